package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
)

// vmSSHInfo answers what the system ssh client needs (banger vm ssh, the
// ssh-proxy of `ssh NAME.banger`): the image's default user, the host
// keys the agent reported at the last boot, and the guest's address when
// its sshd can be reached straight over banger's bridge.
func (d *Daemon) vmSSHInfo(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.NameParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	v, err := d.store.GetVM(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	im, err := d.store.GetImage(ctx, v.ImageID)
	if err != nil {
		return nil, err
	}
	out := api.SSHInfo{Name: v.Name, User: imageUser(im), HostKeys: v.SSHHostKeys}
	if out.HostKeys == nil {
		out.HostKeys = []string{}
	}
	d.mu.Lock()
	r := d.running[v.ID]
	d.mu.Unlock()
	if r == nil || v.State != api.StateRunning {
		return out, nil
	}
	// Ask the guest now: its sshd may have started (or stopped) since the
	// boot. Host keys are pinned as the boot learned them (a key the guest
	// changes since is refused by the client); only a boot that learned
	// none takes them now.
	if info, err := d.refreshInfo(ctx, v, r); err != nil {
		d.log.Debug("ssh info: ask the guest agent", "vm", v.Name, "err", err)
	} else if len(v.SSHHostKeys) == 0 && len(info.SSHHostKeys) > 0 {
		out.HostKeys = info.SSHHostKeys
		if err := d.store.SetSSHHostKeys(ctx, v.ID, info.SSHHostKeys); err != nil {
			d.log.Warn("record the guest's ssh host keys", "vm", v.Name, "err", err)
		}
	}
	if v.Network == api.NetworkBridge && v.IP != "" {
		r.mu.Lock()
		sshd := r.info != nil && r.info.SSHD
		r.mu.Unlock()
		if sshd {
			out.Direct = net.JoinHostPort(v.IP, "22")
		}
	}
	return out, nil
}

// refreshInfo asks a running VM's agent for its info (bounded by a few
// seconds) and keeps it.
func (d *Daemon) refreshInfo(ctx context.Context, v store.VM, r *runningVM) (agentproto.Info, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	keys, err := readVMKeys(v.Dir)
	if err != nil {
		return agentproto.Info{}, err
	}
	c, err := d.connectAgent(ctx, r, keys)
	if err != nil {
		return agentproto.Info{}, err
	}
	info, err := c.Info(ctx)
	if err != nil {
		return agentproto.Info{}, err
	}
	r.mu.Lock()
	r.info = &info
	r.mu.Unlock()
	return info, nil
}

// vmTunnel relays a byte stream between the client and the guest through
// the agent: the guest's SSH service (its sshd, or the agent's own SSH
// server) or a TCP port on the guest's loopback. Works in every network
// mode. The client's stdin frames go to the guest (FrameEOF half-closes
// the guest side); what the guest sends goes back as stdout frames. The
// call ends when the guest side ends the stream, the client goes away or
// the VM stops.
func (d *Daemon) vmTunnel(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.VMTunnelParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	if !p.SSH && (p.Port < 1 || p.Port > 65535) {
		return nil, fmt.Errorf("tunnel port %d: want 1 to 65535, or ssh: %w", p.Port, errdefs.ErrInvalid)
	}
	v, err := d.store.GetVM(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	// An auto-remove VM stays while a tunnel to it is open (vm hold is
	// what keeps it for a whole session).
	detach := d.attach(v)
	defer func() { detach(false) }()
	c, r, err := d.agentFor(ctx, v)
	if err != nil {
		return nil, err
	}
	ctx, cancel := r.untilExit(ctx)
	defer cancel()
	var conn io.ReadWriteCloser
	if p.SSH {
		conn, err = c.OpenSSH(ctx)
	} else {
		conn, err = c.DialGuest(ctx, "127.0.0.1", p.Port)
	}
	if err != nil {
		what := "its ssh service"
		if !p.SSH {
			what = "its port " + strconv.Itoa(p.Port)
		}
		switch {
		case errors.Is(err, agent.ErrUnsupported):
			return nil, fmt.Errorf("vm %q: open a tunnel to %s: %w (restart the VM to update its agent): %w", v.Name, what, err, errdefs.ErrFailedPrecondition)
		case errors.Is(err, agent.ErrGuestDial):
			return nil, fmt.Errorf("vm %q: open a tunnel to %s: %w: %w", v.Name, what, err, errdefs.ErrFailedPrecondition)
		}
		return nil, fmt.Errorf("vm %q: open a tunnel to %s: %w", v.Name, what, err)
	}
	if err := relayTunnel(ctx, call, conn); err != nil {
		return nil, fmt.Errorf("vm %q: tunnel: %w", v.Name, err)
	}
	return nil, nil
}

// relayTunnel copies the call's input into conn and conn's output into
// stdout frames until conn's output ends or ctx ends; conn is closed.
func relayTunnel(ctx context.Context, call *rpc.Call, conn io.ReadWriteCloser) error {
	defer conn.Close()
	stdin, _, stop := pumpInput(call)
	defer stop()
	go func() {
		_, _ = io.Copy(conn, stdin)
		// The client's EOF: the guest reads EOF, its replies still flow.
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}()
	stopped := context.AfterFunc(ctx, func() { conn.Close() })
	defer stopped()
	_, err := io.Copy(frameWriter{call, api.FrameStdout}, conn)
	if ctx.Err() != nil {
		return nil // the client went away or the VM stopped
	}
	if errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// vmHold holds a VM for as long as the call lasts: an auto-remove VM (vm
// run --rm, while the user's ssh session runs) is removed when it ends,
// however it ends. It returns when the client goes away or the VM stops.
func (d *Daemon) vmHold(ctx context.Context, call *rpc.Call) (any, error) {
	v, detach, err := d.attachCall(ctx, call)
	if err != nil {
		return nil, err
	}
	defer detach(true)
	d.mu.Lock()
	r := d.running[v.ID]
	d.mu.Unlock()
	if r == nil {
		return nil, fmt.Errorf("vm %q is not running: %w", v.Name, errdefs.ErrFailedPrecondition)
	}
	call.Progress(api.Progress{Phase: "held"}) // the client may rely on the hold from now on
	select {
	case <-ctx.Done():
	case <-r.exited:
	}
	return nil, nil
}
