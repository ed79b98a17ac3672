package qemu

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/kvmcheck"
	"github.com/bangerdev/banger/internal/vmm"
)

// These tests boot real VMs. They need qemu-system-x86_64, a static
// /bin/busybox (Debian: busybox-static) and a guest kernel at
// $BANGER_TEST_KERNEL or /var/cache/banger/testimage/vmlinuz
// (scripts/make-test-image.sh). The guest is a tiny initramfs whose /init is
// a busybox shell script; it only uses the serial console, so the kernel's
// modular virtio drivers are not needed.

const defaultTestKernel = "/var/cache/banger/testimage/vmlinuz"

func testKernel(t *testing.T) string {
	t.Helper()
	k := os.Getenv("BANGER_TEST_KERNEL")
	if k == "" {
		k = defaultTestKernel
	}
	if _, err := os.Stat(k); err != nil {
		t.Skipf("no guest kernel at %s (set BANGER_TEST_KERNEL or run scripts/make-test-image.sh): %v", k, err)
	}
	return k
}

func requireQEMU(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath(DefaultBinary); err != nil {
		t.Skipf("%s not installed: %v", DefaultBinary, err)
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

// cpioEntry is one member of a newc ("070701") cpio archive.
type cpioEntry struct {
	name         string
	mode         uint32 // including the file type bits
	data         []byte
	rdevMajor    uint32
	rdevMinor    uint32
	ino          uint32
	linkCount    uint32
	modifiedUnix uint32
}

// writeNewc writes entries as a newc cpio archive, the format the kernel
// unpacks as an initramfs.
func writeNewc(w io.Writer, entries []cpioEntry) error {
	var buf bytes.Buffer
	pad := func() {
		for buf.Len()%4 != 0 {
			buf.WriteByte(0)
		}
	}
	put := func(e cpioEntry) {
		nlink := e.linkCount
		if nlink == 0 {
			nlink = 1
		}
		fmt.Fprintf(&buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			e.ino, e.mode, 0, 0, nlink, e.modifiedUnix, len(e.data), 0, 0, e.rdevMajor, e.rdevMinor, len(e.name)+1, 0)
		buf.WriteString(e.name)
		buf.WriteByte(0)
		pad()
		buf.Write(e.data)
		pad()
	}
	for i, e := range entries {
		e.ino = uint32(i + 1)
		put(e)
	}
	put(cpioEntry{name: "TRAILER!!!"})
	_, err := w.Write(buf.Bytes())
	return err
}

const (
	sIFDIR = 0o040000
	sIFREG = 0o100000
	sIFCHR = 0o020000
)

// makeInitramfs writes an initramfs holding busybox and initScript as /init
// into dir and returns its path.
func makeInitramfs(t *testing.T, dir, initScript string) string {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("no /bin/busybox (install busybox-static): %v", err)
	}
	entries := []cpioEntry{
		{name: "bin", mode: sIFDIR | 0o755},
		{name: "dev", mode: sIFDIR | 0o755},
		{name: "dev/console", mode: sIFCHR | 0o600, rdevMajor: 5, rdevMinor: 1},
		{name: "proc", mode: sIFDIR | 0o755},
		{name: "sys", mode: sIFDIR | 0o755},
		{name: "bin/busybox", mode: sIFREG | 0o755, data: bb},
		{name: "init", mode: sIFREG | 0o755, data: []byte(initScript)},
	}
	var buf bytes.Buffer
	if err := writeNewc(&buf, entries); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "initramfs.cpio")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func randomMarker(t *testing.T) string {
	b := make([]byte, 8)
	rand.Read(b)
	return "BANGER-TEST-MARKER-" + hex.EncodeToString(b)
}

// bootSpec returns a spec for a small VM booting initScript. The runtime dir
// is Spec.Dir; the initramfs and the disk live in another directory.
func bootSpec(t *testing.T, initScript string) vmm.Spec {
	t.Helper()
	assets := t.TempDir()
	disk := filepath.Join(assets, "root.raw")
	if err := os.WriteFile(disk, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 16<<20); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "vm")
	return vmm.Spec{
		ID:         strings.ToLower(randomMarker(t)[len("BANGER-TEST-MARKER-"):]),
		Name:       "boottest",
		Dir:        dir,
		CPUs:       1,
		MemoryMiB:  256,
		Kernel:     testKernel(t),
		Initrd:     makeInitramfs(t, assets, initScript),
		Cmdline:    "panic=-1 quiet",
		RootDisk:   vmm.Disk{Path: disk, Format: vmm.FormatRaw},
		Accel:      vmm.AccelAuto,
		ConsoleLog: filepath.Join(dir, "console.log"),
	}
}

// waitForConsole polls the console log until it contains s or ctx ends.
func waitForConsole(ctx context.Context, path, s string) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		b, _ := os.ReadFile(path)
		if bytes.Contains(b, []byte(s)) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("console %s never showed %q: %w\n--- console tail ---\n%s", path, s, ctx.Err(), tail(string(b), 3000))
		case <-tick.C:
		}
	}
}

// assertNoRuntimeFiles checks that dir holds none of the driver's runtime
// files, and that no QEMU process uses them.
func assertNoRuntimeFiles(t *testing.T, d *Driver, dir string) {
	t.Helper()
	paths := PathsFor(dir)
	for _, p := range []string{paths.QMPSocket, paths.AgentSocket, paths.PIDFile} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("runtime file %s left behind (%v)", p, err)
		}
	}
	if pids := d.findQEMU(paths); len(pids) != 0 {
		t.Errorf("qemu processes left behind: %v", pids)
	}
}

func checkAccel(t *testing.T, h vmm.Handle) {
	t.Helper()
	if p := kvmcheck.Probe(); !p.Usable && h.Accel != vmm.AccelTCG {
		t.Errorf("accel = %q on a host where KVM is not usable (%s), want tcg", h.Accel, p.Reason)
	}
}

func TestBootPowerOff(t *testing.T) {
	requireQEMU(t)
	marker := randomMarker(t)
	spec := bootSpec(t, "#!/bin/busybox sh\n/bin/busybox echo "+marker+"\n/bin/busybox poweroff -f\n")
	d := New(Config{}, testLogger(t))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Runtime files a crashed VMM left behind do not stop a new start.
	os.MkdirAll(spec.Dir, 0o700)
	stale := PathsFor(spec.Dir)
	for _, p := range []string{stale.QMPSocket, stale.AgentSocket, stale.PIDFile} {
		os.WriteFile(p, []byte("1\n"), 0o600)
	}

	t0 := time.Now()
	h, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	tStart := time.Since(t0)
	defer d.Kill(context.Background(), h)
	checkAccel(t, h)
	if h.Driver != DriverName || h.PID <= 0 || h.StartTime == 0 || h.ControlSocket == "" || h.AgentSocket == "" || h.PIDFile == "" {
		t.Errorf("incomplete handle %+v", h)
	}
	if err := waitForConsole(ctx, spec.ConsoleLog, marker); err != nil {
		t.Fatal(err)
	}
	tMarker := time.Since(t0)
	if err := d.Wait(ctx, h); err != nil {
		t.Fatal(err)
	}
	tExit := time.Since(t0)
	if d.Alive(h) {
		t.Error("Alive after the guest powered off")
	}
	if err := d.Cleanup(h); err != nil {
		t.Fatal(err)
	}
	assertNoRuntimeFiles(t, d, spec.Dir)
	ents, _ := os.ReadDir(spec.Dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, []string{"console.log"}) {
		t.Errorf("runtime dir holds %v, want only console.log", names)
	}
	t.Logf("accel=%s start=%v marker=%v exit=%v", h.Accel, tStart, tMarker, tExit)
}

func TestBootKill(t *testing.T) {
	requireQEMU(t)
	marker := randomMarker(t)
	spec := bootSpec(t, "#!/bin/busybox sh\n/bin/busybox echo "+marker+"\nwhile :; do /bin/busybox sleep 3600; done\n")
	d := New(Config{}, testLogger(t))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// The VM must not depend on the context that started it.
	sctx, scancel := context.WithCancel(ctx)
	t0 := time.Now()
	h, err := d.Start(sctx, spec)
	scancel()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Kill(context.Background(), h)
	checkAccel(t, h)
	if err := waitForConsole(ctx, spec.ConsoleLog, marker); err != nil {
		t.Fatal(err)
	}
	tMarker := time.Since(t0)
	if !d.Alive(h) {
		t.Fatal("not alive after boot")
	}

	// A second VM in the same runtime directory is refused, and the refusal
	// leaves the first one alone.
	if _, err := d.Start(ctx, spec); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Errorf("second Start in the same dir = %v, want already running", err)
	}
	// A driver created later (a restarted daemon) adopts the VM from its
	// handle alone.
	d = New(Config{}, testLogger(t))
	if !d.Alive(h) {
		t.Fatal("not alive after boot")
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
	conn, err := d.DialAgent(ctx, h)
	if err != nil {
		t.Errorf("DialAgent: %v", err)
	} else {
		conn.Close()
	}
	// The guest has no ACPI event handler: the power button is delivered
	// and ignored.
	if err := d.Shutdown(ctx, h); err != nil {
		t.Errorf("Shutdown: %v", err)
	}

	t1 := time.Now()
	if err := d.Kill(ctx, h); err != nil {
		t.Fatal(err)
	}
	tKill := time.Since(t1)
	if d.Alive(h) {
		t.Error("Alive after Kill")
	}
	assertNoRuntimeFiles(t, d, spec.Dir)
	if err := d.Kill(ctx, h); err != nil {
		t.Errorf("Kill of an exited VM: %v", err)
	}
	if err := d.Shutdown(ctx, h); !errors.Is(err, vmm.ErrNotRunning) {
		t.Errorf("Shutdown after Kill = %v, want ErrNotRunning", err)
	}
	t.Logf("accel=%s marker=%v kill=%v", h.Accel, tMarker, tKill)
}

func TestStartMissingKernel(t *testing.T) {
	dir := t.TempDir()
	disk := filepath.Join(dir, "root.raw")
	os.WriteFile(disk, make([]byte, 4096), 0o644)
	spec := vmm.Spec{
		ID: "missing", Name: "missing", Dir: dir, CPUs: 1, MemoryMiB: 128,
		Kernel:   filepath.Join(dir, "no-such-vmlinuz"),
		RootDisk: vmm.Disk{Path: disk, Format: vmm.FormatRaw},
		Accel:    vmm.AccelTCG,
	}
	d := New(Config{}, testLogger(t))
	_, err := d.Start(context.Background(), spec)
	if err == nil || !strings.Contains(err.Error(), "kernel") {
		t.Fatalf("Start = %v, want a kernel error", err)
	}
	assertNoRuntimeFiles(t, d, dir)
}

func TestStartValidation(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	os.WriteFile(file, []byte("x"), 0o644)
	good := vmm.Spec{ID: "v", Dir: dir, CPUs: 1, MemoryMiB: 128, Kernel: file, RootDisk: vmm.Disk{Path: file, Format: vmm.FormatRaw}}
	tests := map[string]func(*vmm.Spec){
		"cpus":     func(s *vmm.Spec) { s.CPUs = 0 },
		"memory":   func(s *vmm.Spec) { s.MemoryMiB = -1 },
		"format":   func(s *vmm.Spec) { s.RootDisk.Format = "vmdk" },
		"disk":     func(s *vmm.Spec) { s.RootDisk.Path = filepath.Join(dir, "nope") },
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
		} else {
			t.Logf("%s: %v", name, err)
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

// TestStartInterrupted cancels Start at various points of QEMU's start-up:
// whatever the point, no process and no runtime file is left.
func TestStartInterrupted(t *testing.T) {
	requireQEMU(t)
	spec := bootSpec(t, "#!/bin/busybox sh\nwhile :; do /bin/busybox sleep 3600; done\n")
	d := New(Config{TSCKHz: func() (uint64, error) { return 0, errors.New("not needed") }}, testLogger(t))
	var started int
	for _, after := range []time.Duration{0, 5 * time.Millisecond, 15 * time.Millisecond, 30 * time.Millisecond, 60 * time.Millisecond, 90 * time.Millisecond, 120 * time.Millisecond, 160 * time.Millisecond, 220 * time.Millisecond, 400 * time.Millisecond} {
		ctx, cancel := context.WithTimeout(context.Background(), after)
		h, err := d.Start(ctx, spec)
		cancel()
		if err == nil {
			// Start-up finished in time: that VM is legitimately running.
			started++
			if err := d.Kill(context.Background(), h); err != nil {
				t.Fatal(err)
			}
		} else {
			t.Logf("interrupted after %v: %v", after, err)
		}
		assertNoRuntimeFiles(t, d, spec.Dir)
	}
	t.Logf("%d starts completed before their deadline", started)
}

// virtioModules are loaded, in this order, by TestBootVirtioAgent's guest.
var virtioModules = []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_console"}

// testModules finds the guest kernel's module tree ($BANGER_TEST_MODULES,
// or modules/lib/modules/<kernel-release> next to the test kernel, as
// scripts/make-test-image.sh lays it out) and returns the virtio module
// files in load order. Modules built into the kernel are simply absent.
func testModules(t *testing.T, kernel string) map[string]string {
	t.Helper()
	dir := os.Getenv("BANGER_TEST_MODULES")
	if dir == "" {
		rel, err := os.ReadFile(filepath.Join(filepath.Dir(kernel), "kernel-release"))
		if err != nil {
			t.Skipf("no kernel modules: set BANGER_TEST_MODULES to a lib/modules/<release> directory (%v)", err)
		}
		dir = filepath.Join(filepath.Dir(kernel), "modules", "lib", "modules", strings.TrimSpace(string(rel)))
	}
	found := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, e os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := e.Name()
		if m, ok := strings.CutSuffix(name, ".ko"); ok && slices.Contains(virtioModules, m) {
			found[m] = p
		}
		return nil
	})
	if err != nil {
		t.Skipf("no kernel modules at %s: %v", dir, err)
	}
	if _, ok := found["virtio_mmio"]; !ok {
		t.Skipf("no plain virtio_mmio.ko under %s", dir)
	}
	return found
}

// TestBootVirtioAgent checks the devices a stock kernel must find on the
// microvm machine through ACPI (virtio-mmio block and serial), and the agent
// transport end to end: the host writes a line to the agent socket, the
// guest answers on its virtio-serial port.
func TestBootVirtioAgent(t *testing.T) {
	requireQEMU(t)
	kernel := testKernel(t)
	mods := testModules(t, kernel)
	marker := randomMarker(t)
	script := `#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t devtmpfs dev /dev
for m in ` + strings.Join(virtioModules, " ") + `; do [ -f /mod/$m.ko ] && $bb insmod /mod/$m.ko; done
port=
for i in $($bb seq 100); do
  for p in /sys/class/virtio-ports/*; do
    [ "$($bb cat $p/name 2>/dev/null)" = "PORTNAME" ] && port=/dev/$($bb basename $p)
  done
  [ -n "$port" ] && [ -e "$port" ] && [ -e /dev/vda ] && break
  $bb sleep 0.1
done
echo "VDA-SECTORS=$($bb cat /sys/block/vda/size)"
echo "PORT=$port"
echo MARKER-READY
# Reading a virtio-serial port returns EOF while no host client is connected.
line=
while [ -z "$line" ]; do read -r line < $port || $bb sleep 0.1; done
echo "pong $line" > $port
echo MARKER-DONE
$bb poweroff -f
`
	script = strings.NewReplacer("MARKER", marker, "PORTNAME", "org.banger.agent.0").Replace(script)
	spec := bootSpec(t, script)

	// Add the modules to the initramfs.
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skip("no /bin/busybox")
	}
	entries := []cpioEntry{
		{name: "bin", mode: sIFDIR | 0o755},
		{name: "dev", mode: sIFDIR | 0o755},
		{name: "dev/console", mode: sIFCHR | 0o600, rdevMajor: 5, rdevMinor: 1},
		{name: "proc", mode: sIFDIR | 0o755},
		{name: "sys", mode: sIFDIR | 0o755},
		{name: "mod", mode: sIFDIR | 0o755},
		{name: "bin/busybox", mode: sIFREG | 0o755, data: bb},
		{name: "init", mode: sIFREG | 0o755, data: []byte(script)},
	}
	for m, p := range mods {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		entries = append(entries, cpioEntry{name: "mod/" + m + ".ko", mode: sIFREG | 0o644, data: b})
	}
	f, err := os.Create(spec.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeNewc(f, entries); err != nil {
		t.Fatal(err)
	}
	f.Close()
	spec.MemoryMiB = 512

	d := New(Config{}, testLogger(t))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	t0 := time.Now()
	h, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Kill(context.Background(), h)
	if err := waitForConsole(ctx, spec.ConsoleLog, marker+"-READY"); err != nil {
		t.Fatal(err)
	}
	tReady := time.Since(t0)
	console, _ := os.ReadFile(spec.ConsoleLog)
	if !bytes.Contains(console, []byte("VDA-SECTORS=32768")) {
		t.Errorf("guest did not see the 16 MiB virtio-blk disk:\n%s", tail(string(console), 3000))
	}
	if bytes.Contains(console, []byte("PORT=\n")) || !bytes.Contains(console, []byte("PORT=/dev/vport")) {
		t.Fatalf("guest did not find the agent port:\n%s", tail(string(console), 3000))
	}

	conn, err := d.DialAgent(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := conn.Write([]byte("ping-" + marker + "\n")); err != nil {
		t.Fatal(err)
	}
	want := "pong ping-" + marker + "\n"
	got := make([]byte, len(want))
	if _, err := io.ReadFull(conn, got); err != nil {
		t.Fatalf("read agent reply: %v (got %q)", err, got)
	}
	if string(got) != want {
		t.Errorf("agent reply %q, want %q", got, want)
	}
	if err := d.Wait(ctx, h); err != nil {
		t.Fatal(err)
	}
	if err := d.Cleanup(h); err != nil {
		t.Fatal(err)
	}
	assertNoRuntimeFiles(t, d, spec.Dir)
	t.Logf("accel=%s ready=%v total=%v", h.Accel, tReady, time.Since(t0))
}
