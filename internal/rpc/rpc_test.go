package rpc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
)

type echoParams struct {
	Text string `json:"text"`
}

func serve(t testing.TB, authorize Authorizer, register func(s *Server)) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(slog.New(slog.DiscardHandler), authorize)
	register(s)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock
}

func TestCallResultProgressAndErrors(t *testing.T) {
	sock := serve(t, nil, func(s *Server) {
		s.Handle("v1.echo", PermRead, func(ctx context.Context, c *Call) (any, error) {
			var p echoParams
			if err := c.Decode(&p); err != nil {
				return nil, err
			}
			c.Progress(api.Progress{Phase: "think", Done: 1, Total: 2})
			if p.Text == "" {
				return nil, fmt.Errorf("thing %q: %w", "x", errdefs.ErrNotFound)
			}
			return echoParams{Text: p.Text + "!"}, nil
		})
	})
	ctx := context.Background()
	var got echoParams
	var phases []string
	err := Do(ctx, sock, "v1.echo", echoParams{Text: "hi"}, &got, func(f api.Frame) { phases = append(phases, f.Progress.Phase) })
	if err != nil || got.Text != "hi!" || len(phases) != 1 || phases[0] != "think" {
		t.Fatalf("got %+v, phases %v, err %v", got, phases, err)
	}
	err = Do(ctx, sock, "v1.echo", echoParams{}, &got, nil)
	if !errors.Is(err, errdefs.ErrNotFound) || err.Error() != `thing "x": not found` {
		t.Fatalf("error across the wire: %v", err)
	}
	err = Do(ctx, sock, "v1.echo", map[string]any{"text": "a", "bogus": 1}, &got, nil)
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("unknown param field: %v", err)
	}
	err = Do(ctx, sock, "v9.nothing", nil, nil, nil)
	if !errors.Is(err, errdefs.ErrUnknownMethod) {
		t.Fatalf("unknown method: %v", err)
	}
	err = Do(ctx, sock, "v9."+strings.Repeat("x", 500<<10), nil, nil, nil)
	if !errors.Is(err, errdefs.ErrUnknownMethod) || len(err.Error()) > 300 {
		t.Fatalf("unknown 500 KiB method: %.300v (%d bytes)", err, len(err.Error()))
	}
}

func TestUnreachable(t *testing.T) {
	err := Do(context.Background(), filepath.Join(t.TempDir(), "none.sock"), "v1.x", nil, nil, nil)
	if !errors.Is(err, ErrDaemonUnreachable) {
		t.Fatalf("err = %v", err)
	}
}

func TestPermission(t *testing.T) {
	var seen Peer
	sock := serve(t, func(p Peer, perm Perm) error {
		seen = p
		if perm == PermWrite {
			return fmt.Errorf("no: %w", errdefs.ErrPermissionDenied)
		}
		return nil
	}, func(s *Server) {
		s.Handle("v1.read", PermRead, func(ctx context.Context, c *Call) (any, error) { return "ok", nil })
		s.Handle("v1.write", PermWrite, func(ctx context.Context, c *Call) (any, error) { return "bad", nil })
	})
	var r string
	if err := Do(context.Background(), sock, "v1.read", nil, &r, nil); err != nil || r != "ok" {
		t.Fatalf("read: %q %v", r, err)
	}
	if err := Do(context.Background(), sock, "v1.write", nil, &r, nil); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("write: %v", err)
	}
	if seen.PID == 0 {
		t.Fatal("peer credentials not read")
	}
}

func TestStreamingAndCancel(t *testing.T) {
	cancelled := make(chan struct{})
	sock := serve(t, nil, func(s *Server) {
		s.Handle("v1.cat", PermWrite, func(ctx context.Context, c *Call) (any, error) {
			n := 0
			for f := range c.Frames() {
				if f.Type == api.FrameEOF {
					break
				}
				n += len(f.Data)
				if err := c.Send(api.Frame{Type: api.FrameStdout, Data: f.Data}); err != nil {
					return nil, err
				}
			}
			return n, nil
		}, TakesInput())
		s.Handle("v1.block", PermWrite, func(ctx context.Context, c *Call) (any, error) {
			<-ctx.Done()
			close(cancelled)
			return nil, ctx.Err()
		})
	})
	ctx := context.Background()
	st, err := Open(ctx, sock, "v1.cat", nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"ab", "cde"} {
		if err := st.Send(api.Frame{Type: api.FrameStdin, Data: []byte(s)}); err != nil {
			t.Fatal(err)
		}
		f, err := st.Recv(nil)
		if err != nil || string(f.Data) != s {
			t.Fatalf("echo %q: %q %v", s, f.Data, err)
		}
	}
	st.Send(api.Frame{Type: api.FrameEOF})
	var n int
	if _, err := st.Recv(&n); !errors.Is(err, io.EOF) || n != 5 {
		t.Fatalf("end: n=%d err=%v", n, err)
	}
	st.Close()

	// Closing the client cancels the handler's context.
	cctx, cancel := context.WithCancel(ctx)
	go func() { time.Sleep(100 * time.Millisecond); cancel() }()
	if err := Do(cctx, sock, "v1.block", nil, nil, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled call: %v", err)
	}
	select {
	case <-cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("handler context not cancelled when the client went away")
	}
}

// A request larger than MaxRequestBytes is refused with ErrInvalid, and the
// server never buffers it: what it allocates while refusing a 10 MB request
// stays near the limit.
func TestOversizedRequestRefusedWithBoundedMemory(t *testing.T) {
	called := false
	sock := serve(t, nil, func(s *Server) {
		s.Handle("v1.vm.create", PermRead, func(ctx context.Context, c *Call) (any, error) {
			called = true
			return nil, nil
		})
	})
	name := strings.Repeat("a", 10<<20)
	req := []byte(`{"method":"v1.vm.create","params":{"name":"` + name + `"}}` + "\n")

	// The typed path refuses before sending.
	err := Do(context.Background(), sock, "v1.vm.create", map[string]string{"name": name}, nil, nil)
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("Do with a 10 MB request = %v, want ErrInvalid", err)
	}

	// A raw client: the server refuses it.
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	go func() {
		_, _ = conn.Write(req) // fails once the server closed: expected
	}()
	var msg Message
	if err := json.NewDecoder(conn).Decode(&msg); err != nil {
		t.Fatalf("read the server's answer: %v", err)
	}
	runtime.ReadMemStats(&after)
	if msg.Error == nil || msg.Error.Code != api.CodeInvalid {
		t.Fatalf("answer to a 10 MB request = %+v, want an invalid-argument error", msg)
	}
	if called {
		t.Fatal("the handler ran")
	}
	// Allocated by the whole process (this test's reader included) while
	// the server read and refused the request.
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 6<<20 {
		t.Errorf("refusing a 10 MB request allocated %d MiB, want a bound near %d MiB", alloc>>20, MaxRequestBytes>>20)
	}
}

// A client frame larger than MaxFrameBytes ends the call with ErrInvalid.
func TestOversizedFrameEndsCall(t *testing.T) {
	sock := serve(t, nil, func(s *Server) {
		s.Handle("v1.in", PermRead, func(ctx context.Context, c *Call) (any, error) {
			for range c.Frames() {
			}
			<-ctx.Done()
			return nil, ctx.Err()
		}, TakesInput())
	})
	s, err := Open(context.Background(), sock, "v1.in", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	go func() {
		_ = s.Send(api.Frame{Type: api.FrameStdin, Data: make([]byte, 2<<20)})
	}()
	for {
		_, err := s.Recv(nil)
		if err == nil {
			continue
		}
		if !errors.Is(err, errdefs.ErrInvalid) {
			t.Fatalf("call with a 2 MiB frame ended with %v, want ErrInvalid", err)
		}
		return
	}
}

// A frame sent to a method that takes no input ends the call with
// ErrInvalid: the server doesn't queue input nobody reads.
func TestFrameToMethodWithoutInputRefused(t *testing.T) {
	cancelled := make(chan struct{})
	sock := serve(t, nil, func(s *Server) {
		s.Handle("v1.wait", PermRead, func(ctx context.Context, c *Call) (any, error) {
			<-ctx.Done()
			close(cancelled)
			return "never seen", nil
		})
	})
	st, err := Open(context.Background(), sock, "v1.wait", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.Send(api.Frame{Type: api.FrameStdin, Data: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	_, err = st.Recv(nil)
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "takes no input") {
		t.Fatalf("a frame to a method without input: %v, want ErrInvalid", err)
	}
	<-cancelled // the handler's context was cancelled, or this never returns
}

// frameLine is one client message of a stdin frame, as large as the server
// accepts.
func frameLine(t *testing.T) []byte {
	t.Helper()
	line, err := json.Marshal(Message{Frame: &api.Frame{Type: api.FrameStdin, Data: make([]byte, (MaxFrameBytes-128)/4*3)}})
	if err != nil {
		t.Fatal(err)
	}
	line = append(line, '\n')
	if len(line) > MaxFrameBytes {
		t.Fatalf("test frame of %d bytes is over the limit", len(line))
	}
	return line
}

// feeder writes max-size frames to a call's connection for as long as the
// server reads them. A write that makes no progress for a while counts a
// stall and is retried: a server applying backpressure stalls its writer.
type feeder struct {
	conn   net.Conn
	stalls atomic.Int64
	frames atomic.Int64
	done   chan struct{} // closed when the feeder stops
	err    error         // why it stopped; set before done is closed
}

func feed(t *testing.T, sock, method string, binary bool, line []byte) *feeder {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := json.Marshal(Request{Method: method, Binary: binary})
	if _, err := conn.Write(append(req, '\n')); err != nil {
		t.Fatal(err)
	}
	f := &feeder{conn: conn, done: make(chan struct{})}
	go func() {
		off := 0
		for {
			// Not a time limit on the server: how long a write may make no
			// progress before it counts as stalled (and is retried).
			_ = conn.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
			n, err := conn.Write(line[off:])
			off += n
			if off == len(line) {
				off = 0
				f.frames.Add(1)
			}
			var ne net.Error
			switch {
			case err == nil:
			case errors.As(err, &ne) && ne.Timeout():
				f.stalls.Add(1)
			default:
				f.err = err // the connection was closed: the test is over
				close(f.done)
				return
			}
		}
	}()
	return f
}

// waitFor waits for cond, checking it every 10 ms, for at most 2 minutes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
}

// waitStalled waits until every feeder has stalled since marks were taken.
func waitStalled(t *testing.T, fs []*feeder, marks []int64) {
	t.Helper()
	for i, f := range fs {
		waitFor(t, fmt.Sprintf("feeder %d to stall (the server reads without bound?)", i), func() bool {
			select {
			case <-f.done:
				t.Fatalf("feeder %d: %v", i, f.err)
			default:
			}
			return f.stalls.Load() > marks[i]
		})
	}
}

func heapInUse() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// What clients streaming input make the daemon hold is bounded per call,
// whether the handler never reads its input or reads it slowly, in either
// framing: the server stops reading a connection whose handler doesn't
// keep up, so the client's writes stop.
func TestCallInputMemoryBounded(t *testing.T) {
	t.Run("json", func(t *testing.T) { testCallInputMemoryBounded(t, false, frameLine(t)) })
	// A binary stdin message as large as the server accepts.
	t.Run("binary", func(t *testing.T) {
		testCallInputMemoryBounded(t, true, binaryMessage(3, MaxFrameBytes, make([]byte, MaxFrameBytes)))
	})
}

func testCallInputMemoryBounded(t *testing.T, binary bool, line []byte) {
	const conns = 3
	const bound = 8 << 20
	tokens := make(chan struct{})
	var read atomic.Int64
	sock := serve(t, nil, func(s *Server) {
		s.Handle("v1.stuck", PermWrite, func(ctx context.Context, c *Call) (any, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		}, TakesInput())
		s.Handle("v1.slow", PermWrite, func(ctx context.Context, c *Call) (any, error) {
			for {
				select {
				case <-tokens:
				case <-ctx.Done():
					return nil, ctx.Err()
				}
				if _, ok := <-c.Frames(); !ok {
					return nil, nil
				}
				read.Add(1)
			}
		}, TakesInput())
	})
	base := heapInUse()
	var fs []*feeder
	for range conns {
		fs = append(fs, feed(t, sock, "v1.stuck", binary, line), feed(t, sock, "v1.slow", binary, line))
	}
	defer func() {
		for _, f := range fs {
			f.conn.Close()
			<-f.done
		}
	}()
	marks := make([]int64, len(fs))
	check := func(when string) {
		t.Helper()
		waitStalled(t, fs, marks)
		for i, f := range fs {
			marks[i] = f.stalls.Load()
		}
		heap := heapInUse()
		var written int64
		for _, f := range fs {
			written += f.frames.Load()
		}
		t.Logf("%s: %d frames of %d KiB written, heap grew by %d KiB", when, written, len(line)>>10, (int64(heap)-int64(base))>>10)
		if heap > base+bound {
			t.Fatalf("%s: %d connections streaming to handlers that don't keep up grew the heap by %d MiB (%d frames written), want < %d MiB",
				when, len(fs), (heap-base)>>20, written, bound>>20)
		}
	}
	check("handlers not reading")
	// The slow handlers read a few frames at a time; the server reads
	// only as much more.
	given := int64(0)
	for round := range 4 {
		for range conns * 3 {
			tokens <- struct{}{}
			given++
		}
		waitFor(t, "the slow handlers to read", func() bool { return read.Load() == given })
		check(fmt.Sprintf("after slow read %d", round+1))
	}
}

// Past MaxCalls, a call waits until another ends: never more than MaxCalls
// handlers run at once.
func TestMaxCalls(t *testing.T) {
	var running, most atomic.Int64
	release := make(chan struct{})
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(slog.New(slog.DiscardHandler), nil)
	s.MaxCalls = 2
	s.Handle("v1.hold", PermRead, func(ctx context.Context, c *Call) (any, error) {
		n := running.Add(1)
		defer running.Add(-1)
		for {
			m := most.Load()
			if n <= m || most.CompareAndSwap(m, n) {
				break
			}
		}
		select {
		case <-release:
		case <-ctx.Done():
		}
		return "done", nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx, l) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	var streams []*Stream
	for range 3 {
		st, err := Open(ctx, sock, "v1.hold", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		streams = append(streams, st)
	}
	waitFor(t, "two calls to run", func() bool { return running.Load() == 2 })
	// All three calls are open; the third starts only when the others end.
	close(release)
	for _, st := range streams {
		var r string
		if _, err := st.Recv(&r); !errors.Is(err, io.EOF) || r != "done" {
			t.Fatalf("call: %q %v", r, err)
		}
	}
	if got := most.Load(); got != 2 {
		t.Fatalf("%d calls ran at once, want MaxCalls = 2", got)
	}
}
