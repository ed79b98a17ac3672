package guestagent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
)

func TestFindVirtioPort(t *testing.T) {
	sys := t.TempDir()
	ports := map[string]string{
		"vport0p0": "org.qemu.guest_agent.0\n",
		"vport1p1": "org.banger.agent.0\n",
		"vport1p2": "", // unnamed port
	}
	for dev, name := range ports {
		dir := filepath.Join(sys, "class", "virtio-ports", dev)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "name"), []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dev, err := findVirtioPort(sys, agentproto.VirtioPortName)
	if err != nil || dev != "vport1p1" {
		t.Errorf("find %s = %q, %v; want vport1p1", agentproto.VirtioPortName, dev, err)
	}
	if _, err := findVirtioPort(sys, "org.example.missing"); !errors.Is(err, errPortNotFound) {
		t.Errorf("missing port: %v, want errPortNotFound", err)
	}
	if _, err := findVirtioPort(t.TempDir(), agentproto.VirtioPortName); !errors.Is(err, errPortNotFound) {
		t.Errorf("empty sysfs: %v, want errPortNotFound", err)
	}

	// waitVirtioPort waits for the port to appear.
	s := &server{log: slog.New(slog.DiscardHandler)}
	late := t.TempDir()
	go func() {
		time.Sleep(100 * time.Millisecond)
		dir := filepath.Join(late, "class", "virtio-ports", "vport2p1")
		os.MkdirAll(dir, 0o755)
		os.WriteFile(filepath.Join(dir, "name"), []byte(agentproto.VirtioPortName+"\n"), 0o644)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	path, err := s.waitVirtioPort(ctx, late, "/dev", agentproto.VirtioPortName)
	if err != nil || path != "/dev/vport2p1" {
		t.Errorf("waitVirtioPort = %q, %v; want /dev/vport2p1", path, err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := s.waitVirtioPort(ctx, t.TempDir(), "/dev", "nope"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("waitVirtioPort without port: %v, want deadline exceeded", err)
	}
}

// fakePort behaves like a virtio console port whose host is not connected
// for the first reads: they return 0 bytes and io.EOF.
type fakePort struct {
	emptyReads int
	data       []byte
	reads      int
}

func (p *fakePort) Read(b []byte) (int, error) {
	p.reads++
	if p.reads <= p.emptyReads {
		return 0, io.EOF
	}
	n := copy(b, p.data)
	p.data = p.data[n:]
	return n, nil
}

func TestWaitForHost(t *testing.T) {
	p := &fakePort{emptyReads: 3, data: []byte("SSH-2.0-banger\r\n")}
	start := time.Now()
	got, err := waitForHost(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "SSH-2.0-banger\r\n" {
		t.Errorf("got %q", got)
	}
	if p.reads != 4 {
		t.Errorf("%d reads, want 4", p.reads)
	}
	if d := time.Since(start); d < 3*hostPollInterval {
		t.Errorf("returned after %s, want at least 3 poll intervals", d)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := waitForHost(ctx, &fakePort{emptyReads: 1 << 30}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("never connected: %v, want deadline exceeded", err)
	}
	readErr := errors.New("ENODEV")
	if _, err := waitForHost(context.Background(), io.MultiReader(errReader{readErr})); !errors.Is(err, readErr) {
		t.Errorf("read error: %v, want %v", err, readErr)
	}
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

func TestReplayConn(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	rc := newReplayConn(a, []byte("hello "))
	go func() {
		b.Write([]byte("world"))
		b.Close()
	}()
	small := make([]byte, 4)
	n, err := rc.Read(small)
	if err != nil || string(small[:n]) != "hell" {
		t.Fatalf("first read %q, %v", small[:n], err)
	}
	rest, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	if string(rest) != "o world" {
		t.Errorf("rest = %q, want %q", rest, "o world")
	}
	// Writes go to the underlying conn.
	a2, b2 := net.Pipe()
	defer b2.Close()
	rc2 := newReplayConn(a2, nil)
	go rc2.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(b2, buf); err != nil || string(buf) != "ping" {
		t.Errorf("write through: %q, %v", buf, err)
	}
	rc2.Close()
}

func TestPortConnDeadlines(t *testing.T) {
	// A regular file is not pollable: deadlines are accepted as no-ops.
	f, err := os.CreateTemp(t.TempDir(), "port")
	if err != nil {
		t.Fatal(err)
	}
	c := &portConn{f: f, addr: portAddr("vport0p1")}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(time.Second)); err != nil {
		t.Errorf("SetDeadline on a non-pollable file: %v", err)
	}
	if c.LocalAddr().Network() != "virtio-serial" || c.RemoteAddr().String() != "vport0p1" {
		t.Errorf("addr = %v/%v", c.LocalAddr().Network(), c.RemoteAddr())
	}
}

// TestServePortReopens serves clients one after the other over a fake port
// (one socket pair per open) and checks that the port is closed and opened
// again for each client, and that the first bytes read while waiting for
// the host reach the SSH server.
func TestServePortReopens(t *testing.T) {
	km, err := agent.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	var cfg agentproto.Config
	km.ApplyTo(&cfg)
	s, err := newServer(cfg, Hooks{InitMode: "agent"}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	keys, err := km.Keys()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	type opened struct {
		guest *os.File
		host  net.Conn
	}
	opens := make(chan opened)
	open := func() (*os.File, error) {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		unix.SetNonblock(fds[0], true) // pollable, like a virtio port
		guest := os.NewFile(uintptr(fds[0]), "vport-test")
		hf := os.NewFile(uintptr(fds[1]), "host")
		host, err := net.FileConn(hf)
		hf.Close()
		if err != nil {
			guest.Close()
			return nil, err
		}
		select {
		case opens <- opened{guest, host}:
			return guest, nil
		case <-ctx.Done():
			guest.Close()
			host.Close()
			return nil, ctx.Err()
		}
	}
	served := make(chan struct{})
	go func() {
		s.servePort(ctx, "vport-test", open)
		close(served)
	}()

	var previous *os.File
	for i := range 3 {
		var o opened
		select {
		case o = <-opens:
		case <-ctx.Done():
			t.Fatalf("client %d: port not reopened", i)
		}
		if previous != nil {
			// The previous session's fd was closed before the reopen.
			if _, err := previous.Stat(); !errors.Is(err, os.ErrClosed) {
				t.Errorf("client %d: previous port fd still open (%v)", i, err)
			}
		}
		previous = o.guest
		// The host shows up a bit after the guest opened the port.
		time.Sleep(50 * time.Millisecond)
		c, err := agent.Dial(ctx, func(context.Context) (net.Conn, error) { return o.host, nil }, keys, nil)
		if err != nil {
			t.Fatalf("client %d: dial: %v", i, err)
		}
		var out bytes.Buffer
		code, err := c.Exec(ctx, agent.ExecOptions{Argv: []string{"echo", "session"}, Stdout: &out})
		if err != nil || code != 0 || out.String() != "session\n" {
			t.Errorf("client %d: exec: %d %v %q", i, code, err, out.String())
		}
		c.Close()
	}
	cancel()
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		t.Fatalf("servePort did not return after cancel")
	}
}

func TestLookPath(t *testing.T) {
	d1, d2 := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(d1, "noexec"), []byte("x"), 0o644)
	os.WriteFile(filepath.Join(d2, "noexec"), []byte("x"), 0o755)
	os.WriteFile(filepath.Join(d2, "prog"), []byte("x"), 0o755)
	os.Mkdir(filepath.Join(d1, "prog"), 0o755) // a directory is skipped
	path := d1 + ":" + d2
	if p, err := lookPath("prog", path); err != nil || p != filepath.Join(d2, "prog") {
		t.Errorf("prog: %q, %v", p, err)
	}
	if p, err := lookPath("noexec", path); err != nil || p != filepath.Join(d2, "noexec") {
		t.Errorf("noexec: %q, %v", p, err)
	}
	if _, err := lookPath("missing", path); err == nil {
		t.Errorf("missing found")
	}
	if p, err := lookPath("./rel/prog", ""); err != nil || p != "./rel/prog" {
		t.Errorf("path with slash: %q, %v", p, err)
	}
	if got := envValue([]string{"PATH=/a", "X=1", "PATH=/b"}, "PATH"); got != "/b" {
		t.Errorf("envValue = %q, want the last PATH", got)
	}
}

func TestReadUptime(t *testing.T) {
	p := filepath.Join(t.TempDir(), "uptime")
	os.WriteFile(p, []byte("1234.56 7890.12\n"), 0o644)
	if ms, err := readUptimeMS(p); err != nil || ms != 1234560 {
		t.Errorf("uptime = %d, %v; want 1234560", ms, err)
	}
	os.WriteFile(p, []byte("junk"), 0o644)
	if _, err := readUptimeMS(p); err == nil {
		t.Errorf("junk uptime accepted")
	}
}

// TestServeListenerConcurrent serves a listener (as with vsock) and checks
// that connections are served at the same time and that cancelling stops
// the accept loop.
func TestServeListenerConcurrent(t *testing.T) {
	km, err := agent.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	var cfg agentproto.Config
	km.ApplyTo(&cfg)
	s, err := newServer(cfg, Hooks{}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	keys, _ := km.Keys()
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "agent.sock"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- s.serveListener(ctx, ln) }()

	dial := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", ln.Addr().String())
	}
	c1, err := agent.Dial(ctx, dial, keys, nil)
	if err != nil {
		t.Fatalf("dial 1: %v", err)
	}
	defer c1.Close()
	// c1 holds a running command while c2 connects and works.
	stdinR, stdinW := io.Pipe()
	running := make(chan error, 1)
	go func() {
		_, err := c1.Exec(ctx, agent.ExecOptions{Argv: []string{"cat"}, Stdin: stdinR})
		running <- err
	}()
	c2, err := agent.Dial(ctx, dial, keys, nil)
	if err != nil {
		t.Fatalf("dial 2: %v", err)
	}
	if _, err := c2.Info(ctx); err != nil {
		t.Errorf("info on second connection: %v", err)
	}
	c2.Close()
	stdinW.Close()
	if err := <-running; err != nil {
		t.Errorf("exec on first connection: %v", err)
	}
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("serveListener: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("serveListener did not return after cancel")
	}
	select {
	case <-c1.Done():
	case <-time.After(10 * time.Second):
		t.Errorf("open connection not closed after cancel")
	}
}
