package firewall

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/testenv/netns"
)

// world is a host namespace with banger's bridge, two VMs (veth ends in
// namespaces of their own, host ends named like banger's TAPs), an
// "outside" namespace (the internet, with a metadata server at
// 169.254.169.254) and a "lan" namespace.
type world struct {
	host, a, b, out, lan *netns.NS
	vmA, vmB             VM
	cfg                  Config
	port                 int // every server's port
}

const (
	bridgeName = "banger0"
	outAddr    = "192.0.2.2" // outside server (TEST-NET-1: not a LAN range)
	uplinkAddr = "192.0.2.1" // the host's address towards the outside
	metaAddr   = "169.254.169.254"
	wireAddr   = "168.63.129.16" // Azure's WireServer: metadata outside link-local
	lanAddr    = "198.51.100.2"  // a host LAN range passed in Config.LAN
	privAddr   = "172.20.0.2"    // an RFC 1918 address on the host's LAN
)

func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Missing(t, "%s not found (Debian package %s)", tool, map[string]string{"ip": "iproute2", "nft": "nftables", "iptables-nft": "iptables"}[tool])
		}
	}
}

func newWorld(t *testing.T) *world {
	t.Helper()
	needTools(t, "ip", "nft", "iptables-nft")
	w := &world{
		host: netns.New(t, "fwh"), a: netns.New(t, "fwa"), b: netns.New(t, "fwb"),
		out: netns.New(t, "fwo"), lan: netns.New(t, "fwl"),
		port: 8080,
	}
	w.cfg = Config{
		Bridge:  bridgeName,
		Subnet:  netip.MustParsePrefix("10.77.0.0/24"),
		Gateway: netip.MustParseAddr("10.77.0.1"),
		LAN:     []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24"), netip.MustParsePrefix("172.20.0.0/24")},
	}
	h := w.host
	h.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	h.Run(t, "ip", "link", "add", bridgeName, "type", "bridge")
	h.Run(t, "ip", "addr", "add", "10.77.0.1/24", "dev", bridgeName)
	h.Run(t, "ip", "link", "set", bridgeName, "up")
	for i, vm := range []struct {
		ns  *netns.NS
		dst *VM
		id  string
	}{{w.a, &w.vmA, "aaaaaaaaaaaa0001"}, {w.b, &w.vmB, "bbbbbbbbbbbb0002"}} {
		mac := net.HardwareAddr{0x02, 0x42, 0, 0, 0, byte(i + 2)}
		ip := netip.AddrFrom4([4]byte{10, 77, 0, byte(i + 2)})
		*vm.dst = VM{ID: vm.id, TAP: "bg-" + vm.id[:12], MAC: mac, IP: ip}
		netns.Veth(t, h, vm.dst.TAP, "", vm.ns, "eth0", "")
		h.Run(t, "ip", "link", "set", vm.dst.TAP, "master", bridgeName)
		vm.ns.Run(t, "ip", "link", "set", "eth0", "down")
		vm.ns.Run(t, "ip", "link", "set", "eth0", "address", mac.String())
		vm.ns.Run(t, "ip", "link", "set", "eth0", "up")
		vm.ns.Run(t, "ip", "addr", "add", ip.String()+"/24", "dev", "eth0")
		vm.ns.Run(t, "ip", "route", "add", "default", "via", "10.77.0.1")
	}
	netns.Veth(t, h, "uplink", uplinkAddr+"/24", w.out, "eth0", outAddr+"/24")
	w.out.Run(t, "ip", "addr", "add", metaAddr+"/32", "dev", "eth0")
	w.out.Run(t, "ip", "addr", "add", wireAddr+"/32", "dev", "eth0")
	w.out.Run(t, "ip", "route", "add", "10.77.0.0/24", "via", uplinkAddr) // to try connections into the VMs
	h.Run(t, "ip", "route", "add", metaAddr+"/32", "via", outAddr)
	h.Run(t, "ip", "route", "add", wireAddr+"/32", "via", outAddr)
	netns.Veth(t, h, "lan0", "198.51.100.1/24", w.lan, "eth0", lanAddr+"/24")
	h.Run(t, "ip", "addr", "add", "172.20.0.1/24", "dev", "lan0")
	w.lan.Run(t, "ip", "addr", "add", privAddr+"/24", "dev", "eth0")
	w.lan.Run(t, "ip", "route", "add", "10.77.0.0/24", "via", "198.51.100.1")

	for _, ns := range []*netns.NS{w.a, w.b} {
		ns.Run(t, "ip", "addr", "add", "fd77::"+strings.TrimPrefix(ns.Name[:3], "fw")+"/64", "dev", "eth0", "nodad")
	}
	w.serve(t, w.out, "0.0.0.0")
	w.serve(t, w.lan, "0.0.0.0")
	w.serve(t, w.b, "0.0.0.0")
	w.serve(t, w.a, "0.0.0.0")
	w.serve(t, h, "10.77.0.1")
	serveAt(t, h, "10.77.0.1:53") // banger's DNS forwarder
	return w
}

// serve starts a TCP server in ns on addr:w.port that writes the client's
// address and closes.
func (w *world) serve(t *testing.T, ns *netns.NS, addr string) {
	t.Helper()
	serveAt(t, ns, net.JoinHostPort(addr, "8080"))
}

func serveAt(t *testing.T, ns *netns.NS, addr string) {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, c.RemoteAddr().String())
			c.Close()
		}
	}()
}

// dial connects from ns (from local, when set) to dst and returns what the
// server wrote: the address it saw.
func dial(ns *netns.NS, local, dst string) (string, error) {
	var got string
	err := ns.Do(func() error {
		d := net.Dialer{Timeout: 700 * time.Millisecond}
		if local != "" {
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
		}
		c, err := d.Dial("tcp", dst)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		b, err := io.ReadAll(c)
		got = string(b)
		return err
	})
	return got, err
}

// reach fails t unless ns reaches dst; it returns the address the server saw.
func reach(t *testing.T, ns *netns.NS, local, dst string) string {
	t.Helper()
	got, err := dial(ns, local, dst)
	if err != nil {
		t.Fatalf("%s -> %s: %v, want it reachable", ns.Name, dst, err)
	}
	return got
}

// blocked fails t unless connecting from ns to dst times out: the SYN was
// dropped (a refused connection would mean it went through).
func blocked(t *testing.T, ns *netns.NS, local, dst string) {
	t.Helper()
	got, err := dial(ns, local, dst)
	var ne net.Error
	if err == nil || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("%s -> %s: got %q, %v; want it dropped (a timeout)", ns.Name, dst, got, err)
	}
}

func at(addr string) string { return net.JoinHostPort(addr, "8080") }

func (w *world) do(t *testing.T, fn func() error) {
	t.Helper()
	if err := w.host.Do(fn); err != nil {
		t.Fatal(err)
	}
}

func (w *world) newFirewall(t *testing.T, cfg Config) *Firewall {
	t.Helper()
	f, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	w.do(t, f.Ensure)
	return f
}

func TestIsolation(t *testing.T) {
	w := newWorld(t)
	// Without banger's rules everything is reachable: what the tests below
	// find blocked is blocked by them.
	deadline := time.Now().Add(5 * time.Second)
	for _, err := dial(w.a, "", fmt.Sprintf("[fd77::b]:%d", w.port)); err != nil; _, err = dial(w.a, "", fmt.Sprintf("[fd77::b]:%d", w.port)) {
		if time.Now().After(deadline) {
			t.Fatalf("without a firewall, A can't reach B over IPv6: %v", err)
		}
	}
	for _, dst := range []string{w.vmB.IP.String(), "10.77.0.1", metaAddr, wireAddr, lanAddr, privAddr} {
		reach(t, w.a, "", at(dst))
	}
	reach(t, w.out, "", at(w.vmA.IP.String()))
	f := w.newFirewall(t, w.cfg)
	w.do(t, func() error { return f.AddVM(w.vmA) })
	w.do(t, func() error { return f.AddVM(w.vmB) })

	t.Run("nat to the outside", func(t *testing.T) {
		if got := reach(t, w.a, "", at(outAddr)); !strings.HasPrefix(got, uplinkAddr+":") {
			t.Fatalf("the outside server saw %s, want the host's %s (masquerade)", got, uplinkAddr)
		}
	})
	t.Run("defaults block", func(t *testing.T) {
		blocked(t, w.a, "", at(w.vmB.IP.String()))
		blocked(t, w.a, "", at("10.77.0.1"))
		blocked(t, w.a, "", at(metaAddr))
		blocked(t, w.a, "", at(wireAddr))
		blocked(t, w.a, "", at(lanAddr))
		blocked(t, w.a, "", at(privAddr))
		blocked(t, w.out, "", at(w.vmA.IP.String())) // new connections into the VMs
		reach(t, w.a, "", "10.77.0.1:53")            // DNS on the gateway
	})
	t.Run("spoofed IP", func(t *testing.T) {
		w.a.Run(t, "ip", "addr", "add", "10.77.0.50/24", "dev", "eth0")
		defer w.a.Run(t, "ip", "addr", "del", "10.77.0.50/24", "dev", "eth0")
		blocked(t, w.a, "10.77.0.50", at(outAddr))
		reach(t, w.a, w.vmA.IP.String(), at(outAddr))
	})
	t.Run("spoofed MAC", func(t *testing.T) {
		w.a.Run(t, "ip", "link", "set", "eth0", "address", "02:42:00:00:00:99")
		blocked(t, w.a, "", at(outAddr))
		w.a.Run(t, "ip", "link", "set", "eth0", "address", w.vmA.MAC.String())
		reach(t, w.a, "", at(outAddr))
	})
	t.Run("per-VM allows", func(t *testing.T) {
		a, b := w.vmA, w.vmB
		a.AllowHost, a.AllowLAN, a.AllowLinkLocal, a.AllowVMToVM = true, true, true, true
		w.do(t, func() error { return f.AddVM(a) })
		reach(t, w.a, "", at("10.77.0.1"))
		reach(t, w.a, "", at(metaAddr))
		reach(t, w.a, "", at(wireAddr))
		reach(t, w.a, "", at(lanAddr))
		reach(t, w.a, "", at(privAddr))
		blocked(t, w.a, "", at(b.IP.String())) // B doesn't allow VM to VM
		blocked(t, w.b, "", at(metaAddr))      // A's allows are A's
		b.AllowVMToVM = true
		w.do(t, func() error { return f.AddVM(b) })
		reach(t, w.a, "", at(b.IP.String()))
		reach(t, w.b, "", at(a.IP.String()))
		// Back to the defaults: AddVM replaces a VM's allows.
		w.do(t, func() error { return f.AddVM(w.vmA) })
		w.do(t, func() error { return f.AddVM(w.vmB) })
		blocked(t, w.a, "", at("10.77.0.1"))
		blocked(t, w.a, "", at(b.IP.String()))
	})
	t.Run("global allows", func(t *testing.T) {
		cfg := w.cfg
		cfg.AllowHost, cfg.AllowLAN, cfg.AllowLinkLocal, cfg.AllowVMToVM = true, true, true, true
		g := w.newFirewall(t, cfg) // Ensure again, other policy: the VMs stay
		reach(t, w.a, "", at("10.77.0.1"))
		reach(t, w.a, "", at(metaAddr))
		reach(t, w.a, "", at(wireAddr))
		reach(t, w.a, "", at(lanAddr))
		reach(t, w.a, "", at(w.vmB.IP.String()))
		var ids []string
		w.do(t, func() (err error) { ids, err = g.VMs(); return err })
		if want := []string{w.vmA.ID, w.vmB.ID}; !slices.Equal(ids, want) {
			t.Fatalf("VMs after Ensure = %v, want %v", ids, want)
		}
		w.do(t, f.Ensure) // the defaults again
		blocked(t, w.a, "", at(w.vmB.IP.String()))
		blocked(t, w.a, "", at(metaAddr))
		blocked(t, w.a, "", at(wireAddr))
	})
	t.Run("ensure is idempotent", func(t *testing.T) {
		before := w.host.Run(t, "nft", "list", "ruleset")
		w.do(t, f.Ensure)
		if after := w.host.Run(t, "nft", "list", "ruleset"); after != before {
			t.Fatalf("Ensure changed the ruleset:\n%s\nwas:\n%s", after, before)
		}
		if !strings.Contains(before, `oifname != "banger0" masquerade`) || !strings.Contains(before, "jump vm-"+w.vmA.ID) {
			t.Fatalf("ruleset lacks the NAT rule or A's chain:\n%s", before)
		}
	})
	t.Run("no IPv6 from VMs", func(t *testing.T) {
		a, b := w.vmA, w.vmB
		a.AllowVMToVM, b.AllowVMToVM = true, true
		w.do(t, func() error { return f.AddVM(a) })
		w.do(t, func() error { return f.AddVM(b) })
		defer w.do(t, func() error { return f.AddVM(w.vmA) })
		defer w.do(t, func() error { return f.AddVM(w.vmB) })
		// B's server listens on both families (Go's 0.0.0.0 is dual-stack).
		reach(t, w.a, "", at(b.IP.String())) // IPv4 between them is allowed now
		blocked(t, w.a, "", "[fd77::b]:8080")
	})
	t.Run("spoofed ARP", func(t *testing.T) {
		// A claims B's address in an ARP request to the host: the host
		// would map B's address to A's MAC.
		sendARP(t, w.a, w.vmA.MAC, w.vmB.IP, w.cfg.Gateway)
		sendARP(t, w.a, w.vmA.MAC, w.vmA.IP, w.cfg.Gateway) // control: A's own
		if !waitNeigh(t, w.host, w.vmA.IP, w.vmA.MAC) {
			t.Fatalf("the host didn't learn A's own address from A's ARP request: %s", w.host.Run(t, "ip", "neigh"))
		}
		if out := w.host.Run(t, "ip", "neigh", "show", w.vmB.IP.String()); strings.Contains(out, w.vmA.MAC.String()) {
			t.Fatalf("A's ARP claiming B's address went through: %s", out)
		}
	})
	t.Run("DHCP before an address", func(t *testing.T) {
		var ln *net.UDPConn
		w.do(t, func() (err error) { ln, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 67}); return err })
		defer ln.Close()
		w.a.Run(t, "ip", "addr", "flush", "dev", "eth0")
		defer w.a.Run(t, "ip", "route", "add", "default", "via", "10.77.0.1")
		defer w.a.Run(t, "ip", "addr", "add", w.vmA.IP.String()+"/24", "dev", "eth0")
		sendBroadcast(t, w.a, 69) // not DHCP's port: dropped
		sendBroadcast(t, w.a, 68)
		_ = ln.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 64)
		n, from, err := ln.ReadFromUDP(buf)
		if err != nil || string(buf[:n]) != "from 68" || !from.IP.Equal(net.IPv4zero) || from.Port != 68 {
			t.Fatalf("host got %q from %v, %v; want A's DHCP request from 0.0.0.0:68", buf[:n], from, err)
		}
	})
	t.Run("remove", func(t *testing.T) {
		w.do(t, func() error { return f.RemoveVM(w.vmA.ID) })
		w.do(t, func() error { return f.RemoveVM(w.vmA.ID) }) // not found is fine
		var ids []string
		w.do(t, func() (err error) { ids, err = f.VMs(); return err })
		if want := []string{w.vmB.ID}; !slices.Equal(ids, want) {
			t.Fatalf("VMs = %v, want %v", ids, want)
		}
		// A's port is a TAP banger doesn't know now: dropped.
		blocked(t, w.a, "", at(outAddr))
		reach(t, w.b, "", at(outAddr))
		w.do(t, func() error {
			for _, el := range elements(t) {
				if el.elem.Comment == w.vmA.ID {
					t.Errorf("element of %s left in %s", w.vmA.ID, el.set.Name)
				}
			}
			return nil
		})
	})
	t.Run("teardown", func(t *testing.T) {
		w.do(t, f.Teardown)
		w.do(t, f.Teardown) // nothing there is fine
		w.do(t, func() error { assertNoBanger(t); return nil })
	})
}

// elements lists the elements of banger's sets (in the calling thread's
// namespace).
func elements(t *testing.T) []setElem {
	t.Helper()
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	st, err := readState(c)
	if err != nil {
		t.Fatal(err)
	}
	return st.elements
}

// assertNoBanger fails t if any table named banger, or any rule of
// banger's in iptables' chains, exists in the calling thread's namespace.
func assertNoBanger(t *testing.T) {
	t.Helper()
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tables, err := c.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		if tb.Name == TableName {
			t.Errorf("table %d %s left", tb.Family, tb.Name)
		}
	}
	chains, err := c.ListChains()
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range chains {
		if ch.Table.Name == TableName {
			t.Errorf("chain %s left", ch.Name)
		}
		rules, err := c.GetRules(ch.Table, ch)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			if isIPTAccept(r, bridgeName, true) || isIPTAccept(r, bridgeName, false) {
				t.Errorf("rule for %s left in %s %s", bridgeName, ch.Table.Name, ch.Name)
			}
		}
	}
}

func TestValidation(t *testing.T) {
	good := Config{Bridge: "banger0", Subnet: netip.MustParsePrefix("10.77.0.0/24"), Gateway: netip.MustParseAddr("10.77.0.1")}
	for name, mod := range map[string]func(*Config){
		"no bridge":       func(c *Config) { c.Bridge = "" },
		"long bridge":     func(c *Config) { c.Bridge = "a-very-long-bridge-name" },
		"ipv6 subnet":     func(c *Config) { c.Subnet = netip.MustParsePrefix("fd00::/64") },
		"gateway outside": func(c *Config) { c.Gateway = netip.MustParseAddr("10.78.0.1") },
		"no subnet":       func(c *Config) { c.Subnet = netip.Prefix{} },
	} {
		cfg := good
		mod(&cfg)
		if _, err := New(cfg); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s: New = %v, want ErrInvalid", name, err)
		}
	}
	f, err := New(good)
	if err != nil {
		t.Fatal(err)
	}
	vm := VM{ID: "0123456789abcdef", TAP: "bg-0123456789ab", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, IP: netip.MustParseAddr("10.77.0.2")}
	for name, mod := range map[string]func(*VM){
		"bad id":     func(v *VM) { v.ID = "a b" },
		"no mac":     func(v *VM) { v.MAC = nil },
		"ip outside": func(v *VM) { v.IP = netip.MustParseAddr("10.78.0.2") },
		"gateway ip": func(v *VM) { v.IP = netip.MustParseAddr("10.77.0.1") },
		"long tap":   func(v *VM) { v.TAP = "bg-0123456789abcdef" },
	} {
		v := vm
		mod(&v)
		if err := f.AddVM(v); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s: AddVM = %v, want ErrInvalid", name, err)
		}
	}
}

func TestBlockedRanges(t *testing.T) {
	p := netip.MustParsePrefix
	got := blockedRanges(p("10.77.0.0/24"), []netip.Prefix{
		p("10.77.0.0/24"),    // the VMs' subnet: not a LAN
		p("192.168.1.0/24"),  // inside 192.168.0.0/16
		p("169.254.0.0/16"),  // link-local: its own switch
		p("198.51.100.7/24"), // masked
		p("fd00::/64"),       // IPv6: ignored
		p("203.0.113.0/24"),
		p("203.0.113.0/24"), // duplicate
	})
	want := []netip.Prefix{p("10.0.0.0/8"), p("100.64.0.0/10"), p("172.16.0.0/12"), p("192.168.0.0/16"), p("198.51.100.0/24"), p("203.0.113.0/24")}
	if !slices.Equal(got, want) {
		t.Fatalf("blockedRanges = %v, want %v", got, want)
	}
}

func TestAddVMConflicts(t *testing.T) {
	needTools(t, "ip")
	ns := netns.New(t, "fwc")
	f, err := New(Config{Bridge: "banger0", Subnet: netip.MustParsePrefix("10.77.0.0/24"), Gateway: netip.MustParseAddr("10.77.0.1")})
	if err != nil {
		t.Fatal(err)
	}
	a := VM{ID: "a1", TAP: "bg-a1", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, IP: netip.MustParseAddr("10.77.0.2")}
	err = ns.Do(func() error { return f.AddVM(a) })
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("AddVM before Ensure = %v, want ErrFailedPrecondition", err)
	}
	if err := ns.Do(func() error {
		if err := f.Ensure(); err != nil {
			return err
		}
		return f.AddVM(a)
	}); err != nil {
		t.Fatal(err)
	}
	b := a
	b.ID = "b2"
	b.TAP = "bg-b2"
	if err := ns.Do(func() error { return f.AddVM(b) }); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("AddVM with A's IP = %v, want ErrAlreadyExists", err)
	}
	b.IP = netip.MustParseAddr("10.77.0.3")
	b.TAP = a.TAP
	if err := ns.Do(func() error { return f.AddVM(b) }); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("AddVM with A's TAP = %v, want ErrAlreadyExists", err)
	}
	if err := ns.Do(f.Teardown); err != nil {
		t.Fatal(err)
	}
	// RemoveVM without tables is fine.
	if err := ns.Do(func() error { return f.RemoveVM("a1") }); err != nil {
		t.Fatal(err)
	}
}

// ipt runs iptables-nft in ns and fails t on an error or on a warning (an
// "incompatible" table would show one).
func ipt(t *testing.T, ns *netns.NS, args ...string) string {
	t.Helper()
	cmd := ns.Command(t.Context(), "iptables-nft", args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil || stderr.Len() > 0 {
		t.Fatalf("iptables-nft %v: %v: %s%s", args, err, out, stderr.String())
	}
	return string(out)
}

func TestDockerForwardDrop(t *testing.T) {
	w := newWorld(t)
	ipt(t, w.host, "-P", "FORWARD", "DROP") // as Docker does
	ipt(t, w.host, "-P", "INPUT", "DROP")   // as ufw does
	ipt(t, w.host, "-A", "FORWARD", "-i", "lan0", "-j", "ACCEPT")
	f, err := New(w.cfg)
	if err != nil {
		t.Fatal(err)
	}
	// banger's tables alone: iptables' policy still drops.
	w.do(t, func() error {
		c, _ := nftables.New()
		f.build(c, true)
		return c.Flush()
	})
	w.do(t, func() error { return f.AddVM(w.vmA) })
	blocked(t, w.a, "", at(outAddr))

	w.do(t, f.Ensure)
	w.do(t, f.Ensure) // no duplicates
	reach(t, w.a, "", at(outAddr))
	reach(t, w.a, "", "10.77.0.1:53")
	blocked(t, w.a, "", at("10.77.0.1")) // banger's input filter still applies
	wantFwd := "-P FORWARD DROP\n-A FORWARD -i banger0 -j ACCEPT\n-A FORWARD -o banger0 -j ACCEPT\n-A FORWARD -i lan0 -j ACCEPT\n"
	if got := ipt(t, w.host, "-S", "FORWARD"); got != wantFwd {
		t.Fatalf("iptables -S FORWARD:\n%s\nwant:\n%s", got, wantFwd)
	}
	if got, want := ipt(t, w.host, "-S", "INPUT"), "-P INPUT DROP\n-A INPUT -i banger0 -j ACCEPT\n"; got != want {
		t.Fatalf("iptables -S INPUT:\n%s\nwant:\n%s", got, want)
	}
	w.do(t, f.Teardown)
	if got, want := ipt(t, w.host, "-S", "FORWARD"), "-P FORWARD DROP\n-A FORWARD -i lan0 -j ACCEPT\n"; got != want {
		t.Fatalf("after Teardown, iptables -S FORWARD:\n%s\nwant:\n%s", got, want)
	}
	if got, want := ipt(t, w.host, "-S", "INPUT"), "-P INPUT DROP\n"; got != want {
		t.Fatalf("after Teardown, iptables -S INPUT:\n%s\nwant:\n%s", got, want)
	}
	w.do(t, func() error { assertNoBanger(t); return nil })
}

func TestDockerUser(t *testing.T) {
	w := newWorld(t)
	ipt(t, w.host, "-N", "DOCKER-USER")
	ipt(t, w.host, "-A", "DOCKER-USER", "-j", "RETURN")
	ipt(t, w.host, "-A", "FORWARD", "-j", "DOCKER-USER")
	ipt(t, w.host, "-P", "FORWARD", "DROP")
	before := ipt(t, w.host, "-S", "FORWARD")
	f := w.newFirewall(t, w.cfg)
	w.do(t, f.Ensure)
	w.do(t, func() error { return f.AddVM(w.vmA) })
	reach(t, w.a, "", at(outAddr))
	if got := ipt(t, w.host, "-S", "FORWARD"); got != before {
		t.Fatalf("iptables -S FORWARD changed:\n%s\nwas:\n%s", got, before)
	}
	want := "-N DOCKER-USER\n-A DOCKER-USER -i banger0 -j ACCEPT\n-A DOCKER-USER -o banger0 -j ACCEPT\n-A DOCKER-USER -j RETURN\n"
	if got := ipt(t, w.host, "-S", "DOCKER-USER"); got != want {
		t.Fatalf("iptables -S DOCKER-USER:\n%s\nwant:\n%s", got, want)
	}
	w.do(t, f.Teardown)
	if got, want := ipt(t, w.host, "-S", "DOCKER-USER"), "-N DOCKER-USER\n-A DOCKER-USER -j RETURN\n"; got != want {
		t.Fatalf("after Teardown, iptables -S DOCKER-USER:\n%s\nwant:\n%s", got, want)
	}
	w.do(t, func() error { assertNoBanger(t); return nil })
}

func TestConflicts(t *testing.T) {
	needTools(t, "ip", "nft", "iptables-nft")
	ns := netns.New(t, "fwk")
	root := t.TempDir()
	for _, d := range []string{"proc/net", "etc/ufw"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(root, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	write(ipTablesNames, "")
	write(ufwConf, "# comment\nENABLED=no\n")
	if err := ns.Do(func() error { got = conflicts(root, "brx0"); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 0 {
		t.Fatalf("conflicts on a clean host: %q", got)
	}
	write(ipTablesNames, "filter\nnat\n")
	write(ufwConf, "ENABLED=yes\nLOGLEVEL=low\n")
	if err := ns.Do(func() error { got = conflicts(root, "brx0"); return nil }); err != nil {
		t.Fatal(err)
	}
	ns.Run(t, "nft", "add table inet firewalld")
	if err := ns.Do(func() error { got = conflicts(root, "brx0"); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || !strings.HasPrefix(got[0], "firewalld is active") || !strings.Contains(got[1], "iptables-legacy tables are loaded (filter, nat)") || !strings.HasPrefix(got[2], "ufw is active") {
		t.Fatalf("conflicts = %q, want firewalld, iptables-legacy and ufw", got)
	}
	for _, c := range got {
		if !strings.Contains(c, "brx0") || strings.Contains(c, "banger0") {
			t.Errorf("conflict %q: want its fix to name the configured bridge brx0", c)
		}
	}
	ns.Run(t, "nft", "delete table inet firewalld")

	if err := ns.Do(func() error { got = Neighbours(); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 0 {
		t.Fatalf("neighbours in an empty namespace: %q", got)
	}
	ipt(t, ns, "-N", "DOCKER-USER")
	ns.Run(t, "nft", "add table ip libvirt_network")
	ns.Run(t, "nft", "add chain ip libvirt_network forward")
	if err := ns.Do(func() error { got = Neighbours(); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !strings.HasPrefix(got[0], "Docker") || !strings.HasPrefix(got[1], "libvirt") {
		t.Fatalf("neighbours = %q, want Docker and libvirt", got)
	}
}

// sendARP sends, from ns's eth0, a broadcast ARP request from mac claiming
// sender address spa, asking for tpa.
func sendARP(t *testing.T, ns *netns.NS, mac net.HardwareAddr, spa, tpa netip.Addr) {
	t.Helper()
	if err := ns.Do(func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ARP)))
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		s, d := spa.As4(), tpa.As4()
		frame := slices.Concat([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, mac, []byte{0x08, 0x06},
			[]byte{0, 1, 8, 0, 6, 4, 0, 1}, mac, s[:], make([]byte, 6), d[:])
		return unix.Sendto(fd, frame, 0, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: ifi.Index, Halen: 6})
	}); err != nil {
		t.Fatalf("send ARP from %s: %v", ns.Name, err)
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// waitNeigh waits (at most 2 s) for ns to map ip to mac.
func waitNeigh(t *testing.T, ns *netns.NS, ip netip.Addr, mac net.HardwareAddr) bool {
	t.Helper()
	for range 20 {
		if strings.Contains(ns.Run(t, "ip", "neigh", "show", ip.String()), mac.String()) {
			return true
		}
		time.Sleep(100 * time.Millisecond)
	}
	return false
}

// sendBroadcast sends "from SPORT" from 0.0.0.0:sport to
// 255.255.255.255:67 out of ns's eth0 (which must have no IPv4 address).
func sendBroadcast(t *testing.T, ns *netns.NS, sport int) {
	t.Helper()
	if err := ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BROADCAST, 1); err != nil {
			return err
		}
		if err := unix.BindToDevice(fd, "eth0"); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: sport}); err != nil {
			return err
		}
		return unix.Sendto(fd, []byte(fmt.Sprintf("from %d", sport)), 0, &unix.SockaddrInet4{Port: 67, Addr: [4]byte{255, 255, 255, 255}})
	}); err != nil {
		t.Fatalf("send a broadcast from %s: %v", ns.Name, err)
	}
}

// TestEnsureReplacesOldLayout: tables whose base chains can't be updated in
// place (another priority) are replaced.
func TestEnsureReplacesOldLayout(t *testing.T) {
	needTools(t, "ip", "nft")
	ns := netns.New(t, "fwr")
	ns.Run(t, "nft", "add table inet banger")
	ns.Run(t, "nft", "add chain inet banger input { type filter hook input priority 10; policy accept; }")
	ns.Run(t, "nft", "add chain inet banger stale")
	f, err := New(Config{Bridge: "banger0", Subnet: netip.MustParsePrefix("10.77.0.0/24"), Gateway: netip.MustParseAddr("10.77.0.1")})
	if err != nil {
		t.Fatal(err)
	}
	ensure := func() bool {
		t.Helper()
		var fresh bool
		if err := ns.Do(func() (err error) { fresh, err = f.EnsureFresh(); return err }); err != nil {
			t.Fatal(err)
		}
		return fresh
	}
	if !ensure() {
		t.Error("EnsureFresh replaced an old layout and reported the per-VM rules kept")
	}
	if ensure() {
		t.Error("EnsureFresh on its own tables reported them fresh")
	}
	out := ns.Run(t, "nft", "list", "table", "inet", "banger")
	if !strings.Contains(out, "type filter hook input priority filter;") || strings.Contains(out, "stale") {
		t.Fatalf("old table not replaced:\n%s", out)
	}
}
