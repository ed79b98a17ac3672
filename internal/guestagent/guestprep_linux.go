package guestagent

import (
	"context"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
)

// guestPrepTimeout bounds the network setup at boot (a card that never
// appears).
const guestPrepTimeout = 15 * time.Second

// prepareGuest runs in init after the root switch, before the image's init
// (mode says which) or the agent as PID 1 takes over: it configures the
// network (netconf_linux.go), writes what keeps the image's network
// managers from undoing it and points its resolver at banger's DNS
// (netfiles.go), makes missing SSH host keys and authorizes the user's SSH
// keys (sshprep.go). Failures are printed on the console and do not stop
// the boot. It returns the network setup's error, for Info.Network.
func prepareGuest(c *initConsole, cfg agentproto.Config, mode string) (netErr string) {
	r := guestRoot{dir: "/", mode: mode, logf: c.logf}
	if cfg.Network != nil {
		ctx, cancel := context.WithTimeout(context.Background(), guestPrepTimeout)
		start := time.Now()
		done, err := configureNetwork(ctx, cfg.Network)
		cancel()
		for _, d := range done {
			c.logf("network: %s", d)
		}
		if err != nil {
			netErr = strings.ReplaceAll(err.Error(), "\n", "; ")
			c.logf("error: network: %s", netErr)
		} else {
			c.logf("network configured in %s", time.Since(start).Round(time.Millisecond))
		}
		if mode == InitModeSystemd {
			if err := mountRun(); err != nil {
				c.logf("warning: %v", err)
			}
		}
		if err := r.writeNetworkFiles(cfg.Network); err != nil {
			c.logf("warning: network files: %s", strings.ReplaceAll(err.Error(), "\n", "; "))
		}
	}
	if err := r.writeHosts(cfg.Hostname); err != nil {
		c.logf("warning: %v", err)
	}
	if r.sshdInstalled() {
		comment := "root@" + cfg.Hostname
		made, err := r.ensureHostKeys(comment)
		if len(made) > 0 {
			c.logf("ssh: made host keys %s", strings.Join(made, " "))
		}
		if err != nil {
			c.logf("warning: ssh host keys: %s", strings.ReplaceAll(err.Error(), "\n", "; "))
		}
	}
	if cfg.SSH != nil && len(cfg.SSH.AuthorizedKeys) > 0 {
		if err := r.authorizeKeys(cfg.SSH); err != nil {
			c.logf("warning: %v", err)
		} else {
			c.logf("ssh: %d key(s) authorized for %s", len(cfg.SSH.AuthorizedKeys), userOrRoot(cfg.SSH.User))
		}
	}
	return netErr
}

func userOrRoot(u string) string {
	if u == "" {
		return "root"
	}
	return u
}
