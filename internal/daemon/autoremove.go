package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
)

// Auto-remove VMs (vm run --rm; Docker's AutoRemove) are removed by the
// daemon, not by the client, so a killed CLI leaves nothing behind. A VM
// whose row has auto_remove set is removed:
//   - when an exec call on it ends, however it ends (the command exited,
//     the client was killed or went away), unless another call is on it;
//   - when a create or start call on it ends because its client went away;
//   - after autoRemoveGrace when a create or start call on it ended and no
//     other call came (the client died between its create and its exec);
//   - when its VMM exits and no call is on it;
//   - at daemon start: no call survives a restart (reconcileAutoRemove).

// attachment counts the calls on an auto-remove VM.
type attachment struct {
	calls int
	timer *time.Timer // a pending removal; nil if none
}

// attach records a call on v and returns the function that ends it; now
// says the VM may go at once when no other call is on it (an exec ended,
// or the client went away), otherwise it waits autoRemoveGrace for the
// client's next call. For a VM without AutoRemove both do nothing.
func (d *Daemon) attach(v store.VM) (detach func(now bool)) {
	if !v.AutoRemove {
		return func(bool) {}
	}
	d.mu.Lock()
	a := d.attached[v.ID]
	if a == nil {
		a = &attachment{}
		d.attached[v.ID] = a
	}
	a.calls++
	d.cancelRemovalLocked(a)
	d.mu.Unlock()
	return func(now bool) {
		d.mu.Lock()
		defer d.mu.Unlock()
		a.calls--
		if a.calls > 0 {
			return
		}
		delay := d.autoRemoveGrace
		if now {
			delay = 0
		}
		d.scheduleRemovalLocked(v.ID, a, delay)
	}
}

// attachCall attaches a call to the VM it names (api.NameParams), as
// attach does; the caller defers detach.
func (d *Daemon) attachCall(ctx context.Context, call *rpc.Call) (v store.VM, detach func(now bool), err error) {
	var p api.NameParams
	if err := call.Decode(&p); err != nil {
		return store.VM{}, nil, err
	}
	v, err = d.store.GetVM(ctx, p.Name)
	if err != nil {
		return store.VM{}, nil, err
	}
	return v, d.attach(v), nil
}

// autoRemoveIfIdle removes an auto-remove VM whose VMM exited, unless a
// call is on it.
func (d *Daemon) autoRemoveIfIdle(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	a := d.attached[id]
	if a == nil {
		a = &attachment{}
		d.attached[id] = a
	}
	if a.calls > 0 {
		return
	}
	d.cancelRemovalLocked(a)
	d.scheduleRemovalLocked(id, a, 0)
}

// scheduleRemovalLocked and cancelRemovalLocked need d.mu. Every scheduled
// removal is counted in d.removals until it ran or was cancelled.
func (d *Daemon) scheduleRemovalLocked(id string, a *attachment, delay time.Duration) {
	if d.ctx.Err() != nil {
		return // shutting down: the next start removes it
	}
	d.removals.Add(1)
	a.timer = time.AfterFunc(delay, func() { d.autoRemove(id, a) })
}

func (d *Daemon) cancelRemovalLocked(a *attachment) {
	if a.timer != nil && a.timer.Stop() {
		d.removals.Done()
	}
	a.timer = nil
}

// stopRemovals cancels pending removals and waits for running ones; the
// daemon calls it when it stops.
func (d *Daemon) stopRemovals() {
	d.mu.Lock()
	for _, a := range d.attached {
		d.cancelRemovalLocked(a)
	}
	d.mu.Unlock()
	d.removals.Wait()
}

func (d *Daemon) autoRemove(id string, a *attachment) {
	defer d.removals.Done()
	d.mu.Lock()
	if d.attached[id] != a || a.calls > 0 {
		d.mu.Unlock()
		return // a call came back
	}
	a.timer = nil
	delete(d.attached, id)
	d.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.WithoutCancel(d.ctx), time.Minute)
	defer cancel()
	if _, err := d.abortBoot(ctx, id); err != nil {
		d.log.Error("auto-remove: abort the boot", "vm_id", id, "err", err)
		return
	}
	lock := d.vmLock(id)
	lock.Lock()
	defer lock.Unlock()
	v, err := d.store.GetVM(ctx, id)
	if errors.Is(err, errdefs.ErrNotFound) {
		return // already removed (the client's own vm rm)
	}
	if err != nil {
		d.log.Error("auto-remove: read the vm (the next daemon start removes it)", "vm_id", id, "err", err)
		return
	}
	if err := d.removeVM(ctx, v, true); err != nil {
		d.log.Error("auto-remove (the next daemon start removes it)", "vm", v.Name, "err", err)
		return
	}
	d.log.Info("auto-removed vm: its command ended or its client went away", "vm", v.Name)
}

// reconcileAutoRemove removes, at daemon start, an auto-remove VM: the
// calls that kept it died with the previous daemon. Its VMM is killed; if
// that fails, the VM is kept (reported false) and reconciled as any other:
// its monitor removes it when the VMM exits.
func (d *Daemon) reconcileAutoRemove(ctx context.Context, v store.VM) (bool, error) {
	var h vmm.Handle
	found := false
	if v.Handle != "" {
		found = json.Unmarshal([]byte(v.Handle), &h) == nil
	}
	if !found {
		h, found = d.recoverVMM(v.Dir)
	}
	if found {
		if err := d.driver.Kill(ctx, h); err != nil {
			d.log.Error("kill the vmm of an auto-remove vm: keeping the vm", "vm", v.Name, "pid", h.PID, "err", err)
			return false, nil
		}
	}
	if err := d.store.DeleteVM(ctx, v.ID); err != nil {
		return false, err
	}
	if err := d.removeDir(v.Dir); err != nil {
		d.log.Warn("remove the files of an auto-remove vm (the next start retries)", "vm", v.Name, "err", err)
	}
	d.log.Info("removed an auto-remove vm whose client is gone (daemon restart)", "vm", v.Name)
	return true, nil
}
