package qemu

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/kvmcheck"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmtest"
)

// QEMU-specific tests. What every backend must do is checked by the
// conformance suite (TestConformance, package vmmtest); the tests here
// cover QMP, QEMU's runtime file names, QEMU's own errors and
// qemu-only validation.

func requireQEMU(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath(DefaultBinary); err != nil {
		testenv.Missing(t, "%s not installed: %v", DefaultBinary, err)
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// assertNoRuntimeFiles checks that dir holds none of QEMU's runtime files,
// and that no QEMU process uses them.
func assertNoRuntimeFiles(t *testing.T, d *Driver, dir string) {
	t.Helper()
	paths := PathsFor(dir)
	for _, p := range paths.files() {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("runtime file %s left behind (%v)", p, err)
		}
	}
	if pids := d.findQEMU(paths); len(pids) != 0 {
		t.Errorf("qemu processes left behind: %v", pids)
	}
}

// TestBootQEMU boots a guest over runtime files a crashed QEMU left behind,
// then checks what only QEMU has: the accelerator choice, QMP status, the
// virtio-blk disk the guest sees, and the refusal of a second QEMU in the
// same runtime directory.
func TestBootQEMU(t *testing.T) {
	requireQEMU(t)
	img := findTestImage(t)
	spec := img.spec(t, filepath.Join(t.TempDir(), "vm"), vmmtest.RunForever)
	d := New(Config{}, testLogger(t))
	ctx, cancel := context.WithTimeout(context.Background(), vmmtest.Timeout)
	defer cancel()
	// Runtime files a crashed VMM left behind do not stop a new start.
	if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	stale := PathsFor(spec.Dir)
	for _, p := range stale.files() {
		if err := os.WriteFile(p, []byte("1\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	h, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Kill(context.Background(), h)
	if h.ControlSocket != stale.QMPSocket || h.AgentSocket != stale.AgentSocket || h.PIDFile != stale.PIDFile ||
		!slices.Equal(h.DataSockets, stale.DataSockets) || len(h.DataSockets) != DataPorts {
		t.Errorf("handle %+v does not use the paths of PathsFor(%s)", h, spec.Dir)
	}
	// A daemon that died before recording h finds the same VMM again.
	if r, ok := d.Recover(spec.Dir); !ok || !reflect.DeepEqual(r, h) {
		t.Errorf("Recover(%s) = %+v, %v; want %+v", spec.Dir, r, ok, h)
	}
	if _, ok := d.Recover(t.TempDir()); ok {
		t.Error("Recover found a VMM in an empty directory")
	}
	if p := kvmcheck.Probe(); !p.Usable && h.Accel != vmm.AccelTCG {
		t.Errorf("accel = %q on a host where KVM is not usable (%s), want tcg", h.Accel, p.Reason)
	}
	if err := vmmtest.WaitForConsole(ctx, spec.ConsoleLog, vmmtest.Marker); err != nil {
		t.Fatal(err)
	}
	console, _ := os.ReadFile(spec.ConsoleLog)
	if want := "vmmtest-disk-sectors=" + strconv.Itoa(testDiskBytes/512); !slices.Contains(strings.Fields(string(console)), want) {
		t.Errorf("guest did not see the virtio-blk disk (want %q):\n%s", want, console)
	}

	q, err := DialQMP(ctx, h.ControlSocket)
	if err != nil {
		t.Fatal(err)
	}
	st, err := q.QueryStatus(ctx)
	q.Close()
	if err != nil || st != "running" {
		t.Errorf("QueryStatus = %q, %v; want running", st, err)
	}

	// A second VM in the same runtime directory is refused, and the refusal
	// leaves the first one alone.
	if _, err := d.Start(ctx, spec); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Errorf("second Start in the same dir = %v, want already running", err)
	}
	if !d.Alive(h) {
		t.Fatal("the refused second Start stopped the first VM")
	}
	if _, err := os.Lstat(h.ControlSocket); err != nil {
		t.Errorf("the refused second Start removed the QMP socket: %v", err)
	}

	if err := d.Kill(ctx, h); err != nil {
		t.Fatal(err)
	}
	assertNoRuntimeFiles(t, d, spec.Dir)
}

// TestStartValidation covers the checks the conformance suite does not
// (see vmmtest's InvalidSpec): they fail before QEMU is looked up.
func TestStartValidation(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	os.WriteFile(file, []byte("x"), 0o644)
	good := vmm.Spec{ID: "v", Dir: dir, CPUs: 1, MemoryMiB: 128, Kernel: file, RootDisk: vmm.Disk{Path: file, Format: vmm.FormatRaw}}
	tests := map[string]func(*vmm.Spec){
		"memory":   func(s *vmm.Spec) { s.MemoryMiB = -1 },
		"initrd":   func(s *vmm.Spec) { s.Initrd = filepath.Join(dir, "nope") },
		"kernel":   func(s *vmm.Spec) { s.Kernel = dir },
		"id":       func(s *vmm.Spec) { s.ID = "" },
		"long dir": func(s *vmm.Spec) { s.Dir = "/" + strings.Repeat("d", 120) },
		"accel":    func(s *vmm.Spec) { s.Accel = "hvf" },
	}
	d := New(Config{Binary: "/nonexistent/qemu"}, nil)
	for name, mut := range tests {
		s := good
		mut(&s)
		if _, err := d.Start(context.Background(), s); err == nil {
			t.Errorf("%s: Start succeeded", name)
		} else if !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s: Start = %v, want an ErrInvalid error", name, err)
		}
	}
}

// TestStartQEMUFails makes QEMU itself fail (a raw file declared as qcow2):
// the error carries QEMU's message and nothing is left behind.
func TestStartQEMUFails(t *testing.T) {
	requireQEMU(t)
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinuz")
	os.WriteFile(kernel, []byte("not a kernel"), 0o644)
	disk := filepath.Join(dir, "root.raw")
	os.WriteFile(disk, make([]byte, 1<<20), 0o644)
	spec := vmm.Spec{
		ID: "fails", Name: "fails", Dir: filepath.Join(dir, "vm"), CPUs: 1, MemoryMiB: 128,
		Kernel: kernel, RootDisk: vmm.Disk{Path: disk, Format: vmm.FormatQcow2}, Accel: vmm.AccelTCG,
	}
	d := New(Config{}, testLogger(t))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := d.Start(ctx, spec)
	if err == nil {
		t.Fatal("Start succeeded")
	}
	t.Logf("error: %v", err)
	if !strings.Contains(err.Error(), "qcow2") || !strings.Contains(err.Error(), "qemu failed") {
		t.Errorf("error lacks qemu's message: %v", err)
	}
	assertNoRuntimeFiles(t, d, spec.Dir)
}

// testConfine returns a confinement for tests: the banger-vmm user (created
// if missing, as bangerd does) and cgroups under a parent of this test
// process's own, removed at the end. It skips where confinement can't work.
func testConfine(t *testing.T) *Confine {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("confinement needs root")
	}
	parent := "banger-test-" + strconv.Itoa(os.Getpid())
	c := NewConfine(context.Background(), ConfineOptions{CgroupParent: parent, MemoryOverheadMiB: 256})
	if c.Err != nil {
		t.Fatalf("confinement unavailable on this host: %v", c.Err)
	}
	t.Cleanup(func() {
		// The VMs' groups first (an aborted test leaves them), then the parent.
		for _, ctl := range []string{"", "memory", "pids", "cpu"} {
			dir := filepath.Join("/sys/fs/cgroup", ctl, parent)
			children, _ := os.ReadDir(dir)
			for _, c := range children {
				if c.IsDir() {
					os.Remove(filepath.Join(dir, c.Name()))
				}
			}
			os.Remove(dir)
		}
	})
	return c
}
