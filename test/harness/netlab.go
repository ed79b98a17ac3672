package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/bangerdev/banger/internal/testenv/netns"
)

// The lab's addresses. Nothing here is in a range banger blocks by default
// except what is meant to be blocked: the uplink and the "internet" are in
// the benchmarking (198.18.0.0/15) and documentation (203.0.113.0/24)
// ranges, not RFC 1918, so a VM reaches them through NAT; the LAN host is on
// a private prefix connected to bgd (banger sees it as the host's LAN); the
// metadata server is link-local.
const (
	// UplinkBGD and UplinkOut are the two ends of the veth pair joining
	// bgd (the host bangerd runs on) to out (the internet); bgd's default
	// route goes through UplinkOut.
	UplinkBGD = "198.18.0.1"
	UplinkOut = "198.18.0.2"
	// InternetIP is the outside server (HTTP on :80, DNS on :53), on out's
	// loopback.
	InternetIP = "203.0.113.10"
	// OutsideName is the test name the outside DNS server answers with
	// InternetIP (A record); other names get NXDOMAIN.
	OutsideName = "outside.test"
	// LANHostIP is a host on bgd's LAN: a second veth pair joins bgd
	// (LANBGD/24) to out (LANHostIP/24), a connected route in bgd.
	LANHostIP = "192.168.77.1"
	LANBGD    = "192.168.77.2"
	// MetadataIP is the cloud metadata server (HTTP on :80) in out; bgd
	// routes it through the uplink.
	MetadataIP = "169.254.169.254"
)

// The bodies the lab's HTTP servers answer.
const (
	InternetBody = "banger-e2e internet\n"
	MetadataBody = "banger-e2e metadata\n"
	LANBody      = "banger-e2e lan\n"
	HostBody     = "banger-e2e host\n"
)

// Lab is the network a networked Env runs in: namespace BGD is the host
// (bangerd, the CLI and ssh run in it), namespace Out plays the internet,
// the LAN and the metadata service, with servers the test runs.
type Lab struct {
	t        testing.TB
	BGD, Out *netns.NS
	hits     sync.Map // server name -> *atomic.Int64
}

// NewLab makes the two namespaces, their links and routes, and starts
// the outside servers; all of it goes when t ends.
func NewLab(t testing.TB) *Lab {
	t.Helper()
	l := &Lab{t: t, BGD: netns.New(t, "bgd"), Out: netns.New(t, "out")}
	netns.Veth(t, l.BGD, "uplink", UplinkBGD+"/30", l.Out, "uplink", UplinkOut+"/30")
	netns.Veth(t, l.BGD, "lan", LANBGD+"/24", l.Out, "lan", LANHostIP+"/24")
	l.BGD.Run(t, "ip", "route", "add", "default", "via", UplinkOut)
	l.BGD.Run(t, "ip", "route", "add", MetadataIP+"/32", "via", UplinkOut)
	// On out's loopback (this kernel may lack the dummy link type).
	l.Out.Run(t, "ip", "addr", "add", InternetIP+"/32", "dev", "lo")
	l.Out.Run(t, "ip", "addr", "add", MetadataIP+"/32", "dev", "lo")
	// Replies to the VMs' NATed traffic go to bgd's uplink address
	// (connected); nothing in out routes the VM subnet, so un-NATed
	// traffic gets no answer.
	l.serveHTTP(l.Out, "internet", InternetIP+":80", InternetBody)
	l.serveHTTP(l.Out, "metadata", MetadataIP+":80", MetadataBody)
	l.serveHTTP(l.Out, "lan", LANHostIP+":80", LANBody)
	l.serveDNS()
	return l
}

func (l *Lab) counter(name string) *atomic.Int64 {
	c, _ := l.hits.LoadOrStore(name, new(atomic.Int64))
	return c.(*atomic.Int64)
}

// Hits is how many requests (HTTP requests, DNS queries, connections) the
// named server answered: "internet", "metadata", "lan", "dns", or a name
// given to ListenHost.
func (l *Lab) Hits(name string) int64 { return l.counter(name).Load() }

// listen opens a listener inside ns; it stays there after Do returns.
func listen(ns *netns.NS, network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

func (l *Lab) serveHTTP(ns *netns.NS, name, addr, body string) {
	l.t.Helper()
	ln, err := listen(ns, "tcp", addr)
	if err != nil {
		l.t.Fatalf("listen %s in %s: %v", addr, ns.Name, err)
	}
	n := l.counter(name)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			n.Add(1)
			io.WriteString(w, body)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go srv.Serve(ln)
	l.t.Cleanup(func() { srv.Close() })
}

// ListenHost opens a TCP listener on addr (ip:port, port 0 picks one)
// inside bgd, the host, that writes HostBody to each connection and counts
// them under name. It returns the port.
func (l *Lab) ListenHost(name, addr string) int {
	l.t.Helper()
	ln, err := listen(l.BGD, "tcp", addr)
	if err != nil {
		l.t.Fatalf("listen %s in bgd: %v", addr, err)
	}
	n := l.counter(name)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			// Answer, then read what the client sent until its EOF:
			// closing with unread input would reset the connection.
			c.SetDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(c, HostBody)
			c.(*net.TCPConn).CloseWrite()
			io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	l.t.Cleanup(func() { ln.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

// serveDNS answers OutsideName A = InternetIP on InternetIP:53 over UDP
// and TCP; every other question gets NXDOMAIN.
func (l *Lab) serveDNS() {
	l.t.Helper()
	n := l.counter("dns")
	var pc net.PacketConn
	if err := l.Out.Do(func() error {
		var err error
		pc, err = net.ListenPacket("udp", InternetIP+":53")
		return err
	}); err != nil {
		l.t.Fatalf("listen dns/udp: %v", err)
	}
	ln, err := listen(l.Out, "tcp", InternetIP+":53")
	if err != nil {
		l.t.Fatalf("listen dns/tcp: %v", err)
	}
	l.t.Cleanup(func() { pc.Close(); ln.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			k, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if resp, ok := dnsAnswer(buf[:k]); ok {
				n.Add(1)
				pc.WriteTo(resp, from)
			}
		}
	}()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				r := bufio.NewReader(c)
				var hdr [2]byte
				if _, err := io.ReadFull(r, hdr[:]); err != nil {
					return
				}
				q := make([]byte, int(hdr[0])<<8|int(hdr[1]))
				if _, err := io.ReadFull(r, q); err != nil {
					return
				}
				resp, ok := dnsAnswer(q)
				if !ok {
					return
				}
				n.Add(1)
				c.Write(append([]byte{byte(len(resp) >> 8), byte(len(resp))}, resp...))
			}()
		}
	}()
}

func dnsAnswer(query []byte) ([]byte, bool) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil || h.Response {
		return nil, false
	}
	q, err := p.Question()
	if err != nil {
		return nil, false
	}
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true}
	known := strings.EqualFold(strings.TrimSuffix(q.Name.String(), "."), OutsideName)
	if !known {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	if b.StartQuestions() != nil || b.Question(q) != nil || b.StartAnswers() != nil {
		return nil, false
	}
	if known && q.Type == dnsmessage.TypeA {
		ip := net.ParseIP(InternetIP).To4()
		if b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60}, dnsmessage.AResource{A: [4]byte(ip)}) != nil {
			return nil, false
		}
	}
	out, err := b.Finish()
	return out, err == nil
}

// Links lists bgd's links that belong to banger: the bridge (bridge, e.g.
// "banger0") and every link whose name starts with "bg-" (the VMs' TAPs).
func (l *Lab) Links(bridge string) []string {
	l.t.Helper()
	h, err := vnetns.GetFromPath(l.BGD.Path)
	if err != nil {
		l.t.Fatalf("open bgd: %v", err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		l.t.Fatalf("netlink in bgd: %v", err)
	}
	defer nh.Close()
	links, err := nh.LinkList()
	if err != nil {
		l.t.Fatalf("list links in bgd: %v", err)
	}
	var out []string
	for _, k := range links {
		name := k.Attrs().Name
		if name == bridge || strings.HasPrefix(name, "bg-") {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// NFT lists bgd's nftables tables and chains whose table name contains
// "banger", as "FAMILY TABLE" and "FAMILY TABLE CHAIN", and the elements
// of their sets and maps that carry a comment (banger's per-VM elements
// carry the VM's id) as "FAMILY TABLE SET element COMMENT".
func (l *Lab) NFT() []string {
	l.t.Helper()
	f, err := os.Open(l.BGD.Path)
	if err != nil {
		l.t.Fatalf("open bgd: %v", err)
	}
	defer f.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		l.t.Fatalf("nftables in bgd: %v", err)
	}
	defer c.CloseLasting()
	tables, err := c.ListTables()
	if err != nil {
		l.t.Fatalf("list nftables tables in bgd: %v", err)
	}
	var out []string
	for _, t := range tables {
		if !strings.Contains(t.Name, "banger") {
			continue
		}
		out = append(out, familyName(t.Family)+" "+t.Name)
		sets, err := c.GetSets(t)
		if err != nil {
			l.t.Fatalf("list the sets of %s %s in bgd: %v", familyName(t.Family), t.Name, err)
		}
		for _, s := range sets {
			els, err := c.GetSetElements(s)
			if err != nil {
				l.t.Fatalf("list set %s in bgd: %v", s.Name, err)
			}
			for _, el := range els {
				if el.Comment != "" {
					out = append(out, familyName(t.Family)+" "+t.Name+" "+s.Name+" element "+el.Comment)
				}
			}
		}
	}
	chains, err := c.ListChains()
	if err != nil {
		l.t.Fatalf("list nftables chains in bgd: %v", err)
	}
	for _, ch := range chains {
		if strings.Contains(ch.Table.Name, "banger") {
			out = append(out, familyName(ch.Table.Family)+" "+ch.Table.Name+" "+ch.Name)
		}
	}
	sort.Strings(out)
	return out
}

func familyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyINet:
		return "inet"
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	case nftables.TableFamilyBridge:
		return "bridge"
	case nftables.TableFamilyARP:
		return "arp"
	case nftables.TableFamilyNetdev:
		return "netdev"
	}
	return strconv.Itoa(int(f))
}

// Listeners lists bgd's listening TCP sockets and bound UDP sockets, as
// "tcp 127.0.0.1:8080" or "udp 10.77.0.1:53" (IPv6 ones as "tcp6 [::1]:80").
func (l *Lab) Listeners() []string {
	l.t.Helper()
	var out []string
	err := l.BGD.Do(func() error {
		for _, proto := range []string{"tcp", "tcp6", "udp", "udp6"} {
			b, err := os.ReadFile("/proc/thread-self/net/" + proto)
			if err != nil {
				return err
			}
			for _, line := range strings.Split(string(b), "\n")[1:] {
				f := strings.Fields(line)
				if len(f) < 4 {
					continue
				}
				// TCP_LISTEN is 0A; an unconnected UDP socket is 07.
				if (strings.HasPrefix(proto, "tcp") && f[3] != "0A") || (strings.HasPrefix(proto, "udp") && f[3] != "07") {
					continue
				}
				addr, err := procAddr(f[1])
				if err != nil {
					return err
				}
				out = append(out, proto+" "+addr)
			}
		}
		return nil
	})
	if err != nil {
		l.t.Fatalf("list listeners in bgd: %v", err)
	}
	sort.Strings(out)
	return out
}

// procAddr decodes /proc/net/tcp's "0100007F:1F90" (host-order words).
func procAddr(s string) (string, error) {
	hexIP, hexPort, ok := strings.Cut(s, ":")
	if !ok {
		return "", fmt.Errorf("bad address %q", s)
	}
	port, err := strconv.ParseUint(hexPort, 16, 16)
	if err != nil {
		return "", err
	}
	raw := make([]byte, len(hexIP)/2)
	for i := range raw {
		v, err := strconv.ParseUint(hexIP[2*i:2*i+2], 16, 8)
		if err != nil {
			return "", err
		}
		raw[i] = byte(v)
	}
	// Each 32-bit word is in host (little-endian) order.
	for i := 0; i+4 <= len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	return net.JoinHostPort(net.IP(raw).String(), strconv.Itoa(int(port))), nil
}

// Dial connects from bgd (the host) to addr, with a timeout.
func (l *Lab) Dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := l.BGD.Do(func() error {
		var err error
		c, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	return c, err
}

// Exchange sends msg to addr from bgd (TCP: then half-closes) and returns
// what comes back until EOF (TCP) or the first datagram (UDP), within
// timeout.
func (l *Lab) Exchange(network, addr, msg string, timeout time.Duration) (string, error) {
	c, err := l.Dial(network, addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, msg); err != nil {
		return "", err
	}
	if network == "udp" {
		buf := make([]byte, 2048)
		k, err := c.Read(buf)
		return string(buf[:k]), err
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	b, err := io.ReadAll(c)
	if err != nil && !errors.Is(err, io.EOF) {
		return string(b), err
	}
	return string(b), nil
}

// WaitExchange retries Exchange until it answers want (a prefix) or
// timeout passes; it fails the test then.
func (l *Lab) WaitExchange(network, addr, msg, want string, timeout time.Duration) {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var got string
	var err error
	for ctx.Err() == nil {
		got, err = l.Exchange(network, addr, msg, 3*time.Second)
		if err == nil && strings.HasPrefix(got, want) {
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(300 * time.Millisecond):
		}
	}
	l.t.Fatalf("%s %s from bgd: got %q, %v; want %q", network, addr, got, err, want)
}

// Get fetches http://addr/ from bgd and returns the body. It dials the
// literal address itself (net/http and Go's resolver dial on goroutines of
// their own, outside the namespace, so they are not used here).
func (l *Lab) Get(addr string, timeout time.Duration) (string, error) {
	c, err := l.Dial("tcp", addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", addr); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET http://%s/: %s", addr, resp.Status)
	}
	return string(b), err
}

// Lookup asks the DNS server at addr (ip:port) over network (udp or tcp),
// from bgd, for name's A records.
func (l *Lab) Lookup(network, addr, name string, timeout time.Duration) ([]string, error) {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 0x6e6e, RecursionDesired: true})
	n, err := dnsmessage.NewName(strings.TrimSuffix(name, ".") + ".")
	if err != nil {
		return nil, err
	}
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(dnsmessage.Question{Name: n, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}); err != nil {
		return nil, err
	}
	q, err := b.Finish()
	if err != nil {
		return nil, err
	}
	c, err := l.Dial(network, addr, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	var resp []byte
	if network == "tcp" {
		if _, err := c.Write(append([]byte{byte(len(q) >> 8), byte(len(q))}, q...)); err != nil {
			return nil, err
		}
		var hdr [2]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return nil, err
		}
		resp = make([]byte, int(hdr[0])<<8|int(hdr[1]))
		if _, err := io.ReadFull(c, resp); err != nil {
			return nil, err
		}
	} else {
		if _, err := c.Write(q); err != nil {
			return nil, err
		}
		resp = make([]byte, 1500)
		k, err := c.Read(resp)
		if err != nil {
			return nil, err
		}
		resp = resp[:k]
	}
	var m dnsmessage.Message
	if err := m.Unpack(resp); err != nil {
		return nil, err
	}
	if m.RCode != dnsmessage.RCodeSuccess {
		return nil, fmt.Errorf("lookup %s at %s: %s", name, addr, m.RCode)
	}
	var out []string
	for _, a := range m.Answers {
		if r, ok := a.Body.(*dnsmessage.AResource); ok {
			out = append(out, net.IP(r.A[:]).String())
		}
	}
	return out, nil
}
