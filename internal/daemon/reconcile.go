package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
)

// reconcile adopts VMs whose VMM survived a daemon restart and marks the
// others stopped, removing what their VMM left behind. It also repairs what
// a daemon crash in the middle of a request left: a VMM started but never
// recorded is adopted (when the driver can find it), and a VM directory
// without a database row (a create that never finished) is removed, with
// any VMM running in it.
func (d *Daemon) reconcile(ctx context.Context) error {
	vms, err := d.store.ListVMs(ctx)
	if err != nil {
		return err
	}
	known, ids := map[string]bool{}, map[string]bool{}
	for _, v := range vms {
		known[filepath.Base(v.Dir)], ids[v.ID] = true, true
		if err := d.reconcileVM(ctx, v); err != nil {
			return fmt.Errorf("vm %q: %w", v.Name, err)
		}
	}
	// Firewall rules and TAP links of VMs that don't run (a crash between
	// making them and starting the VMM, a VM that exited while no daemon
	// watched) go; running bridged VMs got theirs back in reconcileVM.
	running := map[string]bool{}
	d.mu.Lock()
	for id := range d.running {
		running[id] = true
	}
	d.mu.Unlock()
	if err := d.net.Sweep(running); err != nil {
		d.log.Warn("remove the network leftovers of VMs that no longer run", "err", err)
	}
	dirs, err := os.ReadDir(filepath.Join(d.cfg.StateDir, "vms"))
	if err != nil {
		return err
	}
	for _, e := range dirs {
		if known[e.Name()] {
			continue
		}
		dir := filepath.Join(d.cfg.StateDir, "vms", e.Name())
		if h, ok := d.recoverVMM(dir); ok {
			if err := d.driver.Kill(ctx, h); err != nil {
				d.log.Warn("kill the VMM of an unrecorded VM", "dir", dir, "err", err)
				continue
			}
		}
		if err := d.removeDir(dir); err != nil {
			d.log.Warn("remove an unrecorded VM directory", "dir", dir, "err", err)
			continue
		}
		d.log.Info("removed an unrecorded VM directory (interrupted create)", "dir", dir)
	}
	d.releaseStale(ids)
	return nil
}

// releaseStale removes what the driver keeps outside VM directories (a
// confined QEMU's cgroups) for VMs that no longer exist: a start that
// failed or crashed before its handle was recorded, then an rm that
// could not release it. Failures are logged: they hold no VM back.
func (d *Daemon) releaseStale(ids map[string]bool) {
	r, ok := d.driver.(vmm.Releaser)
	if !ok {
		return
	}
	released, err := r.ReleaseStale(func(id string) bool { return ids[id] })
	if err != nil {
		d.log.Warn("release the vmm resources of removed VMs", "err", err)
	}
	for _, id := range released {
		d.log.Info("released the vmm resources of a removed VM", "id", id)
	}
}

// reconcileVM adopts v's VMM if it still runs, or records v as stopped.
// A store error fails the daemon's start: serving with rows that disagree
// with the processes would act on wrong state.
func (d *Daemon) reconcileVM(ctx context.Context, v store.VM) error {
	if v.AutoRemove {
		if removed, err := d.reconcileAutoRemove(ctx, v); removed || err != nil {
			return err
		}
	}
	var h vmm.Handle
	if v.Handle == "" {
		found, ok := d.recoverVMM(v.Dir)
		if !ok {
			if v.State == api.StateStopped {
				return nil
			}
			v.State = api.StateStopped
			return d.store.UpdateVM(ctx, v)
		}
		d.log.Warn("found a running VMM that was never recorded (daemon crash during start): adopting it", "vm", v.Name, "pid", found.PID)
		h = found
		hj, err := json.Marshal(h)
		if err != nil {
			return fmt.Errorf("encode vmm handle: %w", err)
		}
		v.Handle, v.StartedAt = string(hj), time.Now()
	} else if err := json.Unmarshal([]byte(v.Handle), &h); err != nil {
		d.log.Warn("vm has an unreadable handle: marking it stopped", "vm", v.Name, "err", err)
		v.State, v.Handle = api.StateStopped, ""
		return d.store.UpdateVM(ctx, v)
	}
	if d.driver.Alive(h) {
		v.State = api.StateRunning
		// A running VM's LastError holds only what its network lacks
		// since the last daemon start (a start clears it).
		v.LastError = ""
		if err := d.restoreNetwork(ctx, v); err != nil {
			v.LastError = err.Error()
		}
		if err := d.store.UpdateVM(ctx, v); err != nil {
			return err
		}
		r := &runningVM{handle: h, recorded: v.Handle, exited: make(chan struct{})}
		d.track(v, r)
		d.publishAll(v, r)
		d.watchMainAdopted(v, r)
		d.log.Info("vm adopted", "vm", v.Name, "pid", h.PID)
		return nil
	}
	if err := d.driver.Cleanup(h); err != nil {
		d.log.Warn("clean up stale vmm files", "vm", v.Name, "err", err)
	}
	d.log.Info("vm found stopped", "vm", v.Name)
	v.State, v.Handle = api.StateStopped, ""
	return d.store.UpdateVM(ctx, v)
}

// recoverVMM asks the driver, when it has the ability, for a VMM running
// in dir.
func (d *Daemon) recoverVMM(dir string) (vmm.Handle, bool) {
	r, ok := d.driver.(vmm.Recoverer)
	if !ok {
		return vmm.Handle{}, false
	}
	return r.Recover(dir)
}
