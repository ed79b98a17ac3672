package daemon

import (
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/portfwd"
	"github.com/bangerdev/banger/internal/store"
)

// What a VM may reach beyond the defaults (VMCreateParams.Allow).
const (
	allowHost      = "host"
	allowVM        = "vm"
	allowLAN       = "lan"
	allowLinkLocal = "link-local"
)

// User-mode network addresses (QEMU's slirp defaults).
const (
	userNetAddress = "10.0.2.15/24"
	userNetGateway = "10.0.2.2"
	userNetDNS     = "10.0.2.3"
)

// Bounds of what a create may ask for.
const (
	maxSSHKeys   = 32
	maxSSHKeyLen = 16 << 10
	maxPorts     = 4096
)

// vmNetwork is a new VM's network as createVM validated it, before
// anything exists.
type vmNetwork struct {
	mode    string
	ports   []store.Port
	allow   []string
	sshKeys []string
}

// checkNetwork validates the network part of a create: the mode, the
// allowances, the SSH keys and the ports. It creates nothing.
func (d *Daemon) checkNetwork(p api.VMCreateParams, callerUID uint32) (vmNetwork, error) {
	n := vmNetwork{mode: p.Network}
	if n.mode == "" {
		n.mode = d.cfg.Network
	}
	switch n.mode {
	case api.NetworkBridge:
		if os.Geteuid() != 0 {
			return n, fmt.Errorf("network bridge needs bangerd to run as root (it makes a bridge and TAP devices): use --network user: %w", errdefs.ErrInvalid)
		}
	case api.NetworkUser, api.NetworkNone:
	default:
		return n, fmt.Errorf("network %s: want bridge, user or none: %w", errdefs.Quote(n.mode), errdefs.ErrInvalid)
	}
	for _, a := range p.Allow {
		for _, a := range strings.Split(a, ",") {
			a = strings.TrimSpace(a)
			switch a {
			case allowHost, allowVM, allowLAN, allowLinkLocal:
			case "":
				continue
			default:
				return n, fmt.Errorf("allow %s: want host, vm, lan or link-local: %w", errdefs.Quote(a), errdefs.ErrInvalid)
			}
			if !slices.Contains(n.allow, a) {
				n.allow = append(n.allow, a)
			}
		}
	}
	slices.Sort(n.allow)
	if len(n.allow) > 0 && n.mode != api.NetworkBridge {
		return n, fmt.Errorf("--allow applies to bridge networking only (network %s has no firewall to open): %w", n.mode, errdefs.ErrInvalid)
	}
	if len(p.SSHKeys) > maxSSHKeys {
		return n, fmt.Errorf("%d ssh keys: at most %d: %w", len(p.SSHKeys), maxSSHKeys, errdefs.ErrInvalid)
	}
	for i, k := range p.SSHKeys {
		k = strings.TrimSpace(k)
		if len(k) > maxSSHKeyLen || strings.ContainsAny(k, "\r\n") {
			return n, fmt.Errorf("ssh key %d: want one authorized_keys line: %w", i+1, errdefs.ErrInvalid)
		}
		if _, _, _, _, err := ssh.ParseAuthorizedKey([]byte(k)); err != nil {
			return n, fmt.Errorf("ssh key %d: not a public key in authorized_keys format: %v: %w", i+1, err, errdefs.ErrInvalid)
		}
		if !slices.Contains(n.sshKeys, k) {
			n.sshKeys = append(n.sshKeys, k)
		}
	}
	if len(p.Ports) == 0 {
		return n, nil
	}
	if n.mode == api.NetworkNone {
		return n, fmt.Errorf("ports can't be forwarded to a VM without a network (network none): %w", errdefs.ErrInvalid)
	}
	var rules []portfwd.Rule
	for _, spec := range p.Ports {
		r, err := portfwd.Parse(spec)
		if err != nil {
			return n, err
		}
		rules = append(rules, r...)
		if len(rules) > maxPorts {
			return n, fmt.Errorf("more than %d forwarded ports: %w", maxPorts, errdefs.ErrInvalid)
		}
	}
	if n.mode == api.NetworkUser && d.cfg.VMMConfine {
		// QEMU forwards the ports itself (hostfwd), as its unprivileged user.
		if err := portfwd.Check(rules, unprivilegedUID); err != nil {
			return n, fmt.Errorf("network user: QEMU binds the forwarded ports itself, as an unprivileged user: %w", err)
		}
	} else if err := portfwd.Check(rules, int(callerUID)); err != nil {
		return n, err
	}
	for _, r := range rules {
		n.ports = append(n.ports, store.Port{Proto: r.Proto, HostIP: r.HostIP.String(), HostPort: r.HostPort, GuestPort: r.GuestPort})
	}
	return n, nil
}

// unprivilegedUID stands for a caller who isn't root in portfwd.Check.
const unprivilegedUID = 65534

// tapName is a VM's TAP device: "bg-" and the first 12 characters of its
// id (15, the kernel's limit).
func tapName(id string) string {
	if len(id) > 12 {
		id = id[:12]
	}
	return "bg-" + id
}

// macFor is a VM's stable MAC: locally administered, unicast (02:), then
// five bytes of the sha256 of its id.
func macFor(id string) string {
	h := sha256.Sum256([]byte(id))
	return net.HardwareAddr(append([]byte{0x02}, h[:5]...)).String()
}

// networkAPI is a VM's network as the API reports it.
func (d *Daemon) networkAPI(v store.VM) *api.NetworkInfo {
	if v.Network == "" || v.Network == api.NetworkNone {
		return nil
	}
	n := &api.NetworkInfo{Mode: v.Network, MAC: v.MAC, Allow: v.Allow}
	if v.Network == api.NetworkBridge {
		n.IP, n.TAP = v.IP, v.TAP
		n.Gateway = d.cfg.Gateway().Addr().String()
	}
	for _, p := range v.Ports {
		n.Ports = append(n.Ports, api.PortForward{Proto: p.Proto, HostIP: p.HostIP, HostPort: p.HostPort, GuestPort: p.GuestPort})
	}
	return n
}
