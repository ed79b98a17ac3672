package netsvc

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/bridgenet"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/testenv/netns"
)

func testLog(*testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// TestDHCPExchange runs the server on a bridge in one namespace, and
// clients in another joined to it by a veth pair: this package's codec as
// a client (DISCOVER, REQUEST, a NAK, a renewal), then busybox's udhcpc.
func TestDHCPExchange(t *testing.T) {
	srv := netns.New(t, "bgdhs")
	cli := netns.New(t, "bgdhc")
	if err := srv.Do(func() error {
		return bridgenet.EnsureBridge(bridgenet.Bridge{Name: "bgbr0", Gateway: netip.MustParsePrefix("10.77.0.1/24")})
	}); err != nil {
		t.Fatal(err)
	}
	netns.Veth(t, srv, "vport", "", cli, "vguest", "")
	srv.Run(t, "ip", "link", "set", "vport", "master", "bgbr0")
	cli.Run(t, "ip", "link", "set", "vguest", "address", testMAC.String())

	ctx, cancel := context.WithCancel(context.Background())
	var svc *Service
	cfg := testConfig()
	cfg.Interface = "bgbr0"
	cfg.Log = testLog(t)
	if err := srv.Do(func() (err error) { svc, err = StartDHCP(ctx, cfg); return err }); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); svc.Wait() }()

	var offer, ack, nak *Packet
	if err := cli.Do(func() error {
		c, err := clientConn("vguest")
		if err != nil {
			return err
		}
		defer c.Close()
		bcast := netip.MustParseAddrPort("255.255.255.255:67")
		if offer, err = exchange(c, bcast, request(Discover, nil)); err != nil {
			return fmt.Errorf("discover: %w", err)
		}
		if ack, err = exchange(c, bcast, request(Request, func(p *Packet) {
			p.SetAddrs(OptRequestedIP, offer.YIAddr)
			p.SetAddrs(OptServerID, testServer)
		})); err != nil {
			return fmt.Errorf("request: %w", err)
		}
		nak, err = exchange(c, bcast, request(Request, func(p *Packet) { p.SetAddrs(OptRequestedIP, netip.MustParseAddr("10.77.0.77")) }))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if offer.MessageType() != Offer || offer.YIAddr != testLease.IP || hex.EncodeToString(offer.Options[OptRouter]) != "0a4d0001" {
		t.Fatalf("offer: %+v", offer)
	}
	if ack.MessageType() != Ack || ack.YIAddr != testLease.IP {
		t.Fatalf("ack: %+v", ack)
	}
	if nak.MessageType() != Nak {
		t.Fatalf("nak: %+v", nak)
	}

	// A renewal from the leased address is answered to that address.
	cli.Run(t, "ip", "addr", "add", "10.77.0.5/24", "dev", "vguest")
	var renew *Packet
	if err := cli.Do(func() error {
		c, err := clientConn("vguest")
		if err != nil {
			return err
		}
		defer c.Close()
		renew, err = exchange(c, netip.MustParseAddrPort("10.77.0.1:67"), request(Request, func(p *Packet) { p.CIAddr = testLease.IP }))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if renew.MessageType() != Ack || renew.YIAddr != testLease.IP {
		t.Fatalf("renew ack: %+v", renew)
	}
	cli.Run(t, "ip", "addr", "flush", "dev", "vguest")

	// An unknown MAC gets nothing.
	if err := cli.Do(func() error {
		c, err := clientConn("vguest")
		if err != nil {
			return err
		}
		defer c.Close()
		p, err := exchangeTimeout(c, netip.MustParseAddrPort("255.255.255.255:67"),
			request(Discover, func(p *Packet) { p.CHAddr = net.HardwareAddr{2, 1, 1, 1, 1, 1} }), time.Second)
		if err == nil {
			return fmt.Errorf("an unknown mac got %+v", p)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	// A real client.
	if _, err := exec.LookPath("busybox"); err != nil {
		t.Log("no busybox: udhcpc not tried")
		return
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel2()
	out, err := cli.Command(ctx2, "busybox", "udhcpc", "-i", "vguest", "-f", "-q", "-n", "-t", "5", "-T", "1", "-s", "/bin/true").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "lease of 10.77.0.5 obtained") {
		t.Fatalf("udhcpc: %v\n%s", err, out)
	}
}

// clientConn is a DHCP client's socket on ifname.
func clientConn(ifname string) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_BROADCAST, 1); serr == nil {
				serr = unix.BindToDevice(int(fd), ifname)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp4", "0.0.0.0:68")
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

func exchange(c *net.UDPConn, to netip.AddrPort, req *Packet) (*Packet, error) {
	return exchangeTimeout(c, to, req, 10*time.Second)
}

// exchangeTimeout sends req and returns the first answer with its xid.
func exchangeTimeout(c *net.UDPConn, to netip.AddrPort, req *Packet, d time.Duration) (*Packet, error) {
	req.XID = uint32(time.Now().UnixNano())
	if _, err := c.WriteToUDPAddrPort(req.Marshal(), to); err != nil {
		return nil, err
	}
	_ = c.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 1500)
	for {
		n, _, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return nil, err
		}
		p, err := Parse(buf[:n])
		if err == nil && p.XID == req.XID && p.Op == BootReply {
			return p, nil
		}
	}
}

func TestServfail(t *testing.T) {
	q := query(0xbeef, "test.banger")
	a := servfail(q)
	// id, QR|opcode 0|RD, RA|SERVFAIL, 1 question, no answers, same question.
	want := "beef" + "81" + "82" + "0001" + "0000" + "0000" + "0000" + hex.EncodeToString(q[12:])
	if got := hex.EncodeToString(a); got != want {
		t.Fatalf("servfail\n got %s\nwant %s", got, want)
	}
	// A question that can't be read: the header alone.
	if a := servfail(q[:14]); len(a) != 12 || binary.BigEndian.Uint16(a[4:]) != 0 || a[3]&0xf != 2 {
		t.Fatalf("servfail of a cut query: % x", a)
	}
}

func TestResolvConf(t *testing.T) {
	p := t.TempDir() + "/resolv.conf"
	if err := os.WriteFile(p, []byte("# x\nsearch lan\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver ::1\noptions edns0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := ResolvConf(p)
	if err != nil || len(got) != 2 || got[0] != netip.MustParseAddrPort("127.0.0.53:53") || got[1] != netip.MustParseAddrPort("[::1]:53") {
		t.Fatalf("ResolvConf = %v, %v", got, err)
	}
	if err := os.WriteFile(p, []byte("search lan\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ResolvConf(p); err == nil {
		t.Fatal("a resolv.conf without nameserver gave no error")
	}
}

// query is an A query for name with id.
func query(id uint16, name string) []byte {
	q := binary.BigEndian.AppendUint16(nil, id)
	q = append(q, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0) // RD; 1 question
	for _, l := range strings.Split(name, ".") {
		q = append(q, byte(len(l)))
		q = append(q, l...)
	}
	return append(q, 0, 0, 1, 0, 1) // end of name, type A, class IN
}

// fakeAnswer answers q with one A record, 192.0.2.99.
func fakeAnswer(q []byte) []byte {
	a := bytes.Clone(q)
	a[2] |= 0x80 // QR
	a[3] = 0x80  // RA, NOERROR
	a[7] = 1     // one answer
	return append(a, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 99)
}

// upstream serves fakeAnswer on addr, UDP and TCP.
func upstream(t *testing.T, addr string) {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		b := make([]byte, 512)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(fakeAnswer(b[:n]), from)
		}
	}()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				for {
					q, err := readTCPMsg(c)
					if err != nil {
						return
					}
					if _, err := c.Write(tcpMsg(fakeAnswer(q))); err != nil {
						return
					}
				}
			}()
		}
	}()
}

func TestDNSForward(t *testing.T) {
	if !netns.InChild() {
		ns := netns.New(t, "bgdns")
		// The gateway, a live upstream and a dead one, all on loopback.
		for _, a := range []string{"10.77.0.1/32", "192.0.2.53/32", "192.0.2.54/32", "192.0.2.55/32"} {
			ns.Run(t, "ip", "addr", "add", a, "dev", "lo")
		}
		ns.RunTest(t)
		return
	}
	upstream(t, "192.0.2.53:53")
	// 192.0.2.54 refuses; 192.0.2.55 takes queries and never answers.
	silentU, err := net.ListenPacket("udp", "192.0.2.55:53")
	if err != nil {
		t.Fatal(err)
	}
	defer silentU.Close()
	silentT, err := net.Listen("tcp", "192.0.2.55:53")
	if err != nil {
		t.Fatal(err)
	}
	defer silentT.Close()
	ctx, cancel := context.WithCancel(context.Background())
	svc, err := StartDNS(ctx, DNSConfig{
		Listen: netip.MustParseAddr("10.77.0.1"),
		Upstreams: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.54:53"), netip.MustParseAddrPort("192.0.2.55:53"),
			netip.MustParseAddrPort("192.0.2.53:53")},
		Timeout: 200 * time.Millisecond,
		Log:     testLog(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	// UDP, and TCP with two queries on one connection.
	for i := range 3 {
		q := query(uint16(0x1000+i), "test.banger")
		var got []byte
		if i == 0 {
			got = udpQuery(t, "10.77.0.1:53", q)
		} else {
			got = tcpQueries(t, "10.77.0.1:53", q, q)[1]
		}
		if !bytes.Equal(got, fakeAnswer(q)) {
			t.Fatalf("query %d: got % x\nwant % x", i, got, fakeAnswer(q))
		}
	}

	// The address is taken now: a second forwarder says so.
	_, err = StartDNS(ctx, DNSConfig{Listen: netip.MustParseAddr("10.77.0.1"), Upstreams: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.53:53")}, Log: testLog(t)})
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "10.77.0.1:53/udp is taken") {
		t.Fatalf("a second forwarder on the same address: %v", err)
	}

	// No live upstream: SERVFAIL, quickly enough for the client's timeout.
	ctx2, cancel2 := context.WithCancel(context.Background())
	svc2, err := StartDNS(ctx2, DNSConfig{
		Listen: netip.MustParseAddr("10.77.0.1"), Port: 5353,
		Upstreams: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.54:53")}, Timeout: time.Second, Log: testLog(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	q := query(0x4242, "test.banger")
	for _, got := range [][]byte{udpQuery(t, "10.77.0.1:5353", q), tcpQueries(t, "10.77.0.1:5353", q)[0]} {
		if !bytes.Equal(got, servfail(q)) {
			t.Fatalf("with no upstream: % x", got)
		}
	}

	// Cancelling stops it: the ports are free again.
	cancel()
	cancel2()
	svc.Wait()
	svc2.Wait()
	for _, nw := range []string{"udp", "tcp"} {
		var c io.Closer
		if nw == "udp" {
			c, err = net.ListenPacket(nw, "10.77.0.1:53")
		} else {
			c, err = net.Listen(nw, "10.77.0.1:53")
		}
		if err != nil {
			t.Fatalf("port 53/%s still taken after stop: %v", nw, err)
		}
		c.Close()
	}
}

func udpQuery(t *testing.T, addr string, q []byte) []byte {
	t.Helper()
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(q); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 512)
	n, err := c.Read(b)
	if err != nil {
		t.Fatal(err)
	}
	return b[:n]
}

func tcpQueries(t *testing.T, addr string, qs ...[]byte) [][]byte {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	var out [][]byte
	for _, q := range qs {
		if _, err := c.Write(tcpMsg(q)); err != nil {
			t.Fatal(err)
		}
		a, err := readTCPMsg(c)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}
