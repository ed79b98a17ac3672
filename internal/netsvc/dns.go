package netsvc

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
)

// Defaults of DNSConfig.
const (
	DefaultDNSTimeout     = 2 * time.Second
	DefaultDNSMaxInFlight = 256
	// dnsIdle ends a TCP client connection that sends no query for that long.
	dnsIdle = 10 * time.Second
)

// dnsMaxMsg is the largest DNS message (TCP's 16-bit length).
const dnsMaxMsg = 65535

// DNSConfig configures StartDNS.
type DNSConfig struct {
	// Listen is the address to serve on (the gateway), port 53 unless
	// Port is set.
	Listen netip.Addr
	Port   int
	// Upstreams are the servers queries are relayed to, tried in order.
	// Empty: the nameservers of /etc/resolv.conf.
	Upstreams []netip.AddrPort
	// Timeout bounds one attempt at one upstream (DefaultDNSTimeout).
	Timeout time.Duration
	// MaxInFlight bounds the queries relayed at once, UDP and TCP
	// together (DefaultDNSMaxInFlight); UDP queries beyond it are dropped
	// (the client retries), TCP connections wait.
	MaxInFlight int
	Log         *slog.Logger
}

// StartDNS listens on cfg.Listen port 53, UDP and TCP, and relays each
// query to the upstreams in turn until one answers, until ctx is
// cancelled. The bytes are relayed as they are (only the message id is
// read, to match the answer); when every upstream fails the client gets a
// SERVFAIL.
func StartDNS(ctx context.Context, cfg DNSConfig) (*Service, error) {
	if !cfg.Listen.IsValid() || cfg.Log == nil {
		return nil, fmt.Errorf("dns forwarder: listen address and log are required: %w", errdefs.ErrInvalid)
	}
	if cfg.Port == 0 {
		cfg.Port = 53
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultDNSTimeout
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = DefaultDNSMaxInFlight
	}
	listen := netip.AddrPortFrom(cfg.Listen, uint16(cfg.Port))
	if len(cfg.Upstreams) == 0 {
		ups, err := ResolvConf("/etc/resolv.conf")
		if err != nil {
			return nil, fmt.Errorf("dns forwarder: no dns_servers configured, and %w", err)
		}
		cfg.Upstreams = ups
	}
	var ups []netip.AddrPort
	for _, u := range cfg.Upstreams {
		if u != listen { // never relay to ourselves
			ups = append(ups, u)
		}
	}
	if len(ups) == 0 {
		return nil, fmt.Errorf("dns forwarder: no upstream server other than %s itself: set dns_servers: %w", listen, errdefs.ErrInvalid)
	}
	cfg.Upstreams = ups
	uc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(listen))
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("dns forwarder: %s/udp is taken by another DNS server listening on every address (dnsmasq? bind9?): make it bind to its own addresses: %w",
			listen, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		return nil, fmt.Errorf("dns forwarder: listen on %s/udp: %w", listen, err)
	}
	tl, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(listen))
	if errors.Is(err, syscall.EADDRINUSE) {
		_ = uc.Close()
		return nil, fmt.Errorf("dns forwarder: %s/tcp is taken by another DNS server listening on every address: make it bind to its own addresses: %w",
			listen, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		_ = uc.Close()
		return nil, fmt.Errorf("dns forwarder: listen on %s/tcp: %w", listen, err)
	}
	f := &forwarder{cfg: cfg, log: cfg.Log.With("service", "dns", "listen", listen.String()), sem: make(chan struct{}, cfg.MaxInFlight)}
	s := &Service{}
	s.wg.Add(3)
	go func() {
		defer s.wg.Done()
		<-ctx.Done()
		_ = uc.Close()
		_ = tl.Close()
		f.closeConns()
	}()
	go func() { defer s.wg.Done(); f.serveUDP(ctx, uc, &s.wg) }()
	go func() { defer s.wg.Done(); f.serveTCP(ctx, tl, &s.wg) }()
	return s, nil
}

// ResolvConf returns the nameservers of a resolv.conf file, port 53.
func ResolvConf(path string) ([]netip.AddrPort, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read nameservers: %w", err)
	}
	defer f.Close()
	var out []netip.AddrPort
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(fields[1])
		if err != nil || a.Zone() != "" {
			continue // link-local IPv6 with a zone: not for us
		}
		out = append(out, netip.AddrPortFrom(a.Unmap(), 53))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s names no nameserver: %w", path, errdefs.ErrFailedPrecondition)
	}
	return out, nil
}

type forwarder struct {
	cfg DNSConfig
	log *slog.Logger
	sem chan struct{}

	mu    sync.Mutex
	conns map[net.Conn]struct{} // TCP clients, closed on stop
	done  bool
}

func (f *forwarder) serveUDP(ctx context.Context, uc *net.UDPConn, wg *sync.WaitGroup) {
	for {
		buf := make([]byte, dnsMaxMsg)
		n, client, err := uc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			f.log.Warn("read", "err", err)
			continue
		}
		if n < 12 {
			continue // not even a header
		}
		select {
		case f.sem <- struct{}{}:
		default:
			f.log.Warn("too many queries in flight, dropping one", "client", client)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-f.sem }()
			ans := f.relay(ctx, "udp", buf[:n])
			if _, err := uc.WriteToUDPAddrPort(ans, client); err != nil && !errors.Is(err, net.ErrClosed) {
				f.log.Debug("answer", "client", client, "err", err)
			}
		}()
	}
}

func (f *forwarder) serveTCP(ctx context.Context, tl *net.TCPListener, wg *sync.WaitGroup) {
	for {
		c, err := tl.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			f.log.Warn("accept", "err", err)
			select {
			case <-time.After(50 * time.Millisecond):
				continue
			case <-ctx.Done():
				return
			}
		}
		if !f.track(c) {
			_ = c.Close()
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer f.untrack(c)
			f.serveConn(ctx, c)
		}()
	}
}

// serveConn answers the queries of one TCP client, one at a time.
func (f *forwarder) serveConn(ctx context.Context, c net.Conn) {
	defer c.Close()
	r := bufio.NewReader(c)
	for {
		_ = c.SetDeadline(time.Now().Add(dnsIdle))
		q, err := readTCPMsg(r)
		if err != nil || len(q) < 12 {
			return
		}
		select {
		case f.sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		ans := f.relay(ctx, "tcp", q)
		<-f.sem
		_ = c.SetDeadline(time.Now().Add(dnsIdle))
		if _, err := c.Write(tcpMsg(ans)); err != nil {
			return
		}
	}
}

func (f *forwarder) track(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.done {
		return false
	}
	if f.conns == nil {
		f.conns = map[net.Conn]struct{}{}
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *forwarder) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
}

func (f *forwarder) closeConns() {
	f.mu.Lock()
	f.done = true
	for c := range f.conns {
		_ = c.Close()
	}
	f.mu.Unlock()
}

// relay asks the upstreams in turn and returns the first answer, or a
// SERVFAIL for q.
func (f *forwarder) relay(ctx context.Context, network string, q []byte) []byte {
	for _, up := range f.cfg.Upstreams {
		if ctx.Err() != nil {
			break
		}
		ans, err := f.ask(ctx, network, up, q)
		if err == nil {
			return ans
		}
		f.log.Debug("upstream failed", "upstream", up, "network", network, "err", err)
	}
	return servfail(q)
}

// ask sends q to one upstream and reads the answer with the same id.
func (f *forwarder) ask(ctx context.Context, network string, up netip.AddrPort, q []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, f.cfg.Timeout)
	defer cancel()
	c, err := (&net.Dialer{}).DialContext(ctx, network, up.String())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stop()
	if network == "tcp" {
		if _, err := c.Write(tcpMsg(q)); err != nil {
			return nil, err
		}
		ans, err := readTCPMsg(c)
		if err != nil {
			return nil, err
		}
		if len(ans) < 12 || ans[0] != q[0] || ans[1] != q[1] {
			return nil, errors.New("answer with another id")
		}
		return ans, nil
	}
	if _, err := c.Write(q); err != nil {
		return nil, err
	}
	buf := make([]byte, dnsMaxMsg)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return nil, err
		}
		if n >= 12 && buf[0] == q[0] && buf[1] == q[1] {
			return buf[:n], nil
		}
		// A stray datagram (a late answer to an earlier query): keep reading.
	}
}

func tcpMsg(m []byte) []byte {
	return append(binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(m)), uint16(len(m))), m...)
}

func readTCPMsg(r io.Reader) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, err
	}
	m := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(r, m); err != nil {
		return nil, err
	}
	return m, nil
}

// servfail is the SERVFAIL answer to q: its id, opcode, RD bit and
// question (when it can be read), QR and RA set.
func servfail(q []byte) []byte {
	h := make([]byte, 12, 12+len(q))
	copy(h, q[:4])
	h[2] = 0x80 | q[2]&0x79 // QR, opcode, RD (AA and TC cleared)
	h[3] = 0x80 | 2         // RA, RCODE SERVFAIL
	if qd := binary.BigEndian.Uint16(q[4:6]); qd == 1 {
		if end, ok := questionEnd(q, 12); ok {
			binary.BigEndian.PutUint16(h[4:6], 1)
			h = append(h, q[12:end]...)
		}
	}
	return h
}

// questionEnd is the offset after the question starting at off (a name,
// uncompressed in a query, then type and class).
func questionEnd(m []byte, off int) (int, bool) {
	for off < len(m) {
		l := int(m[off])
		if l == 0 {
			off++
			if off+4 > len(m) {
				return 0, false
			}
			return off + 4, true
		}
		if l&0xc0 != 0 {
			return 0, false
		}
		off += 1 + l
	}
	return 0, false
}
