package portfwd

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/bangerdev/banger/internal/errdefs"
)

// MaxRange is the most ports one spec may forward.
const MaxRange = 1024

// Protocols of a Rule.
const (
	TCP = "tcp"
	UDP = "udp"
)

// DefaultHostIP is the host address of a spec that names none: forwarded
// ports are only reachable from the host itself unless asked otherwise.
var DefaultHostIP = netip.MustParseAddr("127.0.0.1")

// Rule forwards one host port to one guest port.
type Rule struct {
	Proto     string // TCP or UDP
	HostIP    netip.Addr
	HostPort  int
	GuestPort int
}

// HostAddr is the address the rule listens on.
func (r Rule) HostAddr() netip.AddrPort {
	return netip.AddrPortFrom(r.HostIP, uint16(r.HostPort))
}

func (r Rule) String() string {
	return fmt.Sprintf("%s->%d/%s", r.HostAddr(), r.GuestPort, r.Proto)
}

// Parse reads a port forwarding spec,
// `[HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp]`, into one rule per
// port. The host address defaults to 127.0.0.1 (an IPv6 one is written in
// brackets: `[::1]:8080:80`), the protocol to tcp; a host range and a guest
// range have the same length. Errors (errdefs.ErrInvalid) name the bad part.
func Parse(spec string) ([]Rule, error) {
	bad := func(format string, args ...any) ([]Rule, error) {
		return nil, fmt.Errorf("port forward %q: %s (want [HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp]): %w",
			spec, fmt.Sprintf(format, args...), errdefs.ErrInvalid)
	}
	s, proto := spec, TCP
	if i := strings.LastIndexByte(s, '/'); i >= 0 {
		s, proto = s[:i], strings.ToLower(s[i+1:])
		if proto != TCP && proto != UDP {
			return bad("protocol %q is neither tcp nor udp", spec[i+1:])
		}
	}
	host := DefaultHostIP
	var hostPorts, guestPorts string
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return bad("no ']' closes the host address")
		}
		a, err := netip.ParseAddr(s[1:end])
		if err != nil || !a.Is6() || a.Zone() != "" {
			return bad("host address %q is not an IPv6 address", s[1:end])
		}
		host = a.Unmap()
		rest, ok := strings.CutPrefix(s[end+1:], ":")
		if !ok {
			return bad("no ':' after the host address")
		}
		var ok2 bool
		if hostPorts, guestPorts, ok2 = strings.Cut(rest, ":"); !ok2 {
			return bad("no guest port")
		}
	} else {
		parts := strings.Split(s, ":")
		switch len(parts) {
		case 2:
			hostPorts, guestPorts = parts[0], parts[1]
		case 3:
			a, err := netip.ParseAddr(parts[0])
			if err != nil || !a.Is4() {
				return bad("host address %q is not an IPv4 address (write IPv6 ones in brackets)", parts[0])
			}
			host, hostPorts, guestPorts = a, parts[1], parts[2]
		case 1:
			return bad("no guest port")
		default:
			return bad("too many ':' (write an IPv6 host address in brackets)")
		}
	}
	h0, h1, err := portRange(hostPorts)
	if err != nil {
		return bad("host port: %v", err)
	}
	g0, g1, err := portRange(guestPorts)
	if err != nil {
		return bad("guest port: %v", err)
	}
	if h1-h0 != g1-g0 {
		return bad("host ports %s and guest ports %s are ranges of different lengths", hostPorts, guestPorts)
	}
	if n := h1 - h0 + 1; n > MaxRange {
		return bad("range of %d ports, at most %d", n, MaxRange)
	}
	rules := make([]Rule, 0, h1-h0+1)
	for i := 0; h0+i <= h1; i++ {
		rules = append(rules, Rule{Proto: proto, HostIP: host, HostPort: h0 + i, GuestPort: g0 + i})
	}
	return rules, nil
}

// portRange reads PORT or PORT-END.
func portRange(s string) (int, int, error) {
	a, b, isRange := strings.Cut(s, "-")
	lo, err := port(a)
	if err != nil {
		return 0, 0, err
	}
	if !isRange {
		return lo, lo, nil
	}
	hi, err := port(b)
	if err != nil {
		return 0, 0, err
	}
	if hi < lo {
		return 0, 0, fmt.Errorf("range %s ends before it starts", s)
	}
	return lo, hi, nil
}

func port(s string) (int, error) {
	if s == "" {
		return 0, errors.New("empty")
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 || strings.HasPrefix(s, "+") {
		return 0, fmt.Errorf("%q is not a port number (1 to 65535)", s)
	}
	return n, nil
}

// unprivilegedStart is the file with the lowest port anyone may bind.
var unprivilegedStart = "/proc/sys/net/ipv4/ip_unprivileged_port_start"

// Check tells whether rules can be forwarded for a caller with uid
// callerUID: no two rules take the same host port (errdefs.ErrInvalid), a
// caller who isn't root takes no privileged port (below
// net.ipv4.ip_unprivileged_port_start, usually 1024:
// errdefs.ErrPermissionDenied), and every host port is free now: Check
// binds each and releases it (errdefs.ErrAlreadyExists when taken,
// errdefs.ErrInvalid when the host address isn't one of this host's).
func Check(rules []Rule, callerUID int) error {
	for i, r := range rules {
		if r.Proto != TCP && r.Proto != UDP {
			return fmt.Errorf("port forward %s: protocol %q is neither tcp nor udp: %w", r, r.Proto, errdefs.ErrInvalid)
		}
		if !r.HostIP.IsValid() || r.HostPort < 1 || r.HostPort > 65535 || r.GuestPort < 1 || r.GuestPort > 65535 {
			return fmt.Errorf("port forward %s: bad address or port: %w", r, errdefs.ErrInvalid)
		}
		for _, o := range rules[:i] {
			if o.Proto == r.Proto && o.HostPort == r.HostPort && overlap(o.HostIP, r.HostIP) {
				return fmt.Errorf("host port %s/%s is forwarded twice (%s and %s): %w", r.HostAddr(), r.Proto, o, r, errdefs.ErrInvalid)
			}
		}
	}
	if callerUID != 0 {
		start := privilegedBelow()
		for _, r := range rules {
			if r.HostPort < start {
				return fmt.Errorf("host port %d is privileged (below %d): only root may forward it; pick a port of %d or more: %w",
					r.HostPort, start, start, errdefs.ErrPermissionDenied)
			}
		}
	}
	for _, r := range rules {
		c, err := listen(r, "pick another host port")
		if err != nil {
			return err
		}
		_ = c.Close()
	}
	return nil
}

// TakenAtStart is what to do about a VM's host port taken when it
// starts: its ports were fixed at create.
const TakenAtStart = "the port is fixed for this VM: free it, or recreate the VM with another -p"

// CheckFree checks that the host ports of a VM's recorded forwards are
// free, before a start that binds them elsewhere (QEMU's hostfwd): a
// taken one is errdefs.ErrAlreadyExists, saying what to do
// (TakenAtStart).
func CheckFree(rules []Rule) error {
	for _, r := range rules {
		c, err := listen(r, TakenAtStart)
		if err != nil {
			return err
		}
		_ = c.Close()
	}
	return nil
}

// overlap reports whether two listen addresses share a port space: the
// same address, or one is the unspecified address of the other's family.
func overlap(a, b netip.Addr) bool {
	return a == b || (a.IsUnspecified() && a.Is4() == b.Is4()) || (b.IsUnspecified() && a.Is4() == b.Is4())
}

// privilegedBelow reads the first unprivileged port (1024 if unknown).
func privilegedBelow() int {
	b, err := os.ReadFile(unprivilegedStart)
	if err != nil {
		return 1024
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 1024
	}
	return n
}

// listen binds r's host address, with errors users understand; taken
// says what to do about a port in use.
func listen(r Rule, taken string) (interface{ Close() error }, error) {
	var c interface{ Close() error }
	var err error
	addr := r.HostAddr().String()
	if r.Proto == TCP {
		c, err = net.Listen("tcp", addr)
	} else {
		c, err = net.ListenPacket("udp", addr)
	}
	switch {
	case err == nil:
		return c, nil
	case errors.Is(err, syscall.EADDRINUSE):
		return nil, fmt.Errorf("host port %s/%s is already in use: %s: %w", addr, r.Proto, taken, errdefs.ErrAlreadyExists)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return nil, fmt.Errorf("host address %s is not an address of this host: %w", r.HostIP, errdefs.ErrInvalid)
	case errors.Is(err, syscall.EACCES):
		return nil, fmt.Errorf("host port %s/%s: %w: %w", addr, r.Proto, err, errdefs.ErrPermissionDenied)
	}
	return nil, fmt.Errorf("listen on %s/%s: %w", addr, r.Proto, err)
}
