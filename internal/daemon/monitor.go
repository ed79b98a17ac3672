package daemon

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/store"
)

// track registers a running VM and starts its monitor, which records the
// VM as stopped when the VMM exits for any reason.
func (d *Daemon) track(v store.VM, r *runningVM) {
	d.mu.Lock()
	d.running[v.ID] = r
	d.mu.Unlock()
	d.monitors.Add(2)
	go func() {
		defer d.monitors.Done()
		d.capConsole(v.Name, filepath.Join(v.Dir, fileConsole), int64(d.cfg.ConsoleLogMaxMiB)<<20, r.exited)
	}()
	go func() {
		defer d.monitors.Done()
		for {
			err := d.driver.Wait(d.ctx, r.handle)
			if err == nil {
				break
			}
			if d.ctx.Err() != nil {
				return // daemon shutting down: the VM keeps running
			}
			d.log.Warn("wait for vmm failed; retrying", "vm", v.Name, "pid", r.handle.PID, "err", err)
			select {
			case <-d.ctx.Done():
				return
			case <-time.After(time.Second):
			}
		}
		d.mu.Lock()
		if d.running[v.ID] == r {
			delete(d.running, v.ID)
		}
		d.mu.Unlock()
		r.mu.Lock()
		if r.agent != nil {
			r.agent.Close()
		}
		r.mu.Unlock()
		if err := d.driver.Cleanup(r.handle); err != nil {
			d.log.Warn("vmm cleanup", "vm", v.Name, "err", err)
		}
		d.releaseNetwork(v)
		// Only if the row still records the handle watched here: a new
		// boot may have recorded its own since.
		if _, err := d.store.MarkStopped(context.WithoutCancel(d.ctx), v.ID, r.recorded); err != nil {
			d.log.Error("record vm exit (the next daemon start repairs it)", "vm", v.Name, "err", err)
		}
		d.log.Info("vm exited", "vm", v.Name, "pid", r.handle.PID)
		close(r.exited)
		if v.AutoRemove {
			d.autoRemoveIfIdle(v.ID)
		}
	}()
}

// killRunning kills a tracked VMM and waits until its monitor recorded
// the exit.
func (d *Daemon) killRunning(r *runningVM) error {
	ctx, cancel := context.WithTimeout(d.ctx, 20*time.Second)
	defer cancel()
	if err := d.driver.Kill(ctx, r.handle); err != nil {
		return fmt.Errorf("kill vmm (pid %d): %w", r.handle.PID, err)
	}
	select {
	case <-r.exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wait for vmm (pid %d) to exit: %w", r.handle.PID, ctx.Err())
	}
}
