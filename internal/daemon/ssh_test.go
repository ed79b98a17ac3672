package daemon

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/rpc"
)

// hold starts a vm.hold call and returns once the daemon holds the VM;
// the call's result arrives on the channel.
func hold(ctx context.Context, t *testing.T, e *testEnv, name string) <-chan error {
	t.Helper()
	held := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- rpc.Do(ctx, e.cfg.SocketPath, api.MethodVMHold, api.NameParams{Name: name}, nil, func(f api.Frame) {
			if f.Type == api.FrameProgress && f.Progress != nil && f.Progress.Phase == "held" {
				close(held)
			}
		})
	}()
	select {
	case <-held:
	case err := <-done:
		t.Fatalf("hold %s ended before holding: %v", name, err)
	case <-ctx.Done():
		t.Fatalf("hold %s: %v", name, ctx.Err())
	}
	return done
}

// A held auto-remove VM goes when the holding client goes.
func TestHoldRemovesAutoRemoveVMWhenClientGoes(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	vm := createAutoRemove(t, d, "held")
	ctx := testCtx(t)
	hctx, cancel := context.WithCancel(ctx)
	done := hold(hctx, t, e, "held")
	if got := inspect(t, d, "held"); got.State != api.StateRunning {
		t.Fatalf("held vm is %s", got.State)
	}
	cancel()
	<-done
	waitGone(ctx, t, d, vm)
}

// A hold ends when the VM stops; an auto-remove VM is then removed.
func TestHoldEndsWhenVMStops(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	createStarted(t, d, "plain")
	done := hold(ctx, t, e, "plain")
	e.fake.byName("plain").powerOff()
	if err := <-done; err != nil {
		t.Fatalf("hold of a VM that stopped: %v, want nil", err)
	}
	if got := inspect(t, d, "plain"); got.State != api.StateStopped {
		t.Errorf("vm is %s after power off", got.State)
	}
	err := d.c.VMHold(ctx, "plain", nil)
	wireErr(t, "hold a stopped vm", err, errdefs.ErrFailedPrecondition)

	vm := createAutoRemove(t, d, "eph")
	done = hold(ctx, t, e, "eph")
	e.fake.byName("eph").powerOff()
	if err := <-done; err != nil {
		t.Fatalf("hold: %v", err)
	}
	waitGone(ctx, t, d, vm)
}

func TestSSHInfo(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "dev", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd, User: "dev"}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "a", Image: "dev"}, nil); err != nil {
		t.Fatal(err)
	}
	info, err := d.c.VMSSHInfo(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if info.Name != "a" || info.User != "dev" || info.Direct != "" || info.HostKeys == nil {
		t.Errorf("ssh info = %+v", info)
	}
	createStarted(t, d, "b")
	if info, err := d.c.VMSSHInfo(ctx, "b"); err != nil || info.User != "root" || info.Direct != "" {
		t.Errorf("ssh info = %+v, %v", info, err)
	}
	_, err = d.c.VMSSHInfo(ctx, "nope")
	wireErr(t, "ssh info of an unknown vm", err, errdefs.ErrNotFound)
}

func TestTunnelValidation(t *testing.T) {
	t.Parallel()
	_, d := setup(t, nil)
	ctx := testCtx(t)
	createStarted(t, d, "t")
	err := d.c.VMTunnel(ctx, api.VMTunnelParams{Name: "t", Port: 0}, nil, nil)
	wireErr(t, "tunnel to port 0", err, errdefs.ErrInvalid)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "stopped"}, nil); err != nil {
		t.Fatal(err)
	}
	err = d.c.VMTunnel(ctx, api.VMTunnelParams{Name: "stopped", SSH: true}, nil, nil)
	wireErr(t, "tunnel to a stopped vm", err, errdefs.ErrFailedPrecondition)
}

// A tunnel to a guest port relays both ways and ends when the guest side
// closes. The fake guest is the test host: the port is on its loopback.
func TestTunnelToGuestPort(t *testing.T) {
	t.Parallel()
	_, d := setup(t, nil)
	ctx := testCtx(t)
	createStarted(t, d, "t")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c) // until the client's EOF
		c.Write([]byte(strings.ToUpper(string(b))))
	}()
	var out syncBuffer
	err = d.c.VMTunnel(ctx, api.VMTunnelParams{Name: "t", Port: l.Addr().(*net.TCPAddr).Port}, strings.NewReader("hello through the agent"), &out)
	if err != nil {
		t.Fatal(err)
	}
	if got := out.String(); got != "HELLO THROUGH THE AGENT" {
		t.Errorf("tunnel returned %q", got)
	}
	// Nothing listens: a clear error.
	l2, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := l2.Addr().(*net.TCPAddr).Port
	l2.Close()
	err = d.c.VMTunnel(ctx, api.VMTunnelParams{Name: "t", Port: closed}, strings.NewReader(""), io.Discard)
	wireErr(t, "tunnel to a closed port", err, errdefs.ErrFailedPrecondition)
}

// bannerWriter cancels once it has seen an SSH identification line.
type bannerWriter struct {
	syncBuffer
	cancel context.CancelFunc
}

func (w *bannerWriter) Write(p []byte) (int, error) {
	n, err := w.syncBuffer.Write(p)
	if strings.Contains(w.String(), "\n") {
		w.cancel()
	}
	return n, err
}

// A tunnel to the guest's SSH service answers with an SSH server's
// identification line (the guest's sshd, or the agent's own server).
func TestTunnelToGuestSSH(t *testing.T) {
	t.Parallel()
	_, d := setup(t, nil)
	createStarted(t, d, "s")
	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	w := &bannerWriter{cancel: cancel}
	pr, pw := io.Pipe() // stdin stays open: the client speaks first only after the banner
	defer pw.Close()
	_ = d.c.VMTunnel(ctx, api.VMTunnelParams{Name: "s", SSH: true}, pr, w)
	if got := w.String(); !strings.HasPrefix(got, "SSH-2.0-") {
		t.Errorf("the ssh tunnel's first bytes = %q, want an SSH identification", got)
	}
}
