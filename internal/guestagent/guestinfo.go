package guestagent

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/binary"
	"encoding/hex"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
)

// guestReport fills the fields of agentproto.Info about the guest's
// network and SSH service (since protocol 1.3).
type guestReport struct {
	root    guestRoot
	network *agentproto.NetworkConfig
	// netErr is what init reported when it applied network.
	netErr string
	// agentKey is the agent's own SSH host public key, which its SSH
	// server presents on ChanSSH when no sshd listens.
	agentKey string
	// networkHook replaces networkState (Hooks.Network).
	networkHook func() *agentproto.NetworkState
	// listeningHook replaces listeningPorts (Hooks.Listening).
	listeningHook func() []agentproto.PortListen
}

func newGuestReport(cfg agentproto.Config, hostKey ssh.PublicKey, hooks Hooks) guestReport {
	g := guestReport{root: guestRoot{dir: "/"}, network: cfg.Network, netErr: hooks.NetworkError, networkHook: hooks.Network, listeningHook: hooks.Listening}
	if hostKey != nil {
		g.agentKey = string(bytes.TrimSpace(ssh.MarshalAuthorizedKey(hostKey)))
	}
	return g
}

// fill sets Info.Network, Info.SSHHostKeys, Info.SSHD and Info.Listening.
func (g guestReport) fill(inf *agentproto.Info) {
	if g.networkHook != nil {
		inf.Network = g.networkHook()
	} else {
		inf.Network = networkState(g.network, g.netErr)
	}
	if g.root.sshdInstalled() {
		inf.SSHHostKeys = g.root.sshdHostKeys()
	}
	if g.agentKey != "" {
		inf.SSHHostKeys = append(inf.SSHHostKeys, g.agentKey)
	}
	inf.SSHD = listeningTCP(g.root.path("/proc/net/tcp"), 22) || listeningTCP(g.root.path("/proc/net/tcp6"), 22)
	if g.listeningHook != nil {
		inf.Listening = g.listeningHook()
	} else {
		inf.Listening = listeningPorts(g.root.path("/proc/net/tcp"), g.root.path("/proc/net/tcp6"))
	}
}

// listeningPorts reads the listening TCP sockets of /proc/net/tcp and
// tcp6 tables (in that order) that can be reached from outside the guest:
// those bound to a loopback address are left out. One socket per port:
// the first one read (IPv4 before IPv6). Sorted by port, at most
// agentproto.MaxListening. A table that can't be read counts as empty.
func listeningPorts(tables ...string) []agentproto.PortListen {
	seen := map[uint16]bool{}
	var out []agentproto.PortListen
	for _, table := range tables {
		f, err := os.Open(table)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // header
		for sc.Scan() && len(out) < agentproto.MaxListening {
			fields := strings.Fields(sc.Text())
			if len(fields) < 4 || fields[3] != "0A" { // TCP_LISTEN
				continue
			}
			addr, port, ok := parseProcNetAddr(fields[1])
			if !ok || port == 0 || addr.IsLoopback() || seen[port] {
				continue
			}
			seen[port] = true
			out = append(out, agentproto.PortListen{Proto: "tcp", Addr: addr.String(), Port: port})
		}
		f.Close()
	}
	slices.SortFunc(out, func(a, b agentproto.PortListen) int { return cmp.Compare(a.Port, b.Port) })
	return out
}

// listeningTCP tells whether a socket listens on port such that a
// connection to 127.0.0.1:port reaches it, from a /proc/net/tcp or tcp6
// table: it looks at the kernel's socket table rather than connecting (a
// connection to sshd costs the guest a process, and the host asks for
// info every 100 ms during a boot). IPv6 sockets count when they listen on
// :: (systemd's socket for ssh.socket accepts IPv4 too; sshd's own IPv6
// sockets are v6-only but come with an IPv4 one).
func listeningTCP(table string, port uint16) bool {
	f, err := os.Open(table)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 || fields[3] != "0A" { // TCP_LISTEN
			continue
		}
		addr, p, ok := parseProcNetAddr(fields[1])
		if !ok || p != port {
			continue
		}
		if addr.IsUnspecified() || addr == netip.AddrFrom4([4]byte{127, 0, 0, 1}) {
			return true
		}
	}
	return false
}

// parseProcNetAddr parses "0100007F:0016" (IPv4) or 32 hex digits and a
// port (IPv6): the address as 32-bit words in host byte order, the port
// in hex.
func parseProcNetAddr(s string) (netip.Addr, uint16, bool) {
	h, ps, ok := strings.Cut(s, ":")
	if !ok {
		return netip.Addr{}, 0, false
	}
	port, err := strconv.ParseUint(ps, 16, 16)
	if err != nil {
		return netip.Addr{}, 0, false
	}
	raw, err := hex.DecodeString(h)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.Addr{}, 0, false
	}
	b := make([]byte, len(raw))
	for i := 0; i < len(raw); i += 4 {
		binary.BigEndian.PutUint32(b[i:], binary.NativeEndian.Uint32(raw[i:]))
	}
	addr, _ := netip.AddrFromSlice(b)
	return addr.Unmap(), uint16(port), true
}
