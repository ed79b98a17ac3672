package daemon

import (
	"fmt"
	"os"
	"strings"

	"github.com/bangerdev/banger/internal/bridgenet"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/firewall"
)

// TeardownNetwork removes what bridged networking left on the host and
// nothing else: banger's nftables tables, the accept rules it added to
// iptables-nft's chains, and its bridge (`bangerd --teardown-network`).
// bangerd must not run (the state directory's lock), and no bridged VM
// may run (a TAP of banger's exists exactly while its VMM runs): it
// refuses with ErrFailedPrecondition. VMs, images and the state stay; a
// later bridged start makes everything again.
func TeardownNetwork(cfg config.Daemon) error {
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	lock, err := lockStateDir(cfg.StateDir)
	if err != nil {
		return fmt.Errorf("teardown network: %w (stop bangerd first)", err)
	}
	defer lock.Close()
	taps, err := bridgenet.TAPs()
	if err != nil {
		return fmt.Errorf("teardown network: %w", err)
	}
	if len(taps) > 0 {
		return fmt.Errorf("teardown network: bridged VMs run (TAPs %s): stop them first (banger vm stop): %w", strings.Join(taps, ", "), errdefs.ErrFailedPrecondition)
	}
	subnet, err := cfg.SubnetPrefix()
	if err != nil {
		return err
	}
	fw, err := firewall.New(firewall.Config{Bridge: cfg.BridgeName, Subnet: subnet, Gateway: cfg.Gateway().Addr(), TAPPrefix: bridgenet.TAPPrefix})
	if err != nil {
		return err
	}
	if err := fw.Teardown(); err != nil {
		return fmt.Errorf("teardown network: %w", err)
	}
	if err := bridgenet.DeleteLink(cfg.BridgeName); err != nil {
		return fmt.Errorf("teardown network: %w", err)
	}
	return nil
}
