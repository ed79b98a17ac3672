package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/disk"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/imagefile"
	"github.com/bangerdev/banger/internal/initramfs"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/undo"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmname"
)

// Files in a VM's directory (state_dir/vms/<id>/).
const (
	fileRootDisk     = "root"
	fileInitrd       = "initrd.img"
	fileConsole      = "console.log"
	fileHostKey      = "agent-host-key"
	fileHostKeyPub   = "agent-host-key.pub"
	fileClientKey    = "agent-client-key"
	fileClientKeyPub = "agent-client-key.pub"
)

// kernelCmdline is what every VM boots with; the driver adds its console.
const kernelCmdline = "rdinit=" + agentproto.InitPath + " panic=-1 quiet"

// runningVM is the daemon's in-memory view of a VM whose VMM runs.
type runningVM struct {
	handle   vmm.Handle
	recorded string        // handle as recorded in the VM's row: the monitor clears the row only while it still holds this
	exited   chan struct{} // closed by the monitor when the VMM exits

	// connecting serialises agent connection attempts, which may last
	// ready_timeout; mu, which readers of agent and info take, is never
	// held while waiting for the guest.
	connecting sync.Mutex
	mu         sync.Mutex
	agent      *agent.Client
	info       *agentproto.Info
}

func (d *Daemon) vmAPI(v store.VM) api.VM {
	out := api.VM{
		ID: v.ID, Name: v.Name, ImageID: v.ImageID, State: v.State, CPUs: v.CPUs, MemoryMiB: v.MemoryMiB,
		DiskBytes: v.DiskBytes, DiskPath: v.DiskPath, DiskFormat: v.DiskFormat, DiskStrategy: v.DiskStrategy,
		VMM: v.VMM, AccelWanted: v.AccelWanted, Dir: v.Dir, ConsoleLog: filepath.Join(v.Dir, fileConsole),
		CreatedAt: v.CreatedAt, LastError: v.LastError, Image: v.ImageName,
	}
	if !v.StartedAt.IsZero() && v.State == api.StateRunning {
		t := v.StartedAt
		out.StartedAt = &t
	}
	d.mu.Lock()
	r := d.running[v.ID]
	d.mu.Unlock()
	if r != nil {
		out.PID, out.Accel = r.handle.PID, r.handle.Accel
		r.mu.Lock()
		if r.info != nil {
			out.Guest = &api.GuestInfo{KernelRelease: r.info.KernelRelease, InitMode: r.info.InitMode, AgentVersion: r.info.AgentVersion, Hostname: r.info.Hostname}
		}
		r.mu.Unlock()
	}
	return out
}

func (d *Daemon) vmCreate(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.VMCreateParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	v, err := d.createVM(ctx, call, p)
	if err != nil {
		return nil, err
	}
	if p.Start {
		if err := d.startVM(ctx, call, v, p.WaitBoot); err != nil {
			return nil, err
		}
		if v, err = d.store.GetVM(ctx, v.ID); err != nil {
			return nil, err
		}
	}
	return d.vmAPI(v), nil
}

func (d *Daemon) createVM(ctx context.Context, call *rpc.Call, p api.VMCreateParams) (v store.VM, err error) {
	switch p.Accel {
	case "", vmm.AccelAuto, vmm.AccelKVM, vmm.AccelTCG:
	default:
		return v, fmt.Errorf("accel %q: want auto, kvm or tcg: %w", p.Accel, errdefs.ErrInvalid)
	}
	if p.CPUs < 0 || p.CPUs > 64 {
		return v, fmt.Errorf("cpus %d: want 1 to 64: %w", p.CPUs, errdefs.ErrInvalid)
	}
	if p.MemoryMiB != 0 && (p.MemoryMiB < 64 || p.MemoryMiB > 1<<20) {
		return v, fmt.Errorf("memory %d MiB: want 64 MiB to 1 TiB: %w", p.MemoryMiB, errdefs.ErrInvalid)
	}
	if p.DiskBytes < 0 {
		return v, fmt.Errorf("disk size %d: %w", p.DiskBytes, errdefs.ErrInvalid)
	}
	if p.Name != "" {
		if err := vmname.Validate(p.Name); err != nil {
			return v, fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
		}
	}
	imageRef := p.Image
	if imageRef == "" {
		imageRef = d.cfg.DefaultImage
	}

	d.create.Lock()
	defer d.create.Unlock()
	im, err := d.store.GetImage(ctx, imageRef)
	if err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			return v, fmt.Errorf("image %q not found: list images with banger image ls, or register one with banger image register: %w", imageRef, errdefs.ErrNotFound)
		}
		return v, err
	}
	if err := imagefile.ValidateArtifacts(imagefile.Artifacts{Rootfs: im.Rootfs, Kernel: im.Kernel, Initrd: im.Initrd, ModulesDir: im.ModulesDir}); err != nil {
		return v, fmt.Errorf("image %q is unusable (were its files moved or removed?): %w: %w", im.Name, err, errdefs.ErrFailedPrecondition)
	}
	name := p.Name
	if name == "" {
		var takenErr error
		name = vmname.Generate(func(n string) bool {
			taken, err := d.store.VMNameTaken(ctx, n)
			takenErr = errors.Join(takenErr, err)
			return taken || err != nil
		})
		if takenErr != nil {
			return v, fmt.Errorf("allocate a vm name: %w", takenErr)
		}
	} else if taken, err := d.store.VMNameTaken(ctx, name); err != nil {
		return v, fmt.Errorf("check vm name: %w", err)
	} else if taken {
		return v, fmt.Errorf("vm %q already exists (as a name or another VM's id): choose another name: %w", name, errdefs.ErrAlreadyExists)
	}
	if p.DiskBytes != 0 && p.DiskBytes < im.SizeBytes {
		return v, fmt.Errorf("disk size %d bytes is smaller than image %q (%d bytes): %w", p.DiskBytes, im.Name, im.SizeBytes, errdefs.ErrInvalid)
	}
	id := newID()
	dir := filepath.Join(d.cfg.StateDir, "vms", id)
	steps := undo.New(d.log.With("op", "create vm", "vm", name))
	defer func() {
		if err != nil {
			_ = steps.Run(ctx)
		}
	}()
	if err := os.Mkdir(dir, 0o700); err != nil {
		return v, fmt.Errorf("create vm dir: %w", err)
	}
	steps.Push("remove vm dir", func(context.Context) error { return os.RemoveAll(dir) })
	call.Progress(api.Progress{Phase: "clone root disk"})
	cl, err := d.cloner.Clone(ctx, disk.CloneRequest{
		Base: im.Rootfs, Dest: filepath.Join(dir, fileRootDisk), Formats: d.driver.DiskFormats(), Size: p.DiskBytes,
	})
	if err != nil {
		return v, fmt.Errorf("clone root disk: %w", err)
	}
	if err := writeVMKeys(dir); err != nil {
		return v, err
	}
	cpus, mem := p.CPUs, p.MemoryMiB
	if cpus == 0 {
		cpus = d.cfg.DefaultCPUs
	}
	if mem == 0 {
		mem = d.cfg.DefaultMemoryMiB
	}
	accel := p.Accel
	if accel == "" {
		accel = d.cfg.Accel
	}
	v = store.VM{
		ID: id, Name: name, ImageID: im.ID, ImageName: im.Name, State: api.StateStopped, CPUs: cpus, MemoryMiB: mem,
		DiskBytes: cl.Size, DiskPath: cl.Path, DiskFormat: cl.Format, DiskStrategy: cl.Strategy,
		VMM: d.driver.Name(), AccelWanted: accel, Dir: dir, CreatedAt: time.Now(),
	}
	if err := d.store.InsertVM(ctx, v); err != nil {
		return v, err
	}
	steps.Release()
	d.log.Info("vm created", "vm", name, "id", id, "image", im.Name, "disk", cl.Strategy, "disk_bytes", cl.Size)
	return v, nil
}

func writeVMKeys(dir string) error {
	k, err := agent.GenerateKeys()
	if err != nil {
		return fmt.Errorf("generate agent keys: %w", err)
	}
	for name, body := range map[string]string{
		fileHostKey: k.HostPrivatePEM, fileHostKeyPub: k.HostPublic, fileClientKey: k.ClientPrivatePEM, fileClientKeyPub: k.ClientPublic,
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			return fmt.Errorf("write agent key: %w", err)
		}
	}
	return nil
}

func readVMKeys(dir string) (agent.Keys, error) {
	hostPub, err := os.ReadFile(filepath.Join(dir, fileHostKeyPub))
	if err != nil {
		return agent.Keys{}, fmt.Errorf("read agent keys: %w", err)
	}
	clientKey, err := os.ReadFile(filepath.Join(dir, fileClientKey))
	if err != nil {
		return agent.Keys{}, fmt.Errorf("read agent keys: %w", err)
	}
	return agent.ParseKeys(string(hostPub), string(clientKey))
}

func (d *Daemon) vmStart(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.VMStartParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	v, err := d.store.GetVM(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	if err := d.startVM(ctx, call, v, p.WaitBoot); err != nil {
		return nil, err
	}
	if v, err = d.store.GetVM(ctx, v.ID); err != nil {
		return nil, err
	}
	return d.vmAPI(v), nil
}

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

	steps := undo.New(d.log.With("op", "start vm", "vm", v.Name))
	lastErr := "" // what the VM's row records on failure (default: err's first line)
	defer func() {
		if err == nil {
			return
		}
		if cause := bootErr(ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("start vm %q: %w", v.Name, cause)
		}
		_ = steps.Run(ctx)
		if lastErr == "" {
			lastErr, _, _ = strings.Cut(err.Error(), "\n")
		}
		d.recordStartFailure(ctx, v.ID, lastErr)
	}()

	if err := d.phase(ctx, call, v, "build initramfs"); err != nil {
		return err
	}
	initrd := filepath.Join(v.Dir, fileInitrd)
	if err := initramfs.Build(ctx, initrd, initramfs.Options{
		AgentBinary: d.agentBinary,
		BaseInitrd:  im.Initrd,
		ModulesDir:  im.ModulesDir,
		Config: agentproto.Config{
			Transport:     "virtio-serial",
			PortName:      agentproto.VirtioPortName,
			HostKey:       string(hostKey),
			AuthorizedKey: string(clientPub),
			Hostname:      v.Name,
		},
	}); err != nil {
		return fmt.Errorf("build initramfs: %w", err)
	}
	steps.Push("remove initramfs", func(context.Context) error { return removeIfExists(initrd) })
	console := filepath.Join(v.Dir, fileConsole)
	if err := removeIfExists(console); err != nil { // each boot starts a fresh console log
		return fmt.Errorf("reset console log: %w", err)
	}

	if err := d.phase(ctx, call, v, "boot"); err != nil {
		return err
	}
	// The VMM outlives this request (drivers never tie the process to
	// ctx); ctx bounds only its start-up, which an abort cuts short.
	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	h, err := d.driver.Start(startCtx, vmm.Spec{
		ID: v.ID, Name: v.Name, Dir: v.Dir, CPUs: v.CPUs, MemoryMiB: v.MemoryMiB,
		Kernel: im.Kernel, Initrd: initrd, Cmdline: kernelCmdline,
		RootDisk: vmm.Disk{Path: v.DiskPath, Format: v.DiskFormat},
		Accel:    v.AccelWanted, ConsoleLog: console,
	})
	cancel()
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
	if _, err := d.connectAgent(readyCtx, r, keys); err != nil {
		if cause := bootErr(ctx); cause != nil {
			return fmt.Errorf("start vm %q: %w", v.Name, cause)
		}
		lastErr = "agent not ready: " + err.Error()
		return fmt.Errorf("vm %q did not become ready: %w; the VM was stopped; console output:\n%s", v.Name, err, tailFile(console, 20))
	}
	steps.Release()
	d.log.Info("vm ready", "vm", v.Name, "ready_after", time.Since(start).Round(time.Millisecond))
	if waitBoot {
		if err := d.phase(ctx, call, v, "wait for the guest's boot"); err != nil {
			return err
		}
		if err := d.waitBoot(readyCtx, r); err != nil {
			return fmt.Errorf("vm %q: wait for boot: %w", v.Name, err)
		}
		d.log.Info("vm booted", "vm", v.Name, "booted_after", time.Since(start).Round(time.Millisecond))
	}
	return nil
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
		if _, err := c.Exec(ctx, agent.ExecOptions{Argv: []string{"systemctl", "is-system-running", "--wait"}, Stdout: &out}); err != nil {
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
		// Only if the row still records the handle watched here: a new
		// boot may have recorded its own since.
		if _, err := d.store.MarkStopped(context.WithoutCancel(d.ctx), v.ID, r.recorded); err != nil {
			d.log.Error("record vm exit (the next daemon start repairs it)", "vm", v.Name, "err", err)
		}
		d.log.Info("vm exited", "vm", v.Name, "pid", r.handle.PID)
		close(r.exited)
	}()
}

func (d *Daemon) connectAgent(ctx context.Context, r *runningVM, keys agent.Keys) (*agent.Client, error) {
	r.connecting.Lock()
	defer r.connecting.Unlock()
	r.mu.Lock()
	if r.agent != nil {
		select {
		case <-r.agent.Done():
			r.agent.Close()
			r.agent = nil
		default:
			c := r.agent
			r.mu.Unlock()
			return c, nil
		}
	}
	r.mu.Unlock()
	dial := func(ctx context.Context) (net.Conn, error) { return d.driver.DialAgent(ctx, r.handle) }
	// Stop waiting as soon as the VMM exits.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-r.exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	c, err := agent.WaitReady(ctx, dial, keys, d.log)
	if err != nil {
		select {
		case <-r.exited:
			return nil, errors.New("the VM exited during boot")
		default:
		}
		return nil, err
	}
	info, err := c.Info(ctx)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("agent info: %w", err)
	}
	r.mu.Lock()
	r.agent, r.info = c, &info
	r.mu.Unlock()
	return c, nil
}

// agentFor returns the agent client of a running VM.
func (d *Daemon) agentFor(ctx context.Context, v store.VM) (*agent.Client, *runningVM, error) {
	d.mu.Lock()
	r := d.running[v.ID]
	d.mu.Unlock()
	if r == nil || v.State != api.StateRunning {
		return nil, nil, fmt.Errorf("vm %q is %s: start it with banger vm start %s: %w", v.Name, v.State, v.Name, errdefs.ErrFailedPrecondition)
	}
	keys, err := readVMKeys(v.Dir)
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, d.cfg.ReadyTimeout.Duration)
	defer cancel()
	c, err := d.connectAgent(ctx, r, keys)
	if err != nil {
		return nil, nil, fmt.Errorf("vm %q: guest agent unreachable: %w", v.Name, err)
	}
	return c, r, nil
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

func (d *Daemon) vmStop(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.VMStopParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	timeout := d.cfg.StopTimeout.Duration
	if p.Timeout != "" {
		t, err := time.ParseDuration(p.Timeout)
		if err != nil || t <= 0 {
			return nil, fmt.Errorf("timeout %q: want a positive duration like 30s: %w", p.Timeout, errdefs.ErrInvalid)
		}
		timeout = t
	}
	return d.stopOrKill(ctx, call, p.Name, false, timeout)
}

func (d *Daemon) vmKill(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.NameParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	return d.stopOrKill(ctx, call, p.Name, true, 0)
}

func (d *Daemon) stopOrKill(ctx context.Context, call *rpc.Call, name string, kill bool, timeout time.Duration) (any, error) {
	v, err := d.store.GetVM(ctx, name)
	if err != nil {
		return nil, err
	}
	aborted, err := d.abortBoot(ctx, v.ID)
	if err != nil {
		return nil, fmt.Errorf("abort the boot of vm %q: %w", v.Name, err)
	}
	lock := d.vmLock(v.ID)
	lock.Lock()
	defer lock.Unlock()
	d.mu.Lock()
	r := d.running[v.ID]
	d.mu.Unlock()
	switch {
	case r == nil && aborted:
		// The boot was aborted and unwound: the VM is stopped.
	case r == nil:
		return nil, fmt.Errorf("vm %q is not running: %w", v.Name, errdefs.ErrFailedPrecondition)
	case kill:
		if err := d.killRunning(r); err != nil {
			return nil, fmt.Errorf("kill vm %q: %w", v.Name, err)
		}
	default:
		if err := d.stopRunning(ctx, call, v, r, timeout); err != nil {
			return nil, err
		}
	}
	if v, err = d.store.GetVM(ctx, v.ID); err != nil {
		return nil, err
	}
	return d.vmAPI(v), nil
}

// stopRunning stops gracefully: through the agent, then ACPI, then kill.
// When ctx ends (the client gave up) it escalates no further: the VM keeps
// running, or keeps shutting down, and ctx's error is returned.
func (d *Daemon) stopRunning(ctx context.Context, call *rpc.Call, v store.VM, r *runningVM, timeout time.Duration) error {
	waitExit := func(t time.Duration) bool {
		select {
		case <-r.exited:
			return true
		case <-time.After(t):
			return false
		case <-ctx.Done():
			return false
		}
	}
	call.Progress(api.Progress{Phase: "shutdown through agent"})
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	keys, err := readVMKeys(v.Dir)
	var c *agent.Client
	if err == nil {
		c, err = d.connectAgent(actx, r, keys)
	}
	if err == nil {
		err = c.Shutdown(actx, false)
	}
	// A connection lost after the request was sent is the guest going
	// down (the monitor closes the agent client when the VMM exits, maybe
	// before the reply was read): wait for the exit as for a reply.
	asked := err == nil || errors.Is(err, agent.ErrConnectionLost)
	if !asked {
		d.log.Info("shutdown through the agent failed; trying ACPI", "vm", v.Name, "err", err)
	}
	cancel()
	if asked && waitExit(timeout) {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("stop vm %q: %w", v.Name, err)
	}
	call.Progress(api.Progress{Phase: "ACPI power button"})
	if err := d.driver.Shutdown(ctx, r.handle); err == nil && waitExit(timeout/2) {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("stop vm %q: %w", v.Name, err)
	}
	d.log.Warn("vm did not stop gracefully: killing it", "vm", v.Name, "timeout", timeout)
	call.Progress(api.Progress{Phase: "kill"})
	if err := d.killRunning(r); err != nil {
		return fmt.Errorf("stop vm %q: %w", v.Name, err)
	}
	return nil
}

// vmRemove deletes the VM's row first, then its files: a crash in between
// leaves a directory without a row, which reconcile removes at the next
// start. A boot in progress is aborted (with or without force).
func (d *Daemon) vmRemove(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.VMRemoveParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	v, err := d.store.GetVM(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	if _, err := d.abortBoot(ctx, v.ID); err != nil {
		return nil, fmt.Errorf("abort the boot of vm %q: %w", v.Name, err)
	}
	lock := d.vmLock(v.ID)
	lock.Lock()
	defer lock.Unlock()
	if err := d.removeVM(ctx, v, p.Force); err != nil {
		return nil, err
	}
	return nil, nil
}

// removeVM kills the VM's VMM (when force), deletes its row, then its
// files. The caller holds the VM's lock.
func (d *Daemon) removeVM(ctx context.Context, v store.VM, force bool) error {
	d.mu.Lock()
	r := d.running[v.ID]
	d.mu.Unlock()
	if r != nil {
		if !force {
			return fmt.Errorf("vm %q is running: stop it first, or use rm -f: %w", v.Name, errdefs.ErrFailedPrecondition)
		}
		if err := d.killRunning(r); err != nil {
			return fmt.Errorf("remove vm %q: %w", v.Name, err)
		}
	}
	if err := d.store.DeleteVM(ctx, v.ID); err != nil {
		return fmt.Errorf("remove vm %q: %w", v.Name, err)
	}
	d.mu.Lock()
	delete(d.locks, v.ID)
	d.mu.Unlock()
	if err := d.removeDir(v.Dir); err != nil {
		// The row is gone: reconcile removes the directory at the next start.
		d.log.Warn("remove vm files (the next daemon start retries)", "vm", v.Name, "dir", v.Dir, "err", err)
	}
	d.log.Info("vm removed", "vm", v.Name)
	return nil
}

func (d *Daemon) vmList(ctx context.Context, call *rpc.Call) (any, error) {
	vms, err := d.store.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.VM, 0, len(vms))
	for _, v := range vms {
		out = append(out, d.vmAPI(v))
	}
	return out, nil
}

func (d *Daemon) vmInspect(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.NameParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	v, err := d.store.GetVM(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	return d.vmAPI(v), nil
}

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
	known := map[string]bool{}
	for _, v := range vms {
		known[filepath.Base(v.Dir)] = true
		if err := d.reconcileVM(ctx, v); err != nil {
			return fmt.Errorf("vm %q: %w", v.Name, err)
		}
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
	return nil
}

// reconcileVM adopts v's VMM if it still runs, or records v as stopped.
// A store error fails the daemon's start: serving with rows that disagree
// with the processes would act on wrong state.
func (d *Daemon) reconcileVM(ctx context.Context, v store.VM) error {
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
		if err := d.store.UpdateVM(ctx, v); err != nil {
			return err
		}
		d.track(v, &runningVM{handle: h, recorded: v.Handle, exited: make(chan struct{})})
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

func (d *Daemon) closeAgents() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, r := range d.running {
		r.mu.Lock()
		if r.agent != nil {
			r.agent.Close()
		}
		r.mu.Unlock()
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
