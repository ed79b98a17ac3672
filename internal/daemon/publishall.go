package daemon

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/store"
)

// --publish-all (api.VMCreateParams.PublishAll): while a VM runs, every
// TCP port its guest listens on (the agent's Info.Listening: sockets not
// bound to the guest's loopback) is forwarded from the same port on the
// host's 127.0.0.1, as Lima does through its guest agent.
//
// The forwarders relay each connection through the guest agent
// (agent.Client.DialGuest: a direct-tcpip channel, the agent connects
// inside the guest): QEMU's user network can't add a hostfwd to a running
// VM, and the agent reaches sockets bound to any guest address whatever
// the guest's own firewall says. Its throughput is low (the guest's SSH
// encryption: 6-8 MB/s under TCG, where QEMU's hostfwd gives 25-28), so in
// bridge mode a socket bound to the wildcard or the guest's address is
// dialled straight over the bridge (57-87 MB/s, as -p's forwarders),
// through the agent only when that fails.
//
// One publisher per running VM, started once the VM is ready (startVM)
// or adopted (reconcile), polls the agent every publishEvery and ends,
// closing its listeners and their connections, when the VMM exits or the
// daemon stops. Ports under 1024, ports taken on the host, ports of the
// VM's -p rules (host or guest side) and host ports of any VM's -p rules
// (a stopped VM's come back at its start) are skipped and logged once.

// publishEvery is how often a publisher asks the guest for its
// listening ports.
const publishEvery = 2 * time.Second

// maxAutoConns caps the connections of one auto-forwarded port.
const maxAutoConns = 256

// publisher forwards one running VM's listening guest ports.
type publisher struct {
	d    *Daemon
	v    store.VM
	r    *runningVM
	keys agent.Keys

	mu      sync.Mutex
	fwds    map[uint16]*autoFwd // by port
	skipped map[uint16]bool     // ports logged as skipped, until the guest stops listening
	wg      sync.WaitGroup      // forwarders and their connections
}

// autoFwd is one forwarded port: a listener on 127.0.0.1:port relaying to
// target:port inside the guest.
type autoFwd struct {
	port   uint16
	target string // host part of the guest address the agent dials
	l      net.Listener
	cancel context.CancelFunc
}

// publishAll starts v's publisher if it was created with --publish-all;
// it ends when r's VMM exits or the daemon stops.
func (d *Daemon) publishAll(v store.VM, r *runningVM) {
	if !v.PublishAll {
		return
	}
	keys, err := readVMKeys(v.Dir)
	if err != nil {
		d.log.Error("publish-all: read the vm's agent keys: its ports are not forwarded", "vm", v.Name, "err", err)
		return
	}
	p := &publisher{d: d, v: v, r: r, keys: keys, fwds: map[uint16]*autoFwd{}, skipped: map[uint16]bool{}}
	if old, ok := d.published.Swap(v.ID, p); ok {
		// A publisher of an earlier boot that hasn't ended yet: it ends
		// with its VMM and won't remove this one (CompareAndDelete).
		d.log.Debug("publish-all: replacing the publisher of an earlier boot", "vm", v.Name, "old", fmt.Sprintf("%p", old))
	}
	ctx, cancel := r.untilExit(d.ctx)
	d.monitors.Add(1)
	go func() {
		defer d.monitors.Done()
		defer cancel()
		p.run(ctx)
		d.published.CompareAndDelete(v.ID, p)
	}()
}

// autoPorts are the ports published for the VM id now, sorted.
func (d *Daemon) autoPorts(id string) []api.PortForward {
	pv, ok := d.published.Load(id)
	if !ok {
		return nil
	}
	p := pv.(*publisher)
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]api.PortForward, 0, len(p.fwds))
	for port := range p.fwds {
		out = append(out, api.PortForward{Proto: "tcp", HostIP: "127.0.0.1", HostPort: int(port), GuestPort: int(port), Auto: true})
	}
	slices.SortFunc(out, func(a, b api.PortForward) int { return cmp.Compare(a.HostPort, b.HostPort) })
	return out
}

// checkPublishAll validates a create's --publish-all.
func checkPublishAll(p api.VMCreateParams, mode string) error {
	if p.PublishAll && mode == api.NetworkNone {
		return fmt.Errorf("--publish-all forwards ports to the VM, which has no network (network none): %w", errdefs.ErrInvalid)
	}
	return nil
}

func (p *publisher) run(ctx context.Context) {
	defer p.closeAll()
	t := time.NewTicker(publishEvery)
	defer t.Stop()
	for {
		p.sync(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sync asks the guest for its listening ports and makes the forwarders
// match. When the guest doesn't answer, the forwarders stay.
func (p *publisher) sync(ctx context.Context) {
	info, err := p.d.refreshInfo(ctx, p.v, p.r)
	if err != nil {
		if ctx.Err() == nil {
			p.d.log.Debug("publish-all: ask the guest for its listening ports", "vm", p.v.Name, "err", err)
		}
		return
	}
	want := map[uint16]agentproto.PortListen{}
	for _, l := range info.Listening {
		if l.Proto == "tcp" && l.Port != 0 {
			want[l.Port] = l
		}
	}
	var reserved map[int]bool
	p.mu.Lock()
	defer p.mu.Unlock()
	for port := range want {
		if p.fwds[port] == nil && !p.skipped[port] {
			reserved = p.reservedPorts(ctx)
			break
		}
	}
	for port, f := range p.fwds {
		if _, ok := want[port]; !ok {
			p.d.log.Info("publish-all: the guest stopped listening: port no longer forwarded", "vm", p.v.Name, "port", port)
			f.close()
			delete(p.fwds, port)
		}
	}
	for port := range p.skipped {
		if _, ok := want[port]; !ok {
			delete(p.skipped, port)
		}
	}
	for port, l := range want {
		if p.fwds[port] != nil {
			continue
		}
		why := p.skip(port)
		if why == "" && reserved[int(port)] {
			why = "another vm's -p rule uses the host port"
		}
		if why != "" {
			if !p.skipped[port] {
				p.skipped[port] = true
				p.d.log.Info("publish-all: guest port not forwarded", "vm", p.v.Name, "port", port, "reason", why)
			}
			continue
		}
		ln, err := net.Listen("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
		if err != nil {
			// Taken on the host: tried again at the next poll, logged once.
			if !p.skipped[port] {
				p.skipped[port] = true
				p.d.log.Info("publish-all: guest port not forwarded: the host port is taken", "vm", p.v.Name, "port", port, "err", err)
			}
			continue
		}
		delete(p.skipped, port)
		fctx, cancel := context.WithCancel(ctx)
		f := &autoFwd{port: port, target: guestTarget(l.Addr), l: ln, cancel: cancel}
		p.fwds[port] = f
		p.wg.Add(1)
		go p.serve(fctx, f)
		p.d.log.Info("publish-all: forwarding a port the guest listens on", "vm", p.v.Name, "port", port, "guest_addr", l.Addr)
	}
}

// reservedPorts are the TCP host ports of every VM's -p rules on
// 127.0.0.1 or a wildcard address: a stopped VM binds them at its start.
// nil when the store can't tell (the bind decides then).
func (p *publisher) reservedPorts(ctx context.Context) map[int]bool {
	vms, err := p.d.store.ListVMs(ctx)
	if err != nil {
		p.d.log.Debug("publish-all: list the vms' forwarded ports", "err", err)
		return nil
	}
	out := map[int]bool{}
	for _, v := range vms {
		for _, r := range v.Ports {
			a, err := netip.ParseAddr(r.HostIP)
			if r.Proto == "tcp" && (err != nil || a.IsUnspecified() || a == netip.AddrFrom4([4]byte{127, 0, 0, 1})) {
				out[r.HostPort] = true
			}
		}
	}
	return out
}

// skip says why port is not forwarded, "" when it is.
func (p *publisher) skip(port uint16) string {
	if port < 1024 {
		return "privileged port"
	}
	for _, r := range p.v.Ports {
		if r.Proto == "tcp" && (r.HostPort == int(port) || r.GuestPort == int(port)) {
			return "a -p rule of the vm uses it"
		}
	}
	return ""
}

// guestTarget is the address the agent dials for a socket bound to addr:
// its loopback for a wildcard socket, else addr itself.
func guestTarget(addr string) string {
	a, err := netip.ParseAddr(addr)
	switch {
	case err != nil || a == netip.IPv4Unspecified():
		return "127.0.0.1"
	case a == netip.IPv6Unspecified():
		return "::1"
	}
	return a.String()
}

func (f *autoFwd) close() {
	f.cancel()
	_ = f.l.Close()
}

// closeAll ends every forwarder and waits for their connections.
func (p *publisher) closeAll() {
	p.mu.Lock()
	for port, f := range p.fwds {
		f.close()
		delete(p.fwds, port)
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// serve accepts connections on f's listener until it is closed and relays
// each through the agent.
func (p *publisher) serve(ctx context.Context, f *autoFwd) {
	defer p.wg.Done()
	sem := make(chan struct{}, maxAutoConns)
	for {
		c, err := f.l.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			p.d.log.Warn("publish-all: accept", "vm", p.v.Name, "port", f.port, "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		select {
		case sem <- struct{}{}:
		default:
			p.d.log.Warn("publish-all: too many connections, refusing one", "vm", p.v.Name, "port", f.port)
			_ = c.Close()
			continue
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer func() { <-sem }()
			p.relay(ctx, f, c)
		}()
	}
}

// dial connects to f's port in the guest: in bridge mode straight to
// the guest's address when the socket listens there (a wildcard socket or
// the guest's address), at the full speed of the bridge; else, or when
// that fails (the guest's firewall, an IPv6-only socket), through the
// agent.
func (p *publisher) dial(ctx context.Context, f *autoFwd) (io.ReadWriteCloser, error) {
	port := strconv.Itoa(int(f.port))
	if p.v.Network == api.NetworkBridge && p.v.IP != "" && (f.target == "127.0.0.1" || f.target == "::1" || f.target == p.v.IP) {
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		c, err := (&net.Dialer{}).DialContext(dctx, "tcp4", net.JoinHostPort(p.v.IP, port))
		cancel()
		if err == nil {
			return c, nil
		}
		p.d.log.Debug("publish-all: direct connection to the guest failed, going through the agent", "vm", p.v.Name, "port", f.port, "err", err)
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ac, err := p.d.connectAgent(dctx, p.r, p.keys)
	if err != nil {
		return nil, err
	}
	return ac.DialGuest(dctx, f.target, int(f.port))
}

// relay connects c to f's port in the guest through the agent and copies
// both ways until both directions ended (each end passed on as a
// half-close) or ctx ends.
func (p *publisher) relay(ctx context.Context, f *autoFwd, c net.Conn) {
	defer c.Close()
	g, err := p.dial(ctx, f)
	if err != nil {
		p.d.log.Debug("publish-all: connect to the guest's port", "vm", p.v.Name, "port", f.port, "err", err)
		return
	}
	defer g.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.Close(); _ = g.Close() })
	defer stop()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(g, c)
		if cw, ok := g.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}()
	_, _ = io.Copy(c, g)
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	<-done
}
