package cli

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/creack/pty"
	"github.com/vbauerster/mpb/v8/decor"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/rpc"
)

func TestShowCopyBar(t *testing.T) {
	for _, c := range []struct {
		tty, quiet bool
		total      int64
		want       bool
	}{
		{true, false, copyBarMin, true},
		{true, false, 16 << 20, true},
		{true, false, copyBarMin - 1, false},
		{true, false, 0, false},
		{false, false, 16 << 20, false}, // piped
		{true, true, 16 << 20, false},   // --quiet
	} {
		if got := showCopyBar(c.tty, c.quiet, c.total); got != c.want {
			t.Errorf("showCopyBar(tty %v, quiet %v, %d) = %v, want %v", c.tty, c.quiet, c.total, got, c.want)
		}
	}
}

// A meter on a terminal counts every byte that passes, through a writer
// or a reader, and ends its bar complete.
func TestCopyMeterCounts(t *testing.T) {
	const size = 16<<20 + 1234
	for _, viaReader := range []bool{false, true} {
		var out bytes.Buffer
		m := newCopyMeter(&progress{w: &out, tty: true}, "copy big", false)
		if !m.active() {
			t.Fatal("a meter on a terminal is not active")
		}
		m.start(size)
		var got bytes.Buffer
		src := bytes.NewReader(bytes.Repeat([]byte{'x'}, size))
		if viaReader {
			io.Copy(&got, m.Reader(src))
		} else {
			io.Copy(m.Writer(&got), src)
		}
		m.finish()
		if got.Len() != size {
			t.Fatalf("%d bytes passed, want %d", got.Len(), size)
		}
		if m.done != size {
			t.Errorf("meter counted %d bytes, want %d", m.done, size)
		}
		s := out.String()
		for _, want := range []string{"==> copy big", "16.0 MiB / 16.0 MiB", "100 %"} {
			if !strings.Contains(s, want) {
				t.Errorf("reader %v: bar output %q lacks %q", viaReader, s, want)
			}
		}
		// Counting or starting after finish shows nothing more.
		n := out.Len()
		m.count(1)
		m.start(size)
		if out.Len() != n {
			t.Errorf("bytes counted after finish changed the output: %q", out.String()[n:])
		}
	}
}

// The host counts a copy in's size beside the stream: bytes that passed
// before the size was known count too.
func TestCopyMeterLateStart(t *testing.T) {
	var out bytes.Buffer
	m := newCopyMeter(&progress{w: &out, tty: true}, "copy tree", false)
	w := m.Writer(io.Discard)
	w.Write(make([]byte, 5<<20))
	m.start(12 << 20)
	w.Write(make([]byte, 7<<20))
	m.finish()
	for _, want := range []string{"==> copy tree", "12.0 MiB / 12.0 MiB", "100 %"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("bar output %q lacks %q", out.String(), want)
		}
	}
}

// A meter shows nothing off a terminal, with --quiet, or for a transfer
// under copyBarMin; data passes unchanged.
func TestCopyMeterSilent(t *testing.T) {
	for _, c := range []struct {
		name       string
		tty, quiet bool
		total      int64
	}{
		{"piped", false, false, 16 << 20},
		{"quiet", true, true, 16 << 20},
		{"small", true, false, copyBarMin - 1},
	} {
		var out bytes.Buffer
		m := newCopyMeter(&progress{w: &out, tty: c.tty}, "copy f", c.quiet)
		if m.active() != (c.tty && !c.quiet) {
			t.Errorf("%s: active = %v", c.name, m.active())
		}
		m.start(c.total)
		var got bytes.Buffer
		data := bytes.Repeat([]byte("0123456789"), int(c.total/10))
		io.Copy(m.Writer(&got), bytes.NewReader(data))
		m.finish()
		if !bytes.Equal(got.Bytes(), data) {
			t.Errorf("%s: data changed on its way", c.name)
		}
		if out.Len() != 0 {
			t.Errorf("%s: output %q, want none", c.name, out.String())
		}
	}
}

// fakeCopyDaemon serves vm cp: copy out sends the announced size, then a
// tar of one file of size bytes; copy in counts what it receives.
func fakeCopyDaemon(t *testing.T, size int) (sock string, received func() int) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	tw.WriteHeader(&tar.Header{Name: "big", Mode: 0o644, Size: int64(size)})
	tw.Write(make([]byte, size))
	tw.Close()
	stream := b.Bytes()

	dir, err := os.MkdirTemp("/tmp", "bgrcp") // unix socket paths are short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock = filepath.Join(dir, "bangerd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var n int
	srv := rpc.NewServer(slog.New(slog.DiscardHandler), nil)
	srv.Handle(api.MethodVMCopyOut, rpc.PermWrite, func(ctx context.Context, call *rpc.Call) (any, error) {
		call.Progress(api.Progress{Phase: "copy", Total: int64(len(stream)), Unit: "bytes"})
		for s := stream; len(s) > 0; {
			k := min(len(s), 32<<10)
			if err := call.Send(api.Frame{Type: api.FrameStdout, Data: s[:k]}); err != nil {
				return nil, err
			}
			s = s[k:]
		}
		return nil, nil
	})
	srv.Handle(api.MethodVMCopyIn, rpc.PermWrite, func(ctx context.Context, call *rpc.Call) (any, error) {
		for f := range call.Frames() {
			if f.Type == api.FrameEOF {
				break
			}
			mu.Lock()
			n += len(f.Data)
			mu.Unlock()
		}
		return nil, nil
	}, rpc.TakesInput())
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); <-served })
	return sock, func() int { mu.Lock(); defer mu.Unlock(); return n }
}

// `vm cp` of 16 MiB shows a progress bar when stderr is a terminal, in
// both directions, and writes nothing to stderr when it is not one or
// with --quiet.
func TestCopyProgressOutput(t *testing.T) {
	const size = 16 << 20
	sock, received := fakeCopyDaemon(t, size)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(dir, "big")
	if err := os.WriteFile(src, bytes.Repeat([]byte{1}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(stderr io.Writer, args ...string) {
		t.Helper()
		a := &app{stdout: &bytes.Buffer{}, stderr: stderr}
		root := a.rootCmd()
		root.SetArgs(append([]string{"--config", cfgPath, "--socket", sock, "vm", "cp"}, args...))
		if err := root.ExecuteContext(context.Background()); err != nil {
			t.Fatalf("vm cp %v: %v", args, err)
		}
	}
	out := func(n int) string { return filepath.Join(dir, "out", strings.Repeat("o", n)) }

	// onTerminal runs vm cp with stderr a pseudo-terminal and returns what
	// it showed there.
	onTerminal := func(args ...string) string {
		t.Helper()
		ptmx, tty, err := pty.Open()
		if err != nil {
			t.Skipf("no pseudo-terminal: %v", err)
		}
		defer ptmx.Close()
		if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 40, Cols: 120}); err != nil {
			t.Fatal(err)
		}
		var screen syncBuffer
		copied := make(chan struct{})
		go func() { io.Copy(&screen, ptmx); close(copied) }()
		run(tty, args...)
		tty.Close()
		<-copied
		return screen.String()
	}
	bar := []string{"==> copy big", "16.0 MiB / 16.0 MiB", "100 %", "MiB/s"}

	before := received()
	s := onTerminal(src, "box:/root")
	if got := received() - before; got < size {
		t.Errorf("copy in sent %d bytes, want a tar of %d", got, size)
	}
	for _, want := range bar {
		if !strings.Contains(s, want) {
			t.Errorf("copy in: terminal output lacks %q:\n%q", want, s)
		}
	}
	s = onTerminal("box:/big", out(1))
	if fi, err := os.Stat(filepath.Join(out(1), "big")); err != nil || fi.Size() != size {
		t.Fatalf("copied out: %v, %v; want %d bytes", fi, err, size)
	}
	for _, want := range bar {
		if !strings.Contains(s, want) {
			t.Errorf("copy out: terminal output lacks %q:\n%q", want, s)
		}
	}
	for _, args := range [][]string{{"-q", src, "box:/root"}, {"--quiet", "box:/big", out(2)}} {
		if s := onTerminal(args...); s != "" {
			t.Errorf("vm cp %v on a terminal showed %q", args, s)
		}
	}

	// Piped: nothing on stderr.
	for _, args := range [][]string{{src, "box:/root"}, {"box:/big", out(3)}} {
		var stderr bytes.Buffer
		run(&stderr, args...)
		if stderr.Len() != 0 {
			t.Errorf("vm cp %v with stderr piped wrote %q", args, stderr.String())
		}
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// countingDecor renders how many times it was asked, and whether the bar
// was complete.
type countingDecor struct {
	decor.Decorator
	calls int
}

func (d *countingDecor) Decor(s decor.Statistics) (string, int) {
	d.calls++
	str := fmt.Sprintf("call %d complete %v", d.calls, s.Completed)
	return str, len(str)
}

// The rate shown is computed, as for a bar still running, at its
// completion, then kept: later redraws don't dilute it with time spent
// after the last byte.
func TestFinalSpeed(t *testing.T) {
	inner := &countingDecor{Decorator: decor.Name("")}
	d := &finalSpeed{Decorator: inner}
	for i, want := range []string{"call 1 complete false", "call 2 complete false"} {
		if got, _ := d.Decor(decor.Statistics{Current: int64(i)}); got != want {
			t.Errorf("running: %q, want %q", got, want)
		}
	}
	for range 3 {
		if got, _ := d.Decor(decor.Statistics{Current: 9, Total: 9, Completed: true}); got != "call 3 complete false" {
			t.Errorf("completed: %q, want the rate computed once, at completion", got)
		}
	}
}

// Bars are drawn on a terminal with a size only: mpb draws nothing on one
// of 0 rows.
func TestProgressDrawable(t *testing.T) {
	ptmx, tty, err := pty.Open()
	if err != nil {
		t.Skipf("no pseudo-terminal: %v", err)
	}
	defer ptmx.Close()
	defer tty.Close()
	if err := pty.Setsize(ptmx, &pty.Winsize{}); err != nil {
		t.Fatal(err)
	}
	if (&app{stderr: tty}).progress().tty {
		t.Error("a terminal of 0x0 is taken for a terminal to draw bars on")
	}
	if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 24, Cols: 80}); err != nil {
		t.Fatal(err)
	}
	if !(&app{stderr: tty}).progress().tty {
		t.Error("a terminal of 80x24 is not taken for a terminal")
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if (&app{stderr: f}).progress().tty || (&app{stderr: &bytes.Buffer{}}).progress().tty {
		t.Error("a file or a buffer is taken for a terminal")
	}
}

// BenchmarkCopyMeter is the cost of counting a stream on a bar, in
// 128 KiB writes (a binary RPC frame's payload).
func BenchmarkCopyMeter(b *testing.B) {
	m := newCopyMeter(&progress{w: io.Discard, tty: true}, "copy big", false)
	m.start(1 << 50)
	defer m.finish()
	w := m.Writer(io.Discard)
	buf := make([]byte, 128<<10)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		w.Write(buf)
	}
}
