package portfwd

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/testenv/netns"
)

func TestParse(t *testing.T) {
	lo := netip.MustParseAddr("127.0.0.1")
	for _, c := range []struct {
		spec string
		want []Rule
	}{
		{"8080:80", []Rule{{TCP, lo, 8080, 80}}},
		{"8080:80/tcp", []Rule{{TCP, lo, 8080, 80}}},
		{"5353:53/UDP", []Rule{{UDP, lo, 5353, 53}}},
		{"0.0.0.0:8080:80", []Rule{{TCP, netip.MustParseAddr("0.0.0.0"), 8080, 80}}},
		{"[::1]:8080:80/udp", []Rule{{UDP, netip.MustParseAddr("::1"), 8080, 80}}},
		{"8000-8002:9000-9002", []Rule{{TCP, lo, 8000, 9000}, {TCP, lo, 8001, 9001}, {TCP, lo, 8002, 9002}}},
	} {
		got, err := Parse(c.spec)
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("Parse(%q) = %v, %v; want %v", c.spec, got, err, c.want)
		}
	}
	for _, c := range []struct{ spec, part string }{
		{"", "no guest port"},
		{"8080", "no guest port"},
		{"8080:", "guest port: empty"},
		{":80", "host port: empty"},
		{"8080:80/sctp", `"sctp"`},
		{"x:80", `"x" is not a port`},
		{"0:80", `"0" is not a port`},
		{"70000:80", `"70000" is not a port`},
		{"8080:+80", `"+80" is not a port`},
		{"8002-8000:80-82", "ends before it starts"},
		{"8000-8002:80", "different lengths"},
		{"8000:80-82", "different lengths"},
		{"1-2000:1-2000", "at most 1024"},
		{"300.1.1.1:8080:80", `"300.1.1.1"`},
		{"::1:8080:80", "too many ':'"},
		{"[::1:8080:80", "no ']'"},
		{"[10.0.0.1]:8080:80", "not an IPv6"},
		{"[::1]8080:80", "no ':' after"},
		{"[::1]:8080", "no guest port"},
		{"[fe80::1%eth0]:8080:80", "not an IPv6"},
	} {
		_, err := Parse(c.spec)
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), c.part) || !strings.Contains(err.Error(), "HOSTPORT") {
			t.Errorf("Parse(%q) = %v, want an invalid error naming %s", c.spec, err, c.part)
		}
	}
}

func mustParse(t *testing.T, specs ...string) []Rule {
	t.Helper()
	var rules []Rule
	for _, s := range specs {
		r, err := Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		rules = append(rules, r...)
	}
	return rules
}

func TestCheck(t *testing.T) {
	if !netns.InChild() {
		netns.New(t, "bgpfc").RunTest(t)
		return
	}
	if err := Check(mustParse(t, "18000-18003:80-83", "18000:80/udp", "[::1]:18000:80"), 1000); err != nil {
		t.Fatalf("free ports: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:18001")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	err = Check(mustParse(t, "18000-18003:80-83"), 0)
	if !errors.Is(err, errdefs.ErrAlreadyExists) || !strings.Contains(err.Error(), "127.0.0.1:18001/tcp") {
		t.Fatalf("a taken port: %v", err)
	}
	// The same port over UDP is another port.
	if err := Check(mustParse(t, "18001:80/udp"), 0); err != nil {
		t.Fatal(err)
	}
	err = Check(mustParse(t, "80:80"), 1000)
	if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "port 80 is privileged") {
		t.Fatalf("a privileged port for a user: %v", err)
	}
	if err := Check(mustParse(t, "80:80"), 0); err != nil {
		t.Fatalf("a privileged port for root: %v", err)
	}
	for _, dup := range [][]string{{"18010:80", "18010:81"}, {"0.0.0.0:18010:80", "18010:81"}, {"18009-18011:80-82", "18011:90"}} {
		err := Check(mustParse(t, dup...), 0)
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "forwarded twice") {
			t.Errorf("Check(%v) = %v, want a duplicate", dup, err)
		}
	}
	if err := Check(mustParse(t, "18010:80", "18010:80/udp", "127.0.0.2:18010:80"), 0); err != nil {
		t.Errorf("distinct protocols and addresses: %v", err)
	}
	if err := Check(mustParse(t, "192.0.2.99:18010:80"), 0); !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "not an address of this host") {
		t.Errorf("an address not on the host: %v", err)
	}
}

// guestAddr stands for the VM: an address on the namespace's loopback.
const guestAddr = "192.0.2.10"

func TestProxy(t *testing.T) {
	if !netns.InChild() {
		ns := netns.New(t, "bgpf")
		ns.Run(t, "ip", "addr", "add", guestAddr+"/32", "dev", "lo")
		ns.RunTest(t)
		return
	}
	guest := netip.MustParseAddr(guestAddr)
	tcpEcho(t, guestAddr+":9000")
	udpEcho(t, guestAddr+":9001")

	p := NewProxy(slog.New(slog.NewTextHandler(os.Stderr, nil)))
	p.UDPIdle = 300 * time.Millisecond
	if err := p.Start("vm1", guest, mustParse(t, "18000:9000", "18001:9001/udp")); err != nil {
		t.Fatal(err)
	}
	defer p.Stop("vm1")
	if err := p.Start("vm1", guest, nil); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("second start: %v", err)
	}

	// TCP, with a half-close: the echo server sees the end of our data
	// and ends its own.
	c, err := net.Dial("tcp", "127.0.0.1:18000")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	data := make([]byte, 4<<20)
	_, _ = rand.Read(data)
	go func() {
		_, _ = c.Write(data)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("tcp echo through the proxy: %d of %d bytes back, equal %v, %v", len(got), len(data), bytes.Equal(got, data), err)
	}

	// UDP, two clients: two flows, each gets its own answers; idle flows end.
	for _, msg := range []string{"one", "two"} {
		u, err := net.Dial("udp", "127.0.0.1:18001")
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		_ = u.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := u.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 100)
		n, err := u.Read(b)
		if err != nil || string(b[:n]) != "echo "+msg {
			t.Fatalf("udp %s: %q, %v", msg, b[:n], err)
		}
	}
	if n := p.udpFlows.Load(); n != 2 {
		t.Fatalf("udp flows = %d, want 2", n)
	}
	waitFor(t, "idle udp flows to end", func() bool { return p.udpFlows.Load() == 0 })

	// All or none: vm2's second rule takes vm1's port, so its first isn't kept.
	err = p.Start("vm2", guest, mustParse(t, "18002:9000", "18000:9000"))
	if !errors.Is(err, errdefs.ErrAlreadyExists) || !strings.Contains(err.Error(), "18000") {
		t.Fatalf("start over a taken port: %v", err)
	}
	if err := Check(mustParse(t, "18002:9000"), 0); err != nil {
		t.Fatalf("a failed start kept a port: %v", err)
	}
	if got := p.Running(); !slices.Equal(got, []string{"vm1"}) {
		t.Fatalf("Running = %v", got)
	}

	// Stop ends open connections and frees the ports.
	open, err := net.Dial("tcp", "127.0.0.1:18000")
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	if _, err := open.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	_ = open.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(open, b); err != nil {
		t.Fatal(err)
	}
	p.Stop("vm1")
	if _, err := open.Read(b); err == nil {
		t.Fatal("a connection survived Stop")
	} else if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection not closed by Stop: %v", err)
	}
	if err := Check(mustParse(t, "18000:9000", "18001:9001/udp"), 0); err != nil {
		t.Fatalf("ports kept after Stop: %v", err)
	}
	if got := p.Running(); len(got) != 0 {
		t.Fatalf("Running after Stop = %v", got)
	}
	p.Stop("vm1") // again: no-op
}

// tcpEcho serves an echo that half-closes after the client did.
func tcpEcho(t *testing.T, addr string) {
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
				_, _ = io.Copy(c, c)
				_ = c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
}

// udpEcho answers each datagram with "echo " and the datagram.
func udpEcho(t *testing.T, addr string) {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		b := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(append([]byte("echo "), b[:n]...), from)
		}
	}()
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// A taken port: at create (Check) the user picks another; at a VM's start
// (Proxy.Start, CheckFree) the port is the VM's own, fixed at create.
func TestTakenPortMessages(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r := Rule{Proto: TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: l.Addr().(*net.TCPAddr).Port, GuestPort: 80}
	if err := Check([]Rule{r}, 0); !errors.Is(err, errdefs.ErrAlreadyExists) || !strings.Contains(err.Error(), "pick another host port") {
		t.Errorf("Check: %v", err)
	}
	p := NewProxy(slog.New(slog.NewTextHandler(io.Discard, nil)))
	for name, err := range map[string]error{
		"CheckFree":   CheckFree([]Rule{r}),
		"Proxy.Start": p.Start("vm1", netip.MustParseAddr("10.77.0.2"), []Rule{r}),
	} {
		if !errors.Is(err, errdefs.ErrAlreadyExists) || !strings.Contains(err.Error(), TakenAtStart) || strings.Contains(err.Error(), "pick another") {
			t.Errorf("%s: %v, want %q", name, err, TakenAtStart)
		}
	}
}
