package agent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/guestagent"
	"github.com/bangerdev/banger/internal/tarcopy"
	"github.com/bangerdev/banger/test/harness"
)

// The host's data ports against the real guest agent (guestagent's
// OpenDataPort seam): a socket pair per transfer, the host's dial handing
// the guest's end to the port's OpenDataPort.

type dataGuest struct {
	c     *agent.Client
	dials atomic.Int32
}

// serveData starts an agent with n data ports and returns a client using
// them.
func serveData(t *testing.T, n int) *dataGuest {
	t.Helper()
	return serveDataWith(t, n)
}

// serveBench is serveData for a benchmark, with a cipher preference.
func serveBench(b *testing.B, n int, ciphers []string) *agent.Client {
	b.Helper()
	return serveDataWith(b, n, agent.WithCiphers(ciphers...)).c
}

func serveDataWith(t testing.TB, n int, opts ...agent.DialOption) *dataGuest {
	t.Helper()
	km, err := agent.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	keys, _ := km.Keys()
	ports := make([]chan net.Conn, n)
	for i := range ports {
		ports[i] = make(chan net.Conn, 1)
	}
	hooks := guestagent.Hooks{
		DataPorts: n,
		OpenDataPort: func(ctx context.Context, port int) (io.ReadWriteCloser, error) {
			select {
			case c := <-ports[port]:
				return c, nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		},
	}
	guest, host := socketPair(t)
	var cfg agentproto.Config
	km.ApplyTo(&cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		guestagent.ServeConn(ctx, guest, cfg, hooks, nil)
		close(done)
	}()
	t.Cleanup(func() { cancel(); <-done })

	dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer dcancel()
	c, err := agent.Dial(dctx, func(context.Context) (net.Conn, error) { return host, nil }, keys, nil, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	info, err := c.Info(dctx)
	if err != nil || info.DataPorts != n {
		t.Fatalf("info: %d data ports, %v; want %d", info.DataPorts, err, n)
	}
	g := &dataGuest{c: c}
	c.UseDataPorts(n, func(ctx context.Context, port int) (net.Conn, error) {
		gc, hc := socketPair(t)
		// A guest end the guest never took (a refused request) is stale.
		select {
		case old := <-ports[port]:
			old.Close()
		default:
		}
		ports[port] <- gc
		g.dials.Add(1)
		return hc, nil
	})
	return g
}

func TestDataPortExec(t *testing.T) {
	g := serveData(t, 2)
	ctx := dataCtx(t)

	// stdin through cat, byte for byte.
	in := make([]byte, 8<<20+5)
	rand.Read(in)
	var out, errOut bytes.Buffer
	code, err := g.c.Exec(ctx, agent.ExecOptions{Argv: []string{"cat"}, Stdin: bytes.NewReader(in), Stdout: &out, Stderr: &errOut})
	if err != nil || code != 0 {
		t.Fatalf("cat: %d, %v (stderr %q)", code, err, errOut.String())
	}
	if !bytes.Equal(out.Bytes(), in) {
		t.Errorf("cat: %d bytes out, not the %d in", out.Len(), len(in))
	}

	// A big stdout, counted.
	var n int64
	code, err = g.c.Exec(ctx, agent.ExecOptions{Argv: []string{"head", "-c", "30000000", "/dev/zero"}, Stdout: countingWriter{io.Discard, &n}})
	if err != nil || code != 0 || n != 30000000 {
		t.Errorf("head: %d, %v, %d bytes; want 30000000", code, err, n)
	}

	// stderr and the exit status.
	out.Reset()
	errOut.Reset()
	code, err = g.c.Exec(ctx, agent.ExecOptions{Argv: []string{"sh", "-c", "echo out; echo err >&2; exit 7"}, Stdout: &out, Stderr: &errOut})
	if err != nil || code != 7 || out.String() != "out\n" || errOut.String() != "err\n" {
		t.Errorf("sh: %d, %v, stdout %q, stderr %q; want 7, out, err", code, err, out.String(), errOut.String())
	}

	// An unknown program: 127 and a message.
	errOut.Reset()
	code, err = g.c.Exec(ctx, agent.ExecOptions{Argv: []string{"no-such-program-banger"}, Stderr: &errOut})
	if err != nil || code != 127 || !strings.Contains(errOut.String(), "no-such-program-banger") {
		t.Errorf("unknown program: %d, %v, stderr %q; want 127 and a message", code, err, errOut.String())
	}

	if d := g.dials.Load(); d != 4 {
		t.Errorf("%d data port dials for 4 execs", d)
	}
	// Terminals stay on SSH.
	out.Reset()
	code, err = g.c.Exec(ctx, agent.ExecOptions{Argv: []string{"echo", "tty"}, TTY: true, Stdout: &out})
	if err != nil || code != 0 || !strings.Contains(out.String(), "tty") || g.dials.Load() != 4 {
		t.Errorf("tty exec: %d, %v, %q, %d dials; want SSH", code, err, out.String(), g.dials.Load())
	}
}

func TestDataPortCopy(t *testing.T) {
	g := serveData(t, 1)
	ctx := dataCtx(t)
	src := filepath.Join(t.TempDir(), "tree")
	if err := os.MkdirAll(filepath.Join(src, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	big := make([]byte, 5<<20+3)
	rand.Read(big)
	os.WriteFile(filepath.Join(src, "big"), big, 0o644)
	os.WriteFile(filepath.Join(src, "sub", "small"), []byte("small"), 0o600)

	// In: the host's tar stream, extracted in the "guest".
	guestDir := t.TempDir()
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(tarcopy.Write(pw, src, tarcopy.WriteOptions{})) }()
	if err := g.c.CopyIn(ctx, pr, guestDir, agent.CopyOptions{}); err != nil {
		t.Fatalf("copy in: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(guestDir, "tree", "big")); err != nil || !bytes.Equal(b, big) {
		t.Errorf("copied in tree/big: %d bytes, %v; want %d", len(b), err, len(big))
	}

	// Out: back to the host.
	hostDir := t.TempDir()
	var size, entries int64
	err := tarcopy.ExtractFrom(func(w io.Writer) error {
		return g.c.CopyOutWith(ctx, filepath.Join(guestDir, "tree"), w, agent.CopyOutOptions{OnHeader: func(s, e int64) { size, entries = s, e }})
	}, hostDir, tarcopy.ExtractOptions{Base: "tree"})
	if err != nil {
		t.Fatalf("copy out: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(hostDir, "tree", "big")); err != nil || !bytes.Equal(b, big) {
		t.Errorf("copied out tree/big: %d bytes, %v; want %d", len(b), err, len(big))
	}
	if b, _ := os.ReadFile(filepath.Join(hostDir, "tree", "sub", "small")); string(b) != "small" {
		t.Errorf("copied out tree/sub/small: %q", b)
	}
	if size < int64(len(big)) || entries != 4 {
		t.Errorf("header: %d bytes, %d entries; want > %d, 4", size, entries, len(big))
	}
	// A guest error comes back as before.
	err = g.c.CopyOut(ctx, filepath.Join(guestDir, "missing"), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("copy out of a missing path: %v", err)
	}
	if d := g.dials.Load(); d != 3 {
		t.Errorf("%d data port dials for 3 copies", d)
	}
}

func TestDataPortFallbackAndCancel(t *testing.T) {
	g := serveData(t, 1)
	// The one port is held by a running cat.
	pr, pw := io.Pipe()
	defer pw.Close()
	ctx, cancel := context.WithCancel(dataCtx(t))
	defer cancel()
	var out syncBuffer
	first := make(chan error, 1)
	go func() {
		_, err := g.c.Exec(ctx, agent.ExecOptions{Argv: []string{"cat"}, Stdin: pr, Stdout: &out})
		first <- err
	}()
	pw.Write([]byte("hello"))
	harness.WaitFor(t, 10*time.Second, "cat's first output", func() bool { return out.String() == "hello" })
	if g.c.FreeDataPorts() != 0 || g.dials.Load() != 1 {
		t.Fatalf("%d free ports, %d dials while cat runs", g.c.FreeDataPorts(), g.dials.Load())
	}
	// No free port: over SSH, as before.
	var out2 bytes.Buffer
	code, err := g.c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"echo", "ssh"}, Stdout: &out2})
	if err != nil || code != 0 || out2.String() != "ssh\n" || g.dials.Load() != 1 {
		t.Errorf("exec with no free port: %d, %v, %q, %d dials", code, err, out2.String(), g.dials.Load())
	}
	// Cancelled mid-stream: the port comes back.
	cancel()
	if err := <-first; err == nil || ctx.Err() == nil {
		t.Errorf("cancelled cat: %v", err)
	}
	harness.WaitFor(t, 10*time.Second, "the port to be free", func() bool { return g.c.FreeDataPorts() == 1 })
	out2.Reset()
	code, err = g.c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"cat"}, Stdin: strings.NewReader("again"), Stdout: &out2})
	if err != nil || code != 0 || out2.String() != "again" || g.dials.Load() != 2 {
		t.Errorf("exec after the cancel: %d, %v, %q, %d dials; want it over the port", code, err, out2.String(), g.dials.Load())
	}
}

// syncBuffer is a bytes.Buffer safe for a writer and a reader at once.
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
