package netsvc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/errdefs"
)

// Ports of DHCP.
const (
	dhcpServerPort = 67
	dhcpClientPort = 68
)

// DefaultLeaseTime is the lease time when Lease.LeaseTime is zero: leases
// are fixed, so long ones only save traffic.
const DefaultLeaseTime = 24 * time.Hour

// Lease is what a VM is told over DHCP.
type Lease struct {
	IP        netip.Addr
	Prefix    int // the subnet's prefix length, e.g. 24
	Gateway   netip.Addr
	DNS       []netip.Addr
	Hostname  string
	LeaseTime time.Duration // 0: DefaultLeaseTime
	MTU       int           // 0: not sent
}

// DHCPConfig configures StartDHCP.
type DHCPConfig struct {
	// Interface is the bridge the server answers on (SO_BINDTODEVICE).
	Interface string
	// ServerIP is the server's address on it (the gateway): the server
	// identifier of its answers.
	ServerIP netip.Addr
	// Lookup returns the lease of a MAC; false: not a VM's, not answered.
	// It is called from the server's goroutine, one call at a time.
	Lookup func(mac net.HardwareAddr) (Lease, bool)
	Log    *slog.Logger
}

// StartDHCP binds UDP port 67 on cfg.Interface and answers DHCP DISCOVER,
// REQUEST, INFORM, RELEASE and DECLINE of known MACs with their fixed
// lease, until ctx is cancelled: an OFFER or ACK of the lease's address, a
// NAK for a request of any other. Answers are broadcast on the interface
// (255.255.255.255:68), or sent to the client's address when it has one
// (ciaddr: renewing, INFORM).
func StartDHCP(ctx context.Context, cfg DHCPConfig) (*Service, error) {
	if cfg.Interface == "" || !cfg.ServerIP.Is4() || cfg.Lookup == nil || cfg.Log == nil {
		return nil, fmt.Errorf("dhcp server: interface, IPv4 server address, lookup and log are required: %w", errdefs.ErrInvalid)
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); serr != nil {
				return
			}
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_BROADCAST, 1); serr != nil {
				return
			}
			serr = unix.BindToDevice(int(fd), cfg.Interface)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(ctx, "udp4", fmt.Sprintf("0.0.0.0:%d", dhcpServerPort))
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("dhcp server on %s: udp port %d is taken by another DHCP server listening on every interface (dnsmasq?): make it bind to its own interfaces: %w",
			cfg.Interface, dhcpServerPort, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		return nil, fmt.Errorf("dhcp server on %s: listen on udp port %d: %w", cfg.Interface, dhcpServerPort, err)
	}
	conn := pc.(*net.UDPConn)
	s := &Service{}
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		<-ctx.Done()
		_ = conn.Close()
	}()
	go func() {
		defer s.wg.Done()
		serveDHCP(cfg, conn)
	}()
	return s, nil
}

func serveDHCP(cfg DHCPConfig, conn *net.UDPConn) {
	log := cfg.Log.With("service", "dhcp", "interface", cfg.Interface)
	buf := make([]byte, 1500)
	for {
		n, _, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			log.Warn("read", "err", err)
			continue
		}
		req, err := Parse(buf[:n])
		if err != nil {
			log.Debug("ignoring a message", "err", err)
			continue
		}
		reply, to := answer(cfg, log, req)
		if reply == nil {
			continue
		}
		if _, err := conn.WriteToUDPAddrPort(reply.Marshal(), to); err != nil {
			log.Warn("send answer", "to", to, "mac", req.CHAddr.String(), "err", err)
		}
	}
}

// answer is the reply to req and where it goes; nil: none.
func answer(cfg DHCPConfig, log *slog.Logger, req *Packet) (*Packet, netip.AddrPort) {
	if req.Op != BootRequest || req.HType != 1 || req.HLen != 6 {
		return nil, netip.AddrPort{}
	}
	mac := req.CHAddr
	typ := req.MessageType()
	lease, ok := cfg.Lookup(mac)
	if !ok {
		log.Debug("no lease for this mac", "mac", mac.String(), "type", typ)
		return nil, netip.AddrPort{}
	}
	lease.IP = lease.IP.Unmap()
	broadcast := netip.AddrPortFrom(netip.AddrFrom4([4]byte{255, 255, 255, 255}), dhcpClientPort)
	to := broadcast
	if req.CIAddr.Is4() && !req.CIAddr.IsUnspecified() {
		to = netip.AddrPortFrom(req.CIAddr, dhcpClientPort)
	}
	switch typ {
	case Discover:
		return reply(cfg, req, Offer, lease), broadcast
	case Request:
		if sid, ok := req.Addr(OptServerID); ok && sid != cfg.ServerIP {
			return nil, netip.AddrPort{} // the client took another server's offer
		}
		want, ok := req.Addr(OptRequestedIP)
		if !ok {
			want = req.CIAddr // renewing or rebinding
		}
		if want != lease.IP {
			log.Info("nak: the client asked for another address", "mac", mac.String(), "asked", want, "lease", lease.IP)
			nak := reply(cfg, req, Nak, lease)
			nak.YIAddr = netip.Addr{}
			nak.Options = map[byte][]byte{OptMessageType: {Nak}, OptMessage: []byte("address not leased to this client")}
			nak.SetAddrs(OptServerID, cfg.ServerIP)
			return nak, broadcast
		}
		return reply(cfg, req, Ack, lease), to
	case Inform:
		// RFC 2131 4.3.5: configuration, no address or lease time.
		ack := reply(cfg, req, Ack, lease)
		ack.YIAddr = netip.Addr{}
		delete(ack.Options, OptLeaseTime)
		delete(ack.Options, OptRenewalTime)
		delete(ack.Options, OptRebindingTime)
		return ack, to
	case Release:
		log.Debug("release (leases are fixed: nothing to do)", "mac", mac.String())
	case Decline:
		log.Warn("a VM declined its address: something else uses it on the bridge", "mac", mac.String(), "ip", lease.IP)
	}
	return nil, netip.AddrPort{}
}

// reply builds an answer of type typ carrying lease.
func reply(cfg DHCPConfig, req *Packet, typ byte, lease Lease) *Packet {
	p := &Packet{
		Op: BootReply, HType: req.HType, HLen: req.HLen, XID: req.XID,
		Flags: req.Flags, CIAddr: req.CIAddr, YIAddr: lease.IP, GIAddr: req.GIAddr,
		CHAddr: req.CHAddr, Options: map[byte][]byte{OptMessageType: {typ}},
	}
	p.SetAddrs(OptServerID, cfg.ServerIP)
	lt := lease.LeaseTime
	if lt <= 0 {
		lt = DefaultLeaseTime
	}
	p.SetUint32(OptLeaseTime, seconds(lt))
	p.SetUint32(OptRenewalTime, seconds(lt/2))
	p.SetUint32(OptRebindingTime, seconds(lt*7/8))
	if lease.Prefix > 0 && lease.Prefix <= 32 {
		pfx := netip.PrefixFrom(lease.IP, lease.Prefix)
		mask := net.CIDRMask(lease.Prefix, 32)
		p.Options[OptSubnetMask] = mask
		last := pfx.Masked().Addr().As4()
		for i := range last {
			last[i] |= ^mask[i]
		}
		p.SetAddrs(OptBroadcast, netip.AddrFrom4(last))
	}
	if lease.Gateway.Is4() {
		p.SetAddrs(OptRouter, lease.Gateway)
	}
	if len(lease.DNS) > 0 {
		p.SetAddrs(OptDNS, lease.DNS...)
	}
	if lease.Hostname != "" {
		p.Options[OptHostName] = []byte(lease.Hostname)
	}
	if lease.MTU >= 68 && lease.MTU <= 65535 {
		p.SetUint16(OptMTU, uint16(lease.MTU))
	}
	return p
}
