package doctor

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// The bridged networking checks: TUN, the bridge, nftables, IPv4
// forwarding, firewall conflicts, the subnet against the host's routes.
// (The user's side of SSH is checked by the CLI: cli.sshChecks.)

const userMode = `or use QEMU's user networking: network = "user" in bangerd.toml`

// checkTUN checks that /dev/net/tun opens (TAP devices come from it).
func (r runner) checkTUN() Check {
	c := Check{Name: "TUN/TAP"}
	p := filepath.Join(r.opts.DevRoot, "dev/net/tun")
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	switch {
	case errors.Is(err, os.ErrNotExist):
		c.Status, c.Detail = Warn, "/dev/net/tun absent: bridged VMs (TAP devices) can't start"
		c.Fix = "load the tun module: sudo modprobe tun, " + userMode
	case errors.Is(err, os.ErrPermission):
		c.Status, c.Detail = Warn, "/dev/net/tun can't be opened by this user: bangerd needs root for bridged VMs"
		c.Fix = "run bangerd (and banger doctor) as root, " + userMode
	case err != nil:
		c.Status, c.Detail = Warn, fmt.Sprintf("open /dev/net/tun: %v: bridged VMs can't start", err)
		c.Fix = "check the tun module (sudo modprobe tun), " + userMode
	default:
		f.Close()
		c.Status, c.Detail = OK, "/dev/net/tun opens"
	}
	return c
}

// checkBridge checks the kernel's bridge support: banger's bridge exists
// (and is a bridge), or the bridge module is loaded, built in or
// installed (the kernel loads it when bangerd makes the bridge).
func (r runner) checkBridge() Check {
	c := Check{Name: "bridge"}
	root, br := r.opts.DevRoot, r.opts.Bridge
	if _, err := os.Stat(filepath.Join(root, "sys/class/net", br)); err == nil {
		if _, err := os.Stat(filepath.Join(root, "sys/class/net", br, "bridge")); err != nil {
			c.Status, c.Detail = Fail, br+" exists and is not a bridge"
			c.Fix = "set bridge_name in bangerd.toml to a name no other link has"
			return c
		}
		c.Status, c.Detail = OK, br+" exists"
		return c
	}
	if _, err := os.Stat(filepath.Join(root, "sys/module/bridge")); err == nil {
		c.Status, c.Detail = OK, "the kernel has bridge support; bangerd makes "+br+" when a bridged VM starts"
		return c
	}
	var u unix.Utsname
	if err := r.uname(&u); err == nil {
		dir := filepath.Join(root, "lib/modules", unix.ByteSliceToString(u.Release[:]))
		for _, f := range []string{"modules.builtin", "modules.dep"} {
			if b, err := os.ReadFile(filepath.Join(dir, f)); err == nil && strings.Contains(string(b), "/bridge.ko") {
				c.Status, c.Detail = OK, "the bridge module is installed (loaded when bangerd makes "+br+")"
				return c
			}
		}
	}
	c.Status, c.Detail = Warn, "no bridge support found (no "+br+", bridge module neither loaded nor installed): bridged VMs can't start"
	c.Fix = "install your kernel's modules and run sudo modprobe bridge, " + userMode
	return c
}

// permissionError reports an error of a caller without CAP_NET_ADMIN.
func permissionError(err error) bool {
	return errors.Is(err, os.ErrPermission) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES)
}

const asRoot = "run it as root: sudo banger doctor"

// checkNftables checks that nf_tables answers a netlink query.
func (r runner) checkNftables(probe error) Check {
	c := Check{Name: "nftables"}
	switch {
	case probe == nil:
		c.Status, c.Detail = OK, "nf_tables answers netlink queries"
	case permissionError(probe):
		c.Status, c.Detail = Warn, "can't query nf_tables as this user: "+probe.Error()
		c.Fix = asRoot
	default:
		c.Status, c.Detail = Fail, "nf_tables unavailable: "+probe.Error()+": bridged VMs can't get NAT or isolation"
		c.Fix = "use a kernel with nf_tables (CONFIG_NF_TABLES, CONFIG_NFT_MASQ, CONFIG_NFT_CT, CONFIG_NF_TABLES_BRIDGE), " + userMode
	}
	return c
}

// checkFirewall reports what may break banger's network rules, and the
// other firewall users banger coexists with.
func (r runner) checkFirewall(probe error) Check {
	c := Check{Name: "firewall"}
	if probe != nil {
		c.Status, c.Detail = Warn, "not checked: nf_tables can't be queried (see nftables)"
		c.Fix = asRoot
		if !permissionError(probe) {
			c.Fix = "see the nftables check"
		}
		return c
	}
	if conflicts := r.conflicts(r.opts.Bridge); len(conflicts) > 0 {
		c.Status, c.Detail = Warn, strings.Join(conflicts, "; ")
		c.Fix = "see the detail, and docs/security.md (Network isolation)"
		return c
	}
	c.Status, c.Detail = OK, "no conflicting firewall"
	if n := r.neighbours(); len(n) > 0 {
		c.Detail += "; " + strings.Join(n, "; ")
	}
	return c
}

// checkForwarding reports IPv4 forwarding (information: bangerd enables
// it when a bridged VM starts).
func (r runner) checkForwarding() Check {
	c := Check{Name: "IPv4 forwarding", Status: OK}
	b, err := os.ReadFile(filepath.Join(r.opts.DevRoot, "proc/sys/net/ipv4/ip_forward"))
	switch v := strings.TrimSpace(string(b)); {
	case err != nil:
		c.Detail = fmt.Sprintf("unknown (%v); bangerd enables it when a bridged VM starts", err)
	case v == "1":
		c.Detail = "enabled"
	default:
		c.Detail = "disabled; bangerd enables it when a bridged VM starts (net.ipv4.ip_forward = 1)"
	}
	return c
}

// checkSubnet checks that no host route overlaps banger's subnet (other
// than the routes through banger's bridge).
func (r runner) checkSubnet() Check {
	c := Check{Name: "subnet"}
	s := r.opts.Subnet
	if !s.IsValid() {
		c.Status, c.Detail = Fail, "no valid subnet configured"
		c.Fix = `set subnet in bangerd.toml to a free private IPv4 range, e.g. subnet = "10.77.0.0/24"`
		return c
	}
	overlaps, err := r.routeConflicts(s, r.opts.Bridge)
	if err != nil {
		c.Status, c.Detail = Warn, fmt.Sprintf("can't compare %s with the host's routes: %v", s, err)
		c.Fix = "check the routes yourself: ip -4 route show table all"
		return c
	}
	if len(overlaps) > 0 {
		ps := make([]string, len(overlaps))
		for i, p := range overlaps {
			ps[i] = p.String()
		}
		c.Status = Fail
		c.Detail = fmt.Sprintf("subnet %s overlaps the host's routes to %s: VMs would be unreachable or hide those hosts", s, strings.Join(ps, ", "))
		c.Fix = "set subnet in bangerd.toml to a private range no route uses (ip -4 route show table all), e.g. " + freeHint(s, overlaps)
		return c
	}
	c.Status, c.Detail = OK, fmt.Sprintf("%s overlaps no host route", s)
	return c
}

// freeHint suggests a /24 of 10.0.0.0/8 that overlaps none of the
// prefixes (nor s).
func freeHint(s netip.Prefix, used []netip.Prefix) string {
	for i := 77; i < 77+256; i++ {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i % 256), 0, 0}), 24)
		free := !p.Overlaps(s)
		for _, u := range used {
			free = free && !p.Overlaps(u)
		}
		if free {
			return fmt.Sprintf("subnet = %q", p)
		}
	}
	return `subnet = "192.168.177.0/24"`
}
