package guestagent_test

import (
	"context"
	"errors"
	"io"
	"os"
	"reflect"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/guestagent"
)

func TestInfo(t *testing.T) {
	c, h := connect(t, guestagent.Hooks{InitMode: "systemd", Init: "/sbin/init"})
	info, err := c.Info(testCtx(t))
	if err != nil {
		t.Fatalf("info: %v", err)
	}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	want := agentproto.Info{
		AgentVersion:  guestagent.Version,
		ProtoVersion:  agentproto.Version,
		KernelRelease: unix.ByteSliceToString(uts.Release[:]),
		Hostname:      host,
		InitMode:      "systemd",
		Init:          "/sbin/init",
		UptimeMS:      info.UptimeMS,
		// No EarlyBootDone hook: nothing to wait for.
		EarlyBootDone:   true,
		EarlyBootSignal: "none",
	}
	// The SSH fields and Listening describe the machine the test runs on
	// (its sshd, its servers); the agent's own host key comes last.
	if n := len(info.SSHHostKeys); n == 0 || info.SSHHostKeys[n-1] != h.km.HostPublic {
		t.Errorf("SSHHostKeys %q, want the agent's host key %q last", info.SSHHostKeys, h.km.HostPublic)
	}
	if info.Network != nil {
		t.Errorf("Network %+v without a network config, want nil", info.Network)
	}
	got := info
	got.SSHHostKeys, got.SSHD, got.Listening = nil, false, nil
	if !reflect.DeepEqual(got, want) {
		t.Errorf("info = %+v, want %+v", got, want)
	}
	if info.UptimeMS <= 0 {
		t.Errorf("uptime %d ms", info.UptimeMS)
	}
	info2, err := c.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info2.UptimeMS < info.UptimeMS {
		t.Errorf("uptime went backwards: %d then %d", info.UptimeMS, info2.UptimeMS)
	}
}

func TestShutdownHook(t *testing.T) {
	calls := make(chan bool, 2)
	c, _ := connect(t, guestagent.Hooks{Shutdown: func(reboot bool) error {
		calls <- reboot
		return nil
	}})
	for _, reboot := range []bool{true, false} {
		if err := c.Shutdown(testCtx(t), reboot); err != nil {
			t.Fatalf("shutdown(%v): %v", reboot, err)
		}
		select {
		case got := <-calls:
			if got != reboot {
				t.Errorf("hook got reboot=%v, want %v", got, reboot)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("shutdown hook not called")
		}
	}
}

func TestShutdownWithoutHookIsRefused(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	if err := c.Shutdown(testCtx(t), false); !errors.Is(err, agent.ErrRefused) {
		t.Errorf("shutdown without hook: %v, want ErrRefused", err)
	}
}

func TestWrongHostKeyRefused(t *testing.T) {
	h := startServer(t, generateKeys(t), guestagent.Hooks{})
	other := generateKeys(t)
	keys, err := agent.ParseKeys(other.HostPublic, h.km.ClientPrivatePEM)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, h.dialer(), keys, testLogger(t))
	if err == nil {
		c.Close()
		t.Fatalf("dial succeeded with the wrong pinned host key")
	}
	if !errors.Is(err, agent.ErrHostKeyMismatch) {
		t.Errorf("dial: %v, want ErrHostKeyMismatch", err)
	}
}

func TestWrongClientKeyRefused(t *testing.T) {
	h := startServer(t, generateKeys(t), guestagent.Hooks{})
	other := generateKeys(t)
	keys, err := agent.ParseKeys(h.km.HostPublic, other.ClientPrivatePEM)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, h.dialer(), keys, testLogger(t))
	if err == nil {
		c.Close()
		t.Fatalf("dial succeeded with an unauthorized client key")
	}
	select {
	case serr := <-h.serveErr:
		if serr == nil {
			t.Errorf("ServeConn returned nil for an unauthorized client")
		}
		h.serveErr <- serr // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatalf("ServeConn did not return after a refused client")
	}
}

func TestBadConfig(t *testing.T) {
	km := generateKeys(t)
	ctx := testCtx(t)
	for name, cfg := range map[string]agentproto.Config{
		"no host key":       {AuthorizedKey: km.ClientPublic},
		"no authorized key": {HostKey: km.HostPrivatePEM},
		"bad host key":      {HostKey: "junk", AuthorizedKey: km.ClientPublic},
	} {
		g, h := socketPair(t)
		if err := guestagent.ServeConn(ctx, g, cfg, guestagent.Hooks{}, nil); err == nil {
			t.Errorf("%s: ServeConn accepted the config", name)
		}
		h.Close()
	}
	cfg := agentConfig(km)
	cfg.Transport = "carrier-pigeon"
	if err := guestagent.Serve(ctx, cfg, guestagent.Hooks{}, nil); err == nil {
		t.Errorf("Serve accepted an unknown transport")
	}
}

func TestDoneWhenServerStops(t *testing.T) {
	c, h := connect(t, guestagent.Hooks{})
	select {
	case <-c.Done():
		t.Fatalf("Done closed while connected")
	default:
	}
	h.cancel()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("Done not closed after the server stopped")
	}
	if _, err := c.Exec(testCtx(t), agent.ExecOptions{Argv: []string{"true"}}); err == nil {
		t.Errorf("exec succeeded on a dead connection")
	}
	if _, err := c.Info(testCtx(t)); !errors.Is(err, agent.ErrConnectionLost) {
		t.Errorf("info on a dead connection: %v, want ErrConnectionLost", err)
	}
}

func TestExecInterruptedByConnectionLoss(t *testing.T) {
	c, h := connect(t, guestagent.Hooks{})
	var out syncBuffer
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(context.Background(), agent.ExecOptions{
			Argv: []string{"sh", "-c", "echo $$; exec sleep 100"}, Stdout: &out,
		})
		done <- err
	}()
	waitFor(t, 10*time.Second, "pid", func() bool { return len(out.String()) > 0 })
	h.host.Close()
	select {
	case err := <-done:
		if !errors.Is(err, agent.ErrConnectionLost) {
			t.Errorf("exec: %v, want ErrConnectionLost", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("exec did not return after the connection died")
	}
}

func TestInfoEarlyBoot(t *testing.T) {
	var done atomic.Bool
	c, _ := connect(t, guestagent.Hooks{EarlyBootDone: func(context.Context) (bool, string) { return done.Load(), "unit" }})
	info, err := c.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.EarlyBootDone || info.EarlyBootSignal != "unit" {
		t.Errorf("before: EarlyBootDone %v signal %q, want false unit", info.EarlyBootDone, info.EarlyBootSignal)
	}
	done.Store(true)
	if info, err = c.Info(testCtx(t)); err != nil || !info.EarlyBootDone {
		t.Errorf("after: EarlyBootDone %v, err %v", info.EarlyBootDone, err)
	}

	// Without the hook (an agent started by hand), there is nothing to wait for.
	c2, _ := connect(t, guestagent.Hooks{})
	if info, err := c2.Info(testCtx(t)); err != nil || !info.EarlyBootDone {
		t.Errorf("no hook: EarlyBootDone %v, err %v", info.EarlyBootDone, err)
	}
}

func TestInfoDataPorts(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{DataPorts: 3, OpenDataPort: func(ctx context.Context, port int) (io.ReadWriteCloser, error) {
		return nil, errors.New("not used")
	}})
	info, err := c.Info(testCtx(t))
	if err != nil {
		t.Fatalf("info: %v", err)
	}
	if info.DataPorts != 3 {
		t.Errorf("DataPorts = %d, want 3", info.DataPorts)
	}
}
