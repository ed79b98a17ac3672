package guestagent_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/initramfs"
	"github.com/bangerdev/banger/internal/testenv"
)

// The boot tests start real VMs: QEMU (microvm, TCG) with the test image
// made by scripts/make-test-image.sh and an initramfs built by package
// initramfs around the real agent binary. They are skipped when QEMU or the
// image is missing, and with -short.
//
// Environment:
//   - BANGER_TESTIMAGE_DIR overrides the image directory (as for the script);
//   - BANGER_KEEP_CONSOLE=FILE copies the guest console log there;
//   - BANGER_TEST_APPEND adds kernel command line arguments.

const defaultTestImage = "/var/cache/banger/testimage"

type testImage struct {
	dir, kernel, release, initrd, modules string
}

func findTestImage(t *testing.T) testImage {
	t.Helper()
	if testing.Short() {
		t.Skip("boot test skipped with -short")
	}
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Missing(t, "boot test needs %s (apt-get install qemu-system-x86 qemu-utils)", tool)
		}
	}
	dir := os.Getenv("BANGER_TESTIMAGE_DIR")
	if dir == "" {
		dir = defaultTestImage
	}
	img := testImage{
		dir:     dir,
		kernel:  filepath.Join(dir, "vmlinuz"),
		initrd:  filepath.Join(dir, "initrd.img"),
		modules: filepath.Join(dir, "modules"),
	}
	rel, err := os.ReadFile(filepath.Join(dir, "kernel-release"))
	if err != nil {
		testenv.Missing(t, "no test image in %s (run scripts/make-test-image.sh, or set BANGER_TESTIMAGE_DIR): %v", dir, err)
	}
	img.release = strings.TrimSpace(string(rel))
	for _, f := range []string{img.kernel, img.initrd} {
		if _, err := os.Stat(f); err != nil {
			testenv.Missing(t, "incomplete test image in %s (run scripts/make-test-image.sh): %v", dir, err)
		}
	}
	return img
}

var (
	agentOnce sync.Once
	agentPath string
	agentErr  error
	agentDir  string
)

// buildAgent builds the static guest agent once per test binary.
func buildAgent(t *testing.T) string {
	t.Helper()
	agentOnce.Do(func() {
		agentDir, agentErr = os.MkdirTemp("", "banger-agent-build-")
		if agentErr != nil {
			return
		}
		agentPath = filepath.Join(agentDir, "agent")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", agentPath, "github.com/bangerdev/banger/cmd/banger-vsock-agent")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
		if out, err := cmd.CombinedOutput(); err != nil {
			agentErr = fmt.Errorf("build agent: %w\n%s", err, out)
		}
	})
	if agentErr != nil {
		t.Fatal(agentErr)
	}
	return agentPath
}

func TestMain(m *testing.M) {
	if helperMain() {
		return
	}
	code := m.Run()
	if agentDir != "" {
		os.RemoveAll(agentDir)
	}
	os.Exit(code)
}

type bootSpec struct {
	rootfs string // file name in the test image
	// useModulesDir packs modules from the image's modules tree instead
	// of appending to the image's initrd.
	useModulesDir bool
	growBytes     int64
	wantMode      string
	// config, when set, changes the agent's config.
	config func(*agentproto.Config)
	// network and ssh go into the agent's config; qemuArgs are added to
	// QEMU's command line (a network card).
	network  *agentproto.NetworkConfig
	ssh      *agentproto.SSHConfig
	qemuArgs []string
}

type vm struct {
	t       *testing.T
	dir     string
	console string
	sock    string
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	started time.Time
}

func (v *vm) consoleTail(n int) string {
	b, _ := os.ReadFile(v.console)
	lines := strings.Split(string(b), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func bootVM(t *testing.T, img testImage, spec bootSpec) (*vm, agentproto.Config, agent.Keys) {
	t.Helper()
	rootfs := filepath.Join(img.dir, spec.rootfs)
	st, err := os.Stat(rootfs)
	if err != nil {
		testenv.Missing(t, "test image lacks %s (run scripts/make-test-image.sh): %v", spec.rootfs, err)
	}
	agentBin := buildAgent(t)
	dir := t.TempDir()

	km, err := agent.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	keys, err := km.Keys()
	if err != nil {
		t.Fatal(err)
	}
	cfg := agentproto.Config{
		Transport: agentproto.TransportVirtioSerial,
		PortName:  agentproto.VirtioPortName,
		Hostname:  "banger-boot-test",
		Network:   spec.network,
		SSH:       spec.ssh,
	}
	km.ApplyTo(&cfg)
	if spec.config != nil {
		spec.config(&cfg)
	}
	opts := initramfs.Options{AgentBinary: agentBin, Config: cfg}
	if spec.useModulesDir {
		opts.ModulesDir = img.modules
		opts.KernelRelease = img.release
	} else {
		opts.BaseInitrd = img.initrd
	}
	initrd := filepath.Join(dir, "initrd.img")
	buildStart := time.Now()
	if err := initramfs.Build(context.Background(), initrd, opts); err != nil {
		t.Fatal(err)
	}
	t.Logf("initramfs built in %s", time.Since(buildStart).Round(time.Millisecond))

	overlay := filepath.Join(dir, "root.qcow2")
	size := st.Size() + spec.growBytes
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", rootfs, overlay, strconv.FormatInt(size, 10)).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}

	v := &vm{t: t, dir: dir, console: filepath.Join(dir, "console.log"), sock: filepath.Join(dir, "agent.sock"), exited: make(chan struct{})}
	v.cmd = exec.Command("qemu-system-x86_64",
		"-M", "microvm", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-kernel", img.kernel, "-initrd", initrd,
		"-append", kernelCmdline(),
		"-chardev", "file,id=con,path="+v.console, "-serial", "chardev:con",
		"-drive", "id=root,file="+overlay+",format=qcow2,if=none",
		"-device", "virtio-blk-device,drive=root",
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path="+v.sock+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name="+agentproto.VirtioPortName,
	)
	v.cmd.Args = append(v.cmd.Args, spec.qemuArgs...)
	var qemuOut bytes.Buffer
	v.cmd.Stdout, v.cmd.Stderr = &qemuOut, &qemuOut
	v.started = time.Now()
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() { v.waitErr = v.cmd.Wait(); close(v.exited) }()
	t.Cleanup(func() {
		select {
		case <-v.exited:
		default:
			v.cmd.Process.Kill()
			<-v.exited
		}
		if p := os.Getenv("BANGER_KEEP_CONSOLE"); p != "" {
			b, _ := os.ReadFile(v.console)
			os.WriteFile(p, b, 0o644)
		}
		if t.Failed() {
			t.Logf("qemu output:\n%s", qemuOut.String())
			t.Logf("console (tail):\n%s", v.consoleTail(60))
		}
	})
	return v, cfg, keys
}

func (v *vm) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", v.sock)
}

// run executes argv in the guest and returns its stdout.
func run(ctx context.Context, t *testing.T, c *agent.Client, argv ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code, err := c.Exec(ctx, agent.ExecOptions{Argv: argv, Stdout: &stdout, Stderr: &stderr})
	if err != nil || code != 0 {
		t.Fatalf("exec %v: code %d, err %v, stderr %q", argv, code, err, stderr.String())
	}
	return stdout.String()
}

// dfKiB returns the size of the guest's root filesystem in KiB.
func dfKiB(ctx context.Context, t *testing.T, c *agent.Client) int64 {
	t.Helper()
	out := run(ctx, t, c, "df", "-k", "/")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	fields := strings.Fields(lines[len(lines)-1])
	if len(fields) < 2 {
		t.Fatalf("df output %q", out)
	}
	n, err := strconv.ParseInt(fields[1], 10, 64)
	if err != nil {
		t.Fatalf("df output %q: %v", out, err)
	}
	return n
}

// TestBoot boots the agent in both init modes: handing PID 1 to systemd,
// and staying PID 1 in an image without init.
func TestBoot(t *testing.T) {
	t.Run("systemd", func(t *testing.T) {
		testBoot(t, bootSpec{rootfs: "rootfs.ext4", growBytes: 512 << 20, wantMode: "systemd"})
	})
	t.Run("agent-pid1", func(t *testing.T) {
		testBoot(t, bootSpec{rootfs: "busybox-rootfs.ext4", useModulesDir: true, growBytes: 512 << 20, wantMode: "agent"})
	})
}

func testBoot(t *testing.T, spec bootSpec) {
	img := findTestImage(t)
	v, cfg, keys := bootVM(t, img, spec)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	readyCtx, readyCancel := context.WithTimeout(ctx, 2*time.Minute)
	c, err := agent.WaitReady(readyCtx, v.dial, keys, nil)
	readyCancel()
	if err != nil {
		t.Fatalf("agent not ready: %v", err)
	}
	defer c.Close()
	ready := time.Since(v.started)

	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("agent ready %s after QEMU start (guest uptime %dms); info %+v", ready.Round(time.Millisecond), info.UptimeMS, info)
	if info.KernelRelease != img.release {
		t.Errorf("Info.KernelRelease %q, want %q", info.KernelRelease, img.release)
	}
	if info.InitMode != spec.wantMode {
		t.Errorf("Info.InitMode %q, want %q", info.InitMode, spec.wantMode)
	}
	if info.Hostname != cfg.Hostname {
		t.Errorf("Info.Hostname %q, want %q", info.Hostname, cfg.Hostname)
	}

	// Ready for commands: early boot over. When the agent is PID 1 that
	// is at once; with systemd, once sysinit.target is reached.
	if spec.wantMode == "agent" && (!info.EarlyBootDone || info.EarlyBootSignal != "agent") {
		t.Errorf("agent as PID 1: EarlyBootDone %v signal %q, want true agent", info.EarlyBootDone, info.EarlyBootSignal)
	}
	for !info.EarlyBootDone {
		select {
		case <-ctx.Done():
			t.Fatalf("early boot not done %s after QEMU start; console:\n%s", time.Since(v.started).Round(time.Millisecond), v.consoleTail(30))
		case <-time.After(100 * time.Millisecond):
		}
		if info, err = c.Info(ctx); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("early boot done %s after QEMU start (signal %s, guest uptime %dms)", time.Since(v.started).Round(time.Millisecond), info.EarlyBootSignal, info.UptimeMS)
	if spec.wantMode == "systemd" {
		if info.EarlyBootSignal != "unit" {
			t.Errorf("early boot signal %q, want unit (banger's runtime unit after sysinit.target)", info.EarlyBootSignal)
		}
		// What "early boot done" promises: sysinit.target reached (so
		// tmpfiles ran), /dev/pts mounted.
		if got := strings.TrimSpace(run(ctx, t, c, "sh", "-c", "systemctl is-active sysinit.target systemd-tmpfiles-setup.service local-fs.target; test -e /dev/pts/ptmx && echo pts")); got != "active\nactive\nactive\npts" {
			t.Errorf("after early boot: %q, want sysinit.target, tmpfiles setup and local-fs.target active and /dev/pts mounted", got)
		}
	}

	if got := strings.TrimSpace(run(ctx, t, c, "uname", "-r")); got != img.release {
		t.Errorf("uname -r = %q, want %q", got, img.release)
	}

	if spec.growBytes > 0 {
		st, err := os.Stat(filepath.Join(img.dir, spec.rootfs))
		if err != nil {
			t.Fatal(err)
		}
		kib := dfKiB(ctx, t, c)
		// df reports the size minus the filesystem's own metadata, so
		// compare with a margin: the grown filesystem must exceed the
		// original image by most of growBytes.
		min := (st.Size() + spec.growBytes*9/10) / 1024 * 9 / 10
		t.Logf("root filesystem: image %d KiB, device +%d KiB, df size %d KiB", st.Size()/1024, spec.growBytes/1024, kib)
		if kib < min || kib*1024 <= st.Size() {
			t.Errorf("root filesystem not grown: df says %d KiB, image is %d KiB, device %d KiB", kib, st.Size()/1024, (st.Size()+spec.growBytes)/1024)
		}
	}

	if spec.wantMode == "systemd" {
		// The agent was started before systemd; PID 1 must be systemd now.
		if comm := strings.TrimSpace(run(ctx, t, c, "cat", "/proc/1/comm")); comm != "systemd" {
			t.Errorf("PID 1 is %q, want systemd", comm)
		}
		// Let systemd finish booting: it must not undo what init did
		// (hostname) nor fail because of it.
		// systemctl cannot answer until systemd's bus socket exists: poll.
		var state bytes.Buffer
		sctx, scancel := context.WithTimeout(ctx, 90*time.Second)
		for {
			state.Reset()
			_, err := c.Exec(sctx, agent.ExecOptions{Argv: []string{"systemctl", "is-system-running", "--wait"}, Stdout: &state})
			if err != nil {
				scancel()
				t.Fatalf("systemctl is-system-running: %v", err)
			}
			// "offline" (or nothing): systemd's bus is not up yet.
			if s := strings.TrimSpace(state.String()); s != "" && s != "offline" {
				break
			}
			select {
			case <-sctx.Done():
			case <-time.After(250 * time.Millisecond):
			}
		}
		scancel()
		t.Logf("systemd state %q %s after QEMU start", strings.TrimSpace(state.String()), time.Since(v.started).Round(time.Millisecond))
		if s := strings.TrimSpace(state.String()); s != "running" {
			t.Errorf("systemd state %q; failed units:\n%s", s, run(ctx, t, c, "systemctl", "--failed", "--no-pager"))
		}
		if h := strings.TrimSpace(run(ctx, t, c, "cat", "/proc/sys/kernel/hostname")); h != cfg.Hostname {
			t.Errorf("hostname after systemd boot %q, want %q", h, cfg.Hostname)
		}
	} else {
		// The agent is PID 1: zombies are reaped, /tmp and /dev/pts exist.
		run(ctx, t, c, "sh", "-c", "test -d /dev/pts && test -e /dev/ptmx && mount | grep -q ' /tmp '")
		// The loopback interface is up (IFF_UP in its flags).
		if flags := strings.TrimSpace(run(ctx, t, c, "cat", "/sys/class/net/lo/flags")); flags != "0x9" {
			t.Errorf("lo flags %s, want 0x9 (up)", flags)
		}
		run(ctx, t, c, "sh", "-c", "sleep 0.1 & exec sleep 0.5") // orphan a child
		out := run(ctx, t, c, "sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status || true")
		if strings.TrimSpace(out) != "" {
			t.Errorf("zombies left: %s", out)
		}
	}

	shutStart := time.Now()
	if err := c.Shutdown(ctx, false); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	select {
	case <-v.exited:
		t.Logf("QEMU exited %s after the shutdown request (%v); total %s",
			time.Since(shutStart).Round(time.Millisecond), v.waitErr, time.Since(v.started).Round(time.Millisecond))
	case <-time.After(30 * time.Second):
		t.Fatalf("QEMU still running 30s after shutdown")
	}
	if v.waitErr != nil {
		t.Errorf("QEMU exit: %v", v.waitErr)
	}
	cons, _ := os.ReadFile(v.console)
	if !bytes.Contains(cons, []byte("banger-init:")) {
		t.Errorf("no banger-init messages on the console")
	}
	if t.Failed() || testing.Verbose() {
		logInitLines(t, cons)
	}
}

// TestBootAgentRestart kills the agent when it is supervised by the agent
// as PID 1: it must come back, and a reboot request must end QEMU (run with
// -no-reboot).
func TestBootAgentRestart(t *testing.T) {
	img := findTestImage(t)
	v, _, keys := bootVM(t, img, bootSpec{rootfs: "busybox-rootfs.ext4", useModulesDir: true})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := agent.WaitReady(ctx, v.dial, keys, nil)
	if err != nil {
		t.Fatalf("agent not ready: %v", err)
	}
	// The command's parent is the agent server. Over virtio-serial the
	// host's socket stays open when the guest side dies (QEMU keeps the
	// chardev connected), so the client cannot notice: bound the call.
	kctx, kcancel := context.WithTimeout(ctx, 5*time.Second)
	_, err = c.Exec(kctx, agent.ExecOptions{Argv: []string{"sh", "-c", "kill -KILL $PPID; sleep 5"}})
	kcancel()
	t.Logf("exec killing the agent returned %v", err)
	c.Close()
	killed := time.Now()
	c, err = agent.WaitReady(ctx, v.dial, keys, nil)
	if err != nil {
		t.Fatalf("agent not back after being killed: %v", err)
	}
	defer c.Close()
	t.Logf("agent back %s after being killed", time.Since(killed).Round(time.Millisecond))
	info, err := c.Info(ctx)
	if err != nil || info.InitMode != "agent" {
		t.Fatalf("info after restart: %+v, %v", info, err)
	}
	if err := c.Shutdown(ctx, true); err != nil {
		t.Fatalf("reboot: %v", err)
	}
	select {
	case <-v.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("QEMU still running 30s after a reboot request (it runs with -no-reboot)")
	}
	cons, _ := os.ReadFile(v.console)
	for _, want := range []string{"agent exited (signal killed)", "rebooting"} {
		if !bytes.Contains(cons, []byte(want)) {
			t.Errorf("console lacks %q", want)
		}
	}
	if t.Failed() || testing.Verbose() {
		logInitLines(t, cons)
	}
}

func logInitLines(t *testing.T, cons []byte) {
	var lines []string
	for _, l := range strings.Split(string(cons), "\n") {
		if strings.Contains(l, "banger-init:") || strings.Contains(l, "banger-agent") {
			lines = append(lines, strings.TrimRight(l, "\r"))
		}
	}
	t.Logf("init/agent console lines:\n%s", strings.Join(lines, "\n"))
}

// TestBootFatalPowersOff checks that an init error (a root device that
// never appears) is reported on the console and powers the VM off instead
// of hanging.
func TestBootFatalPowersOff(t *testing.T) {
	img := findTestImage(t)
	agentBin := buildAgent(t)
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initrd.img")
	cfg := agentproto.Config{Transport: agentproto.TransportVirtioSerial, RootDevice: "/dev/vdz"}
	if err := initramfs.Build(context.Background(), initrd, initramfs.Options{AgentBinary: agentBin, BaseInitrd: img.initrd, Config: cfg}); err != nil {
		t.Fatal(err)
	}
	console := filepath.Join(dir, "console.log")
	// A disk is attached (as /dev/vda) but the config asks for /dev/vdz.
	// (Without any virtio-blk device this kernel stalls under TCG before
	// it even runs init, so a disk is needed for the test to mean anything.)
	disk := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-M", "microvm", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "512",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-kernel", img.kernel, "-initrd", initrd,
		"-append", kernelCmdline(),
		"-chardev", "file,id=con,path="+console, "-serial", "chardev:con",
		"-drive", "id=d,file="+disk+",format=raw,if=none",
		"-device", "virtio-blk-device,drive=d",
	)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("QEMU still running after %s: init hung instead of powering off\n%s", time.Since(start), tailFile(console))
	}
	if err != nil {
		t.Errorf("qemu: %v\n%s", err, out)
	}
	cons, _ := os.ReadFile(console)
	if !bytes.Contains(cons, []byte("banger-init:")) || !bytes.Contains(cons, []byte("FATAL")) || !bytes.Contains(cons, []byte("/dev/vdz")) {
		t.Errorf("console lacks the fatal error:\n%s", tailFile(console))
	}
	t.Logf("VM powered off %s after start", time.Since(start).Round(time.Millisecond))
	if testing.Verbose() {
		logInitLines(t, cons)
	}
}

// kernelCmdline is the guest kernel command line. Under TCG the guest's
// early TSC calibration against the PIT is timing-sensitive: on a loaded
// host it fails ("tsc: Unable to calibrate against PIT ... could not
// calculate TSC khz") and the kernel then stalls before running init (3 of
// 4 boots with two VMs starting at once on a 2-core machine). TCG's guest
// TSC runs at the host's TSC rate, so passing that rate (tsc_early_khz)
// skips the calibration.
func kernelCmdline() string {
	cl := "console=ttyS0 rdinit=" + agentproto.InitPath
	if khz := hostTSCkHz(); khz > 0 {
		cl += " tsc_early_khz=" + strconv.Itoa(khz)
	}
	if x := os.Getenv("BANGER_TEST_APPEND"); x != "" {
		cl += " " + x
	}
	return cl
}

// hostTSCkHz returns the host's TSC frequency in kHz when the TSC is
// constant (from /proc/cpuinfo), or 0.
func hostTSCkHz() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	var mhz float64
	constant := false
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "cpu MHz":
			if mhz == 0 {
				mhz, _ = strconv.ParseFloat(strings.TrimSpace(v), 64)
			}
		case "flags":
			constant = constant || strings.Contains(" "+v+" ", " constant_tsc ")
		}
	}
	if !constant || mhz <= 0 {
		return 0
	}
	return int(mhz * 1000)
}

func tailFile(p string) string {
	f, err := os.Open(p)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil && !errors.Is(err, io.EOF) {
		return err.Error()
	}
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}
