package guestagent

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"net/netip"
	"os"
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
}

func newGuestReport(cfg agentproto.Config, hostKey ssh.PublicKey, hooks Hooks) guestReport {
	g := guestReport{root: guestRoot{dir: "/"}, network: cfg.Network, netErr: hooks.NetworkError, networkHook: hooks.Network}
	if hostKey != nil {
		g.agentKey = string(bytes.TrimSpace(ssh.MarshalAuthorizedKey(hostKey)))
	}
	return g
}

// fill sets Info.Network, Info.SSHHostKeys and Info.SSHD.
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
