package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/cgroup"
)

// DefaultUser is the system user confined QEMU processes run as.
const DefaultUser = "banger-vmm"

// ConfineOptions are what NewConfine needs from the daemon's configuration.
type ConfineOptions struct {
	// User runs QEMU; created (a system user and group, no home, no login
	// shell) when missing. Default DefaultUser. Ignored with UIDFirst.
	User string
	// UIDFirst and UIDLast, when set, give each QEMU its own uid from this
	// range instead of User (see Confine).
	UIDFirst, UIDLast int
	// CgroupRoot is where cgroupfs is mounted. Default cgroup.DefaultRoot.
	CgroupRoot string
	// CgroupParent holds the VMs' cgroups. Default "banger".
	CgroupParent string
	// MemoryOverheadMiB, see Confine.
	MemoryOverheadMiB int
	// SystemdBus is the D-Bus address of systemd's manager. When systemd
	// is the host's init, VM cgroups are transient scopes made through
	// it. Default cgroup.SystemBusAddress.
	SystemdBus string
}

// fixHint ends every confinement set-up error.
const fixHint = "fix the host, or set vmm_confine = false in bangerd.toml to run QEMU unconfined (for debugging only)"

// NewConfine prepares confinement on this host: the user (created if
// missing) and the cgroup hierarchy. It never fails: when something is
// missing, the returned Confine carries the error and every Start fails
// with it, so that no VM runs unconfined by accident.
func NewConfine(ctx context.Context, o ConfineOptions) *Confine {
	if o.User == "" {
		o.User = DefaultUser
	}
	if o.CgroupRoot == "" {
		o.CgroupRoot = cgroup.DefaultRoot
	}
	if o.CgroupParent == "" {
		o.CgroupParent = "banger"
	}
	c := &Confine{User: o.User, MemoryOverheadMiB: o.MemoryOverheadMiB}
	var errs []error
	if os.Geteuid() != 0 {
		errs = append(errs, fmt.Errorf("bangerd runs as uid %d, and only root can start QEMU as another user and create cgroups", os.Geteuid()))
	} else if o.UIDFirst > 0 {
		if o.UIDLast < o.UIDFirst {
			errs = append(errs, fmt.Errorf("uid range %d-%d is empty", o.UIDFirst, o.UIDLast))
		}
		c.User, c.UIDFirst, c.UIDLast = "", o.UIDFirst, o.UIDLast
	} else {
		uid, gid, err := EnsureUser(ctx, o.User)
		if err != nil {
			errs = append(errs, err)
		}
		c.UID, c.GID = uid, gid
	}
	info, err := cgroup.Detect(o.CgroupRoot)
	if err == nil {
		c.Cgroups, err = newBackend(info, o)
	}
	if err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		c.Err = fmt.Errorf("%w; %s", errors.Join(errs...), fixHint)
	}
	return c
}

// EnsureUser returns the uid and gid of the user name, creating it as a
// system user (with a group of the same name, no home, no login shell)
// when it does not exist. root is refused.
func EnsureUser(ctx context.Context, name string) (uid, gid int, err error) {
	u, err := user.Lookup(name)
	var unknown user.UnknownUserError
	if errors.As(err, &unknown) {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		out, cerr := exec.CommandContext(ctx, "useradd", "--system", "--user-group", "--no-create-home",
			"--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
			"--comment", "banger VMM (confined QEMU)", name).CombinedOutput()
		if cerr != nil {
			return 0, 0, fmt.Errorf("create vmm user %s: %w: %s", name, cerr, strings.TrimSpace(string(out)))
		}
		u, err = user.Lookup(name)
	}
	if err != nil {
		return 0, 0, fmt.Errorf("vmm user %s: %w", name, err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	if uid == 0 || gid == 0 {
		return 0, 0, fmt.Errorf("vmm user %s has uid %d gid %d: it must not be root", name, uid, gid)
	}
	return uid, gid, nil
}

// newBackend returns systemd scopes when systemd is the host's init (or a
// bus was given), cgroupfs otherwise.
func newBackend(info cgroup.Info, o ConfineOptions) (cgroup.Backend, error) {
	if info.Systemd || o.SystemdBus != "" {
		bus := o.SystemdBus
		if bus == "" {
			bus = cgroup.SystemBusAddress
		}
		return cgroup.NewSystemd(info, o.CgroupParent, bus)
	}
	return cgroup.NewManager(info, o.CgroupParent)
}
