package portfwd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
)

// Defaults of a Proxy's limits.
const (
	DefaultUDPIdle     = 60 * time.Second
	DefaultMaxUDPFlows = 1024
	DefaultMaxTCPConns = 1024
	DefaultDialTimeout = 5 * time.Second
)

// udpBufSize holds the largest UDP datagram.
const udpBufSize = 64 * 1024

// Proxy runs the port forwarders of VMs. Its methods are safe for
// concurrent use. The zero value isn't usable: make one with NewProxy.
type Proxy struct {
	log *slog.Logger
	// UDPIdle closes a UDP flow that carried nothing for that long.
	UDPIdle time.Duration
	// MaxUDPFlows caps the UDP flows of one rule: datagrams of further
	// clients are dropped until a flow ends.
	MaxUDPFlows int
	// MaxTCPConns caps the connections of one rule: further ones are
	// closed at once.
	MaxTCPConns int
	// DialTimeout bounds a connection to the guest.
	DialTimeout time.Duration

	mu  sync.Mutex
	vms map[string]*vmFwd
	// udpFlows counts the open UDP flows of every VM.
	udpFlows atomic.Int64
}

// NewProxy returns a Proxy with the default limits, logging to log.
func NewProxy(log *slog.Logger) *Proxy {
	return &Proxy{
		log:         log,
		UDPIdle:     DefaultUDPIdle,
		MaxUDPFlows: DefaultMaxUDPFlows,
		MaxTCPConns: DefaultMaxTCPConns,
		DialTimeout: DefaultDialTimeout,
		vms:         map[string]*vmFwd{},
	}
}

// vmFwd is one VM's forwarders.
type vmFwd struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closes []func() // close the listeners
}

// Start forwards rules to guest for the VM vmID: it binds every host
// address first, and forwards none if one fails (the error names it, as
// Check's do). A VM already forwarded is an error (errdefs.ErrAlreadyExists):
// Stop it first.
func (p *Proxy) Start(vmID string, guest netip.Addr, rules []Rule) (err error) {
	if !guest.IsValid() {
		return fmt.Errorf("forward ports of vm %s: no guest address: %w", vmID, errdefs.ErrInvalid)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.vms[vmID]; ok {
		return fmt.Errorf("ports of vm %s are already forwarded: %w", vmID, errdefs.ErrAlreadyExists)
	}
	ctx, cancel := context.WithCancel(context.Background())
	v := &vmFwd{cancel: cancel}
	defer func() {
		if err != nil {
			cancel()
			for _, c := range v.closes {
				c()
			}
		}
	}()
	var starts []func()
	for _, r := range rules {
		c, err := listen(r, TakenAtStart)
		if err != nil {
			return fmt.Errorf("forward ports of vm %s: %w", vmID, err)
		}
		to := netip.AddrPortFrom(guest, uint16(r.GuestPort))
		log := p.log.With("vm", vmID, "rule", r.String())
		switch l := c.(type) {
		case *net.TCPListener:
			v.closes = append(v.closes, func() { _ = l.Close() })
			starts = append(starts, func() { p.serveTCP(ctx, &v.wg, log, l, to) })
		case *net.UDPConn:
			v.closes = append(v.closes, func() { _ = l.Close() })
			starts = append(starts, func() { p.serveUDP(ctx, &v.wg, log, l, to) })
		}
	}
	for _, s := range starts {
		v.wg.Add(1)
		go s()
	}
	p.vms[vmID] = v
	return nil
}

// Stop ends the forwarders of vmID and their connections, and waits for
// them; a VM without forwarders is no error.
func (p *Proxy) Stop(vmID string) {
	p.mu.Lock()
	v, ok := p.vms[vmID]
	delete(p.vms, vmID)
	p.mu.Unlock()
	if !ok {
		return
	}
	v.cancel()
	for _, c := range v.closes {
		c()
	}
	v.wg.Wait()
}

// Running returns the VMs whose ports are forwarded, sorted.
func (p *Proxy) Running() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	ids := make([]string, 0, len(p.vms))
	for id := range p.vms {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// serveTCP accepts connections on l and relays each to the guest.
func (p *Proxy) serveTCP(ctx context.Context, wg *sync.WaitGroup, log *slog.Logger, l *net.TCPListener, to netip.AddrPort) {
	defer wg.Done()
	sem := make(chan struct{}, max(p.MaxTCPConns, 1))
	var backoff time.Duration
	for {
		c, err := l.AcceptTCP()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors and the like: wait a little, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			log.Warn("port forward: accept", "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
				continue
			case <-ctx.Done():
				return
			}
		}
		backoff = 0
		select {
		case sem <- struct{}{}:
		default:
			log.Warn("port forward: too many connections, refusing one", "client", c.RemoteAddr())
			_ = c.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			p.relayTCP(ctx, log, c, to)
		}()
	}
}

// relayTCP relays c and a new connection to the guest until both
// directions ended; each direction's end is passed on as a half-close.
func (p *Proxy) relayTCP(ctx context.Context, log *slog.Logger, c *net.TCPConn, to netip.AddrPort) {
	defer c.Close()
	dctx, cancel := context.WithTimeout(ctx, p.DialTimeout)
	g, err := (&net.Dialer{}).DialContext(dctx, "tcp", to.String())
	cancel()
	if err != nil {
		log.Debug("port forward: dial guest", "err", err)
		return
	}
	gc := g.(*net.TCPConn)
	defer gc.Close()
	// Stop closes the connections through ctx.
	stop := context.AfterFunc(ctx, func() { _ = c.Close(); _ = gc.Close() })
	defer stop()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(gc, c) // splice
		_ = gc.CloseWrite()
	}()
	_, _ = io.Copy(c, gc)
	_ = c.CloseWrite()
	<-done
}

// flow is one UDP client's relay to the guest.
type flow struct {
	guest *net.UDPConn
	last  time.Time // of the last datagram either way; under udpRelay.mu
}

// udpRelay is one UDP rule's listener and flows.
type udpRelay struct {
	p      *Proxy
	log    *slog.Logger
	l      *net.UDPConn
	to     netip.AddrPort
	mu     sync.Mutex
	flows  map[netip.AddrPort]*flow
	closed bool
}

// serveUDP relays datagrams between clients of l and the guest, one
// connected socket to the guest per client address.
func (p *Proxy) serveUDP(ctx context.Context, wg *sync.WaitGroup, log *slog.Logger, l *net.UDPConn, to netip.AddrPort) {
	defer wg.Done()
	u := &udpRelay{p: p, log: log, l: l, to: to, flows: map[netip.AddrPort]*flow{}}
	defer func() {
		u.mu.Lock()
		u.closed = true
		for _, f := range u.flows {
			_ = f.guest.Close()
		}
		u.mu.Unlock()
	}()
	buf := make([]byte, udpBufSize)
	for {
		n, client, err := l.ReadFromUDPAddrPort(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			log.Warn("port forward: read", "err", err)
			continue
		}
		f := u.flow(wg, client)
		if f == nil {
			continue
		}
		if _, err := f.guest.Write(buf[:n]); err != nil {
			log.Debug("port forward: write to guest", "err", err)
		}
	}
}

// flow returns client's flow, made if it is new, nil if it can't be.
func (u *udpRelay) flow(wg *sync.WaitGroup, client netip.AddrPort) *flow {
	u.mu.Lock()
	defer u.mu.Unlock()
	if f := u.flows[client]; f != nil {
		f.last = time.Now()
		return f
	}
	if len(u.flows) >= max(u.p.MaxUDPFlows, 1) {
		u.log.Warn("port forward: too many udp flows, dropping a datagram", "client", client)
		return nil
	}
	gc, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(u.to))
	if err != nil {
		u.log.Debug("port forward: dial guest", "err", err)
		return nil
	}
	f := &flow{guest: gc, last: time.Now()}
	u.flows[client] = f
	u.p.udpFlows.Add(1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer u.p.udpFlows.Add(-1)
		u.replies(client, f)
	}()
	return f
}

// replies sends the guest's datagrams of flow f back to client, until the
// flow is idle for UDPIdle or closed.
func (u *udpRelay) replies(client netip.AddrPort, f *flow) {
	defer f.guest.Close()
	buf := make([]byte, udpBufSize)
	for {
		u.mu.Lock()
		deadline := f.last.Add(u.p.UDPIdle)
		if u.closed {
			u.mu.Unlock()
			return
		}
		if !time.Now().Before(deadline) {
			delete(u.flows, client) // under the lock: no datagram goes to a closed flow
			u.mu.Unlock()
			return
		}
		u.mu.Unlock()
		_ = f.guest.SetReadDeadline(deadline)
		n, err := f.guest.Read(buf)
		var ne net.Error
		switch {
		case err == nil:
		case errors.As(err, &ne) && ne.Timeout():
			continue // the loop checks whether the flow is idle
		case errors.Is(err, syscall.ECONNREFUSED):
			continue // nothing listens in the guest (yet): keep the flow
		default:
			if !errors.Is(err, net.ErrClosed) {
				u.log.Debug("port forward: read from guest", "err", err)
			}
			u.mu.Lock()
			if u.flows[client] == f {
				delete(u.flows, client)
			}
			u.mu.Unlock()
			return
		}
		u.mu.Lock()
		f.last = time.Now()
		u.mu.Unlock()
		if _, err := u.l.WriteToUDPAddrPort(buf[:n], client); err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			u.log.Debug("port forward: write to client", "err", err)
		}
	}
}
