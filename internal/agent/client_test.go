package agent_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/guestagent"
)

func TestGenerateAndParseKeys(t *testing.T) {
	km, err := agent.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range map[string]string{"HostPrivatePEM": km.HostPrivatePEM, "ClientPrivatePEM": km.ClientPrivatePEM} {
		if !strings.HasPrefix(v, "-----BEGIN OPENSSH PRIVATE KEY-----") {
			t.Errorf("%s is not an OpenSSH PEM: %.40q", name, v)
		}
	}
	for name, v := range map[string]string{"HostPublic": km.HostPublic, "ClientPublic": km.ClientPublic} {
		if !strings.HasPrefix(v, "ssh-ed25519 ") || strings.Contains(v, "\n") {
			t.Errorf("%s is not a one-line ed25519 authorized key: %q", name, v)
		}
	}

	// The public halves match the private halves.
	hostSigner, err := ssh.ParsePrivateKey([]byte(km.HostPrivatePEM))
	if err != nil {
		t.Fatal(err)
	}
	keys, err := agent.ParseKeys(km.HostPublic, km.ClientPrivatePEM)
	if err != nil {
		t.Fatalf("parse keys: %v", err)
	}
	if !bytes.Equal(keys.HostPublic.Marshal(), hostSigner.PublicKey().Marshal()) {
		t.Errorf("HostPublic does not match HostPrivatePEM")
	}
	clientPub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(km.ClientPublic))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(keys.ClientSigner.PublicKey().Marshal(), clientPub.Marshal()) {
		t.Errorf("ClientPublic does not match ClientPrivatePEM")
	}
	if bytes.Equal(keys.HostPublic.Marshal(), clientPub.Marshal()) {
		t.Errorf("host and client keys are the same")
	}
	keys2, err := km.Keys()
	if err != nil || !bytes.Equal(keys2.HostPublic.Marshal(), keys.HostPublic.Marshal()) {
		t.Errorf("KeyMaterial.Keys differs from ParseKeys: %v", err)
	}

	var cfg agentproto.Config
	km.ApplyTo(&cfg)
	if cfg.HostKey != km.HostPrivatePEM || cfg.AuthorizedKey != km.ClientPublic {
		t.Errorf("ApplyTo filled %+v", cfg)
	}

	other, err := agent.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	if other.HostPublic == km.HostPublic || other.ClientPublic == km.ClientPublic {
		t.Errorf("two generations gave the same keys")
	}

	for name, args := range map[string][2]string{
		"empty host":     {"", km.ClientPrivatePEM},
		"bad host":       {"ssh-ed25519 AAAAjunk", km.ClientPrivatePEM},
		"empty client":   {km.HostPublic, ""},
		"client is pub":  {km.HostPublic, km.ClientPublic},
		"swapped halves": {km.ClientPrivatePEM, km.HostPublic},
	} {
		if _, err := agent.ParseKeys(args[0], args[1]); err == nil {
			t.Errorf("%s: ParseKeys accepted bad input", name)
		}
	}
}

func socketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	t.Cleanup(func() { conns[0].Close(); conns[1].Close() })
	return conns[0], conns[1]
}

// serve starts an agent on a fresh socket pair and returns the host end.
func serve(t *testing.T, km agent.KeyMaterial) net.Conn {
	t.Helper()
	guest, host := socketPair(t)
	var cfg agentproto.Config
	km.ApplyTo(&cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		guestagent.ServeConn(ctx, guest, cfg, guestagent.Hooks{}, nil)
		close(done)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return host
}

func TestDialRequiresKeys(t *testing.T) {
	called := false
	dial := func(context.Context) (net.Conn, error) { called = true; return nil, errors.New("unused") }
	if _, err := agent.Dial(context.Background(), dial, agent.Keys{}, nil); err == nil {
		t.Errorf("Dial accepted empty keys")
	}
	if called {
		t.Errorf("Dial dialed without keys")
	}
	if _, err := agent.WaitReady(context.Background(), dial, agent.Keys{}, nil); err == nil {
		t.Errorf("WaitReady accepted empty keys")
	}
}

func TestDialBoundedByContext(t *testing.T) {
	km, _ := agent.GenerateKeys()
	keys, _ := km.Keys()
	_, silent := socketPair(t) // nobody answers on the other end
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := agent.Dial(ctx, func(context.Context) (net.Conn, error) { return silent, nil }, keys, nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("dial: %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("dial took %s", d)
	}
}

func TestWaitReadyRetries(t *testing.T) {
	km, _ := agent.GenerateKeys()
	keys, _ := km.Keys()
	_, silent := socketPair(t)
	var attempts atomic.Int32
	dial := func(ctx context.Context) (net.Conn, error) {
		switch n := attempts.Add(1); {
		case n <= 3:
			return nil, errors.New("connection refused")
		case n == 4:
			// The guest accepts bytes but does not answer yet: this
			// attempt must time out and be retried.
			return silent, nil
		default:
			return serve(t, km), nil
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	c, err := agent.WaitReady(ctx, dial, keys, nil)
	if err != nil {
		t.Fatalf("wait ready: %v", err)
	}
	defer c.Close()
	if n := attempts.Load(); n != 5 {
		t.Errorf("%d attempts, want 5", n)
	}
	if d := time.Since(start); d < 2*time.Second || d > 10*time.Second {
		t.Errorf("took %s, want about 2 s (one hung attempt)", d)
	}
	if _, err := c.Info(ctx); err != nil {
		t.Errorf("info: %v", err)
	}
}

func TestWaitReadyGivesUp(t *testing.T) {
	km, _ := agent.GenerateKeys()
	keys, _ := km.Keys()
	dialErr := errors.New("connection refused")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := agent.WaitReady(ctx, func(context.Context) (net.Conn, error) { return nil, dialErr }, keys, nil)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, dialErr) {
		t.Errorf("wait ready: %v, want deadline exceeded and the last dial error", err)
	}

	// A wrong host key is not retried.
	other, _ := agent.GenerateKeys()
	var attempts atomic.Int32
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	_, err = agent.WaitReady(ctx2, func(context.Context) (net.Conn, error) {
		attempts.Add(1)
		return serve(t, other), nil
	}, keys, nil)
	if !errors.Is(err, agent.ErrHostKeyMismatch) {
		t.Errorf("wait ready: %v, want ErrHostKeyMismatch", err)
	}
	if n := attempts.Load(); n != 1 {
		t.Errorf("%d attempts, want 1", n)
	}
}

func TestCloseIsIdempotent(t *testing.T) {
	km, _ := agent.GenerateKeys()
	keys, _ := km.Keys()
	host := serve(t, km)
	c, err := agent.Dial(context.Background(), func(context.Context) (net.Conn, error) { return host, nil }, keys, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Errorf("Done not closed after Close")
	}
}
