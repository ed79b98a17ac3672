// Package qemu is the QEMU microvm backend of vmm.Driver.
//
// Each VM is one qemu-system-x86_64 process. Confined (Config.Confine, the
// daemon's default; see Confine), the driver starts it as an unprivileged
// user, in its own session and cgroup, and reaps it; unconfined, it is
// started with -daemonize. Either way it outlives the daemon and a
// restarted daemon adopts it from the recorded vmm.Handle (pid plus process
// start time, which guards against pid reuse). The process is controlled over QMP
// (<Dir>/qmp.sock); the guest agent's virtio-serial port is a unix socket
// (<Dir>/agent.sock), and so is each of the guest's DataPorts data ports
// (<Dir>/data<i>.sock, DialData).
//
// The accelerator is KVM when kvmcheck says the host's KVM runs stock guest
// kernels, TCG otherwise (with a warning): on PVM-only hosts a stock kernel
// hangs under KVM.
package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/kvmcheck"
	"github.com/bangerdev/banger/internal/sockbuf"
	"github.com/bangerdev/banger/internal/vmm"
)

var (
	_ vmm.Recoverer  = (*Driver)(nil)
	_ vmm.DataDialer = (*Driver)(nil)
)

// DriverName is the value of vmm.Handle.Driver for this backend.
const DriverName = "qemu"

// DefaultBinary is the QEMU system emulator used when Config.Binary is empty.
const DefaultBinary = "qemu-system-x86_64"

// Timeouts for steps that must not hang whatever the caller's context says.
const (
	// startTimeout bounds qemu's own start-up (until the -daemonize parent
	// exits) when the caller's context has no deadline.
	startTimeout = 60 * time.Second
	// qmpTimeout bounds one QMP exchange (connect, greeting, command).
	qmpTimeout = 5 * time.Second
	// quitGrace is how long Kill waits for QEMU to exit after QMP quit
	// before it sends SIGKILL.
	quitGrace = 5 * time.Second
	// killWait is how long Kill waits for the process to go after SIGKILL.
	killWait = 10 * time.Second
	// pollInterval is how often Wait rechecks /proc in addition to the
	// pidfd.
	pollInterval = 200 * time.Millisecond
)

// maxSocketPath is the longest unix socket path Linux accepts
// (sizeof(sun_path) - 1).
const maxSocketPath = 107

// Config configures the driver. The zero value is usable.
type Config struct {
	// Binary is the QEMU system emulator, a path or a name looked up on
	// PATH. Default "qemu-system-x86_64".
	Binary string
	// DefaultAccel is used for specs whose Accel is empty: vmm.AccelAuto
	// (the default), vmm.AccelKVM or vmm.AccelTCG.
	DefaultAccel string
	// Probe inspects the host's KVM when the accelerator is "auto" or
	// "kvm". Default kvmcheck.Probe.
	Probe func() kvmcheck.Result
	// TSCKHz returns the host TSC frequency, handed to TCG guests as
	// tsc_early_khz (see TCGCmdline). Default HostTSCKHz, computed once.
	TSCKHz func() (uint64, error)
	// Confine, when not nil, runs every QEMU confined (see Confine and
	// docs/security.md). Nil runs QEMU as the daemon's user, unconfined,
	// daemonized.
	Confine *Confine
}

// Driver is the QEMU backend. It holds no per-VM state: everything it needs
// is in the vmm.Handle, so a new Driver can manage VMs an earlier daemon
// started.
type Driver struct {
	cfg      Config
	log      *slog.Logger
	procRoot string // "/proc"; tests use a fake
	// uidMu serialises picking a uid from Confine's range with starting
	// the QEMU that holds it.
	uidMu sync.Mutex
}

var _ vmm.Driver = (*Driver)(nil)

// New returns a QEMU driver. log may be nil.
func New(cfg Config, log *slog.Logger) *Driver {
	if cfg.Binary == "" {
		cfg.Binary = DefaultBinary
	}
	if cfg.DefaultAccel == "" {
		cfg.DefaultAccel = vmm.AccelAuto
	}
	if cfg.Probe == nil {
		cfg.Probe = kvmcheck.Probe
	}
	if cfg.TSCKHz == nil {
		cfg.TSCKHz = sync.OnceValues(HostTSCKHz)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Driver{cfg: cfg, log: log, procRoot: "/proc"}
}

// Name implements vmm.Driver.
func (d *Driver) Name() string { return DriverName }

// DiskFormats implements vmm.Driver: qcow2 (overlays on a shared base image)
// is preferred.
func (d *Driver) DiskFormats() []string { return []string{vmm.FormatQcow2, vmm.FormatRaw} }

// validate checks what QEMU would otherwise reject later, with less clear
// messages.
func (d *Driver) validate(spec vmm.Spec) error {
	switch {
	case spec.ID == "":
		return errors.New("invalid spec: empty id")
	case spec.Dir == "":
		return errors.New("invalid spec: empty runtime directory")
	case spec.CPUs <= 0:
		return fmt.Errorf("invalid spec: cpus must be positive, got %d", spec.CPUs)
	case spec.MemoryMiB <= 0:
		return fmt.Errorf("invalid spec: memory must be positive, got %d MiB", spec.MemoryMiB)
	case spec.Kernel == "":
		return errors.New("invalid spec: no kernel")
	case spec.RootDisk.Path == "":
		return errors.New("invalid spec: no root disk")
	case !slices.Contains(d.DiskFormats(), spec.RootDisk.Format):
		return fmt.Errorf("invalid spec: root disk format %q not supported (want one of %s)",
			spec.RootDisk.Format, strings.Join(d.DiskFormats(), ", "))
	}
	if err := validateNet(spec.Net); err != nil {
		return err
	}
	for _, p := range PathsFor(spec.Dir).sockets() {
		if len(p) > maxSocketPath {
			return fmt.Errorf("invalid spec: runtime directory %s too long for unix sockets (%s: %d bytes, max %d)", spec.Dir, filepath.Base(p), len(p), maxSocketPath)
		}
	}
	if err := regularFile(spec.Kernel); err != nil {
		return fmt.Errorf("invalid spec: kernel: %w", err)
	}
	if spec.Initrd != "" {
		if err := regularFile(spec.Initrd); err != nil {
			return fmt.Errorf("invalid spec: initrd: %w", err)
		}
	}
	if _, err := os.Stat(spec.RootDisk.Path); err != nil {
		return fmt.Errorf("invalid spec: root disk: %w", err)
	}
	return nil
}

func regularFile(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	return nil
}

// Start implements vmm.Driver. It returns once QEMU has daemonized and
// answers on QMP. The QEMU process does not depend on ctx, which only
// bounds the start-up; if anything fails, the process is killed and its
// runtime files removed.
func (d *Driver) Start(ctx context.Context, spec vmm.Spec) (vmm.Handle, error) {
	if err := d.validate(spec); err != nil {
		return vmm.Handle{}, fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
	}
	if spec.Name == "" {
		spec.Name = spec.ID
	}
	requested := spec.Accel
	if requested == "" {
		requested = d.cfg.DefaultAccel
	}
	var probe kvmcheck.Result
	if requested != vmm.AccelTCG {
		probe = d.cfg.Probe()
	}
	accel, warning, err := ChooseAccel(requested, probe)
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("start vm %s: %w", spec.Name, err)
	}
	if warning != "" {
		d.log.Warn("qemu accelerator", "vm", spec.Name, "accel", accel, "reason", warning)
	}
	if accel == vmm.AccelTCG {
		if khz, err := d.cfg.TSCKHz(); err != nil {
			d.log.Warn("host tsc frequency unknown; tcg guest may hang calibrating its tsc under load", "vm", spec.Name, "err", err)
		} else {
			spec.Cmdline = TCGCmdline(spec.Cmdline, khz)
		}
	}
	if c := d.cfg.Confine; c != nil && c.Err != nil {
		return vmm.Handle{}, fmt.Errorf("start vm %s: confine qemu: %w", spec.Name, c.Err)
	}
	bin, err := exec.LookPath(d.cfg.Binary)
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("start vm %s: find qemu: %w", spec.Name, err)
	}
	if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
		return vmm.Handle{}, fmt.Errorf("start vm %s: create runtime dir: %w", spec.Name, err)
	}
	paths := PathsFor(spec.Dir)
	unlock, err := lockDir(spec.Dir)
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("start vm %s: %w", spec.Name, err)
	}
	defer unlock()
	if err := d.clearStale(paths); err != nil {
		return vmm.Handle{}, fmt.Errorf("start vm %s: %w", spec.Name, err)
	}

	launch := d.launch
	if d.cfg.Confine != nil {
		launch = d.launchConfined
	}
	h, err := launch(ctx, bin, spec, accel, paths)
	if err != nil {
		if aerr := d.abort(paths); aerr != nil {
			d.log.Error("clean up after failed start", "vm", spec.Name, "err", aerr)
		}
		return vmm.Handle{}, fmt.Errorf("start vm %s: %w", spec.Name, err)
	}
	d.log.Info("qemu started", "vm", spec.Name, "pid", h.PID, "accel", h.Accel, "confined", h.Confinement != nil)
	return h, nil
}

// launch runs QEMU and waits for it to daemonize. The caller cleans up on
// error.
func (d *Driver) launch(ctx context.Context, bin string, spec vmm.Spec, accel string, paths Paths) (vmm.Handle, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}
	if err := ctx.Err(); err != nil {
		return vmm.Handle{}, fmt.Errorf("qemu start-up: %w", err)
	}
	args := BuildArgs(spec, accel, paths)
	d.log.Debug("run qemu", "vm", spec.Name, "binary", bin, "args", args)
	var out bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Dir = spec.Dir
	cmd.Stdout = &out
	cmd.Stderr = &out
	if spec.Net != nil && spec.Net.Mode == vmm.NetTAP {
		cmd.ExtraFiles = []*os.File{spec.Net.TAP} // fd 3 (unconfinedTAPFD)
	}
	// The daemonized QEMU points its stdio at /dev/null once it is set up;
	// don't hang on a pipe some descendant kept open regardless.
	cmd.WaitDelay = 2 * time.Second
	// Own session: a terminal's Ctrl-C aimed at a foreground bangerd must not
	// reach QEMU while it starts.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return vmm.Handle{}, fmt.Errorf("run %s: %w", bin, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		cmd.Process.Kill()
		<-done
		return vmm.Handle{}, fmt.Errorf("qemu start-up: %w", ctx.Err())
	}
	if errors.Is(err, exec.ErrWaitDelay) {
		// QEMU exited successfully; a descendant still held its stderr.
		err = nil
	}
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("qemu failed: %w: %s", err, tail(out.String(), 2000))
	}

	pid, err := readPIDFile(paths.PIDFile)
	if err != nil {
		return vmm.Handle{}, err
	}
	st, err := readProcStat(d.procRoot, pid)
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("qemu exited right after start-up: %w", err)
	}
	if st.exited() {
		return vmm.Handle{}, fmt.Errorf("qemu pid %d exited right after start-up", pid)
	}
	h := newHandle(pid, st.StartTime, paths, accel)

	// QEMU answering on QMP proves the pid file and the sockets are its own.
	qctx, cancel := context.WithTimeout(ctx, qmpTimeout)
	defer cancel()
	q, err := DialQMP(qctx, paths.QMPSocket)
	if err != nil {
		return vmm.Handle{}, err
	}
	defer q.Close()
	status, err := q.QueryStatus(qctx)
	if err != nil {
		return vmm.Handle{}, err
	}
	d.log.Debug("qemu status", "vm", spec.Name, "status", status,
		"qemu_version", fmt.Sprintf("%d.%d.%d", q.Version.Major, q.Version.Minor, q.Version.Micro))
	return h, nil
}

// clearStale removes runtime files a crashed VMM left in a VM directory, and
// refuses to if a QEMU still runs with them.
func (d *Driver) clearStale(paths Paths) error {
	if pids := d.findQEMU(paths); len(pids) > 0 {
		return fmt.Errorf("qemu already running for %s (pid %d)", filepath.Dir(paths.PIDFile), pids[0])
	}
	return removeFiles(paths.files()...)
}

// abort kills every QEMU process started with these runtime paths
// (including the intermediate processes of -daemonize, in case start-up was
// interrupted) and removes the runtime files.
func (d *Driver) abort(paths Paths) error {
	deadline := time.Now().Add(killWait)
	for {
		pids := d.findQEMU(paths)
		if len(pids) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("qemu pids %v survived SIGKILL", pids)
		}
		for _, pid := range pids {
			d.log.Debug("kill qemu after failed start", "pid", pid)
			unix.Kill(pid, unix.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return removeFiles(append(paths.files(), paths.Log)...)
}

// findQEMU returns the live (not zombie) processes whose command line has
// "-pidfile <paths.PIDFile>" (unconfined) or an fd set whose opaque names
// paths.PIDFile (confined): QEMU processes of this VM directory.
func (d *Driver) findQEMU(paths Paths) []int {
	entries, err := os.ReadDir(d.procRoot)
	if err != nil {
		return nil
	}
	want := []byte("\x00-pidfile\x00" + paths.PIDFile + "\x00")
	wantConfined := []byte(",opaque=" + escape(paths.PIDFile) + "\x00")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cl, err := os.ReadFile(filepath.Join(d.procRoot, e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cl, want) && !bytes.Contains(cl, wantConfined) {
			continue
		}
		if st, err := readProcStat(d.procRoot, pid); err == nil && !st.exited() {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Recover implements vmm.Recoverer: the handle of the QEMU running with
// dir's pid file, if exactly one does.
func (d *Driver) Recover(dir string) (vmm.Handle, bool) {
	paths := PathsFor(dir)
	pids := d.findQEMU(paths)
	if len(pids) != 1 {
		return vmm.Handle{}, false
	}
	st, err := readProcStat(d.procRoot, pids[0])
	if err != nil || st.exited() {
		return vmm.Handle{}, false
	}
	cl, err := os.ReadFile(filepath.Join(d.procRoot, strconv.Itoa(pids[0]), "cmdline"))
	if err != nil {
		return vmm.Handle{}, false
	}
	accel := vmm.AccelTCG
	if bytes.Contains(cl, []byte("\x00-accel\x00kvm\x00")) {
		accel = vmm.AccelKVM
	}
	h := newHandle(pids[0], st.StartTime, paths, accel)
	h.DataSockets = recoverDataSockets(cl, paths)
	h.Confinement = d.recoverConfinement(pids[0])
	return h, true
}

// recoverDataSockets returns the data sockets of paths that the QEMU whose
// command line is cmdline has (none when an older banger, without data
// ports, started it).
func recoverDataSockets(cmdline []byte, paths Paths) []string {
	var socks []string
	for i, p := range paths.DataSockets {
		if !bytes.Contains(cmdline, []byte(",name="+agentproto.DataPortName(i)+"\x00")) {
			break
		}
		socks = append(socks, p)
	}
	return socks
}

// newHandle is the handle of the QEMU process pid, started at startTime
// (clock ticks), whose runtime files are paths.
func newHandle(pid int, startTime uint64, paths Paths, accel string) vmm.Handle {
	return vmm.Handle{
		Driver: DriverName, PID: pid, StartTime: startTime,
		ControlSocket: paths.QMPSocket, AgentSocket: paths.AgentSocket,
		DataSockets: slices.Clone(paths.DataSockets), PIDFile: paths.PIDFile, Accel: accel,
	}
}

// Alive implements vmm.Driver: the process exists, is not a zombie and
// started when h says it did.
func (d *Driver) Alive(h vmm.Handle) bool {
	if h.PID <= 0 {
		return false
	}
	st, err := readProcStat(d.procRoot, h.PID)
	if err != nil || st.exited() {
		return false
	}
	// A handle without a start time can't tell this process from another
	// that reused its pid: it is never alive.
	return h.StartTime != 0 && st.StartTime == h.StartTime
}

// Wait implements vmm.Driver. QEMU is not the caller's child, so it waits on
// a pidfd (and rechecks /proc every 200 ms: a zombie that nobody reaps
// counts as exited).
func (d *Driver) Wait(ctx context.Context, h vmm.Handle) error {
	if !d.Alive(h) {
		return nil
	}
	pidfd, err := unix.PidfdOpen(h.PID, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		d.log.Debug("pidfd_open failed; polling /proc", "pid", h.PID, "err", err)
		pidfd = -1
	} else {
		defer unix.Close(pidfd)
		// The pidfd may name a newer process that reused the pid.
		if !d.Alive(h) {
			return nil
		}
	}
	for {
		if pidfd >= 0 {
			// Poll in slices so that ctx and /proc are rechecked.
			fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
			n, err := unix.Poll(fds, int(pollInterval/time.Millisecond))
			if err == nil && n > 0 {
				return nil
			}
			if err != nil && !errors.Is(err, unix.EINTR) {
				return fmt.Errorf("wait for qemu pid %d: poll pidfd: %w", h.PID, err)
			}
		} else {
			t := time.NewTimer(pollInterval)
			select {
			case <-ctx.Done():
				t.Stop()
			case <-t.C:
			}
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("wait for qemu pid %d: %w", h.PID, err)
		}
		if !d.Alive(h) {
			return nil
		}
	}
}

// Shutdown implements vmm.Driver: it presses the ACPI power button
// (QMP system_powerdown). A guest without an ACPI event handler ignores it.
func (d *Driver) Shutdown(ctx context.Context, h vmm.Handle) error {
	if !d.Alive(h) {
		return fmt.Errorf("shutdown: %w", vmm.ErrNotRunning)
	}
	ctx, cancel := context.WithTimeout(ctx, qmpTimeout)
	defer cancel()
	q, err := DialQMP(ctx, h.ControlSocket)
	if err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	defer q.Close()
	if err := q.Execute(ctx, "system_powerdown", nil, nil); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}

// Kill implements vmm.Driver: QMP quit if QEMU answers, SIGKILL otherwise or
// if it does not exit in time; then Cleanup.
func (d *Driver) Kill(ctx context.Context, h vmm.Handle) error {
	if !d.Alive(h) {
		return d.Cleanup(h)
	}
	if err := d.quit(ctx, h); err != nil {
		d.log.Debug("qmp quit failed; will SIGKILL", "pid", h.PID, "err", err)
	} else {
		wctx, cancel := context.WithTimeout(ctx, quitGrace)
		d.Wait(wctx, h)
		cancel()
	}
	if d.Alive(h) {
		if err := d.sigkill(h); err != nil {
			return fmt.Errorf("kill qemu pid %d: %w", h.PID, err)
		}
		wctx, cancel := context.WithTimeout(ctx, killWait)
		err := d.Wait(wctx, h)
		cancel()
		if err != nil {
			return fmt.Errorf("kill qemu pid %d: %w", h.PID, err)
		}
	}
	return d.Cleanup(h)
}

func (d *Driver) quit(ctx context.Context, h vmm.Handle) error {
	ctx, cancel := context.WithTimeout(ctx, qmpTimeout)
	defer cancel()
	q, err := DialQMP(ctx, h.ControlSocket)
	if err != nil {
		return err
	}
	defer q.Close()
	// QEMU may close the connection before its reply is read.
	if err := q.Execute(ctx, "quit", nil, nil); err != nil && !isClosedConn(err) {
		return err
	}
	return nil
}

// sigkill sends SIGKILL through a pidfd, after checking that the pidfd names
// the process of h (not a later process that reused its pid).
func (d *Driver) sigkill(h vmm.Handle) error {
	pidfd, err := unix.PidfdOpen(h.PID, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		// No pidfd support: a plain kill after the start time check.
		if !d.Alive(h) {
			return nil
		}
		if err := unix.Kill(h.PID, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("send SIGKILL: %w", err)
		}
		return nil
	}
	defer unix.Close(pidfd)
	if !d.Alive(h) {
		return nil
	}
	if err := unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("send SIGKILL: %w", err)
	}
	return nil
}

// Cleanup implements vmm.Driver. It refuses to remove the files of a QEMU
// that still runs. When h is stale (its QEMU is gone and a newer QEMU,
// started in the same runtime directory, now uses the same paths), it
// leaves the files alone and returns nil.
func (d *Driver) Cleanup(h vmm.Handle) error {
	if d.Alive(h) {
		return fmt.Errorf("cleanup: qemu pid %d still running", h.PID)
	}
	if h.PIDFile != "" {
		// Serialised with Start, so that a QEMU being started now is seen.
		if unlock, err := lockDir(filepath.Dir(h.PIDFile)); err == nil {
			defer unlock()
		}
		paths := Paths{QMPSocket: h.ControlSocket, AgentSocket: h.AgentSocket, PIDFile: h.PIDFile}
		if pids := d.findQEMU(paths); len(pids) > 0 {
			d.log.Debug("runtime files belong to a newer qemu; leaving them", "pid", h.PID, "newer_pid", pids[0])
			return nil
		}
	}
	var logFile string
	if h.Confinement != nil && h.PIDFile != "" {
		logFile = filepath.Join(filepath.Dir(h.PIDFile), LogFileName)
	}
	files := append([]string{h.ControlSocket, h.AgentSocket, h.PIDFile, logFile}, h.DataSockets...)
	if err := removeFiles(files...); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	if err := d.removeCgroups(h); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	return nil
}

// lockDir takes an exclusive flock on the VM directory dir. Start holds it
// from the stale-file check until QEMU has daemonized, Cleanup while it
// checks and removes, so that neither removes the files of a QEMU the other
// is starting. The descriptor is close-on-exec: QEMU does not inherit the
// lock.
func lockDir(dir string) (unlock func(), err error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("lock runtime dir: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock runtime dir %s: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

// DialAgent implements vmm.Driver. The agent socket serves one connection
// at a time: a second dial waits until the first is closed.
func (d *Driver) DialAgent(ctx context.Context, h vmm.Handle) (net.Conn, error) {
	if !d.Alive(h) {
		return nil, fmt.Errorf("dial agent: %w", vmm.ErrNotRunning)
	}
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "unix", h.AgentSocket)
	if err != nil {
		return nil, fmt.Errorf("dial agent: %w", err)
	}
	return conn, nil
}

// DialData implements vmm.DataDialer: a connection to data port port's
// socket. A port serves one connection at a time: a second connection is
// not served until the first is closed (the connect itself returns at
// once, into the socket's backlog, or fails with EAGAIN when it is full).
func (d *Driver) DialData(ctx context.Context, h vmm.Handle, port int) (net.Conn, error) {
	if !d.Alive(h) {
		return nil, fmt.Errorf("dial data port %d: %w", port, vmm.ErrNotRunning)
	}
	if port < 0 || port >= len(h.DataSockets) {
		return nil, fmt.Errorf("dial data port %d: the vm has %d data ports: %w", port, len(h.DataSockets), errdefs.ErrInvalid)
	}
	var dialer net.Dialer
	conn, err := dialer.DialContext(ctx, "unix", h.DataSockets[port])
	if err != nil {
		return nil, fmt.Errorf("dial data port %d: %w", port, err)
	}
	// Input for the guest queues in the kernel while QEMU is behind.
	// Best effort: the port works with any buffer, so an error is
	// ignored.
	_, _ = sockbuf.GrowSend(conn, sockbuf.Stream)
	return conn, nil
}

func removeFiles(paths ...string) error {
	var errs []error
	for _, p := range paths {
		if p == "" {
			continue
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// tail returns the end of s, at most n bytes, trimmed.
func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		s = "..." + s[len(s)-n:]
	}
	if s == "" {
		return "(no output)"
	}
	return s
}
