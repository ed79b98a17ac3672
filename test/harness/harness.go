// Package harness runs the real bangerd and banger binaries for the
// end-to-end tests and the benchmarks.
package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
)

// Env is one bangerd with its own state directory and socket.
type Env struct {
	T                testing.TB
	dir              string
	socket           string
	state            string
	daemon           *exec.Cmd
	exited           chan struct{} // closed when daemon exited
	config           string        // the daemon's --config
	binDir, imageDir string
	logBuf           *bytes.Buffer
	// Lab is the network bangerd, the CLI and NetCommand run in (nil: the
	// machine's own namespace; see Options.Net).
	Lab *Lab
}

// Options configure an Env.
type Options struct {
	// Config is the daemon's configuration file (TOML; "" for every
	// default).
	Config string
	// Net runs bangerd, the CLI and NetCommand inside a Lab (NewLab):
	// namespace bgd with an uplink to namespace out, which plays the
	// internet, a LAN host and a metadata server. Tests that create links
	// or firewall rules, or talk to guest addresses, must use it.
	Net bool
}

func New(t testing.TB, binDir, imageDir string) *Env {
	t.Helper()
	return NewWithConfig(t, binDir, imageDir, "")
}

// NewWithConfig is New with the daemon's configuration file holding
// config (TOML; "" for every default).
func NewWithConfig(t testing.TB, binDir, imageDir, config string) *Env {
	t.Helper()
	return NewWithOptions(t, binDir, imageDir, Options{Config: config})
}

// NewWithOptions is New with options.
func NewWithOptions(t testing.TB, binDir, imageDir string, o Options) *Env {
	t.Helper()
	var lab *Lab
	if o.Net {
		// Made first so that its namespaces go last, after the daemon.
		lab = NewLab(t)
	}
	// Unix socket paths are limited to 108 bytes: keep the directory short.
	dir, err := os.MkdirTemp("/tmp", "bgr")
	if err != nil {
		t.Fatal(err)
	}
	// Other users may traverse it (the socket's own mode decides who connects):
	// tests run the CLI as unprivileged users against the daemon's checks.
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	e := &Env{T: t, binDir: binDir, imageDir: imageDir, dir: dir, socket: filepath.Join(dir, "bangerd.sock"), state: filepath.Join(dir, "state"), Lab: lab}
	// An explicit, empty config: every setting at its default, so that a
	// host's /etc/banger/bangerd.toml can't leak into the tests.
	e.config = filepath.Join(dir, "bangerd.toml")
	config := o.Config
	if lab == nil && !strings.Contains(config, "network") {
		// Outside a Lab, bangerd runs in the machine's own namespace,
		// where tests must not make links or firewall rules: its VMs get
		// no network card unless the test asks for one.
		config = "network = \"none\"\n" + config
	}
	if err := os.WriteFile(e.config, []byte(testImageDefault(config)), 0o644); err != nil {
		t.Fatal(err)
	}
	e.StartDaemon()
	t.Cleanup(func() {
		// Remove every VM so no process outlives the test, then stop the daemon.
		out, _, _ := e.Banger("vm", "ls", "-q")
		for _, n := range strings.Fields(out) {
			e.Banger("vm", "rm", "-f", n)
		}
		e.StopDaemon()
		if t.Failed() {
			t.Logf("bangerd log:\n%s", e.logBuf.String())
		}
		os.RemoveAll(dir)
	})
	return e
}

// testImageDefault makes "default", a name no catalog has, the default
// image unless config names one: a test that names no image never pulls
// the catalogs' default image (catalog_urls is empty unless the test sets
// it and serves its own catalog).
//
// Likewise, unless config sets them: default_kernel_name is a name no
// catalog has, the embedded catalogs are off and so are local builds and
// Docker Hub pulls of bare names (vm create --image nosuch), so
// that no test reaches a non-loopback URL or builds an image by accident
// (TestGoldenLocalBuild turns them back on).
func testImageDefault(config string) string {
	for _, d := range []struct{ key, line string }{
		{"default_image", "default_image_name = \"default\"\n"},
		{"default_kernel_name", "default_kernel_name = \"test-no-such-kernel\"\n"},
		{"embedded_catalogs", "embedded_catalogs = false\n"},
		{"local_builds", "local_builds = false\n"},
		{"registry_fallback", "registry_fallback = false\n"},
	} {
		if !strings.Contains(config, d.key) {
			config = d.line + config
		}
	}
	return config
}

func (e *Env) StartDaemon() {
	e.T.Helper()
	if err := e.TryStartDaemon(); err != nil {
		e.T.Fatal(err)
	}
}

// TryStartDaemon starts bangerd and waits until it answers; when it exits
// first (a config it refuses) or doesn't answer within 20 s, the error
// holds its output.
func (e *Env) TryStartDaemon() error {
	if e.logBuf == nil {
		e.logBuf = &bytes.Buffer{}
	}
	var out syncBuffer
	cmd := e.inNet(context.Background(), filepath.Join(e.binDir, "bangerd"), "--config", e.config, "--socket", e.socket, "--state-dir", e.state, "--log-level", "debug")
	out.w = e.logBuf
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		_, _, code := e.Banger("version")
		ls, _, _ := e.Banger("vm", "ls")
		if code == 0 && strings.Contains(ls, "NAME") {
			e.daemon, e.exited = cmd, exited
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("bangerd exited (%v):\n%s", cmd.ProcessState, out.String())
		case <-ctx.Done():
			cmd.Process.Kill()
			<-exited
			return fmt.Errorf("bangerd did not answer within 20s:\n%s", out.String())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// syncBuffer copies a daemon's output to w and keeps this run's own.
type syncBuffer struct {
	mu  sync.Mutex
	w   *bytes.Buffer
	own bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.w.Write(p)
	return b.own.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.own.String()
}

// SetConfig replaces the daemon's configuration file (read at its next
// start).
func (e *Env) SetConfig(config string) {
	e.T.Helper()
	if err := os.WriteFile(e.config, []byte(testImageDefault(config)), 0o644); err != nil {
		e.T.Fatal(err)
	}
}

// KillDaemon kills bangerd with SIGKILL (a crash) and waits for it.
func (e *Env) KillDaemon() {
	if e.daemon == nil {
		return
	}
	e.daemon.Process.Kill()
	<-e.exited
	e.daemon = nil
}

func (e *Env) StopDaemon() {
	if e.daemon == nil {
		return
	}
	e.daemon.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.exited:
	case <-time.After(20 * time.Second):
		e.daemon.Process.Kill()
		<-e.exited
	}
	e.daemon = nil
}

// Banger runs the CLI and returns stdout, stderr and the exit code. It
// never stops the test, so goroutines may call it: when the CLI can't be
// run at all, the code is -1 and stderr says why.
func (e *Env) Banger(args ...string) (string, string, int) {
	return e.BangerIn(nil, args...)
}

// Command returns the CLI's command, not started, for tests that feed it
// or signal it themselves.
func (e *Env) Command(ctx context.Context, args ...string) *exec.Cmd {
	return e.NetCommand(ctx, filepath.Join(e.binDir, "banger"), append([]string{"--socket", e.socket}, args...)...)
}

// NetCommand returns a command, not started, that runs where the CLI runs
// (inside the Lab's bgd when there is one) with the CLI's environment:
// its config directory, $HOME (banger's ssh key, known_hosts and ssh
// config go under it), $BANGER_SOCKET naming the Env's daemon and the
// built binaries first in $PATH, so that `ssh NAME.banger` through
// banger's ProxyCommand reaches this Env.
func (e *Env) NetCommand(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := e.inNet(ctx, name, args...)
	cmd.Env = append(os.Environ(), "HOME="+e.dir, "XDG_CONFIG_HOME="+e.dir, "BANGER_SOCKET="+e.socket, "PATH="+e.binDir+":"+os.Getenv("PATH"))
	return cmd
}

// inNet returns a command that runs inside the Lab's bgd namespace when
// there is one. It enters only the network namespace (nsenter), not `ip
// netns exec`'s private mount of /sys, which hides the cgroup hierarchies
// bangerd confines QEMU with; nsenter execs the program in place, so the
// command's pid is the program's.
func (e *Env) inNet(ctx context.Context, name string, args ...string) *exec.Cmd {
	if e.Lab == nil {
		return exec.CommandContext(ctx, name, args...)
	}
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + e.Lab.BGD.Path, "--", name}, args...)...)
}

// Dir is the Env's directory (XDG_CONFIG_HOME of the CLI).
func (e *Env) Dir() string { return e.dir }

// Exec runs argv in the guest (vm exec) and returns stdout, stderr and
// the exit code.
func (e *Env) Exec(name string, argv ...string) (string, string, int) {
	return e.Banger(append([]string{"vm", "exec", name, "--"}, argv...)...)
}

// MustExec is Exec that fails the test unless argv exits 0.
func (e *Env) MustExec(name string, argv ...string) string {
	e.T.Helper()
	return e.Must(append([]string{"vm", "exec", name, "--"}, argv...)...)
}

// BangerIn is Banger with stdin.
func (e *Env) BangerIn(stdin []byte, args ...string) (string, string, int) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := e.Command(ctx, args...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		return so.String(), fmt.Sprintf("run banger %v: %v\n%s", args, err, se.String()), -1
	}
	return so.String(), se.String(), code
}

// Must runs the CLI and fails the test unless it exits 0.
func (e *Env) Must(args ...string) string {
	e.T.Helper()
	out, errOut, code := e.Banger(args...)
	if code != 0 {
		e.T.Fatalf("banger %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// Fails runs the CLI, expects a non-zero exit and stderr mentioning want.
func (e *Env) Fails(want string, args ...string) {
	e.T.Helper()
	out, errOut, code := e.Banger(args...)
	if code == 0 {
		e.T.Fatalf("banger %s succeeded, want failure\nstdout: %s", strings.Join(args, " "), out)
	}
	if !strings.Contains(errOut, want) {
		e.T.Fatalf("banger %s: stderr %q does not mention %q", strings.Join(args, " "), errOut, want)
	}
}

func (e *Env) RegisterImages() {
	e.T.Helper()
	e.Must("image", "register", "debian", "--rootfs", filepath.Join(e.imageDir, "rootfs.ext4"),
		"--kernel", filepath.Join(e.imageDir, "vmlinuz"), "--initrd", filepath.Join(e.imageDir, "initrd.img"))
	e.Must("image", "register", "tiny", "--rootfs", filepath.Join(e.imageDir, "busybox-rootfs.ext4"),
		"--kernel", filepath.Join(e.imageDir, "vmlinuz"), "--modules", filepath.Join(e.imageDir, "modules"))
}

func (e *Env) Inspect(name string) api.VM {
	e.T.Helper()
	var vm api.VM
	if err := json.Unmarshal([]byte(e.Must("vm", "inspect", name)), &vm); err != nil {
		e.T.Fatal(err)
	}
	return vm
}

func (e *Env) VMDirs() []string {
	ents, _ := os.ReadDir(filepath.Join(e.state, "vms"))
	var out []string
	for _, d := range ents {
		out = append(out, d.Name())
	}
	return out
}

func KernelRelease(t testing.TB, imageDir string) string {
	b, err := os.ReadFile(filepath.Join(imageDir, "kernel-release"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// ProcessAlive reports whether pid runs (zombies count as dead).
func ProcessAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && i+2 < len(s) && s[i+2] != 'Z'
}

// ProcessesMentioning lists live pids whose command line contains s.
func ProcessesMentioning(s string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, d := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte(s)) {
			continue
		}
		var pid int
		if _, err := fmt.Sscan(d.Name(), &pid); err == nil && ProcessAlive(pid) {
			out = append(out, d.Name())
		}
	}
	return out
}

func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}

// Locate finds the built binaries (build/bin, from the module root) and the
// test image ($BANGER_TESTIMAGE_DIR or /var/cache/banger/testimage), and
// checks that the caller is root.
func Locate() (binDir, imageDir string, err error) {
	if os.Geteuid() != 0 {
		return "", "", errors.New("these tests need root (bangerd manages VMs as root)")
	}
	wd, _ := os.Getwd()
	for d := wd; d != "/"; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			binDir = filepath.Join(d, "build", "bin")
			break
		}
	}
	for _, b := range []string{"banger", "bangerd", "banger-vsock-agent"} {
		if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
			return "", "", fmt.Errorf("missing %s: run make build first", b)
		}
	}
	imageDir = os.Getenv("BANGER_TESTIMAGE_DIR")
	if imageDir == "" {
		imageDir = "/var/cache/banger/testimage"
	}
	if _, err := os.Stat(filepath.Join(imageDir, "stamp")); err != nil {
		return "", "", fmt.Errorf("no test image in %s: run make testimage first", imageDir)
	}
	return binDir, imageDir, nil
}

// Socket is the daemon's socket path.
func (e *Env) Socket() string { return e.socket }

// StateDir is the daemon's state directory.
func (e *Env) StateDir() string { return e.state }

// DaemonPID is the running daemon's pid (0 when stopped).
func (e *Env) DaemonPID() int {
	if e.daemon == nil {
		return 0
	}
	return e.daemon.Process.Pid
}

// GuestToolPath is where InstallGuestTool puts test/guesttool in a guest.
const GuestToolPath = "/opt/guesttool"

// InstallGuestTool builds test/guesttool (static) once per Env and copies
// it into the running VM name at GuestToolPath.
func (e *Env) InstallGuestTool(name string) {
	e.T.Helper()
	bin := filepath.Join(e.dir, "guesttool")
	if _, err := os.Stat(bin); err != nil {
		root := filepath.Dir(e.binDir) // build/bin -> build
		root = filepath.Dir(root)
		cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "./test/guesttool")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			e.T.Fatalf("build guesttool: %v\n%s", err, out)
		}
	}
	e.MustExec(name, "mkdir", "-p", filepath.Dir(GuestToolPath))
	// Into the directory: the file keeps its name.
	e.Must("vm", "cp", bin, name+":"+filepath.Dir(GuestToolPath)+"/")
	e.MustExec(name, "chmod", "755", GuestToolPath)
}
