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
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
)

type echoParams struct {
	Text string `json:"text"`
}

func serve(t *testing.T, authorize Authorizer, register func(s *Server)) string {
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
		})
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
		})
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
