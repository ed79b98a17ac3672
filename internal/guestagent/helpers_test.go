package guestagent_test

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/guestagent"
)

// socketPair returns the two ends of a connected unix stream socket pair
// (buffered by the kernel, unlike net.Pipe, so both SSH sides can send
// their version line at once).
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatalf("file conn: %v", err)
		}
		conns[i] = c
	}
	return conns[0], conns[1]
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func generateKeys(t *testing.T) agent.KeyMaterial {
	t.Helper()
	km, err := agent.GenerateKeys()
	if err != nil {
		t.Fatalf("generate keys: %v", err)
	}
	return km
}

func agentConfig(km agent.KeyMaterial) agentproto.Config {
	var cfg agentproto.Config
	km.ApplyTo(&cfg)
	return cfg
}

// harness is a guest agent served in process over a socket pair.
type harness struct {
	km       agent.KeyMaterial
	cfg      agentproto.Config
	serveErr chan error
	cancel   context.CancelFunc
	guest    net.Conn
	host     net.Conn
}

// startServer serves one connection of an agent configured with km.
func startServer(t *testing.T, km agent.KeyMaterial, hooks guestagent.Hooks) *harness {
	t.Helper()
	return startServerConfig(t, km, agentConfig(km), hooks)
}

// startServerConfig serves one connection of an agent configured with cfg
// (holding km's keys).
func startServerConfig(t *testing.T, km agent.KeyMaterial, cfg agentproto.Config, hooks guestagent.Hooks) *harness {
	t.Helper()
	guest, host := socketPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{km: km, cfg: cfg, serveErr: make(chan error, 1), cancel: cancel, guest: guest, host: host}
	log := testLogger(t)
	go func() { h.serveErr <- guestagent.ServeConn(ctx, guest, h.cfg, hooks, log.With("side", "guest")) }()
	t.Cleanup(func() {
		cancel()
		host.Close()
		select {
		case <-h.serveErr:
		case <-time.After(10 * time.Second):
			t.Errorf("ServeConn did not return after cancel")
		}
	})
	return h
}

func (h *harness) dialer() agent.DialFunc {
	var once sync.Once
	return func(ctx context.Context) (net.Conn, error) {
		var c net.Conn
		once.Do(func() { c = h.host })
		if c == nil {
			return nil, net.ErrClosed
		}
		return c, nil
	}
}

// connect starts an agent and returns a client connected to it.
func connect(t *testing.T, hooks guestagent.Hooks) (*agent.Client, *harness) {
	t.Helper()
	return connectConfig(t, hooks, nil)
}

// connectConfig is connect with the agent's config changed by edit.
func connectConfig(t *testing.T, hooks guestagent.Hooks, edit func(*agentproto.Config)) (*agent.Client, *harness) {
	t.Helper()
	km := generateKeys(t)
	cfg := agentConfig(km)
	if edit != nil {
		edit(&cfg)
	}
	h := startServerConfig(t, km, cfg, hooks)
	keys, err := h.km.Keys()
	if err != nil {
		t.Fatalf("keys: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, h.dialer(), keys, testLogger(t).With("side", "host"))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, h
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// syncBuffer is a bytes.Buffer safe for concurrent Write and String.
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

// waitFor polls cond every 20 ms until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
