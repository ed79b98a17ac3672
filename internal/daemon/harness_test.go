package daemon

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/client"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/initramfs"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/vmm"
)

// The tests here run the real daemon (run, with its store, RPC server,
// disk cloner and initramfs builder) against fakeDriver, and reach it
// through the typed client over its unix socket, as the CLI does.

// testEnv is a state dir, a fake VMM and the files of one image.
type testEnv struct {
	t      testing.TB
	dir    string
	cfg    config.Daemon
	fake   *fakeDriver
	net    *fakeHostNet
	log    *slog.Logger
	rootfs string
	kernel string
	initrd string

	// Hooks passed to the daemons started from now on (see deps).
	onPhase   func(ctx context.Context, vm, phase string)
	removeDir func(path string) error
	// hostNetwork: daemons use the real host network (bridge, TAPs,
	// firewall, services): only inside a namespace the test made.
	hostNetwork     bool
	autoRemoveGrace time.Duration

	// daemon is the last daemon started (its methods, for tests of them).
	daemon atomic.Pointer[Daemon]
}

// newEnv makes a short temp dir (unix socket paths are limited to 108
// bytes), a daemon config and image files. mod may adjust the config.
func newEnv(t testing.TB, mod func(*config.Daemon)) *testEnv {
	t.Helper()
	log := testLogger(t)
	dir, err := os.MkdirTemp("/tmp", "bgr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &testEnv{t: t, dir: dir, log: log}
	rootfs := bytes.Repeat([]byte("rootfs.."), 64<<10/8) // 64 KiB
	copy(rootfs[0x438:], []byte{0x53, 0xef})             // an ext4 superblock magic
	e.rootfs = writeFile(t, filepath.Join(dir, "src", "rootfs.img"), rootfs)
	e.kernel = writeFile(t, filepath.Join(dir, "src", "vmlinux"), append([]byte("\x7fELF"), make([]byte, 1020)...))
	var ird bytes.Buffer
	cw := initramfs.NewWriter(&ird)
	if err := cw.WriteFile("etc/image-marker", 0o644, []byte("from the image's initrd")); err != nil {
		t.Fatal(err)
	}
	if err := cw.Close(); err != nil {
		t.Fatal(err)
	}
	e.initrd = writeFile(t, filepath.Join(dir, "src", "initrd.img"), ird.Bytes())
	agentBin := writeFile(t, filepath.Join(dir, "banger-vsock-agent"), []byte("#!/bin/false\nfake agent binary\n"))

	cfg := config.DefaultDaemon()
	cfg.SocketPath = filepath.Join(dir, "bangerd.sock")
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.AgentBinary = agentBin
	cfg.QEMUImgBinary = "/nonexistent/qemu-img" // the fake takes raw disks only
	cfg.ReadyTimeout = config.Duration{Duration: 10 * time.Second}
	cfg.StopTimeout = config.Duration{Duration: 10 * time.Second}
	cfg.LogLevel = "debug"
	// No network unless a test asks: a bridged VM's host side is faked by
	// the test (see fakeHostNet); the host's own namespace is never touched.
	cfg.Network = api.NetworkNone
	// The image the tests register, and no catalog:
	// no test pulls anything unless it serves its own catalog.
	cfg.DefaultImageName = "default"
	cfg.CatalogURLs = nil
	// Nor the embedded catalogs (whose entries download from the internet
	// or build locally), nor local builds, nor a default kernel a catalog
	// has: a test that wants them turns them on.
	cfg.EmbeddedCatalogs = false
	cfg.LocalBuilds = false
	cfg.DefaultKernelName = "test-no-such-kernel"
	cfg.RegistryFallback = false
	if mod != nil {
		mod(&cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	e.cfg = cfg
	// Registered after the logger's cleanup: it runs before it.
	e.fake = newFakeDriver(t, log)
	e.net = newFakeHostNet()
	return e
}

func writeFile(t testing.TB, p string, b []byte) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// testDaemon is one run of the daemon.
type testDaemon struct {
	t      testing.TB
	c      *client.Client
	cancel context.CancelFunc
	done   chan error
	closed bool
}

// start runs a daemon over the env's state dir and waits until it answers.
func (e *testEnv) start() *testDaemon {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d := &testDaemon{t: e.t, c: client.New(e.cfg.SocketPath), cancel: cancel, done: make(chan error, 1)}
	go func() {
		// A process forked by this test binary (a fake VMM, a command the
		// guest agent runs) shares the state dir lock's file description
		// until it execs: the lock of a daemon that just ended can stay
		// held for that instant. Retry then (never in production: each
		// bangerd is its own process).
		retry := time.NewTicker(10 * time.Millisecond)
		defer retry.Stop()
		giveUp := time.Now().Add(10 * time.Second)
		for {
			newHostNet := e.net.new
			if e.hostNetwork {
				newHostNet = nil // the default: the real one
			}
			err := run(ctx, e.cfg, e.log, deps{newDriver: func() vmm.Driver { return e.fake }, newHostNet: newHostNet, onPhase: e.onPhase, removeDir: e.removeDir, autoRemoveGrace: e.autoRemoveGrace, built: e.daemon.Store})
			if errors.Is(err, unix.EWOULDBLOCK) && time.Now().Before(giveUp) {
				<-retry.C
				continue
			}
			d.done <- err
			return
		}
	}()
	e.t.Cleanup(d.close)
	wctx := testCtx(e.t)
	waitFor(wctx, e.t, "daemon to answer ping", func() bool {
		select {
		case err := <-d.done:
			d.closed = true
			e.t.Fatalf("daemon exited at start: %v", err)
		default:
		}
		_, err := d.c.Ping(wctx)
		return err == nil
	})
	return d
}

// close stops the daemon (not its VMs) and checks that run returned nil.
func (d *testDaemon) close() {
	if d.closed {
		return
	}
	d.closed = true
	d.cancel()
	select {
	case err := <-d.done:
		if err != nil {
			d.t.Errorf("daemon returned %v", err)
		}
	case <-time.After(30 * time.Second):
		d.t.Errorf("daemon did not return 30s after its context ended")
	}
}

// setup starts a daemon with the image "default" registered.
func setup(t testing.TB, mod func(*config.Daemon)) (*testEnv, *testDaemon) {
	t.Helper()
	e := newEnv(t, mod)
	d := e.start()
	if _, err := d.c.ImageRegister(testCtx(t), api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd}); err != nil {
		t.Fatalf("register image: %v", err)
	}
	return e, d
}

// createStarted creates and starts a VM, failing the test on error.
func createStarted(t testing.TB, d *testDaemon, name string) api.VM {
	t.Helper()
	vm, err := d.c.VMCreate(testCtx(t), api.VMCreateParams{Name: name, Start: true, MemoryMiB: 128, CPUs: 1}, nil)
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	if vm.State != api.StateRunning {
		t.Fatalf("vm %s is %s after create --start, want running", name, vm.State)
	}
	return vm
}

func inspect(t testing.TB, d *testDaemon, name string) api.VM {
	t.Helper()
	vm, err := d.c.VMInspect(testCtx(t), name)
	if err != nil {
		t.Fatalf("inspect %s: %v", name, err)
	}
	return vm
}

// execResult runs argv in a VM and returns its exit code and streams.
func execResult(t testing.TB, d *testDaemon, name, stdin string, argv ...string) (int, string, string, error) {
	t.Helper()
	var out, errb syncBuffer
	eio := client.ExecIO{Stdout: &out, Stderr: &errb}
	if stdin != "" {
		eio.Stdin = strings.NewReader(stdin)
	}
	code, err := d.c.VMExec(testCtx(t), api.VMExecParams{Name: name, Argv: argv}, eio)
	return code, out.String(), errb.String(), err
}

// wireErr checks that err came across the socket (a *rpc.RemoteError) and
// matches kind with errors.Is.
func wireErr(t testing.TB, what string, err, kind error) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: no error, want %v", what, kind)
	}
	var re *rpc.RemoteError
	if !errors.As(err, &re) {
		t.Fatalf("%s: error %v (%T) did not come from the daemon", what, err, err)
	}
	if !errors.Is(err, kind) {
		t.Fatalf("%s: error %q (code %s) is not %v", what, err, re.Code, kind)
	}
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// waitFor polls cond every 10 ms until it holds; it fails the test when
// ctx ends first.
func waitFor(ctx context.Context, t testing.TB, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s: %v", what, ctx.Err())
		case <-tick.C:
		}
	}
}

// testLogger logs to t.Log until the test's cleanups end (daemon and fake
// goroutines may still log while they stop).
func testLogger(t testing.TB) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// phases collects progress phases.
type phases struct {
	mu sync.Mutex
	ps []api.Progress
}

func (p *phases) add(pr api.Progress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.ps = append(p.ps, pr)
}

func (p *phases) names() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, pr := range p.ps {
		out = append(out, pr.Phase)
	}
	return out
}

// inOrder reports whether want occur in got in this order (not
// necessarily adjacent).
func inOrder(got []string, want ...string) bool {
	i := 0
	for _, g := range got {
		if i < len(want) && g == want[i] {
			i++
		}
	}
	return i == len(want)
}
