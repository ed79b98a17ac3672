package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/bridgenet"
	"github.com/bangerdev/banger/internal/disk"
	"github.com/bangerdev/banger/internal/errdefs"
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

// errExitedDuringBoot is what a wait for the guest reports when the VMM
// exits under it.
var errExitedDuringBoot = errors.New("the VM exited during boot")

// hasExited reports whether the VMM has exited.
func (r *runningVM) hasExited() bool {
	select {
	case <-r.exited:
		return true
	default:
		return false
	}
}

// untilExit returns a context that ends with ctx or as soon as the VMM
// exits, so that no wait for the guest outlasts its VM.
func (r *runningVM) untilExit(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-r.exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

func (d *Daemon) vmAPI(v store.VM) api.VM {
	out := api.VM{
		ID: v.ID, Name: v.Name, ImageID: v.ImageID, State: v.State, CPUs: v.CPUs, MemoryMiB: v.MemoryMiB,
		DiskBytes: v.DiskBytes, DiskPath: v.DiskPath, DiskFormat: v.DiskFormat, DiskStrategy: v.DiskStrategy,
		VMM: v.VMM, AccelWanted: v.AccelWanted, Dir: v.Dir, ConsoleLog: filepath.Join(v.Dir, fileConsole),
		CreatedAt: v.CreatedAt, LastError: v.LastError, Image: v.ImageName, AutoRemove: v.AutoRemove,
		BootTimeline: d.timelineAPI(v, time.Now()), Network: d.networkAPI(v),
		Kernel: v.KernelName, Restart: v.Restart,
	}
	if !v.StartedAt.IsZero() && v.State == api.StateRunning {
		t := v.StartedAt
		out.StartedAt = &t
	}
	d.mu.Lock()
	r := d.running[v.ID]
	if d.booting[v.ID] != nil {
		out.State = api.StateStarting
	}
	d.mu.Unlock()
	if r != nil {
		out.PID, out.Accel = r.handle.PID, r.handle.Accel
		if c := r.handle.Confinement; c != nil {
			ac := api.Confinement(*c)
			out.Confinement = &ac
		}
		r.mu.Lock()
		if r.info != nil {
			out.Guest = &api.GuestInfo{KernelRelease: r.info.KernelRelease, InitMode: r.info.InitMode, AgentVersion: r.info.AgentVersion, Hostname: r.info.Hostname}
		}
		r.mu.Unlock()
	}
	d.mainAPI(&out, v, r)
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
	detach := d.attach(v)
	defer func() { detach(ctx.Err() != nil) }() // client gone: no call will come back
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
		return v, fmt.Errorf("accel %s: want auto, kvm or tcg: %w", errdefs.Quote(p.Accel), errdefs.ErrInvalid)
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
	if err := checkRestart(p.Restart); err != nil {
		return v, err
	}
	if p.Name != "" {
		if err := vmname.Validate(p.Name); err != nil {
			return v, fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
		}
	}
	netw, err := d.checkNetwork(p, call.Peer.UID)
	if err != nil {
		return v, err
	}
	if p.Name != "" {
		// Checked again under the create lock; here so that a taken name
		// fails before a pull that may take minutes.
		if taken, err := d.store.VMNameTaken(ctx, p.Name); err != nil {
			return v, fmt.Errorf("check vm name: %w", err)
		} else if taken {
			return v, fmt.Errorf("vm %q already exists (as a name or another VM's id): choose another name: %w", p.Name, errdefs.ErrAlreadyExists)
		}
	}
	imageRef := p.Image
	if imageRef == "" {
		imageRef = d.cfg.DefaultImageName
	}
	// Pulled first when not local (from a catalog, or an OCI reference's
	// registry), before the create lock: a pull may take minutes.
	// Local OCI sources are read as root: imported for admins only.
	admin := d.authorize(call.Peer, rpc.PermAdmin) == nil
	pulled, err := d.ensureImage(ctx, imageRef, admin, call.Progress)
	if err != nil {
		return v, err
	}
	imageRef = pulled.ID

	// The kernel is resolved (and, missing, may be pulled) before the
	// create lock is taken: a long pull must not hold image and kernel rm
	// back. usableImage finds it again under the lock.
	kernelID := ""
	if p.Kernel != "" {
		k, err := d.kernelForCreate(ctx, p.Kernel, call.Progress)
		if err != nil {
			return v, err
		}
		kernelID = k.ID
	}

	d.create.RLock()
	defer d.create.RUnlock()
	im, err := d.store.GetImage(ctx, imageRef)
	if err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			return v, fmt.Errorf("image %s not found: list images with banger image ls, or register one with banger image register: %w", errdefs.Quote(imageRef), errdefs.ErrNotFound)
		}
		return v, err
	}
	bootK, err := d.usableImage(ctx, im, kernelID)
	if err != nil {
		return v, err
	}
	name := p.Name
	if name == "" {
		var takenErr error
		name = vmname.Generate(func(n string) bool {
			taken, err := d.reserveName(ctx, n)
			takenErr = errors.Join(takenErr, err)
			return taken || err != nil
		})
		if takenErr != nil {
			return v, fmt.Errorf("allocate a vm name: %w", takenErr)
		}
	} else if taken, err := d.reserveName(ctx, name); err != nil {
		return v, fmt.Errorf("check vm name: %w", err)
	} else if taken {
		return v, fmt.Errorf("vm %q already exists (as a name or another VM's id): choose another name: %w", name, errdefs.ErrAlreadyExists)
	}
	defer func() {
		d.namingMu.Lock()
		delete(d.naming, name)
		d.namingMu.Unlock()
	}()
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
	cloneStart := time.Now()
	cl, err := d.cloner.Clone(ctx, disk.CloneRequest{
		Base: im.Rootfs, Dest: filepath.Join(dir, fileRootDisk), Formats: d.driver.DiskFormats(), Size: p.DiskBytes,
	})
	if err != nil {
		return v, fmt.Errorf("clone root disk: %w", err)
	}
	if err := recordClone(dir, cloneStart, time.Since(cloneStart)); err != nil {
		d.log.Warn("record boot timeline", "vm", name, "err", err)
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
		VMM: d.driver.Name(), AccelWanted: accel, Dir: dir, CreatedAt: time.Now(), AutoRemove: p.AutoRemove,
		PublishAll: p.PublishAll, Network: netw.mode, Allow: netw.allow, SSHKeys: netw.sshKeys, Ports: netw.ports,
		KernelID: kernelID, KernelName: bootK.Name, Cmd: p.Cmd, Restart: p.Restart,
	}
	if netw.mode != api.NetworkNone {
		v.MAC = bridgenet.MAC(id).String()
	}
	if netw.mode == api.NetworkBridge {
		// The address is chosen in the insert's transaction, under the
		// create lock: never two VMs on one address.
		v.TAP = bridgenet.TAPName(id)
		subnet, err := d.cfg.SubnetPrefix()
		if err != nil {
			return v, err
		}
		if v, err = d.store.InsertVMWithAddress(ctx, v, subnet); err != nil {
			return v, err
		}
	} else if err := d.store.InsertVM(ctx, v); err != nil {
		return v, err
	}
	steps.Release()
	d.log.Info("vm created", "vm", name, "id", id, "image", im.Name, "disk", cl.Strategy, "disk_bytes", cl.Size, "network", v.Network, "ip", v.IP)
	return v, nil
}

// reserveName takes name for a create unless a VM or another create has
// it (as a name, or a VM as its id); it reports whether it was taken.
// The create releases it once its row is in (or it failed). The name is
// reserved before the store is asked, so that the lock is not held while
// the query waits for the store's connection (parallel creates queued
// behind it).
func (d *Daemon) reserveName(ctx context.Context, name string) (bool, error) {
	d.namingMu.Lock()
	if d.naming[name] {
		d.namingMu.Unlock()
		return true, nil
	}
	d.naming[name] = true
	d.namingMu.Unlock()
	taken, err := d.store.VMNameTaken(ctx, name)
	if err != nil || taken {
		d.namingMu.Lock()
		delete(d.naming, name)
		d.namingMu.Unlock()
		return taken, err
	}
	return false, nil
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
	detach := d.attach(v)
	defer func() { detach(ctx.Err() != nil) }() // client gone: no call will come back
	if err := d.startVM(ctx, call, v, p.WaitBoot); err != nil {
		return nil, err
	}
	if v, err = d.store.GetVM(ctx, v.ID); err != nil {
		return nil, err
	}
	return d.vmAPI(v), nil
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
			return nil, fmt.Errorf("timeout %s: want a positive duration like 30s: %w", errdefs.Quote(p.Timeout), errdefs.ErrInvalid)
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
	delete(d.mainWatches, v.ID)
	d.mu.Unlock()
	if err := d.removeDir(v.Dir); err != nil {
		// The row is gone: reconcile removes the directory at the next start.
		d.log.Warn("remove vm files (the next daemon start retries)", "vm", v.Name, "dir", v.Dir, "err", err)
	}
	// What the driver keeps outside the directory (a confined QEMU's
	// cgroups, left by a start that failed before its handle was
	// recorded); reconcile sweeps what this misses.
	if r, ok := d.driver.(vmm.Releaser); ok {
		if err := r.Release(v.ID); err != nil {
			d.log.Warn("release the vm's vmm resources (the next daemon start retries)", "vm", v.Name, "err", err)
		}
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
