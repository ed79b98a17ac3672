package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/initramfs"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/undo"
	"github.com/bangerdev/banger/internal/vmm"
)

// startVM boots a stopped VM and waits until its agent answers. Each step
// that creates something (the initramfs, the VMM process) registers its undo
// on a stack; when a later step fails, or the boot is aborted (vm stop, kill
// or rm, or the client going away), the stack unwinds in reverse order and
// the VM stays, stopped, with the error recorded.
//
// A start registers itself in d.booting before it takes the VM's lock, so a
// second start of the same VM fails at once (it says the VM is booting),
// and stop, kill and rm abort the boot at whatever phase it is in and wait
// only for its unwinding (abortBoot), never for the whole boot.
func (d *Daemon) startVM(ctx context.Context, call *rpc.Call, v store.VM, waitBoot bool) (err error) {
	ctx, b, err := d.beginBoot(ctx, v)
	if err != nil {
		return err
	}
	defer d.endBoot(v.ID, b)
	lock := d.vmLock(v.ID)
	lock.Lock()
	defer lock.Unlock()
	if err := bootErr(ctx); err != nil {
		return fmt.Errorf("start vm %q: %w", v.Name, err)
	}
	v, err = d.store.GetVM(ctx, v.ID)
	if err != nil {
		return err
	}
	if v.State == api.StateRunning {
		return fmt.Errorf("vm %q is already running: %w", v.Name, errdefs.ErrFailedPrecondition)
	}
	im, err := d.store.GetImage(ctx, v.ImageID)
	if err != nil {
		return err
	}
	k, err := d.imageReady(ctx, v, im) // the VM boots k with im's rootfs
	if err != nil {
		return err
	}
	hostKey, err := os.ReadFile(filepath.Join(v.Dir, fileHostKey))
	if err != nil {
		return fmt.Errorf("read agent key: %w", err)
	}
	clientPub, err := os.ReadFile(filepath.Join(v.Dir, fileClientKeyPub))
	if err != nil {
		return fmt.Errorf("read agent key: %w", err)
	}
	keys, err := readVMKeys(v.Dir)
	if err != nil {
		return err
	}

	tl := d.newBootTimeline(v)
	steps := undo.New(d.log.With("op", "start vm", "vm", v.Name))
	lastErr := ""  // what the VM's row records on failure (default: err's first line)
	ready := false // the agent answered: the VM runs, whatever happens next
	defer func() {
		if err == nil || ready {
			return
		}
		if cause := bootErr(ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("start vm %q: %w", v.Name, cause)
		}
		_ = steps.Run(ctx)
		if lastErr == "" {
			lastErr, _, _ = strings.Cut(err.Error(), "\n")
		}
		tl.fail(lastErr)
		d.recordStartFailure(ctx, v.ID, lastErr)
	}()

	if v, err = d.readdress(ctx, v); err != nil {
		return err
	}
	netCfg, err := d.agentNetwork(v)
	if err != nil {
		return err
	}

	imCfg, err := imageConfig(im)
	if err != nil {
		return err
	}
	// A new boot: the main process's last exit and output go.
	d.mu.Lock()
	delete(d.mainWatches, v.ID)
	d.mu.Unlock()
	if err := removeIfExists(filepath.Join(v.Dir, fileMainExit)); err != nil {
		return fmt.Errorf("reset the main process's exit: %w", err)
	}

	tl.begin(api.PhaseInitramfs)
	if err := d.phase(ctx, call, v, "build initramfs"); err != nil {
		return err
	}
	initrd := filepath.Join(v.Dir, fileInitrd)
	if err := initramfs.Build(ctx, initrd, initramfs.Options{
		AgentBinary: d.agentBinary,
		BaseInitrd:  k.Initrd,
		ModulesDir:  k.ModulesDir,
		Kernel:      k.Kernel,
		Config: agentproto.Config{
			Transport:     "virtio-serial",
			PortName:      agentproto.VirtioPortName,
			HostKey:       string(hostKey),
			AuthorizedKey: string(clientPub),
			Hostname:      v.Name,
			Network:       netCfg,
			SSH:           agentSSH(v, im),
			Process:       agentProcess(imCfg, v.Cmd, v.Restart),
			ExecDefaults:  agentExecDefaults(imCfg),
		},
	}); err != nil {
		return fmt.Errorf("build initramfs: %w", initramfsErr(err))
	}
	steps.Push("remove initramfs", func(context.Context) error { return removeIfExists(initrd) })
	console := filepath.Join(v.Dir, fileConsole)
	if err := removeIfExists(console); err != nil { // each boot starts a fresh console log
		return fmt.Errorf("reset console log: %w", err)
	}

	tl.begin(api.PhaseVMMStart)
	if v.Network == api.NetworkBridge {
		if err := d.phase(ctx, call, v, "network"); err != nil {
			return err
		}
	}
	netCard, closeTAP, err := d.setupNetwork(ctx, v, steps)
	defer closeTAP()
	if err != nil {
		return err
	}
	if err := d.phase(ctx, call, v, "boot"); err != nil {
		return err
	}
	// The VMM outlives this request (drivers never tie the process to
	// ctx); ctx bounds only its start-up, which an abort cuts short.
	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	h, err := d.driver.Start(startCtx, vmm.Spec{
		ID: v.ID, Name: v.Name, Dir: v.Dir, CPUs: v.CPUs, MemoryMiB: v.MemoryMiB,
		Kernel: k.Kernel, Initrd: initrd, Cmdline: kernelCmdline,
		RootDisk: vmm.Disk{Path: v.DiskPath, Format: v.DiskFormat},
		Accel:    v.AccelWanted, ConsoleLog: console, Net: netCard,
	})
	cancel()
	closeTAP() // the VMM holds its own descriptor: the TAP lives as long as it
	if err != nil {
		lastErr = err.Error()
		return fmt.Errorf("start vm %q: %w", v.Name, err)
	}
	var r *runningVM // set once the monitor watches the VMM
	steps.Push("kill vmm", func(ctx context.Context) error {
		if r != nil {
			return d.killRunning(r)
		}
		return d.driver.Kill(ctx, h)
	})
	hj, err := json.Marshal(h)
	if err != nil {
		return fmt.Errorf("encode vmm handle: %w", err)
	}
	v.State, v.Handle, v.StartedAt, v.LastError = api.StateRunning, string(hj), time.Now(), ""
	if err := d.store.UpdateVM(ctx, v); err != nil {
		return fmt.Errorf("record vm %q as running: %w", v.Name, err)
	}
	r = &runningVM{handle: h, recorded: v.Handle, exited: make(chan struct{})}
	d.track(v, r)
	d.log.Info("vm booting", "vm", v.Name, "pid", h.PID, "accel", h.Accel)

	if err := d.phase(ctx, call, v, "wait for agent"); err != nil {
		return err
	}
	readyCtx, cancelReady := context.WithTimeout(ctx, d.cfg.ReadyTimeout.Duration)
	defer cancelReady()
	start := time.Now()
	if err := d.waitReady(readyCtx, call, v, r, keys, tl); err != nil {
		if cause := bootErr(ctx); cause != nil {
			return fmt.Errorf("start vm %q: %w", v.Name, cause)
		}
		err = fmt.Errorf("vm %q did not become ready: %w", v.Name, tl.stuck(err))
		lastErr = err.Error()
		return fmt.Errorf("%w%s; the VM was stopped; console output:\n%s", err, modulesHint(console), tailFile(console, 20))
	}
	steps.Release()
	ready = true
	d.log.Info("vm ready", "vm", v.Name, "ready_after", time.Since(start).Round(time.Millisecond))
	d.recordHostKeys(ctx, v, r)
	d.publishAll(v, r)
	d.watchMain(v, r)
	if waitBoot {
		if err := d.phase(ctx, call, v, "wait for the guest's boot"); err != nil {
			tl.fail(err.Error())
			return err
		}
		if err := d.waitBoot(readyCtx, r); err != nil {
			err = fmt.Errorf("vm %q: wait for boot: %w", v.Name, tl.stuck(err))
			tl.fail(err.Error())
			return err
		}
		tl.finish()
		d.log.Info("vm booted", "vm", v.Name, "booted_after", time.Since(start).Round(time.Millisecond))
	} else {
		d.recordFullBoot(v, r, tl)
	}
	return nil
}

// recordHostKeys keeps the guest's SSH host keys the agent reported (over
// the agent's channel, which the guest network can't forge) in the VM's
// row: vm.ssh_info hands them to clients, which pin them.
func (d *Daemon) recordHostKeys(ctx context.Context, v store.VM, r *runningVM) {
	r.mu.Lock()
	var keys []string
	if r.info != nil {
		keys = r.info.SSHHostKeys
	}
	r.mu.Unlock()
	if len(keys) == 0 || slices.Equal(keys, v.SSHHostKeys) {
		return
	}
	if err := d.store.SetSSHHostKeys(context.WithoutCancel(ctx), v.ID, keys); err != nil {
		d.log.Error("record the guest's ssh host keys", "vm", v.Name, "err", err)
	}
}

// boot is a start in progress (see startVM).
type boot struct {
	abort context.CancelCauseFunc
	done  chan struct{} // closed once the start returned and released the VM's lock
}

// errBootAborted is the cause of a boot that vm stop, kill or rm ended.
var errBootAborted = fmt.Errorf("boot aborted by a stop or remove of the VM: %w", context.Canceled)

// beginBoot registers a start of v, or fails at once when one is running.
// The returned context ends when the boot is aborted or ctx ends.
func (d *Daemon) beginBoot(ctx context.Context, v store.VM) (context.Context, *boot, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.booting[v.ID] != nil {
		return nil, nil, fmt.Errorf("vm %q is booting: wait for its start to finish, or abort it with banger vm stop %s: %w",
			v.Name, v.Name, errdefs.ErrFailedPrecondition)
	}
	ctx, abort := context.WithCancelCause(ctx)
	b := &boot{abort: abort, done: make(chan struct{})}
	d.booting[v.ID] = b
	return ctx, b, nil
}

func (d *Daemon) endBoot(id string, b *boot) {
	d.mu.Lock()
	if d.booting[id] == b {
		delete(d.booting, id)
	}
	d.mu.Unlock()
	b.abort(nil)
	close(b.done)
}

// abortBoot ends a start of the VM in progress, at any phase, and waits
// until the start has unwound (the VMM it started is gone) and released the
// VM's lock, or ctx ends. It reports whether a boot was running.
func (d *Daemon) abortBoot(ctx context.Context, id string) (bool, error) {
	d.mu.Lock()
	b := d.booting[id]
	d.mu.Unlock()
	if b == nil {
		return false, nil
	}
	b.abort(errBootAborted)
	select {
	case <-b.done:
		return true, nil
	case <-ctx.Done():
		return true, ctx.Err()
	}
}

// bootErr is why a boot's context ended (errBootAborted, or the client's
// cancellation), or nil.
func bootErr(ctx context.Context) error {
	if ctx.Err() == nil {
		return nil
	}
	return context.Cause(ctx)
}

// phase reports a boot phase to the client (and to the test hook) and
// returns the boot's error if it was aborted.
func (d *Daemon) phase(ctx context.Context, call *rpc.Call, v store.VM, name string) error {
	call.Progress(api.Progress{Phase: name})
	if d.onPhase != nil {
		d.onPhase(ctx, v.Name, name)
	}
	if err := bootErr(ctx); err != nil {
		return fmt.Errorf("start vm %q (%s): %w", v.Name, name, err)
	}
	return nil
}

// recordStartFailure marks the VM stopped with the start's error. The start
// already failed: a store error here is logged (reconcile repairs the row at
// the next daemon start).
func (d *Daemon) recordStartFailure(ctx context.Context, id, lastErr string) {
	ctx = context.WithoutCancel(ctx)
	v, err := d.store.GetVM(ctx, id)
	if err == nil {
		v.State, v.Handle, v.LastError = api.StateStopped, "", lastErr
		err = d.store.UpdateVM(ctx, v)
	}
	if err != nil {
		d.log.Error("record a failed start", "vm_id", id, "start_err", lastErr, "err", err)
	}
}

func removeIfExists(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// waitBoot waits until the guest's init has finished booting. The agent is
// ready early (before systemd starts services); with systemd this waits for
// "systemctl is-system-running" to leave "starting" (running and degraded
// both count as booted). Other inits give no such signal: nothing to wait
// for.
func (d *Daemon) waitBoot(ctx context.Context, r *runningVM) error {
	r.mu.Lock()
	c, info := r.agent, r.info
	r.mu.Unlock()
	if c == nil || info == nil || info.InitMode != "systemd" {
		return nil
	}
	for {
		var out strings.Builder
		if _, err := c.Exec(ctx, agent.ExecOptions{Argv: []string{"systemctl", "is-system-running", "--wait"}, User: "root", Stdout: &out}); err != nil {
			return err
		}
		state := strings.TrimSpace(out.String())
		switch state {
		case "running", "degraded", "maintenance", "stopping":
			d.log.Debug("guest boot finished", "state", state)
			return nil
		}
		// "offline": systemd is not answering on its bus yet (the agent
		// starts before it); "initializing"/"starting" end --wait early only
		// when the bus drops. Ask again.
		select {
		case <-ctx.Done():
			return fmt.Errorf("systemd still %q: %w", state, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func tailFile(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(no console output)"
	}
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}
