package bridgenet

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/errdefs"
)

// maxNameLen is the longest name a link can have (IFNAMSIZ less the NUL).
const maxNameLen = unix.IFNAMSIZ - 1

// TAPPrefix starts the name of every TAP device banger makes.
const TAPPrefix = "bg-"

// procSys is where sysctl files are; a variable only for the tests of
// errors on them.
var procSys = "/proc/sys"

// Bridge is the bridge the VMs are attached to.
type Bridge struct {
	Name string
	// Gateway is the bridge's address and the VMs' subnet, e.g.
	// 10.77.0.1/24.
	Gateway netip.Prefix
	// MTU of the bridge; 0 leaves the bridge's as it is (1500 when made).
	MTU int
}

// ValidName checks that name can name a link: 1 to 15 bytes, no '/', no
// whitespace or ':', not "." or "..".
func ValidName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("link name is empty: %w", errdefs.ErrInvalid)
	case len(name) > maxNameLen:
		return fmt.Errorf("link name %q is %d bytes long, the kernel allows at most %d: %w", name, len(name), maxNameLen, errdefs.ErrInvalid)
	case name == "." || name == "..", strings.ContainsAny(name, "/: \t\n\r\v\f"):
		return fmt.Errorf("link name %q is not valid (no '/', ':' or spaces, not . or ..): %w", name, errdefs.ErrInvalid)
	}
	return nil
}

// TAPName is the name of a VM's TAP device: "bg-" and the first 12
// characters of its id (15 bytes, the kernel's limit).
func TAPName(vmID string) string {
	return TAPPrefix + vmID[:min(len(vmID), 12)]
}

// MAC is a VM's stable MAC address: 02 (locally administered, unicast) and
// the first 5 bytes of the sha256 of its id.
func MAC(vmID string) net.HardwareAddr {
	sum := sha256.Sum256([]byte(vmID))
	return net.HardwareAddr{0x02, sum[0], sum[1], sum[2], sum[3], sum[4]}
}

// BridgeMAC is the fixed MAC address EnsureBridge gives the bridge name:
// 02 and 5 bytes of the sha256 of "bridge:" and its name.
func BridgeMAC(name string) net.HardwareAddr {
	return MAC("bridge:" + name)
}

// EnsureBridge makes the bridge b, or adopts the one that exists with its
// name: it sets its MTU, its MAC (BridgeMAC), replaces any other IPv4 address on it with
// b.Gateway, disables IPv6 on it and brings it up. It is idempotent. A link
// with the name that is not a bridge is an error (errdefs.ErrFailedPrecondition).
func EnsureBridge(b Bridge) error {
	if err := ValidName(b.Name); err != nil {
		return fmt.Errorf("bridge: %w", err)
	}
	gw := b.Gateway
	if !gw.IsValid() || !gw.Addr().Is4() || gw.Bits() < 1 || gw.Bits() > 30 {
		return fmt.Errorf("bridge %s: gateway %s must be an IPv4 address with a prefix length of 1 to 30 (e.g. 10.77.0.1/24): %w", b.Name, gw, errdefs.ErrInvalid)
	}
	if gw.Addr() == gw.Masked().Addr() {
		return fmt.Errorf("bridge %s: gateway %s is the subnet's network address, not a host address: %w", b.Name, gw, errdefs.ErrInvalid)
	}
	if b.MTU < 0 || b.MTU > 65535 || (b.MTU != 0 && b.MTU < 576) {
		return fmt.Errorf("bridge %s: mtu %d out of range (576 to 65535): %w", b.Name, b.MTU, errdefs.ErrInvalid)
	}
	link, err := netlink.LinkByName(b.Name)
	if errors.As(err, new(netlink.LinkNotFoundError)) {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = b.Name
		if b.MTU != 0 {
			attrs.MTU = b.MTU
		}
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("create bridge %s: %w", b.Name, err)
		}
		link, err = netlink.LinkByName(b.Name)
	}
	if err != nil {
		return fmt.Errorf("find bridge %s: %w", b.Name, err)
	}
	if link.Type() != "bridge" {
		return fmt.Errorf("link %s exists and is a %s, not a bridge: set another bridge_name or remove it: %w", b.Name, link.Type(), errdefs.ErrFailedPrecondition)
	}
	if b.MTU != 0 && link.Attrs().MTU != b.MTU {
		if err := netlink.LinkSetMTU(link, b.MTU); err != nil {
			return fmt.Errorf("set mtu %d of bridge %s: %w", b.MTU, b.Name, err)
		}
	}
	// A bridge without a MAC of its own takes its ports' lowest, which
	// changes as VMs come and go and leaves stale gateway entries in the
	// guests' ARP caches: give it a fixed one.
	if mac := BridgeMAC(b.Name); !bytes.Equal(link.Attrs().HardwareAddr, mac) {
		if err := netlink.LinkSetHardwareAddr(link, mac); err != nil {
			return fmt.Errorf("set mac %s of bridge %s: %w", mac, b.Name, err)
		}
	}
	if err := disableIPv6(b.Name); err != nil {
		return fmt.Errorf("bridge %s: %w", b.Name, err)
	}
	if err := setAddress(link, gw); err != nil {
		return fmt.Errorf("bridge %s: %w", b.Name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring bridge %s up: %w", b.Name, err)
	}
	return nil
}

// setAddress makes want the only IPv4 address of link.
func setAddress(link netlink.Link, want netip.Prefix) error {
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses: %w", err)
	}
	have := false
	for _, a := range addrs {
		p, ok := prefixOf(a.IPNet)
		if ok && p == want {
			have = true
			continue
		}
		if err := netlink.AddrDel(link, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("remove address %s: %w", a.IPNet, err)
		}
	}
	if have {
		return nil
	}
	ipnet := &net.IPNet{IP: want.Addr().AsSlice(), Mask: net.CIDRMask(want.Bits(), 32)}
	if err := netlink.AddrReplace(link, &netlink.Addr{IPNet: ipnet}); err != nil {
		return fmt.Errorf("set address %s: %w", want, err)
	}
	return nil
}

// prefixOf converts an IPv4 address and its mask.
func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// disableIPv6 turns IPv6 off on a link. A kernel without IPv6 has no
// such file: nothing to do.
func disableIPv6(name string) error {
	p := filepath.Join(procSys, "net/ipv6/conf", name, "disable_ipv6")
	err := os.WriteFile(p, []byte("1\n"), 0o644)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("disable ipv6: %w", err)
	}
	return nil
}

// DeleteLink removes the link name; a link that doesn't exist is no error.
func DeleteLink(name string) error {
	if err := ValidName(name); err != nil {
		return err
	}
	link, err := netlink.LinkByName(name)
	if errors.As(err, new(netlink.LinkNotFoundError)) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if err := netlink.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete link %s: %w", name, err)
	}
	return nil
}

// IsTAPName reports whether name has TAPName's form: TAPPrefix and 12
// lowercase hex digits (a VM id's start).
func IsTAPName(name string) bool {
	rest, ok := strings.CutPrefix(name, TAPPrefix)
	if !ok || len(rest) != 12 {
		return false
	}
	for _, c := range rest {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// TAPs returns the names of the TUN/TAP links named like banger's TAPs
// (IsTAPName), sorted: what a sweep of stale TAPs may remove. Another
// kind of link (a veth, a bridge) with such a name is not banger's.
func TAPs() ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var names []string
	for _, l := range links {
		if l.Type() == "tuntap" && IsTAPName(l.Attrs().Name) {
			names = append(names, l.Attrs().Name)
		}
	}
	slices.Sort(names)
	return names, nil
}

// Links returns the names of the links that start with prefix, sorted.
func Links(prefix string) ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var names []string
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, prefix) {
			names = append(names, l.Attrs().Name)
		}
	}
	slices.Sort(names)
	return names, nil
}

// EnableIPv4Forwarding turns IPv4 forwarding on if it is off, and reports
// whether it changed it.
func EnableIPv4Forwarding() (bool, error) {
	p := filepath.Join(procSys, "net/ipv4/ip_forward")
	b, err := os.ReadFile(p)
	if err != nil {
		return false, fmt.Errorf("read ipv4 forwarding: %w", err)
	}
	if strings.TrimSpace(string(b)) != "0" {
		return false, nil
	}
	if err := os.WriteFile(p, []byte("1\n"), 0o644); err != nil {
		return false, fmt.Errorf("enable ipv4 forwarding: %w", err)
	}
	return true, nil
}

// RouteConflicts returns the destinations of the IPv4 routes (every
// routing table but the local one; default routes aside) that overlap
// subnet, except routes through ownBridge: a subnet with conflicts would
// make VMs unreachable or hide hosts. Sorted, without duplicates.
func RouteConflicts(subnet netip.Prefix, ownBridge string) ([]netip.Prefix, error) {
	if !subnet.IsValid() || !subnet.Addr().Is4() {
		return nil, fmt.Errorf("subnet %s is not an IPv4 prefix: %w", subnet, errdefs.ErrInvalid)
	}
	subnet = subnet.Masked()
	own := ownIndex(ownBridge)
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	var out []netip.Prefix
	for _, r := range routes {
		if r.Table == unix.RT_TABLE_LOCAL {
			continue
		}
		p, ok := prefixOf(r.Dst)
		if !ok || p.Bits() == 0 || !p.Overlaps(subnet) {
			continue
		}
		if own != 0 && routeVia(r, own) {
			continue
		}
		out = append(out, p.Masked())
	}
	return sortPrefixes(out), nil
}

// routeVia reports whether every path of r goes through the link index.
func routeVia(r netlink.Route, index int) bool {
	if len(r.MultiPath) == 0 {
		return r.LinkIndex == index
	}
	for _, p := range r.MultiPath {
		if p.LinkIndex != index {
			return false
		}
	}
	return true
}

// ownIndex is the index of the link name, 0 if there is none.
func ownIndex(name string) int {
	if name == "" {
		return 0
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		return 0
	}
	return l.Attrs().Index
}

// LANPrefixes returns the IPv4 prefixes connected to the host's links
// other than loopback, ownBridge and the ports of ownBridge: the networks a
// VM must not reach unless allowed. Sorted, without duplicates.
func LANPrefixes(ownBridge string) ([]netip.Prefix, error) {
	own := ownIndex(ownBridge)
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var out []netip.Prefix
	for _, l := range links {
		a := l.Attrs()
		if a.Flags&net.FlagLoopback != 0 || (own != 0 && (a.Index == own || a.MasterIndex == own)) {
			continue
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			if errors.Is(err, unix.ENODEV) {
				continue // gone meanwhile
			}
			return nil, fmt.Errorf("list addresses of %s: %w", a.Name, err)
		}
		for _, ad := range addrs {
			if p, ok := prefixOf(ad.IPNet); ok {
				out = append(out, p.Masked())
			}
		}
	}
	return sortPrefixes(out), nil
}

func sortPrefixes(ps []netip.Prefix) []netip.Prefix {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(ps)
}
