package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/bridgenet"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/firewall"
	"github.com/bangerdev/banger/internal/netsvc"
	"github.com/bangerdev/banger/internal/portfwd"
	"github.com/bangerdev/banger/internal/store"
)

// hostNet is the host side of bridged VMs' networks, as the daemon uses
// it: startVM (Ensure, OpenTAP, AddVM, StartPorts, each undone on
// failure), the end of a VMM (RemoveVM, StopPorts), reconcile (AddVM and
// StartPorts again for the VMs that kept running, Sweep for the rest) and
// the daemon's end (Close). Production composes bridgenet, netsvc and
// portfwd (bridgeHost); the daemon's tests pass a fake, so they never
// touch the host's links.
type hostNet interface {
	// Ensure makes the bridge, enables IPv4 forwarding and starts DHCP and
	// DNS on the bridge, once per daemon; every call brings banger's
	// firewall tables (and the accept rules an iptables policy of drop
	// set since needs) up to date. It reports what it made anew under
	// running VMs (ensureNetwork gives them back what they lost).
	Ensure(ctx context.Context) (remade, error)
	// CheckSubnet reports the host routes that overlap the VMs' subnet
	// (other than the bridge's own) as an ErrFailedPrecondition error
	// that names them and the fix.
	CheckSubnet() error
	// OpenTAP makes v's TAP device on the bridge; it lives as long as a
	// descriptor of it is open.
	OpenTAP(v store.VM) (*os.File, error)
	// AttachTAP attaches v's TAP (a running VM's) to the bridge again,
	// with its isolation (idempotent).
	AttachTAP(v store.VM) error
	// AddVM installs v's firewall rules (idempotent); RemoveVM removes
	// them (a VM without rules is no error).
	AddVM(v store.VM) error
	RemoveVM(id string) error
	// StartPorts forwards v's ports to its address; StopPorts ends them.
	StartPorts(v store.VM) error
	StopPorts(id string)
	// Sweep removes the firewall rules and TAP links of the VMs not in
	// keep (by id): what a crash left.
	Sweep(keep map[string]bool) error
	// Close stops the services and the port forwarders; the bridge, the
	// rules and the TAPs stay (running VMs keep their network).
	Close()
}

// remade is what hostNet.Ensure made anew, which running bridged VMs
// need again.
type remade struct {
	// bridge: the bridge was made or adopted (the daemon's first Ensure,
	// or the bridge was removed): the VMs' TAPs must be attached to it.
	bridge bool
	// rules: banger's tables were missing or replaced; the VMs' firewall
	// rules are gone.
	rules bool
}

// bridgeHost is hostNet on the host's own network stack.
type bridgeHost struct {
	cfg   config.Daemon
	log   *slog.Logger
	store *store.Store
	ctx   context.Context // the daemon's: services run until it ends
	proxy *portfwd.Proxy

	mu       sync.Mutex
	fw       *firewall.Firewall // made by firewallLocked, its tables by Ensure
	ensured  bool
	cancel   context.CancelFunc
	services []*netsvc.Service
}

// firewallLocked returns the daemon's Firewall (made once, with the
// host's LAN prefixes of that moment). b.mu must be held.
func (b *bridgeHost) firewallLocked() (*firewall.Firewall, error) {
	if b.fw != nil {
		return b.fw, nil
	}
	subnet, err := b.cfg.SubnetPrefix()
	if err != nil {
		return nil, err
	}
	lan, err := bridgenet.LANPrefixes(b.cfg.BridgeName)
	if err != nil {
		return nil, err
	}
	fw, err := firewall.New(firewall.Config{
		Bridge: b.cfg.BridgeName, Subnet: subnet, Gateway: b.cfg.Gateway().Addr(),
		AllowHost: b.cfg.AllowHost, AllowVMToVM: b.cfg.AllowVMToVM, AllowLAN: b.cfg.AllowLAN, AllowLinkLocal: b.cfg.AllowLinkLocal,
		LAN: lan, TAPPrefix: bridgenet.TAPPrefix,
	})
	if err != nil {
		return nil, err
	}
	b.fw = fw
	return fw, nil
}

func (b *bridgeHost) firewall() (*firewall.Firewall, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.firewallLocked()
}

func newBridgeHost(ctx context.Context, cfg config.Daemon, st *store.Store, log *slog.Logger) *bridgeHost {
	return &bridgeHost{cfg: cfg, log: log, store: st, ctx: ctx, proxy: portfwd.NewProxy(log.With("component", "portfwd"))}
}

func (b *bridgeHost) Ensure(ctx context.Context) (remade, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ensured {
		if l, err := bridgenet.Links(b.cfg.BridgeName); err == nil && slices.Contains(l, b.cfg.BridgeName) {
			// Another tool may have set an iptables policy of drop, or
			// removed banger's tables, since: Ensure again (~10 ms).
			fw, err := b.firewallLocked()
			if err != nil {
				return remade{}, err
			}
			fresh, err := fw.EnsureFresh()
			return remade{rules: fresh}, err
		}
		// Someone removed the bridge: make it, and the services bound to
		// it, again.
		b.log.Warn("the bridge is gone: making it again", "bridge", b.cfg.BridgeName)
		b.stopServicesLocked()
	}
	gw := b.cfg.Gateway()
	if err := b.CheckSubnet(); err != nil {
		return remade{}, err
	}
	if err := bridgenet.EnsureBridge(bridgenet.Bridge{Name: b.cfg.BridgeName, Gateway: gw, MTU: b.cfg.MTU}); err != nil {
		return remade{}, err
	}
	// The firewall before forwarding: a VM is filtered from its first frame.
	fw, err := b.firewallLocked()
	if err != nil {
		return remade{}, err
	}
	fresh, err := fw.EnsureFresh()
	if err != nil {
		return remade{}, err
	}
	if changed, err := bridgenet.EnableIPv4Forwarding(); err != nil {
		return remade{}, err
	} else if changed {
		b.log.Info("enabled IPv4 forwarding for bridged VMs")
	}
	var upstreams []netip.AddrPort
	for _, s := range b.cfg.DNSServers {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return remade{}, fmt.Errorf("dns_servers: %q: %w", s, errdefs.ErrInvalid)
		}
		upstreams = append(upstreams, netip.AddrPortFrom(a, 53))
	}
	sctx, cancel := context.WithCancel(b.ctx)
	dhcp, err := netsvc.StartDHCP(sctx, netsvc.DHCPConfig{
		Interface: b.cfg.BridgeName, ServerIP: gw.Addr(), Lookup: b.lease, Log: b.log.With("component", "dhcp"),
	})
	if err != nil {
		cancel()
		return remade{}, fmt.Errorf("start dhcp on %s: %w", b.cfg.BridgeName, err)
	}
	dns, err := netsvc.StartDNS(sctx, netsvc.DNSConfig{Listen: gw.Addr(), Upstreams: upstreams, Log: b.log.With("component", "dns")})
	if err != nil {
		cancel()
		dhcp.Wait()
		return remade{}, fmt.Errorf("start dns forwarder on %s: %w", gw.Addr(), err)
	}
	b.cancel, b.services, b.ensured = cancel, []*netsvc.Service{dhcp, dns}, true
	b.log.Info("bridge network ready", "bridge", b.cfg.BridgeName, "gateway", gw, "dns_upstreams", upstreams)
	return remade{bridge: true, rules: fresh}, nil
}

func (b *bridgeHost) CheckSubnet() error {
	subnet, err := b.cfg.SubnetPrefix()
	if err != nil {
		return err
	}
	conflicts, err := bridgenet.RouteConflicts(subnet, b.cfg.BridgeName)
	if err != nil {
		return fmt.Errorf("check subnet %s against the host's routes: %w", subnet, err)
	}
	if len(conflicts) > 0 {
		return fmt.Errorf("subnet %s overlaps the host's route(s) to %s: set another subnet in bangerd.toml (for example 10.78.0.0/24) and restart bangerd: %w",
			subnet, joinPrefixes(conflicts), errdefs.ErrFailedPrecondition)
	}
	return nil
}

// lease answers DHCP for a bridged VM's MAC with its recorded address.
func (b *bridgeHost) lease(mac net.HardwareAddr) (netsvc.Lease, bool) {
	ctx, cancel := context.WithTimeout(b.ctx, 2*time.Second)
	defer cancel()
	v, err := b.store.VMByMAC(ctx, mac.String())
	if err != nil {
		if !errors.Is(err, errdefs.ErrNotFound) {
			b.log.Warn("dhcp: look up a lease", "mac", mac, "err", err)
		}
		return netsvc.Lease{}, false
	}
	ip, err := netip.ParseAddr(v.IP)
	if v.Network != api.NetworkBridge || err != nil {
		return netsvc.Lease{}, false
	}
	gw := b.cfg.Gateway()
	return netsvc.Lease{IP: ip, Prefix: gw.Bits(), Gateway: gw.Addr(), DNS: []netip.Addr{gw.Addr()}, Hostname: v.Name, MTU: b.cfg.MTU}, true
}

func (b *bridgeHost) OpenTAP(v store.VM) (*os.File, error) {
	return bridgenet.OpenTAP(v.TAP, b.cfg.BridgeName, b.isolated(v))
}

func (b *bridgeHost) AttachTAP(v store.VM) error {
	return bridgenet.AttachTAP(v.TAP, b.cfg.BridgeName, b.isolated(v))
}

// isolated reports whether v's bridge port is isolated (VM-to-VM not
// allowed).
func (b *bridgeHost) isolated(v store.VM) bool {
	return !b.cfg.AllowVMToVM && !slices.Contains(v.Allow, allowVM)
}

func (b *bridgeHost) AddVM(v store.VM) error {
	fw, err := b.firewall()
	if err != nil {
		return err
	}
	ip, err := netip.ParseAddr(v.IP)
	if err != nil {
		return fmt.Errorf("vm %q: address %q: %w", v.Name, v.IP, errdefs.ErrInvalid)
	}
	mac, err := net.ParseMAC(v.MAC)
	if err != nil {
		return fmt.Errorf("vm %q: mac %q: %w", v.Name, v.MAC, errdefs.ErrInvalid)
	}
	return fw.AddVM(firewall.VM{
		ID: v.ID, TAP: v.TAP, MAC: mac, IP: ip,
		AllowHost: slices.Contains(v.Allow, allowHost), AllowVMToVM: slices.Contains(v.Allow, allowVM),
		AllowLAN: slices.Contains(v.Allow, allowLAN), AllowLinkLocal: slices.Contains(v.Allow, allowLinkLocal),
	})
}

func (b *bridgeHost) RemoveVM(id string) error {
	fw, err := b.firewall()
	if err != nil {
		return err
	}
	return fw.RemoveVM(id)
}

func (b *bridgeHost) StartPorts(v store.VM) error {
	if len(v.Ports) == 0 {
		return nil
	}
	ip, err := netip.ParseAddr(v.IP)
	if err != nil {
		return fmt.Errorf("forward ports of vm %q: address %q: %w", v.Name, v.IP, err)
	}
	rules := make([]portfwd.Rule, 0, len(v.Ports))
	for _, p := range v.Ports {
		hip, err := netip.ParseAddr(p.HostIP)
		if err != nil {
			return fmt.Errorf("forward ports of vm %q: host address %q: %w", v.Name, p.HostIP, err)
		}
		rules = append(rules, portfwd.Rule{Proto: p.Proto, HostIP: hip, HostPort: p.HostPort, GuestPort: p.GuestPort})
	}
	return b.proxy.Start(v.ID, ip, rules)
}

func (b *bridgeHost) StopPorts(id string) { b.proxy.Stop(id) }

func (b *bridgeHost) Sweep(keep map[string]bool) error {
	if os.Geteuid() != 0 {
		return nil // an unprivileged bangerd never made any
	}
	var errs []error
	fw, err := b.firewall()
	if err != nil {
		return err
	}
	ids, err := fw.VMs()
	if err != nil {
		return err
	}
	for _, id := range ids {
		if keep[id] {
			continue
		}
		if err := fw.RemoveVM(id); err != nil {
			errs = append(errs, err)
			continue
		}
		b.log.Info("removed the firewall rules of a VM that no longer runs", "vm_id", id)
	}
	// Only TAPs named as banger names them: a bridge or veth called bg-*
	// is someone else's.
	links, err := bridgenet.TAPs()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	kept := map[string]bool{}
	for id := range keep {
		kept[bridgenet.TAPName(id)] = true
	}
	for _, l := range links {
		if kept[l] {
			continue
		}
		if err := bridgenet.DeleteLink(l); err != nil {
			errs = append(errs, err)
			continue
		}
		b.log.Info("removed the TAP device of a VM that no longer runs", "tap", l)
	}
	return errors.Join(errs...)
}

func (b *bridgeHost) Close() {
	for _, id := range b.proxy.Running() {
		b.proxy.Stop(id)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.stopServicesLocked()
}

// stopServicesLocked stops DHCP and DNS and forgets the bridge was made.
func (b *bridgeHost) stopServicesLocked() {
	if b.cancel != nil {
		b.cancel()
	}
	for _, s := range b.services {
		s.Wait()
	}
	b.cancel, b.services, b.ensured = nil, nil, false
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}
