package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/rpc"
)

// fakeDaemon serves the streaming methods the way bangerd's handlers use
// the call (SendData out, Frames and Release in), and records what it saw.
type fakeDaemon struct {
	// mu guards the fields below out: the handlers run on the server's
	// goroutines (the socket orders them before the test reads, but the
	// race detector can't see that).
	mu      sync.Mutex
	out     []byte // what copy_out, logs and attach send
	binary  map[string]bool
	in      map[string][]byte // stdin received per method
	maxIn   int               // the largest stdin frame
	frames  map[string][]int  // the sizes of the stdin frames per method
	execEOF bool
}

func (d *fakeDaemon) setBinary(c *rpc.Call) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.binary[c.Method] = c.Binary()
}

// seen is what the fake recorded.
type seen struct {
	binary  map[string]bool
	in      map[string][]byte
	frames  map[string][]int
	maxIn   int
	execEOF bool
}

func (d *fakeDaemon) seen() seen {
	d.mu.Lock()
	defer d.mu.Unlock()
	return seen{maps.Clone(d.binary), maps.Clone(d.in), maps.Clone(d.frames), d.maxIn, d.execEOF}
}

func serveFake(t *testing.T, d *fakeDaemon) *Client {
	t.Helper()
	d.binary, d.in, d.frames = map[string]bool{}, map[string][]byte{}, map[string][]int{}
	sock := filepath.Join(t.TempDir(), "d.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := rpc.NewServer(slog.New(slog.DiscardHandler), nil)
	// input reads stdin to EOF, echoing it to stdout when echo is set.
	input := func(c *rpc.Call, echo bool) error {
		for f := range c.Frames() {
			d.mu.Lock()
			switch f.Type {
			case api.FrameEOF:
				if c.Method == api.MethodVMExec {
					d.execEOF = true
				}
				d.mu.Unlock()
				return nil
			case api.FrameStdin:
				d.in[c.Method] = append(d.in[c.Method], f.Data...)
				d.maxIn = max(d.maxIn, len(f.Data))
				d.frames[c.Method] = append(d.frames[c.Method], len(f.Data))
			}
			d.mu.Unlock()
			if f.Type == api.FrameStdin {
				if echo {
					if err := c.SendData(rpc.KindStdout, f.Data); err != nil {
						return err
					}
				}
			}
			c.Release(f)
		}
		return errors.New("no EOF")
	}
	s.Handle(api.MethodVMExec, rpc.PermWrite, func(ctx context.Context, c *rpc.Call) (any, error) {
		d.setBinary(c)
		if err := input(c, true); err != nil {
			return nil, err
		}
		if err := c.SendData(rpc.KindStderr, []byte("done\n")); err != nil {
			return nil, err
		}
		return api.ExecResult{ExitCode: 3}, nil
	}, rpc.TakesInput())
	s.Handle(api.MethodVMCopyIn, rpc.PermWrite, func(ctx context.Context, c *rpc.Call) (any, error) {
		d.setBinary(c)
		return nil, input(c, false)
	}, rpc.TakesInput())
	send := func(ctx context.Context, c *rpc.Call) (any, error) {
		d.setBinary(c)
		for p := d.out; len(p) > 0; {
			n := min(len(p), 32<<10)
			if err := c.SendData(rpc.KindStdout, p[:n]); err != nil {
				return nil, err
			}
			p = p[n:]
		}
		return api.ExecResult{ExitCode: 5}, nil
	}
	s.Handle(api.MethodVMCopyOut, rpc.PermWrite, send)
	s.Handle(api.MethodVMLogs, rpc.PermRead, send)
	s.Handle(api.MethodVMAttach, rpc.PermRead, send)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return New(sock)
}

func randomBytes(n int) []byte {
	rng := rand.New(rand.NewPCG(3, 4))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// exec, cp in and out, logs and attach use binary framing and move their
// bytes unchanged; stdin goes in chunks as large as a frame may be.
func TestStreamsBinary(t *testing.T) {
	d := &fakeDaemon{out: randomBytes(3 << 20)}
	c := serveFake(t, d)
	ctx := context.Background()
	in := randomBytes(5<<20 + 17)

	var stdout, stderr bytes.Buffer
	code, err := c.VMExec(ctx, api.VMExecParams{Name: "x", Argv: []string{"cat"}}, ExecIO{Stdin: bytes.NewReader(in), Stdout: &stdout, Stderr: &stderr})
	if err != nil || code != 3 {
		t.Fatalf("exec: code %d, %v", code, err)
	}
	if !bytes.Equal(stdout.Bytes(), in) || stderr.String() != "done\n" {
		t.Fatalf("exec: stdout %d bytes (equal: %v), stderr %q", stdout.Len(), bytes.Equal(stdout.Bytes(), in), stderr.String())
	}
	if got := d.seen().maxIn; got != stdinChunk {
		t.Fatalf("largest stdin frame %d bytes, want chunks of %d", got, stdinChunk)
	}

	if err := c.VMCopyIn(ctx, api.VMCopyParams{Name: "x", Path: "/t"}, bytes.NewReader(in)); err != nil {
		t.Fatal(err)
	}
	if got := d.seen().in[api.MethodVMCopyIn]; !bytes.Equal(got, in) {
		t.Fatalf("copy in: daemon got %d bytes, want the %d sent", len(got), len(in))
	}

	var out bytes.Buffer
	if err := c.VMCopyOut(ctx, api.VMCopyParams{Name: "x", Path: "/t"}, &out); err != nil || !bytes.Equal(out.Bytes(), d.out) {
		t.Fatalf("copy out: %d bytes (want %d), %v", out.Len(), len(d.out), err)
	}
	out.Reset()
	if err := c.VMLogs(ctx, api.VMLogsParams{Name: "x"}, &out); err != nil || !bytes.Equal(out.Bytes(), d.out) {
		t.Fatalf("logs: %d bytes (want %d), %v", out.Len(), len(d.out), err)
	}
	out.Reset()
	code, err = c.VMAttach(ctx, "x", &out, &stderr)
	if err != nil || code != 5 || !bytes.Equal(out.Bytes(), d.out) {
		t.Fatalf("attach: code %d, %d bytes (want %d), %v", code, out.Len(), len(d.out), err)
	}
	binary := d.seen().binary
	for _, m := range []string{api.MethodVMExec, api.MethodVMCopyIn, api.MethodVMCopyOut, api.MethodVMLogs, api.MethodVMAttach} {
		if !binary[m] {
			t.Errorf("%s did not use binary framing", m)
		}
	}
}

// An exec without stdin sends EOF at once: the command isn't left waiting.
func TestExecWithoutStdin(t *testing.T) {
	d := &fakeDaemon{}
	c := serveFake(t, d)
	var stdout, stderr bytes.Buffer
	code, err := c.VMExec(context.Background(), api.VMExecParams{Name: "x", Argv: []string{"true"}}, ExecIO{Stdout: &stdout, Stderr: &stderr})
	if eof := d.seen().execEOF; err != nil || code != 3 || !eof || stdout.Len() != 0 {
		t.Fatalf("code %d, eof %v, stdout %q, %v", code, eof, stdout.String(), err)
	}
}

// A writer that fails ends the call with its error.
func TestOutputWriteError(t *testing.T) {
	d := &fakeDaemon{out: randomBytes(1 << 20)}
	c := serveFake(t, d)
	err := c.VMCopyOut(context.Background(), api.VMCopyParams{Name: "x", Path: "/t"}, failWriter{})
	if err == nil || !strings.Contains(err.Error(), "write output: disk full") {
		t.Fatalf("copy out to a failing writer: %v", err)
	}
}

type failWriter struct{}

func (failWriter) Write(p []byte) (int, error) { return 0, fmt.Errorf("disk full") }

// smallWrites yields its data a few bytes per read, as a pipe from a tar
// writer does.
type smallWrites struct{ data []byte }

func (s *smallWrites) Read(p []byte) (int, error) {
	if len(s.data) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), 512)], s.data)
	s.data = s.data[n:]
	return n, nil
}

// A copy in's stream goes in full frames however small its reads: only the
// last frame is shorter.
func TestCopyInFullFrames(t *testing.T) {
	d := &fakeDaemon{}
	c := serveFake(t, d)
	in := randomBytes(3*stdinChunk + 1000)
	if err := c.VMCopyIn(context.Background(), api.VMCopyParams{Name: "x", Path: "/t"}, &smallWrites{in}); err != nil {
		t.Fatal(err)
	}
	got := d.seen()
	if !bytes.Equal(got.in[api.MethodVMCopyIn], in) {
		t.Fatalf("daemon got %d bytes, want the %d sent", len(got.in[api.MethodVMCopyIn]), len(in))
	}
	if sizes := got.frames[api.MethodVMCopyIn]; !slices.Equal(sizes, []int{stdinChunk, stdinChunk, stdinChunk, 1000}) {
		t.Fatalf("frames of %v bytes, want 3 of %d and the rest", sizes, stdinChunk)
	}
}
