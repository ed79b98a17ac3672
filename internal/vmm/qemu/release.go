package qemu

import (
	"errors"
	"fmt"
	"strings"

	"github.com/bangerdev/banger/internal/cgroup"
	"github.com/bangerdev/banger/internal/vmm"
)

var _ vmm.Releaser = (*Driver)(nil)

// cgroupDirs is the ability of a backend whose groups are plain
// directories, which nothing removes but banger (cgroupfs; a systemd
// scope is stopped and collected by systemd once it is empty).
type cgroupDirs interface {
	Group(name string) *cgroup.Group
	List() ([]string, error)
}

// dirs returns the driver's cgroupfs backend, if it has one.
func (d *Driver) dirs() (cgroupDirs, bool) {
	c := d.cfg.Confine
	if c == nil || c.Cgroups == nil {
		return nil, false
	}
	b, ok := c.Cgroups.(cgroupDirs)
	return b, ok
}

// Release implements vmm.Releaser: it removes the cgroups of VM id, which
// a start that failed or crashed before its Handle was recorded can leave
// (Cleanup removes those a Handle names). A driver without confinement,
// or confining with systemd scopes, keeps nothing.
func (d *Driver) Release(id string) error {
	b, ok := d.dirs()
	if !ok {
		return nil
	}
	if err := b.Group(cgroupName(id)).Remove(); err != nil {
		return fmt.Errorf("release vm %s: %w", id, err)
	}
	return nil
}

// ReleaseStale implements vmm.Releaser: it removes the empty vm-<id>
// cgroups of VMs that keep says no longer exist. A group that holds a
// process (a VMM this daemon doesn't know) is left alone.
func (d *Driver) ReleaseStale(keep func(id string) bool) ([]string, error) {
	b, ok := d.dirs()
	if !ok {
		return nil, nil
	}
	names, err := b.List()
	if err != nil {
		return nil, err
	}
	var released []string
	var errs []error
	for _, name := range names {
		id, ok := strings.CutPrefix(name, "vm-")
		if !ok || id == "" || keep(id) {
			continue
		}
		removed, err := b.Group(name).RemoveIfEmpty()
		if err != nil {
			errs = append(errs, fmt.Errorf("release stale cgroup %s: %w", name, err))
			continue
		}
		if removed {
			released = append(released, id)
		}
	}
	return released, errors.Join(errs...)
}
