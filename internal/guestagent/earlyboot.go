package guestagent

import (
	"context"
	"os"
	"os/exec"
	"path"
	"sync"
	"time"
)

// Early boot (agentproto.Info.EarlyBootDone). The agent answers long before
// the guest is usable when the image's init is systemd: it is started from
// the initramfs, before systemd mounts /dev/pts and before
// systemd-tmpfiles-setup.service empties /tmp. The guest is ready for
// commands once sysinit.target is reached.
//
// To learn that without polling systemd (each systemctl costs a process,
// expensive under emulation), init installs a runtime unit before it hands
// PID 1 to systemd: a oneshot service wanted by and ordered after
// sysinit.target that creates earlyBootMarker. The agent only stats the
// marker. When the unit could not be installed, or the marker is late (the
// unit failed, e.g. no /bin/sh), the agent asks systemd itself, at most
// every systemctlInterval.

const (
	// earlyBootDir holds the marker; /run is a tmpfs (mounted by init
	// before systemd, which keeps it), so it starts empty at every boot.
	earlyBootDir    = "/run/banger"
	earlyBootMarker = earlyBootDir + "/early-boot-done"
	// earlyBootUnitName is the runtime unit, in systemdRuntimeUnits.
	earlyBootUnitName   = "banger-early-boot.service"
	systemdRuntimeUnits = "/run/systemd/system"
	// earlyBootFallbackAfter: with the unit installed, systemd is asked
	// directly only when the marker has not appeared this long after the
	// agent started.
	earlyBootFallbackAfter = 60 * time.Second
	// systemctlInterval bounds how often systemd is asked.
	systemctlInterval = 2 * time.Second
)

// Early boot signals, reported in agentproto.Info.EarlyBootSignal.
const (
	earlyBootByUnit      = "unit"
	earlyBootBySystemctl = "systemctl"
	earlyBootByAgent     = "agent"
	earlyBootByNone      = "none"
)

// earlyBootUnit is the unit installed by init for systemd guests.
func earlyBootUnit() string {
	return `# Installed by banger's init: tells banger's agent that early boot is over.
[Unit]
Description=banger: early boot done
Documentation=https://github.com/bangerdev/banger/blob/main/docs/agent.md
DefaultDependencies=no
After=sysinit.target
Conflicts=shutdown.target
Before=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c ': > ` + earlyBootMarker + `'
`
}

// earlyBootChecker answers "is early boot over?" for one agent server. It
// is safe for concurrent use and remembers a positive answer.
type earlyBootChecker struct {
	mode    string
	root    string // prefix of the paths it stats ("" in the guest)
	started time.Time
	now     func() time.Time
	// systemdSaysActive reports whether sysinit.target is active.
	systemdSaysActive func(ctx context.Context) bool

	mu       sync.Mutex
	done     bool
	signal   string
	lastAsk  time.Time
	askedYet bool
}

func newEarlyBootChecker(mode string) *earlyBootChecker {
	return &earlyBootChecker{mode: mode, started: time.Now(), now: time.Now, systemdSaysActive: sysinitActive}
}

// sysinitActive asks systemd whether sysinit.target is active (it fails,
// hence false, while systemd's bus is not up yet).
func sysinitActive(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return exec.CommandContext(ctx, "systemctl", "is-active", "--quiet", "sysinit.target").Run() == nil
}

func (c *earlyBootChecker) exists(p string) bool {
	_, err := os.Stat(path.Join("/", c.root, p))
	return err == nil
}

// check reports whether early boot is over and how that is known.
func (c *earlyBootChecker) check(ctx context.Context) (bool, string) {
	switch c.mode {
	case InitModeAgent:
		// Init's own setup (pid1_linux.go) ran before the agent started.
		return true, earlyBootByAgent
	case InitModeSystemd:
	default:
		// Another init (or the agent started by hand): no signal to wait
		// for.
		return true, earlyBootByNone
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return true, c.signal
	}
	if c.exists(earlyBootMarker) {
		c.done, c.signal = true, earlyBootByUnit
		return true, c.signal
	}
	now := c.now()
	unit := c.exists(path.Join(systemdRuntimeUnits, earlyBootUnitName))
	if unit && now.Sub(c.started) < earlyBootFallbackAfter {
		return false, earlyBootByUnit
	}
	if c.askedYet && now.Sub(c.lastAsk) < systemctlInterval {
		return false, earlyBootBySystemctl
	}
	c.askedYet, c.lastAsk = true, now
	if c.systemdSaysActive(ctx) {
		c.done, c.signal = true, earlyBootBySystemctl
		return true, c.signal
	}
	return false, earlyBootBySystemctl
}
