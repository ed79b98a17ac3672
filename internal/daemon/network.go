package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/portfwd"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/undo"
	"github.com/bangerdev/banger/internal/vmm"
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
		if err := d.net.CheckSubnet(); err != nil {
			return n, err
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
			return n, fmt.Errorf("ssh key %d: not a public key in authorized_keys format: %w: %w", i+1, err, errdefs.ErrInvalid)
		}
		if !slices.Contains(n.sshKeys, k) {
			n.sshKeys = append(n.sshKeys, k)
		}
	}
	if err := checkPublishAll(p, n.mode); err != nil {
		return n, err
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
	if n.mode == api.NetworkUser {
		for _, r := range rules {
			if !r.HostIP.Is4() {
				return n, fmt.Errorf("port forward %s: QEMU's user network forwards IPv4 host addresses only (use --network bridge for %s): %w", r, r.HostIP, errdefs.ErrInvalid)
			}
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

// networkAPI is a VM's network as the API reports it.
func (d *Daemon) networkAPI(v store.VM) *api.NetworkInfo {
	if v.Network == "" || v.Network == api.NetworkNone {
		return nil
	}
	n := &api.NetworkInfo{Mode: v.Network, MAC: v.MAC, Allow: v.Allow, PublishAll: v.PublishAll}
	if v.Network == api.NetworkBridge {
		n.IP, n.TAP = v.IP, v.TAP
		n.Gateway = d.cfg.Gateway().Addr().String()
	}
	for _, p := range v.Ports {
		n.Ports = append(n.Ports, api.PortForward{Proto: p.Proto, HostIP: p.HostIP, HostPort: p.HostPort, GuestPort: p.GuestPort})
	}
	n.Ports = append(n.Ports, d.autoPorts(v.ID)...)
	return n
}

// agentNetwork is the guest side of v's network, for the agent's boot
// config: the card (found by its MAC), its address, the default route and
// the nameserver (banger's forwarder on the gateway; QEMU's in user mode).
func (d *Daemon) agentNetwork(v store.VM) (*agentproto.NetworkConfig, error) {
	switch v.Network {
	case api.NetworkBridge:
		gw := d.cfg.Gateway()
		ip, err := d.bridgeAddr(v)
		if err != nil {
			return nil, err
		}
		return &agentproto.NetworkConfig{
			Interfaces: []agentproto.Interface{{MAC: v.MAC, Address: netip.PrefixFrom(ip, gw.Bits()).String(), Gateway: gw.Addr().String(), MTU: d.cfg.MTU}},
			DNS:        []string{gw.Addr().String()},
		}, nil
	case api.NetworkUser:
		return &agentproto.NetworkConfig{
			Interfaces: []agentproto.Interface{{MAC: v.MAC, Address: userNetAddress, Gateway: userNetGateway}},
			DNS:        []string{userNetDNS},
		}, nil
	}
	return nil, nil
}

// bridgeAddr is a bridged VM's address, which must be in the configured
// subnet (not the gateway).
func (d *Daemon) bridgeAddr(v store.VM) (netip.Addr, error) {
	subnet, err := d.cfg.SubnetPrefix()
	if err != nil {
		return netip.Addr{}, err
	}
	ip, err := netip.ParseAddr(v.IP)
	if err != nil || !subnet.Contains(ip) || ip == d.cfg.Gateway().Addr() {
		return netip.Addr{}, fmt.Errorf("vm %q has address %q, outside the subnet %s: %w",
			v.Name, v.IP, subnet, errdefs.ErrFailedPrecondition)
	}
	return ip, nil
}

// readdress gives a bridged VM whose address is outside the configured
// subnet (the subnet was changed) a new one, before its start; it returns
// the VM as recorded.
func (d *Daemon) readdress(ctx context.Context, v store.VM) (store.VM, error) {
	if v.Network != api.NetworkBridge {
		return v, nil
	}
	if _, err := d.bridgeAddr(v); err == nil {
		return v, nil
	}
	subnet, err := d.cfg.SubnetPrefix()
	if err != nil {
		return v, err
	}
	old := v.IP
	if v.IP, err = d.store.ReassignAddress(ctx, v.ID, subnet); err != nil {
		return v, err
	}
	d.log.Info("vm moved to the configured subnet", "vm", v.Name, "old_ip", old, "ip", v.IP)
	return v, nil
}

// agentSSH prepares the guest for the user's SSH logins: the image's
// default user and the keys the VM was created with.
func agentSSH(v store.VM, im store.Image) *agentproto.SSHConfig {
	return &agentproto.SSHConfig{User: im.DefaultUser, AuthorizedKeys: v.SSHKeys}
}

// setupNetwork makes the host side of v's network card and returns the
// card for the VMM: nothing for network none; QEMU's user network with
// the VM's ports as its forwards; for a bridge, the bridge and its
// services (once), the VM's TAP, firewall rules and port forwarders, each
// undone by steps. The caller closes the TAP (closeTAP) once the VMM has
// its own copy.
func (d *Daemon) setupNetwork(ctx context.Context, v store.VM, steps *undo.Stack) (n *vmm.Net, closeTAP func(), err error) {
	closeTAP = func() {}
	switch v.Network {
	case api.NetworkUser:
		n = &vmm.Net{Mode: vmm.NetUser, MAC: v.MAC}
		var rules []portfwd.Rule
		for _, p := range v.Ports {
			n.Forwards = append(n.Forwards, vmm.Forward{Proto: p.Proto, HostIP: p.HostIP, HostPort: p.HostPort, GuestPort: p.GuestPort})
			if hip, err := netip.ParseAddr(p.HostIP); err == nil {
				rules = append(rules, portfwd.Rule{Proto: p.Proto, HostIP: hip, HostPort: p.HostPort, GuestPort: p.GuestPort})
			}
		}
		// QEMU would fail on a taken port with a message of its own.
		if err := portfwd.CheckFree(rules); err != nil {
			return nil, closeTAP, fmt.Errorf("vm %q: %w", v.Name, err)
		}
		return n, closeTAP, nil
	case api.NetworkBridge:
	default:
		return nil, closeTAP, nil
	}
	if os.Geteuid() != 0 {
		return nil, closeTAP, fmt.Errorf("vm %q uses the bridge network, which needs bangerd to run as root: %w", v.Name, errdefs.ErrFailedPrecondition)
	}
	if err := d.ensureNetwork(ctx); err != nil {
		return nil, closeTAP, fmt.Errorf("set up the bridge network: %w", err)
	}
	tap, err := d.net.OpenTAP(v)
	if err != nil {
		return nil, closeTAP, fmt.Errorf("create tap %s: %w", v.TAP, err)
	}
	var once bool
	closeTAP = func() {
		if !once {
			once = true
			tap.Close()
		}
	}
	steps.Push("close tap", func(context.Context) error { closeTAP(); return nil })
	if err := d.net.AddVM(v); err != nil {
		return nil, closeTAP, fmt.Errorf("firewall rules of vm %q: %w", v.Name, err)
	}
	steps.Push("remove firewall rules", func(context.Context) error { return d.net.RemoveVM(v.ID) })
	if err := d.net.StartPorts(v); err != nil {
		return nil, closeTAP, fmt.Errorf("vm %q: %w", v.Name, err)
	}
	steps.Push("stop port forwarders", func(context.Context) error { d.net.StopPorts(v.ID); return nil })
	return &vmm.Net{Mode: vmm.NetTAP, MAC: v.MAC, TAP: tap, TAPName: v.TAP}, closeTAP, nil
}

// releaseNetwork removes what a bridged VM's network holds on the host
// once its VMM is gone (the TAP went with the VMM).
func (d *Daemon) releaseNetwork(v store.VM) {
	if v.Network != api.NetworkBridge {
		return
	}
	d.net.StopPorts(v.ID)
	if err := d.net.RemoveVM(v.ID); err != nil {
		d.log.Error("remove the firewall rules of a stopped vm (the next daemon start retries)", "vm", v.Name, "err", err)
	}
}

// restoreNetwork gives a bridged VM that kept running through a daemon
// restart its TAP on the bridge, its firewall rules and port forwarders again (its DHCP lease
// is in the database). Failures are logged and returned, for the VM's
// LastError (vm inspect): the VM runs on.
func (d *Daemon) restoreNetwork(ctx context.Context, v store.VM) error {
	if v.Network != api.NetworkBridge {
		return nil
	}
	if err := d.ensureNetwork(ctx); err != nil {
		d.log.Error("restore the bridge network of a running vm", "vm", v.Name, "err", err)
		return fmt.Errorf("the bridge network was not restored at the daemon's start: %w", err)
	}
	if err := d.net.AttachTAP(v); err != nil {
		d.log.Error("attach a running vm's tap to the bridge", "vm", v.Name, "tap", v.TAP, "err", err)
	}
	var errs []error
	if err := d.net.AddVM(v); err != nil {
		d.log.Error("restore the firewall rules of a running vm", "vm", v.Name, "err", err)
		errs = append(errs, fmt.Errorf("the firewall rules were not restored at the daemon's start (its frames are dropped; restart the VM): %w", err))
	}
	if err := d.net.StartPorts(v); err != nil {
		d.log.Error("restore the port forwarders of a running vm", "vm", v.Name, "err", err)
		errs = append(errs, fmt.Errorf("the forwarded ports were not restored at the daemon's start (they don't answer; restart the VM once the port is free): %w", err))
	}
	return errors.Join(errs...)
}

// ensureNetwork is hostNet.Ensure, then what the running bridged VMs need
// again of what it made anew under them: their TAPs attached to a bridge
// made (or adopted) again, their firewall rules when banger's tables were
// missing or replaced. Failures for one VM are
// logged: it runs on, and the start that called this goes on.
func (d *Daemon) ensureNetwork(ctx context.Context) error {
	r, err := d.net.Ensure(ctx)
	if err != nil || r == (remade{}) {
		return err
	}
	for _, v := range d.runningBridged(ctx) {
		if r.bridge {
			if err := d.net.AttachTAP(v); err != nil {
				d.log.Error("attach a running vm's tap to the bridge", "vm", v.Name, "tap", v.TAP, "err", err)
			}
		}
		if r.rules {
			if err := d.net.AddVM(v); err != nil {
				d.log.Error("restore the firewall rules of a running vm", "vm", v.Name, "err", err)
				continue
			}
			d.log.Warn("banger's firewall tables were made anew: restored the rules of a running vm", "vm", v.Name)
		}
	}
	return nil
}

// runningBridged returns the bridged VMs the daemon monitors.
func (d *Daemon) runningBridged(ctx context.Context) []store.VM {
	d.mu.Lock()
	ids := make(map[string]bool, len(d.running))
	for id := range d.running {
		ids[id] = true
	}
	d.mu.Unlock()
	if len(ids) == 0 {
		return nil
	}
	vms, err := d.store.ListVMs(ctx)
	if err != nil {
		d.log.Error("list the running vms", "err", err)
		return nil
	}
	var out []store.VM
	for _, v := range vms {
		if ids[v.ID] && v.Network == api.NetworkBridge {
			out = append(out, v)
		}
	}
	return out
}
