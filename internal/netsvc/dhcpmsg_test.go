package netsvc

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"
)

var testMAC = net.HardwareAddr{0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee}

func TestMarshal(t *testing.T) {
	p := &Packet{
		Op: BootReply, HType: 1, HLen: 6, XID: 0x01020304, Flags: FlagBroadcast,
		YIAddr: netip.MustParseAddr("10.77.0.5"), CHAddr: testMAC,
		Options: map[byte][]byte{OptMessageType: {Offer}},
	}
	p.SetAddrs(OptServerID, netip.MustParseAddr("10.77.0.1"))
	p.SetAddrs(OptDNS, netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("10.77.0.2"))
	p.SetUint32(OptLeaseTime, 3600)
	p.Options[OptSubnetMask] = []byte{255, 255, 255, 0}
	b := p.Marshal()
	if len(b) != 300 {
		t.Fatalf("%d bytes, want 300 (padded BOOTP size)", len(b))
	}
	head := "02010600" + "01020304" + "0000" + "8000" + "00000000" + "0a4d0005" + "00000000" + "00000000" + "02aabbccddee"
	if got := hex.EncodeToString(b[:34]); got != head {
		t.Fatalf("header\n got %s\nwant %s", got, head)
	}
	if !bytes.Equal(b[34:236], make([]byte, 202)) {
		t.Fatal("chaddr padding, sname and file are not zero")
	}
	// cookie; 53 first; then 1, 6, 51, 54 ascending; end.
	want := "63825363" + "350102" + "0104ffffff00" + "06080a4d00010a4d0002" + "33040000" + "0e10" + "36040a4d0001" + "ff"
	if got := hex.EncodeToString(b[236 : 236+len(want)/2]); got != want {
		t.Fatalf("options\n got %s\nwant %s", got, want)
	}
	if !bytes.Equal(b[236+len(want)/2:], make([]byte, 300-236-len(want)/2)) {
		t.Fatal("padding after the end option is not zero")
	}

	q, err := Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if q.XID != p.XID || q.Flags != FlagBroadcast || q.YIAddr != p.YIAddr || !bytes.Equal(q.CHAddr, testMAC) || q.MessageType() != Offer {
		t.Fatalf("round trip: %+v", q)
	}
	if a, ok := q.Addr(OptServerID); !ok || a != netip.MustParseAddr("10.77.0.1") {
		t.Fatalf("server id %v %v", a, ok)
	}
	if !bytes.Equal(q.Options[OptDNS], p.Options[OptDNS]) {
		t.Fatalf("dns %x", q.Options[OptDNS])
	}
}

func TestParseOptions(t *testing.T) {
	p := &Packet{Op: BootRequest, HType: 1, HLen: 6, CHAddr: testMAC, Options: map[byte][]byte{
		OptMessageType: {Discover},
		OptHostName:    bytes.Repeat([]byte("h"), 300), // split in two: RFC 3396
	}}
	b := p.Marshal()
	if b[243] != OptHostName || b[244] != 255 || b[243+2+255] != OptHostName || b[243+2+255+1] != 45 {
		t.Fatalf("long option not split: % x", b[240:250])
	}
	q, err := Parse(b)
	if err != nil || len(q.Options[OptHostName]) != 300 {
		t.Fatalf("long option back: %d, %v", len(q.Options[OptHostName]), err)
	}
	// Pads between options, and a client's request list and id.
	raw := slices.Clone(b[:240])
	raw = append(raw, 0, 0, 53, 1, Request, 0, 55, 3, 1, 3, 6, 61, 7, 1, 2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 50, 4, 10, 77, 0, 5, 255)
	q, err = Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	if q.MessageType() != Request || !bytes.Equal(q.Options[OptParamRequest], []byte{1, 3, 6}) || len(q.Options[OptClientID]) != 7 {
		t.Fatalf("options: %v", q.Options)
	}
	if a, ok := q.Addr(OptRequestedIP); !ok || a != netip.MustParseAddr("10.77.0.5") {
		t.Fatalf("requested ip %v", a)
	}
	for _, bad := range [][]byte{
		b[:200],
		append(slices.Clone(b[:236]), 1, 2, 3, 4),
		append(slices.Clone(b[:240]), 53, 5, 1),
	} {
		if _, err := Parse(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("Parse(% x...) = %v, want malformed", bad[len(bad)-4:], err)
		}
	}
}

var (
	testServer = netip.MustParseAddr("10.77.0.1")
	testLease  = Lease{
		IP: netip.MustParseAddr("10.77.0.5"), Prefix: 24, Gateway: testServer,
		DNS: []netip.Addr{testServer}, Hostname: "vm1", LeaseTime: time.Hour, MTU: 1400,
	}
)

func testConfig() DHCPConfig {
	return DHCPConfig{
		Interface: "br", ServerIP: testServer, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Lookup: func(mac net.HardwareAddr) (Lease, bool) {
			return testLease, bytes.Equal(mac, testMAC)
		},
	}
}

func request(typ byte, mod func(*Packet)) *Packet {
	p := &Packet{Op: BootRequest, HType: 1, HLen: 6, XID: 7, CHAddr: testMAC, Options: map[byte][]byte{OptMessageType: {typ}}}
	if mod != nil {
		mod(p)
	}
	return p
}

func TestAnswer(t *testing.T) {
	cfg := testConfig()
	bcast := netip.MustParseAddrPort("255.255.255.255:68")

	offer, to := answer(cfg, cfg.Log, request(Discover, nil))
	if offer == nil || offer.MessageType() != Offer || offer.YIAddr != testLease.IP || offer.XID != 7 || to != bcast {
		t.Fatalf("offer %+v to %s", offer, to)
	}
	for code, want := range map[byte]string{
		OptSubnetMask: "ffffff00", OptRouter: "0a4d0001", OptDNS: "0a4d0001", OptHostName: hex.EncodeToString([]byte("vm1")),
		OptLeaseTime: "00000e10", OptRenewalTime: "00000708", OptRebindingTime: "00000c4e", OptServerID: "0a4d0001",
		OptBroadcast: "0a4d00ff", OptMTU: "0578",
	} {
		if got := hex.EncodeToString(offer.Options[code]); got != want {
			t.Errorf("option %d = %s, want %s", code, got, want)
		}
	}

	ack, to := answer(cfg, cfg.Log, request(Request, func(p *Packet) {
		p.SetAddrs(OptRequestedIP, testLease.IP)
		p.SetAddrs(OptServerID, testServer)
	}))
	if ack == nil || ack.MessageType() != Ack || ack.YIAddr != testLease.IP || to != bcast {
		t.Fatalf("ack %+v to %s", ack, to)
	}
	// Renewing: no option 50, ciaddr set: the answer goes to ciaddr.
	ack, to = answer(cfg, cfg.Log, request(Request, func(p *Packet) { p.CIAddr = testLease.IP }))
	if ack == nil || ack.MessageType() != Ack || to != netip.MustParseAddrPort("10.77.0.5:68") {
		t.Fatalf("renew ack %+v to %s", ack, to)
	}
	nak, to := answer(cfg, cfg.Log, request(Request, func(p *Packet) { p.SetAddrs(OptRequestedIP, netip.MustParseAddr("10.77.0.9")) }))
	if nak == nil || nak.MessageType() != Nak || nak.YIAddr.IsValid() || to != bcast || nak.Options[OptLeaseTime] != nil {
		t.Fatalf("nak %+v to %s", nak, to)
	}
	if r, _ := answer(cfg, cfg.Log, request(Request, func(p *Packet) {
		p.SetAddrs(OptRequestedIP, testLease.IP)
		p.SetAddrs(OptServerID, netip.MustParseAddr("10.77.0.254"))
	})); r != nil {
		t.Fatalf("answered a request for another server: %+v", r)
	}
	inf, to := answer(cfg, cfg.Log, request(Inform, func(p *Packet) { p.CIAddr = testLease.IP }))
	if inf == nil || inf.MessageType() != Ack || inf.YIAddr.IsValid() || inf.Options[OptLeaseTime] != nil || inf.Options[OptDNS] == nil || to.Addr() != testLease.IP {
		t.Fatalf("inform ack %+v to %s", inf, to)
	}
	for _, r := range []*Packet{
		request(Release, func(p *Packet) { p.CIAddr = testLease.IP }),
		request(Decline, nil),
		request(Discover, func(p *Packet) { p.CHAddr = net.HardwareAddr{2, 0, 0, 0, 0, 1} }),
		request(Discover, func(p *Packet) { p.Op = BootReply }),
	} {
		if a, _ := answer(cfg, cfg.Log, r); a != nil {
			t.Errorf("answered %+v with %+v", r, a)
		}
	}
}
