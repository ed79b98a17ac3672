// Package vmmtest is the conformance suite every vmm.Driver backend runs
// (after containerd's core/snapshots/testsuite). The contract it checks is
// written down in docs/dev/vmm-drivers.md and in package vmm.
//
// A backend's test calls Run with a Factory:
//
//	func TestConformance(t *testing.T) {
//		vmmtest.Run(t, vmmtest.Factory{
//			New:  func(t *testing.T) vmm.Driver { return mybackend.New(...) },
//			Spec: mySpec, // a bootable spec whose guest does what Behaviour says
//		})
//	}
//
// The suite boots real VMs and never imports a concrete driver.
package vmmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/initramfs"
	"github.com/bangerdev/banger/internal/kmod"
	"github.com/bangerdev/banger/internal/vmm"
)

// Behaviour is what the guest of a spec made by Factory.Spec does.
type Behaviour int

const (
	// PowerOffAfterBoot: the guest prints Marker on its serial console
	// (Spec.ConsoleLog), then powers off by itself.
	PowerOffAfterBoot Behaviour = iota + 1
	// RunForever: the guest starts echoing every byte it reads on the
	// agent transport (what DialAgent connects to) back to it, and on
	// each data port (what DialData connects to, for a driver that is a
	// vmm.DataDialer), then prints Marker and runs until it is killed. It
	// ignores the ACPI power button. The echo must survive the host
	// closing its connection and dialing again.
	RunForever
)

func (b Behaviour) String() string {
	switch b {
	case PowerOffAfterBoot:
		return "PowerOffAfterBoot"
	case RunForever:
		return "RunForever"
	}
	return "Behaviour(" + strconv.Itoa(int(b)) + ")"
}

// Marker is the line a test guest prints on its serial console once it is
// ready (see Behaviour).
const Marker = "BANGER-VMMTEST-GUEST-READY"

// Timeout bounds each subtest (a TCG boot takes 2-4 s).
const Timeout = 60 * time.Second

// promptly is how fast an operation that has nothing to wait for (Wait on a
// VMM that Kill already stopped, Shutdown or DialAgent on a stopped VM) must
// return.
const promptly = 2 * time.Second

// Factory supplies what the suite needs from a backend.
type Factory struct {
	// New returns a fresh driver instance. The suite calls it more than
	// once per subtest to model a restarted daemon: instances must not
	// share per-VM state.
	New func(t *testing.T) vmm.Driver
	// Spec returns a bootable spec whose Dir is dir, whose guest behaves as
	// b says, and whose ConsoleLog is set. dir may not exist yet; Spec may
	// create it and put files there (they count as the caller's). The spec
	// uses one of the driver's DiskFormats.
	Spec func(t *testing.T, dir string, b Behaviour) vmm.Spec
}

// Run runs the conformance suite against the backend f describes. The
// subtests run one after another; each boots at most two VMs and is
// bounded by Timeout.
func Run(t *testing.T, f Factory) {
	t.Helper()
	if f.New == nil || f.Spec == nil {
		t.Fatal("vmmtest: Factory.New and Factory.Spec are required")
	}
	tests := []struct {
		name string
		fn   func(t *testing.T, e *env)
	}{
		{"KillRunning", testKillRunning},
		{"GuestPowerOff", testGuestPowerOff},
		{"StartContextCancelled", testStartContextCancelled},
		{"HandleAfterRestart", testHandleAfterRestart},
		{"StaleHandle", testStaleHandle},
		{"InvalidSpec", testInvalidSpec},
		{"StartInterrupted", testStartInterrupted},
		{"Shutdown", testShutdown},
		{"DialAgent", testDialAgent},
		{"DialData", testDialData},
		{"ConcurrentStart", testConcurrentStart},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), Timeout)
			defer cancel()
			tc.fn(t, &env{f: f, ctx: ctx, root: t.TempDir()})
		})
	}
}

// env is one subtest's context.
type env struct {
	f    Factory
	ctx  context.Context
	root string
}

// spec returns the factory's spec for a VM directory named name.
func (e *env) spec(t *testing.T, name string, b Behaviour) vmm.Spec {
	t.Helper()
	dir := filepath.Join(e.root, name)
	s := e.f.Spec(t, dir, b)
	if s.Dir != dir {
		t.Fatalf("Factory.Spec: Dir = %q, want %q", s.Dir, dir)
	}
	if s.ConsoleLog == "" {
		t.Fatal("Factory.Spec: ConsoleLog not set")
	}
	return s
}

// start starts spec, checks the handle, and kills the VM when the test ends.
// It returns what Dir held before Start.
func (e *env) start(t *testing.T, d vmm.Driver, spec vmm.Spec) (vmm.Handle, dirState) {
	t.Helper()
	before := readDir(t, spec.Dir)
	t0 := time.Now()
	h, err := d.Start(e.ctx, spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Logf("%s: started in %v (pid %d, accel %s)", filepath.Base(spec.Dir), time.Since(t0).Round(time.Millisecond), h.PID, h.Accel)
	killAtEnd(t, d, h)
	checkHandle(t, d, spec, h)
	return h, before
}

// killAtEnd kills h when t ends, whatever happened.
func killAtEnd(t *testing.T, d vmm.Driver, h vmm.Handle) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := d.Kill(ctx, h); err != nil {
			t.Errorf("Kill at the end of the test: %v", err)
		}
	})
}

// checkHandle checks what a Handle must carry.
func checkHandle(t *testing.T, d vmm.Driver, spec vmm.Spec, h vmm.Handle) {
	t.Helper()
	if h.Driver != d.Name() {
		t.Errorf("Handle.Driver = %q, want %q", h.Driver, d.Name())
	}
	if h.PID <= 0 {
		t.Errorf("Handle.PID = %d", h.PID)
	}
	if h.StartTime == 0 {
		t.Error("Handle.StartTime is 0: nothing guards against pid reuse")
	}
	if h.Accel == "" {
		t.Error("Handle.Accel is empty")
	}
	if h.ControlSocket == "" || h.AgentSocket == "" {
		t.Errorf("Handle lacks a socket: control %q, agent %q", h.ControlSocket, h.AgentSocket)
	}
	for _, p := range runtimeFiles(h) {
		if !inDir(spec.Dir, p) {
			t.Errorf("runtime file %s is outside Spec.Dir %s", p, spec.Dir)
		}
	}
	if _, err := os.Lstat(h.ControlSocket); err != nil {
		t.Errorf("control socket after Start: %v", err)
	}
	if _, ok := d.(vmm.DataDialer); ok {
		if n := len(h.DataSockets); n == 0 || n > agentproto.MaxDataPorts {
			t.Errorf("a vmm.DataDialer's Handle has %d data sockets, want 1 to %d", n, agentproto.MaxDataPorts)
		}
	} else if len(h.DataSockets) > 0 {
		t.Errorf("Handle has data sockets %v but the driver is no vmm.DataDialer", h.DataSockets)
	}
}

func runtimeFiles(h vmm.Handle) []string {
	var ps []string
	for _, p := range append([]string{h.ControlSocket, h.AgentSocket, h.PIDFile}, h.DataSockets...) {
		if p != "" {
			ps = append(ps, p)
		}
	}
	return ps
}

func inDir(dir, p string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != "." && !strings.HasPrefix(rel, "..")
}

// waitMarker waits until the guest printed Marker.
func (e *env) waitMarker(t *testing.T, spec vmm.Spec) {
	t.Helper()
	t0 := time.Now()
	if err := WaitForConsole(e.ctx, spec.ConsoleLog, Marker); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: guest ready after %v", filepath.Base(spec.Dir), time.Since(t0).Round(time.Millisecond))
}

// WaitForConsole polls the console log at path until it contains s or ctx
// ends. The error holds the end of the log.
func WaitForConsole(ctx context.Context, path, s string) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		b, _ := os.ReadFile(path)
		if bytes.Contains(b, []byte(s)) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("console %s never showed %q: %w\n%s", path, s, ctx.Err(), consoleTail(path))
		case <-tick.C:
		}
	}
}

// consoleTail returns the end of a console log, for failure messages.
func consoleTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "--- no console log: " + err.Error()
	}
	s := strings.TrimSpace(string(b))
	if len(s) > 3000 {
		s = "..." + s[len(s)-3000:]
	}
	return "--- console tail ---\n" + s
}

// dirState is the set of names in a directory.
type dirState []string

func readDir(t *testing.T, dir string) dirState {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var names dirState
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// assertGone checks that the VM of spec left nothing behind: none of h's
// runtime files, nothing in Dir but what was there before (and the console
// log when allowed), and no process using Dir.
func assertGone(t *testing.T, spec vmm.Spec, h vmm.Handle, before dirState, allowConsole bool) {
	t.Helper()
	for _, p := range runtimeFiles(h) {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("runtime file %s left behind (lstat: %v)", p, err)
		}
	}
	allowed := slices.Clone(before)
	if allowConsole && filepath.Dir(spec.ConsoleLog) == filepath.Clean(spec.Dir) {
		allowed = append(allowed, filepath.Base(spec.ConsoleLog))
	}
	for _, n := range readDir(t, spec.Dir) {
		if !slices.Contains(allowed, n) {
			t.Errorf("%s left behind in Dir (before Start it held %v)", n, []string(before))
		}
	}
	if ps := ProcessesUsing(spec.Dir); len(ps) > 0 {
		t.Errorf("processes still use %s: %v", spec.Dir, ps)
	}
	if c := h.Confinement; c != nil {
		for _, p := range c.Cgroups {
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("cgroup %s left behind (stat: %v)", p, err)
			}
		}
	}
}

// ProcessesUsing returns the live processes (zombies excluded, the caller
// excluded) that name a path under dir on their command line or hold a file
// under dir open, as "pid (comm)". The contract requires a VMM process to
// name its runtime directory on its command line, so this finds every VMM
// process of a VM directory whatever the backend.
func ProcessesUsing(dir string) []string {
	dir = filepath.Clean(dir)
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var found []string
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		proc := filepath.Join("/proc", ent.Name())
		stat, err := os.ReadFile(filepath.Join(proc, "stat"))
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 || i+2 >= len(stat) || stat[i+2] == 'Z' || stat[i+2] == 'X' {
			continue
		}
		comm := string(stat[bytes.IndexByte(stat, '(')+1 : i])
		if usesDir(proc, dir) {
			found = append(found, fmt.Sprintf("%d (%s)", pid, comm))
		}
	}
	return found
}

func usesDir(proc, dir string) bool {
	if cl, err := os.ReadFile(filepath.Join(proc, "cmdline")); err == nil {
		for _, arg := range bytes.Split(cl, []byte{0}) {
			if string(arg) == dir || bytes.Contains(arg, []byte(dir+"/")) {
				return true
			}
		}
	}
	fds, _ := os.ReadDir(filepath.Join(proc, "fd"))
	for _, fd := range fds {
		if l, err := os.Readlink(filepath.Join(proc, "fd", fd.Name())); err == nil && (l == dir || strings.HasPrefix(l, dir+"/")) {
			return true
		}
	}
	return false
}

// echo dials the agent transport of h, writes a random line and checks the
// guest sends it back.
func (e *env) echo(t *testing.T, d vmm.Driver, spec vmm.Spec, h vmm.Handle) {
	t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 20*time.Second)
	defer cancel()
	conn, err := d.DialAgent(ctx, h)
	if err != nil {
		t.Fatalf("DialAgent: %v", err)
	}
	defer conn.Close()
	if err := echoLine(ctx, conn, "agent transport"); err != nil {
		t.Fatalf("%v\n%s", err, consoleTail(spec.ConsoleLog))
	}
}

// echoLine writes a random line on conn (what, in messages) and checks
// that the same line comes back before ctx ends.
func echoLine(ctx context.Context, conn net.Conn, what string) error {
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	line := "vmmtest-echo-" + randomHex(8) + "\n"
	if _, err := conn.Write([]byte(line)); err != nil {
		return fmt.Errorf("write to the %s: %w", what, err)
	}
	got, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read the echo from the %s: %w (got %q)", what, err, got)
	}
	if got != line {
		return fmt.Errorf("the %s echoed %q, want %q", what, got, line)
	}
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// testKillRunning: a running VM is alive, boots, and Kill stops it for
// good; Kill and Cleanup are idempotent.
func testKillRunning(t *testing.T, e *env) {
	spec := e.spec(t, "vm", RunForever)
	d := e.f.New(t)
	h, before := e.start(t, d, spec)
	if !d.Alive(h) {
		t.Fatal("Alive = false right after Start")
	}
	e.waitMarker(t, spec)
	if !d.Alive(h) {
		t.Fatal("Alive = false after boot")
	}

	// Wait on a running VM ends with its context.
	wctx, cancel := context.WithTimeout(e.ctx, 300*time.Millisecond)
	err := d.Wait(wctx, h)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Wait on a running VM with a 300ms context = %v, want context.DeadlineExceeded", err)
	}
	// Cleanup refuses a running VM and leaves it controllable.
	if err := d.Cleanup(h); err == nil {
		t.Error("Cleanup of a running VM succeeded")
	}
	if !d.Alive(h) {
		t.Fatal("Alive = false after a refused Cleanup")
	}
	for _, p := range runtimeFiles(h) {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("refused Cleanup removed %s: %v", p, err)
		}
	}

	// A monitor, as the daemon runs one per VM: Wait, then Cleanup,
	// concurrently with the Kill below.
	monitor := make(chan error, 1)
	go func() {
		if err := d.Wait(e.ctx, h); err != nil {
			monitor <- fmt.Errorf("wait: %w", err)
			return
		}
		if err := d.Cleanup(h); err != nil {
			monitor <- fmt.Errorf("cleanup: %w", err)
			return
		}
		monitor <- nil
	}()

	t0 := time.Now()
	if err := d.Kill(e.ctx, h); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	tKill := time.Since(t0)
	if d.Alive(h) {
		t.Error("Alive = true after Kill")
	}
	select {
	case err := <-monitor:
		if err != nil {
			t.Errorf("monitor running concurrently with Kill: %v", err)
		}
	case <-time.After(promptly):
		t.Errorf("a Wait started before Kill had not returned %v after Kill returned", promptly)
	}
	t0 = time.Now()
	if err := d.Wait(e.ctx, h); err != nil {
		t.Errorf("Wait after Kill: %v", err)
	}
	if el := time.Since(t0); el > promptly {
		t.Errorf("Wait after Kill took %v", el)
	}
	assertGone(t, spec, h, before, true)
	if err := d.Kill(e.ctx, h); err != nil {
		t.Errorf("second Kill: %v", err)
	}
	for i := range 2 {
		if err := d.Cleanup(h); err != nil {
			t.Errorf("Cleanup #%d after Kill: %v", i+1, err)
		}
	}
	assertGone(t, spec, h, before, true)
	t.Logf("kill took %v", tKill.Round(time.Millisecond))
}

// testGuestPowerOff: a guest that powers off ends its VMM; Wait sees it and
// Cleanup removes what is left.
func testGuestPowerOff(t *testing.T, e *env) {
	spec := e.spec(t, "vm", PowerOffAfterBoot)
	d := e.f.New(t)
	h, before := e.start(t, d, spec)
	e.waitMarker(t, spec)
	t0 := time.Now()
	if err := d.Wait(e.ctx, h); err != nil {
		t.Fatalf("Wait for the guest to power off: %v\n%s", err, consoleTail(spec.ConsoleLog))
	}
	t.Logf("vmm exited %v after the marker", time.Since(t0).Round(time.Millisecond))
	if d.Alive(h) {
		t.Error("Alive = true after Wait returned")
	}
	for i := range 2 {
		if err := d.Cleanup(h); err != nil {
			t.Errorf("Cleanup #%d: %v", i+1, err)
		}
	}
	assertGone(t, spec, h, before, true)
	if err := d.Kill(e.ctx, h); err != nil {
		t.Errorf("Kill of a VM that powered off: %v", err)
	}
}

// testStartContextCancelled: the VM's lifetime is not the lifetime of the
// context that started it.
func testStartContextCancelled(t *testing.T, e *env) {
	spec := e.spec(t, "vm", RunForever)
	d := e.f.New(t)
	sctx, cancel := context.WithCancel(e.ctx)
	h, err := d.Start(sctx, spec)
	cancel()
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	killAtEnd(t, d, h)
	// Booting takes seconds: the cancellation has long been seen when the
	// marker shows.
	e.waitMarker(t, spec)
	if !d.Alive(h) {
		t.Fatal("the VM died after its Start context was cancelled")
	}
	e.echo(t, d, spec, h)
	if err := d.Kill(e.ctx, h); err != nil {
		t.Fatalf("Kill: %v", err)
	}
}

// testHandleAfterRestart: the handle, stored as JSON, lets a new driver
// instance (a restarted daemon) control the VM.
func testHandleAfterRestart(t *testing.T, e *env) {
	spec := e.spec(t, "vm", RunForever)
	d1 := e.f.New(t)
	h1, before := e.start(t, d1, spec)
	stored, err := json.Marshal(h1)
	if err != nil {
		t.Fatal(err)
	}
	var h vmm.Handle
	if err := json.Unmarshal(stored, &h); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(h, h1) {
		t.Fatalf("handle changed through JSON: %+v, want %+v", h, h1)
	}
	d2 := e.f.New(t)
	killAtEnd(t, d2, h)
	e.waitMarker(t, spec)
	if !d2.Alive(h) {
		t.Fatal("a new driver says the VM is not alive")
	}
	e.echo(t, d2, spec, h)
	if err := d2.Kill(e.ctx, h); err != nil {
		t.Fatalf("Kill through a new driver: %v", err)
	}
	if d2.Alive(h) || d1.Alive(h1) {
		t.Error("Alive = true after Kill through a new driver")
	}
	if err := d2.Wait(e.ctx, h); err != nil {
		t.Errorf("Wait: %v", err)
	}
	assertGone(t, spec, h, before, true)
}

// testStaleHandle: the handle of a VM that was stopped and then started
// again in the same Dir (a restart) no longer controls anything: Alive is
// false, Wait returns, and Kill and Cleanup leave the new VM and its
// runtime files alone.
func testStaleHandle(t *testing.T, e *env) {
	spec := e.spec(t, "vm", RunForever)
	d := e.f.New(t)
	old, before := e.start(t, d, spec)
	e.waitMarker(t, spec)
	if err := d.Kill(e.ctx, old); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	// Restart in the same Dir, with a fresh console log.
	if err := os.Remove(spec.ConsoleLog); err != nil {
		t.Fatal(err)
	}
	spec = e.spec(t, "vm", RunForever)
	h, _ := e.start(t, d, spec)
	if reflect.DeepEqual(h, old) {
		t.Fatalf("the restarted VM has the old handle %+v", h)
	}
	if d.Alive(old) {
		t.Error("Alive(old handle) = true while a new VM runs in the same Dir")
	}
	t0 := time.Now()
	if err := d.Wait(e.ctx, old); err != nil {
		t.Errorf("Wait(old handle): %v", err)
	}
	if el := time.Since(t0); el > promptly {
		t.Errorf("Wait(old handle) took %v", el)
	}
	if err := d.Cleanup(old); err != nil {
		t.Logf("Cleanup(old handle): %v", err)
	}
	if err := d.Kill(e.ctx, old); err != nil {
		t.Errorf("Kill(old handle): %v", err)
	}
	for _, p := range runtimeFiles(h) {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("Kill or Cleanup of the old handle removed the new VM's %s", p)
		}
	}
	if !d.Alive(h) {
		t.Fatal("Kill of the old handle stopped the new VM")
	}
	e.waitMarker(t, spec)
	e.echo(t, d, spec, h)
	if err := d.Kill(e.ctx, h); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	assertGone(t, spec, h, before, true)
}

// testInvalidSpec: Start refuses a spec it can't boot, and leaves Dir as it
// found it and no process.
func testInvalidSpec(t *testing.T, e *env) {
	unsupported := ""
	formats := e.f.New(t).DiskFormats()
	for _, f := range []string{vmm.FormatRaw, vmm.FormatQcow2, "vmdk", "vdi", "vhdx"} {
		if !slices.Contains(formats, f) {
			unsupported = f
			break
		}
	}
	assets := t.TempDir()
	missing := filepath.Join(assets, "missing")
	empty := filepath.Join(assets, "empty-vmlinuz")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		mut  func(*vmm.Spec)
		// late: the spec looks valid, only the VMM process finds out.
		// The console log may remain (it may tell why).
		late bool
	}{
		{"MissingKernel", func(s *vmm.Spec) { s.Kernel = filepath.Join(missing, "vmlinuz") }, false},
		{"MissingDisk", func(s *vmm.Spec) { s.RootDisk.Path = filepath.Join(missing, "root.img") }, false},
		{"ZeroCPUs", func(s *vmm.Spec) { s.CPUs = 0 }, false},
		{"UnsupportedDiskFormat", func(s *vmm.Spec) { s.RootDisk.Format = unsupported }, false},
		{"EmptyKernel", func(s *vmm.Spec) { s.Kernel = empty }, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := e.f.New(t)
			spec := e.spec(t, tc.name, RunForever)
			tc.mut(&spec)
			// The caller's own file in Dir must survive.
			if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
				t.Fatal(err)
			}
			keep := filepath.Join(spec.Dir, "caller-file")
			if err := os.WriteFile(keep, []byte("mine"), 0o600); err != nil {
				t.Fatal(err)
			}
			before := readDir(t, spec.Dir)
			h, err := d.Start(e.ctx, spec)
			if err == nil {
				killAtEnd(t, d, h)
				t.Fatalf("Start succeeded (pid %d)", h.PID)
			}
			t.Logf("Start: %v", err)
			assertGone(t, spec, h, before, tc.late)
			if b, err := os.ReadFile(keep); err != nil || string(b) != "mine" {
				t.Errorf("the caller's file in Dir changed: %q, %v", b, err)
			}
		})
	}
}

// testStartInterrupted cancels Start at various points of the VMM's
// start-up: either Start returns a running VM, or it leaves nothing.
func testStartInterrupted(t *testing.T, e *env) {
	spec := e.spec(t, "vm", RunForever)
	d := e.f.New(t)
	var started int
	for _, after := range []time.Duration{0, 5 * time.Millisecond, 15 * time.Millisecond, 30 * time.Millisecond, 60 * time.Millisecond, 90 * time.Millisecond, 120 * time.Millisecond, 160 * time.Millisecond, 220 * time.Millisecond, 400 * time.Millisecond} {
		before := readDir(t, spec.Dir)
		ctx, cancel := context.WithTimeout(e.ctx, after)
		h, err := d.Start(ctx, spec)
		cancel()
		if err == nil {
			started++
			if !d.Alive(h) {
				t.Errorf("after %v: Start succeeded but the VM is not alive", after)
			}
			if err := d.Kill(e.ctx, h); err != nil {
				t.Fatalf("Kill: %v", err)
			}
		} else {
			t.Logf("interrupted after %v: %v", after, err)
		}
		assertGone(t, spec, h, before, true)
	}
	t.Logf("%d of 10 starts completed before their deadline", started)
}

// testShutdown: Shutdown delivers the power-off request to a running VM;
// Shutdown and DialAgent fail on a stopped one.
func testShutdown(t *testing.T, e *env) {
	spec := e.spec(t, "vm", RunForever)
	d := e.f.New(t)
	h, _ := e.start(t, d, spec)
	e.waitMarker(t, spec)
	t0 := time.Now()
	if err := d.Shutdown(e.ctx, h); err != nil {
		t.Errorf("Shutdown of a running VM: %v", err)
	}
	tShutdown := time.Since(t0)
	t0 = time.Now()
	if err := d.Kill(e.ctx, h); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	t.Logf("shutdown request took %v, kill %v", tShutdown.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	if err := d.Shutdown(e.ctx, h); !errors.Is(err, vmm.ErrNotRunning) {
		t.Errorf("Shutdown of a killed VM = %v, want vmm.ErrNotRunning", err)
	}
	if conn, err := d.DialAgent(e.ctx, h); !errors.Is(err, vmm.ErrNotRunning) {
		if conn != nil {
			conn.Close()
		}
		t.Errorf("DialAgent on a killed VM = %v, want vmm.ErrNotRunning", err)
	}
	if el := time.Since(t0); el > promptly {
		t.Errorf("Shutdown and DialAgent on a killed VM took %v", el)
	}
}

// testDialAgent: bytes written on DialAgent's connection reach the guest
// (which echoes them), also on a second connection after the first closed.
func testDialAgent(t *testing.T, e *env) {
	spec := e.spec(t, "vm", RunForever)
	d := e.f.New(t)
	h, _ := e.start(t, d, spec)
	e.waitMarker(t, spec)
	e.echo(t, d, spec, h)
	e.echo(t, d, spec, h) // reconnect, as a restarted daemon does
	if err := d.Kill(e.ctx, h); err != nil {
		t.Fatalf("Kill: %v", err)
	}
}

// dataEchoBytes is the size of the binary stream testDialData sends
// through a data port and back.
const dataEchoBytes = 1 << 20

// testDialData: for a driver that is a vmm.DataDialer, every data port of
// the handle carries bytes to the guest and back (the guest echoes), each
// port on its own connection at the same time, again after a reconnect,
// and a binary stream of dataEchoBytes unchanged; a port out of range is
// an error; on a killed VM DialData fails with ErrNotRunning, promptly.
func testDialData(t *testing.T, e *env) {
	d := e.f.New(t)
	dd, ok := d.(vmm.DataDialer)
	if !ok {
		t.Skipf("driver %s has no data ports (not a vmm.DataDialer)", d.Name())
	}
	spec := e.spec(t, "vm", RunForever)
	h, _ := e.start(t, d, spec)
	e.waitMarker(t, spec)
	ports := len(h.DataSockets)
	if ports == 0 {
		t.Fatal("Handle.DataSockets is empty")
	}
	ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
	defer cancel()

	// All ports at once, each its own line: no port carries another's
	// bytes.
	conns := make([]net.Conn, ports)
	for i := range ports {
		conn, err := dd.DialData(ctx, h, i)
		if err != nil {
			t.Fatalf("DialData(%d): %v", i, err)
		}
		defer conn.Close()
		conns[i] = conn
	}
	errs := make([]error, ports)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i, conn := range conns {
		wg.Go(func() { errs[i] = echoLine(ctx, conn, fmt.Sprintf("data port %d", i)) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("echo over %d data ports at once in %v", ports, time.Since(t0).Round(time.Millisecond))
	for _, conn := range conns {
		conn.Close()
	}

	// Reconnect to the last port, and send a binary stream through it.
	conn, err := dd.DialData(ctx, h, ports-1)
	if err != nil {
		t.Fatalf("DialData(%d) again: %v", ports-1, err)
	}
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	want := make([]byte, dataEchoBytes)
	rand.Read(want)
	t0 = time.Now()
	werr := make(chan error, 1)
	go func() {
		_, err := conn.Write(want)
		werr <- err
	}()
	got := make([]byte, len(want))
	n, err := io.ReadFull(conn, got)
	if err != nil {
		t.Fatalf("read the echo of %d bytes from data port %d: %v after %d bytes\n%s", len(want), ports-1, err, n, consoleTail(spec.ConsoleLog))
	}
	if err := <-werr; err != nil {
		t.Fatalf("write %d bytes to data port %d: %v", len(want), ports-1, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("data port %d echoed %d bytes that differ from those sent", ports-1, len(want))
	}
	t.Logf("%d bytes through data port %d and back in %v", len(want), ports-1, time.Since(t0).Round(time.Millisecond))
	conn.Close()

	for _, port := range []int{-1, ports} {
		conn, err := dd.DialData(ctx, h, port)
		if err == nil {
			conn.Close()
			t.Errorf("DialData(%d) of a VM with %d data ports succeeded", port, ports)
		} else if errors.Is(err, vmm.ErrNotRunning) {
			t.Errorf("DialData(%d) of a running VM = %v, want an error about the port", port, err)
		}
	}

	if err := d.Kill(e.ctx, h); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	t0 = time.Now()
	if conn, err := dd.DialData(e.ctx, h, 0); !errors.Is(err, vmm.ErrNotRunning) {
		if conn != nil {
			conn.Close()
		}
		t.Errorf("DialData on a killed VM = %v, want vmm.ErrNotRunning", err)
	}
	if el := time.Since(t0); el > promptly {
		t.Errorf("DialData on a killed VM took %v", el)
	}
}

// testConcurrentStart: one driver starts, then kills, two VMs at once.
func testConcurrentStart(t *testing.T, e *env) {
	d := e.f.New(t)
	specs := []vmm.Spec{e.spec(t, "vm-a", RunForever), e.spec(t, "vm-b", RunForever)}
	handles := make([]vmm.Handle, len(specs))
	befores := make([]dirState, len(specs))
	errs := make([]error, len(specs))
	var wg sync.WaitGroup
	for i, s := range specs {
		befores[i] = readDir(t, s.Dir)
		wg.Go(func() { handles[i], errs[i] = d.Start(e.ctx, s) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("Start %s: %v", specs[i].Name, err)
			continue
		}
		killAtEnd(t, d, handles[i])
	}
	if t.Failed() {
		t.FailNow()
	}
	if handles[0].PID == handles[1].PID {
		t.Fatalf("both VMs have pid %d", handles[0].PID)
	}
	for i, s := range specs {
		checkHandle(t, d, s, handles[i])
		e.waitMarker(t, s)
		if !d.Alive(handles[i]) {
			t.Errorf("%s not alive", s.Dir)
		}
	}
	for i := range specs {
		wg.Go(func() { errs[i] = d.Kill(e.ctx, handles[i]) })
	}
	wg.Wait()
	for i, s := range specs {
		if errs[i] != nil {
			t.Errorf("Kill %s: %v", s.Dir, errs[i])
		}
		if d.Alive(handles[i]) {
			t.Errorf("%s alive after Kill", s.Dir)
		}
		assertGone(t, s, handles[i], befores[i], true)
	}
}

// GuestPrelude starts the /init shell script of a BusyboxInitramfs guest:
// it mounts /proc, /sys and /dev and loads the kernel modules of /modules
// in order. $bb is busybox.
const GuestPrelude = `#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t devtmpfs dev /dev
for m in /modules/*.ko; do [ -e "$m" ] && $bb insmod "$m"; done
`

// BusyboxInitramfs writes to dst an initramfs (newc cpio) for a minimal
// test guest: the static busybox at host path busybox as /bin/busybox,
// initScript as /init (start it with GuestPrelude), and the kernel module
// files modules (host paths, each after its dependencies) as
// /modules/NN-<name>.ko.
func BusyboxInitramfs(dst, busybox, initScript string, modules []string) error {
	f, err := os.Create(dst)
	if err != nil {
		return fmt.Errorf("create initramfs: %w", err)
	}
	defer f.Close()
	bw := bufio.NewWriter(f)
	w := initramfs.NewWriter(bw)
	for _, d := range []string{"bin", "dev", "proc", "sys", "modules"} {
		if err := w.WriteDir(d, 0o755); err != nil {
			return err
		}
	}
	if err := w.WriteCharDevice("dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	if err := w.WriteFile("init", 0o755, []byte(initScript)); err != nil {
		return err
	}
	add := func(name string, mode os.FileMode, src string) error {
		b, err := os.ReadFile(src)
		if err != nil {
			return fmt.Errorf("initramfs: %w", err)
		}
		return w.WriteFile(name, mode, b)
	}
	if err := add("bin/busybox", 0o755, busybox); err != nil {
		return err
	}
	for i, m := range modules {
		if err := add(fmt.Sprintf("modules/%02d-%s.ko", i, kmod.ModuleName(m)), 0o644, m); err != nil {
			return err
		}
	}
	if err := w.Close(); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	return f.Close()
}
