package netsvc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"
)

// BOOTP operations (Packet.Op).
const (
	BootRequest = 1
	BootReply   = 2
)

// DHCP message types (option 53).
const (
	Discover = 1
	Offer    = 2
	Request  = 3
	Decline  = 4
	Ack      = 5
	Nak      = 6
	Release  = 7
	Inform   = 8
)

// DHCP options (RFC 2132) this package reads or writes.
const (
	OptPad           = 0
	OptSubnetMask    = 1
	OptRouter        = 3
	OptDNS           = 6
	OptHostName      = 12
	OptMTU           = 26
	OptBroadcast     = 28
	OptRequestedIP   = 50
	OptLeaseTime     = 51
	OptMessageType   = 53
	OptServerID      = 54
	OptParamRequest  = 55
	OptMessage       = 56
	OptMaxMsgSize    = 57
	OptRenewalTime   = 58
	OptRebindingTime = 59
	OptClientID      = 61
	OptEnd           = 255
)

// magic is the DHCP cookie after the BOOTP header.
var magic = [4]byte{99, 130, 83, 99}

// headerLen is the fixed BOOTP part, cookie included.
const headerLen = 240

// FlagBroadcast asks the server to broadcast its replies (Packet.Flags).
const FlagBroadcast = 0x8000

// Packet is a DHCPv4 message (RFC 2131, section 2). The sname and file
// fields are not kept (zero when encoded); Options maps an option code to
// its value, with repeated options concatenated (RFC 3396).
type Packet struct {
	Op      byte
	HType   byte // 1: Ethernet
	HLen    byte
	Hops    byte
	XID     uint32
	Secs    uint16
	Flags   uint16
	CIAddr  netip.Addr // client's address, when it has one (renewing)
	YIAddr  netip.Addr // "your" address: the one offered
	SIAddr  netip.Addr
	GIAddr  netip.Addr
	CHAddr  net.HardwareAddr
	Options map[byte][]byte
}

// ErrMalformed is the error of a message that can't be decoded.
var ErrMalformed = errors.New("malformed dhcp message")

// Parse decodes a DHCP message.
func Parse(b []byte) (*Packet, error) {
	if len(b) < headerLen {
		return nil, fmt.Errorf("%d bytes, shorter than a header: %w", len(b), ErrMalformed)
	}
	if [4]byte(b[236:240]) != magic {
		return nil, fmt.Errorf("no magic cookie (a BOOTP message?): %w", ErrMalformed)
	}
	p := &Packet{
		Op: b[0], HType: b[1], HLen: b[2], Hops: b[3],
		XID:     binary.BigEndian.Uint32(b[4:8]),
		Secs:    binary.BigEndian.Uint16(b[8:10]),
		Flags:   binary.BigEndian.Uint16(b[10:12]),
		CIAddr:  netip.AddrFrom4([4]byte(b[12:16])),
		YIAddr:  netip.AddrFrom4([4]byte(b[16:20])),
		SIAddr:  netip.AddrFrom4([4]byte(b[20:24])),
		GIAddr:  netip.AddrFrom4([4]byte(b[24:28])),
		Options: map[byte][]byte{},
	}
	if p.HLen > 16 {
		return nil, fmt.Errorf("hardware address length %d: %w", p.HLen, ErrMalformed)
	}
	p.CHAddr = slices.Clone(b[28 : 28+int(p.HLen)])
	opts := b[headerLen:]
	for len(opts) > 0 {
		code := opts[0]
		if code == OptEnd {
			break
		}
		if code == OptPad {
			opts = opts[1:]
			continue
		}
		if len(opts) < 2 || len(opts) < 2+int(opts[1]) {
			return nil, fmt.Errorf("option %d runs past the end: %w", code, ErrMalformed)
		}
		n := int(opts[1])
		p.Options[code] = append(p.Options[code], opts[2:2+n]...)
		opts = opts[2+n:]
	}
	return p, nil
}

// Marshal encodes p: the header, the cookie, option 53 first, then the
// others in ascending order (values longer than 255 bytes split, RFC
// 3396), the end option, and padding up to the 300 bytes of a BOOTP
// message that some clients want.
func (p *Packet) Marshal() []byte {
	b := make([]byte, headerLen, 576)
	b[0], b[1], b[2], b[3] = p.Op, p.HType, p.HLen, p.Hops
	binary.BigEndian.PutUint32(b[4:8], p.XID)
	binary.BigEndian.PutUint16(b[8:10], p.Secs)
	binary.BigEndian.PutUint16(b[10:12], p.Flags)
	for i, a := range []netip.Addr{p.CIAddr, p.YIAddr, p.SIAddr, p.GIAddr} {
		if a.Is4() {
			v := a.As4()
			copy(b[12+4*i:], v[:])
		}
	}
	copy(b[28:44], p.CHAddr)
	copy(b[236:240], magic[:])
	codes := make([]byte, 0, len(p.Options))
	for c := range p.Options {
		if c != OptPad && c != OptEnd {
			codes = append(codes, c)
		}
	}
	slices.SortFunc(codes, func(x, y byte) int {
		if x == OptMessageType || y == OptMessageType {
			return boolInt(y == OptMessageType) - boolInt(x == OptMessageType)
		}
		return int(x) - int(y)
	})
	for _, c := range codes {
		v := p.Options[c]
		for first := true; first || len(v) > 0; first = false {
			n := min(len(v), 255)
			b = append(b, c, byte(n))
			b = append(b, v[:n]...)
			v = v[n:]
		}
	}
	b = append(b, OptEnd)
	for len(b) < 300 {
		b = append(b, OptPad)
	}
	return b
}

func boolInt(v bool) int {
	if v {
		return 1
	}
	return 0
}

// MessageType is option 53, 0 when absent.
func (p *Packet) MessageType() byte {
	if v := p.Options[OptMessageType]; len(v) == 1 {
		return v[0]
	}
	return 0
}

// Addr is an option holding one IPv4 address (requested IP, server id).
func (p *Packet) Addr(code byte) (netip.Addr, bool) {
	v := p.Options[code]
	if len(v) != 4 {
		return netip.Addr{}, false
	}
	return netip.AddrFrom4([4]byte(v)), true
}

// SetAddrs sets an option to a list of IPv4 addresses.
func (p *Packet) SetAddrs(code byte, addrs ...netip.Addr) {
	v := make([]byte, 0, 4*len(addrs))
	for _, a := range addrs {
		if a.Is4() {
			a4 := a.As4()
			v = append(v, a4[:]...)
		}
	}
	p.Options[code] = v
}

// SetUint32 sets a 32-bit option (lease times), and SetUint16 a 16-bit one
// (MTU).
func (p *Packet) SetUint32(code byte, v uint32) {
	p.Options[code] = binary.BigEndian.AppendUint32(nil, v)
}

func (p *Packet) SetUint16(code byte, v uint16) {
	p.Options[code] = binary.BigEndian.AppendUint16(nil, v)
}

// seconds is a lease time in option form, capped below "infinite".
func seconds(d time.Duration) uint32 {
	s := d / time.Second
	if s <= 0 {
		return 1
	}
	if s >= 0xffffffff {
		return 0xfffffffe
	}
	return uint32(s)
}
