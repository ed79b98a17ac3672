package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/guestagent"
	"github.com/bangerdev/banger/internal/vmm"
)

// fakeBehaviour makes a fake VM misbehave.
type fakeBehaviour struct {
	StartErr            error  // Start fails with it and leaves nothing behind
	AgentSilent         bool   // the agent socket accepts connections but never answers
	IgnoreAgentShutdown bool   // the agent accepts a shutdown request and does nothing
	IgnoreACPI          bool   // Shutdown (the ACPI power button) is delivered and ignored
	CrashAtBoot         bool   // the VMM exits right after Start returned, before its agent answers
	Console             string // more console output, after the fake kernel's line
	HangStart           bool   // Start blocks until its context ends, then fails and leaves nothing
	// LeakOnStartErr: with StartErr, the failed Start leaves a resource
	// outside the VM's directory (like a confined QEMU's cgroup), which
	// only Release or ReleaseStale removes.
	LeakOnStartErr bool
	// EarlyBootInfos: the agent reports early boot done only from its
	// EarlyBootInfos-th info request on; EarlyBootNever: never.
	EarlyBootInfos int
	EarlyBootNever bool
	// EarlyBootDropAt: the agent drops its connections at its
	// EarlyBootDropAt-th info request (a keepalive lost in a busy guest).
	EarlyBootDropAt int
	// NetworkUpAt: the guest reports its network configured only from
	// its NetworkUpAt-th info request on; NetworkError: its setup failed.
	NetworkUpAt  int
	NetworkError string
	// InitMode the agent reports (default "agent"); with "systemd", a
	// --wait-boot runs systemctl on the test host, where systemd is not
	// PID 1: the full boot never ends.
	InitMode string
	// Listening is what the agent reports in Info.Listening (nothing when
	// nil: the real agent would read this host's sockets).
	Listening func() []agentproto.PortListen
	// MainProcess plays the guest's PID 1 running the main process (the
	// agent config's Process, agent as PID 1): it feeds the agent's link
	// (output, states, the final exit) and may power the VM off. Without
	// it a configured main process stays "starting".
	MainProcess func(ctx context.Context, feed *guestagent.MainFeeder, p agentproto.Process, powerOff func())
}

// fakeDriver is a vmm.Driver whose "VM" lives in the test process: a
// helper process (cat, reading a pipe the fake holds) stands for the VMM
// process, so pid, start time, Alive and Wait are real; the real guest agent
// serves SSH connections on the VM's agent socket, configured from the
// agent.json of the initramfs the daemon built. Powering the VM off kills
// the helper process.
//
// One fakeDriver may serve several daemons in turn (over the same state
// dir): its VMs survive a daemon's end, like QEMU processes do.
type fakeDriver struct {
	log     *slog.Logger
	formats []string // DiskFormats; raw only when nil

	mu     sync.Mutex
	behave map[string]fakeBehaviour // by VM name
	vms    map[int]*fakeVM          // by pid, kept after exit
	calls  []fakeCall
	wg     sync.WaitGroup // agent servers and reapers
	// held are the ids of VMs with a resource outside their directory
	// (vmm.Releaser).
	held map[string]bool
}

type fakeCall struct {
	Op string // start, dial, agent-shutdown, acpi, kill, cleanup
	VM string
}

type fakeVM struct {
	name      string
	spec      vmm.Spec
	initramfs map[string][]byte // the regular files of the initramfs it booted
	agentCfg  agentproto.Config // the agent config of that initramfs
	tapOpen   bool              // spec.Net's TAP was an open file when Start was called
	handle    vmm.Handle
	cmd       *exec.Cmd
	stdin     *os.File // write end of the helper's stdin: the helper exits when it closes
	exited    chan struct{}
}

const (
	fakeAgentSocket = "agent.sock"
	fakePIDFile     = "fake.pid"
)

func newFakeDriver(t testing.TB, log *slog.Logger) *fakeDriver {
	f := &fakeDriver{log: log, behave: map[string]fakeBehaviour{}, vms: map[int]*fakeVM{}, held: map[string]bool{}}
	t.Cleanup(f.close)
	return f
}

var (
	_ vmm.Driver   = (*fakeDriver)(nil)
	_ vmm.Releaser = (*fakeDriver)(nil)
)

// Release implements vmm.Releaser.
func (f *fakeDriver) Release(id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.held, id)
	return nil
}

// ReleaseStale implements vmm.Releaser.
func (f *fakeDriver) ReleaseStale(keep func(id string) bool) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var released []string
	for id := range f.held {
		if !keep(id) {
			delete(f.held, id)
			released = append(released, id)
		}
	}
	return released, nil
}

// holds reports whether the fake keeps a resource for VM id.
func (f *fakeDriver) holds(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.held[id]
}

func (f *fakeDriver) setBehaviour(name string, b fakeBehaviour) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.behave[name] = b
}

func (f *fakeDriver) record(op, vm string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fakeCall{op, vm})
}

// callsFor returns the operations recorded for a VM, in order.
func (f *fakeDriver) callsFor(vm string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ops []string
	for _, c := range f.calls {
		if c.VM == vm {
			ops = append(ops, c.Op)
		}
	}
	return ops
}

func (f *fakeDriver) vmOf(h vmm.Handle) *fakeVM {
	f.mu.Lock()
	defer f.mu.Unlock()
	v := f.vms[h.PID]
	if v == nil || v.handle.StartTime != h.StartTime {
		return nil
	}
	return v
}

func (f *fakeDriver) nameOf(h vmm.Handle) string {
	if v := f.vmOf(h); v != nil {
		return v.name
	}
	return "?"
}

// byName returns the latest fake VM started under name.
func (f *fakeDriver) byName(name string) *fakeVM {
	f.mu.Lock()
	defer f.mu.Unlock()
	var last *fakeVM
	for _, v := range f.vms {
		if v.name == name && (last == nil || v.handle.StartTime >= last.handle.StartTime) {
			last = v
		}
	}
	return last
}

// powerOff makes the VM's VMM exit on its own (a guest poweroff, or a
// crash) and waits for it to be gone.
func (v *fakeVM) powerOff() {
	_ = v.cmd.Process.Kill()
	<-v.exited
}

func (f *fakeDriver) Name() string { return "fake" }
func (f *fakeDriver) DiskFormats() []string {
	if f.formats != nil {
		return f.formats
	}
	return []string{vmm.FormatRaw}
}

func (f *fakeDriver) Start(ctx context.Context, spec vmm.Spec) (vmm.Handle, error) {
	f.record("start", spec.Name)
	f.mu.Lock()
	b := f.behave[spec.Name]
	f.mu.Unlock()
	if b.StartErr != nil {
		if b.LeakOnStartErr {
			f.mu.Lock()
			f.held[spec.ID] = true
			f.mu.Unlock()
		}
		return vmm.Handle{}, b.StartErr
	}
	if b.HangStart {
		<-ctx.Done()
		return vmm.Handle{}, fmt.Errorf("fake: start: %w", ctx.Err())
	}
	if spec.ID == "" || spec.CPUs <= 0 || spec.MemoryMiB <= 0 || spec.Kernel == "" || !slices.Contains(f.DiskFormats(), spec.RootDisk.Format) {
		return vmm.Handle{}, fmt.Errorf("fake: bad spec %+v", spec)
	}
	if _, err := os.Stat(spec.RootDisk.Path); err != nil {
		return vmm.Handle{}, fmt.Errorf("fake: root disk: %w", err)
	}
	cfg, files, err := agentConfigFromInitramfs(spec.Initrd)
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("fake: %w", err)
	}
	if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
		return vmm.Handle{}, err
	}
	sock := filepath.Join(spec.Dir, fakeAgentSocket)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return vmm.Handle{}, err
	}
	// Like QEMU, leave the socket file behind when the VMM exits: Cleanup
	// or Kill must remove it.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)

	pr, pw, err := os.Pipe()
	if err != nil {
		ln.Close()
		os.Remove(sock)
		return vmm.Handle{}, err
	}
	cmd := exec.Command("cat")
	cmd.Stdin = pr
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		ln.Close()
		os.Remove(sock)
		return vmm.Handle{}, err
	}
	pr.Close()
	// Like QEMU, hold a descriptor of the TAP until the VMM exits: the
	// TAP lives as long as it.
	var tap *os.File
	if spec.Net != nil && spec.Net.TAP != nil {
		if fd, err := unix.Dup(int(spec.Net.TAP.Fd())); err == nil {
			tap = os.NewFile(uintptr(fd), "tap")
		}
	}
	pid := cmd.Process.Pid
	st, err := procStartTime(pid)
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		pw.Close()
		ln.Close()
		os.Remove(sock)
		return vmm.Handle{}, err
	}
	pidFile := filepath.Join(spec.Dir, fakePIDFile)
	_ = os.WriteFile(pidFile, []byte(strconv.Itoa(pid)+"\n"), 0o600)
	_ = os.WriteFile(spec.ConsoleLog, []byte("fake firmware\nfake kernel booting "+spec.Name+"\n"+b.Console), 0o600)

	vctx, cancel := context.WithCancel(context.Background())
	v := &fakeVM{
		name: spec.Name, spec: spec, initramfs: files, agentCfg: cfg, cmd: cmd, stdin: pw, exited: make(chan struct{}),
		tapOpen: spec.Net != nil && spec.Net.TAP != nil && fileOpen(spec.Net.TAP),
		handle:  vmm.Handle{Driver: "fake", PID: pid, StartTime: st, AgentSocket: sock, PIDFile: pidFile, Accel: vmm.AccelKVM},
	}
	f.mu.Lock()
	f.vms[pid] = v
	f.mu.Unlock()

	f.wg.Add(2)
	go func() { // the reaper: the VMM exited
		defer f.wg.Done()
		_ = cmd.Wait()
		pw.Close()
		if tap != nil {
			tap.Close()
		}
		cancel()
		ln.Close()
		close(v.exited)
	}()
	go func() { // the guest agent
		defer f.wg.Done()
		if b.CrashAtBoot {
			v.powerOff()
			return
		}
		f.serveAgent(vctx, v, ln, cfg, b)
	}()
	return v.handle, nil
}

func (f *fakeDriver) serveAgent(ctx context.Context, v *fakeVM, ln net.Listener, cfg agentproto.Config, b fakeBehaviour) {
	var infos, netInfos atomic.Int64
	var openMu sync.Mutex
	var open []net.Conn
	mode := b.InitMode
	if mode == "" {
		mode = "agent"
	}
	hooks := guestagent.Hooks{
		InitMode: mode,
		EarlyBootDone: func(context.Context) (bool, string) {
			n := infos.Add(1)
			if n == int64(b.EarlyBootDropAt) {
				f.record("agent-drop", v.name)
				openMu.Lock()
				for _, c := range open {
					c.Close()
				}
				openMu.Unlock()
			}
			return !b.EarlyBootNever && n >= int64(b.EarlyBootInfos), "unit"
		},
		// The fake guest configures its network at once (the real agent's
		// state would be read from this host's kernel).
		Network: func() *agentproto.NetworkState {
			if cfg.Network == nil {
				return nil
			}
			if b.NetworkError != "" {
				return &agentproto.NetworkState{Error: b.NetworkError}
			}
			f.record("net-info", v.name)
			if netInfos.Add(1) < int64(b.NetworkUpAt) {
				return &agentproto.NetworkState{}
			}
			st := &agentproto.NetworkState{Configured: true}
			for _, ifc := range cfg.Network.Interfaces {
				st.Addresses = append(st.Addresses, ifc.Address)
			}
			return st
		},
		Listening: func() []agentproto.PortListen {
			if b.Listening == nil {
				return nil
			}
			return b.Listening()
		},
		Shutdown: func(reboot bool) error {
			f.record("agent-shutdown", v.name)
			if b.IgnoreAgentShutdown {
				return nil
			}
			go v.powerOff()
			return nil
		},
	}
	if cfg.Process != nil && mode == "agent" {
		link, feed := guestagent.NewMainLinkPair(nil)
		go link.Run(ctx)
		hooks.Main = link
		if b.MainProcess != nil {
			go b.MainProcess(ctx, feed, *cfg.Process, v.powerOff)
		}
	}
	var conns sync.WaitGroup
	defer conns.Wait()
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		if b.AgentSilent {
			conns.Go(func() {
				<-ctx.Done()
				conn.Close()
			})
			continue
		}
		openMu.Lock()
		open = append(open, conn)
		openMu.Unlock()
		conns.Go(func() {
			_ = guestagent.ServeConn(ctx, conn, cfg, hooks, f.log.With("side", "guest", "vm", v.name))
		})
	}
}

func (f *fakeDriver) Alive(h vmm.Handle) bool {
	if h.PID <= 0 {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(h.PID) + "/stat")
	if err != nil {
		return false
	}
	state, start, err := parseStat(b)
	return err == nil && state != 'Z' && state != 'X' && start == h.StartTime
}

func (f *fakeDriver) Wait(ctx context.Context, h vmm.Handle) error {
	v := f.vmOf(h)
	if v == nil {
		return fmt.Errorf("fake: wait: no such vm (pid %d)", h.PID)
	}
	select {
	case <-v.exited:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *fakeDriver) Shutdown(ctx context.Context, h vmm.Handle) error {
	f.record("acpi", f.nameOf(h))
	v := f.vmOf(h)
	if v == nil || !f.Alive(h) {
		return fmt.Errorf("shutdown: %w", vmm.ErrNotRunning)
	}
	f.mu.Lock()
	b := f.behave[v.name]
	f.mu.Unlock()
	if !b.IgnoreACPI {
		go v.powerOff()
	}
	return nil
}

func (f *fakeDriver) Kill(ctx context.Context, h vmm.Handle) error {
	f.record("kill", f.nameOf(h))
	if v := f.vmOf(h); v != nil {
		_ = v.cmd.Process.Kill()
		select {
		case <-v.exited:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return removeRuntime(h)
}

func (f *fakeDriver) Cleanup(h vmm.Handle) error {
	f.record("cleanup", f.nameOf(h))
	if f.Alive(h) {
		return fmt.Errorf("fake: cleanup: pid %d still running", h.PID)
	}
	return removeRuntime(h)
}

func removeRuntime(h vmm.Handle) error {
	var errs []error
	for _, p := range []string{h.AgentSocket, h.PIDFile} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (f *fakeDriver) DialAgent(ctx context.Context, h vmm.Handle) (net.Conn, error) {
	f.record("dial", f.nameOf(h))
	if !f.Alive(h) {
		return nil, fmt.Errorf("dial agent: %w", vmm.ErrNotRunning)
	}
	var d net.Dialer
	return d.DialContext(ctx, "unix", h.AgentSocket)
}

// close powers off every VM still running and waits for the fake's
// goroutines.
func (f *fakeDriver) close() {
	f.mu.Lock()
	vms := make([]*fakeVM, 0, len(f.vms))
	for _, v := range f.vms {
		vms = append(vms, v)
	}
	f.mu.Unlock()
	for _, v := range vms {
		v.powerOff()
	}
	f.wg.Wait()
}

// runtimeFiles lists the driver files left in a VM directory.
func runtimeFiles(dir string) []string {
	var left []string
	for _, n := range []string{fakeAgentSocket, fakePIDFile} {
		if _, err := os.Lstat(filepath.Join(dir, n)); err == nil {
			left = append(left, n)
		}
	}
	return left
}

func procStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	_, st, err := parseStat(b)
	return st, err
}

// parseStat returns the state (field 3) and start time (field 22) of a
// /proc/<pid>/stat.
func parseStat(b []byte) (byte, uint64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, errors.New("parse stat: no command name")
	}
	fs := strings.Fields(string(b[i+1:]))
	if len(fs) < 20 {
		return 0, 0, errors.New("parse stat: short")
	}
	st, err := strconv.ParseUint(fs[19], 10, 64)
	return fs[0][0], st, err
}

// agentConfigFromInitramfs reads the agent configuration from the newc
// cpio initramfs the daemon built; it returns the archive's regular files
// too (names without a leading slash).
func agentConfigFromInitramfs(p string) (agentproto.Config, map[string][]byte, error) {
	var cfg agentproto.Config
	files, err := readCpio(p)
	if err != nil {
		return cfg, nil, err
	}
	raw, ok := files[strings.TrimPrefix(agentproto.ConfigPath, "/")]
	if !ok {
		return cfg, nil, fmt.Errorf("initramfs %s: no %s", p, agentproto.ConfigPath)
	}
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return cfg, nil, fmt.Errorf("initramfs %s: agent config: %w", p, err)
	}
	if cfg.Transport != agentproto.TransportVirtioSerial || cfg.HostKey == "" || cfg.AuthorizedKey == "" {
		return cfg, nil, fmt.Errorf("initramfs %s: unexpected agent config (transport %q)", p, cfg.Transport)
	}
	return cfg, files, nil
}

// readCpio returns the regular files of a sequence of uncompressed newc
// archives, by name.
func readCpio(p string) (map[string][]byte, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{}
	pad4 := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; off < len(b); {
		if b[off] == 0 { // padding between archives
			off++
			continue
		}
		if off+110 > len(b) || string(b[off:off+6]) != "070701" {
			return nil, fmt.Errorf("cpio %s: bad header at %d", p, off)
		}
		field := func(i int) int {
			v, _ := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			return int(v)
		}
		mode, size, nameSize := field(1), field(6), field(11)
		nameEnd := off + 110 + nameSize
		if nameEnd > len(b) {
			return nil, io.ErrUnexpectedEOF
		}
		name := strings.TrimRight(string(b[off+110:nameEnd]), "\x00")
		data := pad4(nameEnd)
		if data+size > len(b) {
			return nil, io.ErrUnexpectedEOF
		}
		if mode&0o170000 == 0o100000 && name != "TRAILER!!!" {
			files[name] = b[data : data+size]
		}
		off = pad4(data + size)
	}
	return files, nil
}

// fileOpen reports whether f is open.
func fileOpen(f *os.File) bool {
	_, err := f.Stat()
	return err == nil
}
