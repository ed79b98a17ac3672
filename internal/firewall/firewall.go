// Package firewall keeps banger's packet filter: NAT for the VMs' subnet,
// isolation of the VMs from the host, from each other, from link-local
// (cloud metadata) addresses and from the host's LAN, and anti-spoofing on
// every VM's bridge port. It speaks nf_tables over netlink
// (github.com/google/nftables); banger runs no nft or iptables program.
//
// Everything banger owns lives in two tables, `inet banger` (NAT, input and
// forward filtering) and `bridge banger` (anti-spoofing per bridge port,
// VM-to-VM at layer 2). The only rules outside them are the two accept
// rules an iptables-nft FORWARD policy of drop (Docker's) needs, written
// exactly as iptables-nft writes them (see docker.go).
//
// Call order: New, then Ensure (idempotent; safe to call again, per-VM
// state survives it), then AddVM/RemoveVM per VM, Teardown to remove
// everything. Every change is one netlink batch: it applies whole or not at
// all. A Firewall's methods may be called concurrently; they serialise.
// The netlink socket of each call is opened in the calling thread's network
// namespace.
//
// The rules, in nft syntax (BRIDGE, SUBNET, GATEWAY from Config):
//
//	table inet banger {
//	  set vm_ips { type ipv4_addr }                  # every VM's address
//	  set host_ok, vm_ok, lan_ok, ll_ok { type ipv4_addr }   # per-VM allows
//	  chain postrouting { type nat hook postrouting priority srcnat
//	    meta nfproto ipv4 ip saddr SUBNET oifname != BRIDGE masquerade }
//	  chain input { type filter hook input priority filter
//	    iifname BRIDGE jump vm_input }
//	  chain vm_input {
//	    ct state established,related accept
//	    meta nfproto != ipv4 drop
//	    udp dport 67 accept                          # DHCP
//	    ip saddr != @vm_ips drop
//	    ip daddr GATEWAY udp dport 53 accept         # DNS
//	    ip daddr GATEWAY tcp dport 53 accept
//	    ip saddr @host_ok accept                     # or accept: allow_host
//	    drop }
//	  chain forward { type filter hook forward priority filter
//	    ct state established,related accept
//	    iifname BRIDGE jump vm_forward
//	    oifname BRIDGE drop }                        # new connections to VMs
//	  chain vm_forward {
//	    meta nfproto != ipv4 drop                    # no IPv6 from VMs
//	    ip saddr != @vm_ips drop
//	    oifname BRIDGE jump vm_to_vm
//	    ip daddr 169.254.0.0/16 ip saddr != @ll_ok drop   # unless allow_link_local
//	    ip daddr 168.63.129.16 ip saddr != @ll_ok drop    # (Azure's WireServer)
//	    ip daddr 100.100.100.200 ip saddr != @ll_ok drop  # (Alibaba's metadata)
//	    ip daddr LAN ip saddr != @lan_ok drop        # per LAN range, unless allow_lan
//	    accept }
//	  chain vm_to_vm {
//	    ip saddr @vm_ok ip daddr @vm_ok accept       # or accept: allow_vm_to_vm
//	    drop }
//	}
//	table bridge banger {
//	  map ports { type ifname : verdict }            # TAP : jump vm-ID
//	  set vm_ports { type ifname }                   # TAPs allowed VM-to-VM
//	  chain prerouting { type filter hook prerouting priority filter
//	    iifname vmap @ports
//	    iifname "bg-*" drop }                        # a TAP AddVM doesn't know
//	  chain forward { type filter hook forward priority filter
//	    iifname @vm_ports oifname @vm_ports accept   # unless allow_vm_to_vm
//	    iifname @ports drop }
//	  chain vm-ID {
//	    ether saddr != MAC drop
//	    ether type arp (htype 1, ptype ip, hlen 6, plen 4) else drop
//	    ether type arp arp saddr ether != MAC drop
//	    ether type arp arp saddr ip { IP, 0.0.0.0 } accept
//	    ether type ip ip saddr IP accept
//	    ether type ip ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept
//	    drop }                                       # IPv6, other ethertypes, spoofed frames
//	}
//
// Per-VM set and map elements carry the VM's id as their comment, so
// RemoveVM finds them from the id alone. The bridge table knows banger's
// ports by their names (the kernel may lack `meta ibrname` to tell one
// bridge from another): a TAP must be named with Config.TAPPrefix, and
// added with AddVM before its VM starts.
package firewall

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/errdefs"
)

// TableName is the name of banger's tables (families inet and bridge).
const TableName = "banger"

// DefaultTAPPrefix is Config.TAPPrefix's default.
const DefaultTAPPrefix = "bg-"

// vmChainPrefix starts the name of each VM's chain in the bridge table.
const vmChainPrefix = "vm-"

// Config is the network's policy. The zero value of each Allow is the safe
// default: blocked.
type Config struct {
	// Bridge is the VMs' bridge (banger0).
	Bridge string
	// Subnet is the VMs' IPv4 subnet; Gateway is the bridge's address in it.
	Subnet  netip.Prefix
	Gateway netip.Addr
	// AllowHost lets every VM reach any service of the host; by default a
	// VM reaches only DHCP and DNS on the gateway.
	AllowHost bool
	// AllowVMToVM lets VMs reach each other.
	AllowVMToVM bool
	// AllowLAN lets VMs reach LAN and private ranges (see LAN).
	AllowLAN bool
	// AllowLinkLocal lets VMs reach 169.254.0.0/16 and the cloud metadata
	// endpoints outside it (metadataRanges: 169.254.169.254, Azure's
	// WireServer 168.63.129.16, Alibaba's 100.100.100.200).
	AllowLinkLocal bool
	// LAN are the host's LAN ranges, blocked unless AllowLAN (the daemon
	// passes the connected prefixes of the host's links). RFC 1918 ranges
	// and 100.64.0.0/10 are blocked as well. IPv6 prefixes are ignored (IPv6
	// from the VMs is dropped).
	LAN []netip.Prefix
	// TAPPrefix starts the name of every TAP of banger's (default "bg-"):
	// frames from a bridge port with such a name that AddVM doesn't know
	// are dropped, so a VM is filtered from its first frame.
	TAPPrefix string
}

// VM is one VM's port and identity. Its Allow fields add to the Config's:
// a VM is allowed what the Config or its own fields allow.
type VM struct {
	ID  string
	TAP string // the VM's bridge port
	MAC net.HardwareAddr
	IP  netip.Addr
	// AllowVMToVM lets this VM reach the other VMs allowed VM-to-VM (both
	// ends must allow it, unless the Config allows it for every VM).
	AllowHost, AllowVMToVM, AllowLAN, AllowLinkLocal bool
}

// Firewall manages banger's tables.
type Firewall struct {
	cfg Config
	lan []netip.Prefix // blocked ranges, deduplicated
	mu  sync.Mutex
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// New checks cfg and returns a Firewall for it; it changes nothing.
func New(cfg Config) (*Firewall, error) {
	if err := validIfname(cfg.Bridge); err != nil {
		return nil, fmt.Errorf("firewall: bridge: %w", err)
	}
	if !cfg.Subnet.IsValid() || !cfg.Subnet.Addr().Is4() {
		return nil, fmt.Errorf("firewall: subnet %s is not an IPv4 prefix: %w", cfg.Subnet, errdefs.ErrInvalid)
	}
	cfg.Subnet = cfg.Subnet.Masked()
	if cfg.TAPPrefix == "" {
		cfg.TAPPrefix = DefaultTAPPrefix
	}
	if !cfg.Gateway.Is4() || !cfg.Subnet.Contains(cfg.Gateway) {
		return nil, fmt.Errorf("firewall: gateway %s is not in subnet %s: %w", cfg.Gateway, cfg.Subnet, errdefs.ErrInvalid)
	}
	return &Firewall{cfg: cfg, lan: blockedRanges(cfg.Subnet, cfg.LAN)}, nil
}

func validIfname(name string) error {
	if name == "" || len(name) > 15 || strings.ContainsAny(name, "/ \x00") {
		return fmt.Errorf("interface name %q: want 1 to 15 characters without '/', space or NUL: %w", name, errdefs.ErrInvalid)
	}
	return nil
}

// privateRanges are blocked with the host's LAN unless allow_lan: RFC 1918
// and the shared address space (carrier-grade NAT, Tailscale).
var privateRanges = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("100.64.0.0/10"),
}

var linkLocal = netip.MustParsePrefix("169.254.0.0/16")

// metadataRanges are blocked unless allow_link_local: link-local (AWS,
// GCP, Azure IMDS, OpenStack, Oracle, DigitalOcean: 169.254.169.254;
// Tencent 169.254.0.23) and the cloud metadata and agent endpoints
// outside it: Azure's WireServer (168.63.129.16) and Alibaba Cloud's
// metadata (100.100.100.200, also inside the LAN ranges: reaching it
// needs allow_lan too). AWS's IPv6 endpoint (fd00:ec2::254) needs no
// rule: IPv6 from the VMs is dropped.
var metadataRanges = []netip.Prefix{
	linkLocal,
	netip.MustParsePrefix("168.63.129.16/32"),
	netip.MustParsePrefix("100.100.100.200/32"),
}

// blockedRanges returns the IPv4 ranges of lan and privateRanges, without
// the ones inside the subnet or link-local (governed by their own switches)
// and without the ones inside another, sorted.
func blockedRanges(subnet netip.Prefix, lan []netip.Prefix) []netip.Prefix {
	var all []netip.Prefix
	for _, p := range append(slices.Clone(privateRanges), lan...) {
		if !p.IsValid() || !p.Addr().Is4() {
			continue
		}
		p = p.Masked()
		if (subnet.Contains(p.Addr()) && p.Bits() >= subnet.Bits()) || (linkLocal.Contains(p.Addr()) && p.Bits() >= linkLocal.Bits()) {
			continue
		}
		all = append(all, p)
	}
	var out []netip.Prefix
	for i, p := range all {
		inside := false
		for j, q := range all {
			if i != j && q.Bits() <= p.Bits() && q.Contains(p.Addr()) && (q.Bits() < p.Bits() || j < i) {
				inside = true
				break
			}
		}
		if !inside {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

// Ensure builds banger's tables, or brings them to this Config, in one
// batch: base chains are rebuilt, per-VM chains and elements are kept.
// Where iptables-nft's FORWARD (or INPUT) policy is drop, or Docker's
// DOCKER-USER chain exists, it adds the accept rules banger's traffic needs
// there (docker.go).
func (f *Firewall) Ensure() error {
	_, err := f.EnsureFresh()
	return err
}

// EnsureFresh is Ensure, and reports whether the tables it leaves hold no
// per-VM rules of before: they were missing (or incomplete), or of an
// older layout and replaced. The caller then adds its running VMs again
// (their TAPs' frames are dropped until it does).
func (f *Firewall) EnsureFresh() (fresh bool, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, st, err := openState()
	if err != nil {
		return false, fmt.Errorf("firewall: %w", err)
	}
	fresh = !st.complete()
	compat, err := f.planCompat(c)
	if err != nil {
		return false, err
	}
	f.build(c, false)
	compat.apply(c)
	if err := c.Flush(); err != nil {
		// Tables of an older layout (a chain with another hook) can't be
		// updated in place: replace them. Per-VM rules are lost.
		f.build(c, true)
		compat.apply(c)
		if err2 := c.Flush(); err2 != nil {
			return false, fmt.Errorf("firewall: create tables %s: %w (is nf_tables available? `banger doctor` checks)", TableName, first(err2))
		}
		fresh = true
	}
	return fresh, nil
}

// Teardown removes banger's tables and the rules it added to iptables-nft's
// chains, in one batch. Nothing there is fine.
func (f *Firewall) Teardown() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("firewall: open nftables: %w", err)
	}
	n := 0
	for _, fam := range []nftables.TableFamily{nftables.TableFamilyINet, nftables.TableFamilyBridge} {
		if t, err := c.ListTableOfFamily(TableName, fam); err == nil {
			c.DelTable(t)
			n++
		} else if !isNotExist(err) {
			return fmt.Errorf("firewall: list tables: %w", err)
		}
	}
	own, err := f.compatRules(c)
	if err != nil {
		return err
	}
	for _, r := range own {
		if err := c.DelRule(r); err != nil {
			return fmt.Errorf("firewall: delete rule in ip filter %s: %w", r.Chain.Name, err)
		}
		n++
	}
	if n == 0 {
		return nil
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("firewall: remove tables %s: %w", TableName, first(err))
	}
	return nil
}

// AddVM adds (or updates) a VM's anti-spoofing chain and allows, in one
// batch. Ensure must have run. An IP or TAP that another VM holds is an
// ErrAlreadyExists error.
func (f *Firewall) AddVM(vm VM) error {
	if err := f.checkVM(vm); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	c, st, err := openState()
	if err != nil {
		return fmt.Errorf("firewall: add vm %s: %w", vm.ID, err)
	}
	if !st.complete() {
		return fmt.Errorf("firewall: add vm %s: banger's tables are missing or incomplete (Ensure first): %w", vm.ID, errdefs.ErrFailedPrecondition)
	}
	// Elements of other VMs with this VM's keys are conflicts; this VM's
	// own elements are replaced.
	for _, el := range st.elements {
		if el.elem.Comment == vm.ID {
			continue
		}
		if k := el.elem.Key; (len(k) == 4 && netip.AddrFrom4([4]byte(k)) == vm.IP) || string(k) == string(ifnameKey(vm.TAP)) {
			return fmt.Errorf("firewall: add vm %s: %s or %s already belongs to vm %s: %w", vm.ID, vm.IP, vm.TAP, el.elem.Comment, errdefs.ErrAlreadyExists)
		}
	}
	st.deleteVM(c, vm.ID, false)
	f.addVM(c, st, vm)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("firewall: add vm %s: %w", vm.ID, first(err))
	}
	return nil
}

func (f *Firewall) checkVM(vm VM) error {
	switch {
	case !idRE.MatchString(vm.ID):
		return fmt.Errorf("firewall: vm id %q: want 1 to 64 letters, digits, '-' or '_': %w", vm.ID, errdefs.ErrInvalid)
	case len(vm.MAC) != 6:
		return fmt.Errorf("firewall: vm %s: MAC %q is not a 48-bit address: %w", vm.ID, vm.MAC, errdefs.ErrInvalid)
	case !vm.IP.Is4() || !f.cfg.Subnet.Contains(vm.IP) || vm.IP == f.cfg.Gateway:
		return fmt.Errorf("firewall: vm %s: IP %s is not a VM address of %s: %w", vm.ID, vm.IP, f.cfg.Subnet, errdefs.ErrInvalid)
	}
	if err := validIfname(vm.TAP); err != nil {
		return fmt.Errorf("firewall: vm %s: TAP: %w", vm.ID, err)
	}
	return nil
}

// RemoveVM removes a VM's chain and elements in one batch. A VM that has
// none (or no tables at all) is not an error.
func (f *Firewall) RemoveVM(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("firewall: vm id %q: %w", id, errdefs.ErrInvalid)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	c, st, err := openState()
	if err != nil {
		return fmt.Errorf("firewall: remove vm %s: %w", id, err)
	}
	if !st.deleteVM(c, id, true) {
		return nil
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("firewall: remove vm %s: %w", id, first(err))
	}
	return nil
}

// VMs returns the ids of the VMs that have rules, sorted.
func (f *Firewall) VMs() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, st, err := openState()
	if err != nil {
		return nil, fmt.Errorf("firewall: list vms: %w", err)
	}
	seen := map[string]bool{}
	for _, ch := range st.vmChains {
		seen[strings.TrimPrefix(ch.Name, vmChainPrefix)] = true
	}
	for _, el := range st.elements {
		if el.elem.Comment != "" {
			seen[el.elem.Comment] = true
		}
	}
	var ids []string
	for id := range seen {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

// state is what readState finds of banger's tables.
type state struct {
	inet, bridge *nftables.Table
	sets         map[string]*nftables.Set // banger's sets by name (unique across both tables)
	vmChains     []*nftables.Chain
	elements     []setElem
}

// complete reports whether the tables and every set exist.
func (st *state) complete() bool {
	if st.inet == nil || st.bridge == nil {
		return false
	}
	for _, s := range sets() {
		if st.sets[s.Name] == nil {
			return false
		}
	}
	return true
}

type setElem struct {
	set  *nftables.Set
	elem nftables.SetElement
}

// first returns the first of the errors a batch's answer joins (the
// kernel answers each message of a failed batch with the same error).
func first(err error) error {
	for {
		var next error
		switch u := err.(type) {
		case interface{ Unwrap() []error }:
			if es := u.Unwrap(); len(es) > 0 {
				next = es[0]
			}
		case interface{ Unwrap() error }:
			next = u.Unwrap()
		}
		if next == nil {
			return err
		}
		err = next
	}
}

// isNotExist reports a netlink answer of "no such table/chain/set".
func isNotExist(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, os.ErrNotExist)
}

// openState opens a netlink connection to nf_tables and reads banger's
// tables through it.
func openState() (*nftables.Conn, *state, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, nil, fmt.Errorf("open nftables: %w", err)
	}
	st, err := readState(c)
	if err != nil {
		return nil, nil, fmt.Errorf("read tables %s: %w", TableName, err)
	}
	return c, st, nil
}

func readState(c *nftables.Conn) (*state, error) {
	st := &state{sets: map[string]*nftables.Set{}}
	var err error
	if st.inet, err = c.ListTableOfFamily(TableName, nftables.TableFamilyINet); err != nil && !isNotExist(err) {
		return nil, err
	}
	if st.bridge, err = c.ListTableOfFamily(TableName, nftables.TableFamilyBridge); err != nil && !isNotExist(err) {
		return nil, err
	}
	for _, t := range []*nftables.Table{st.inet, st.bridge} {
		if t == nil {
			continue
		}
		sets, err := c.GetSets(t)
		if err != nil {
			return nil, fmt.Errorf("list sets of %s: %w", t.Name, err)
		}
		for _, s := range sets {
			st.sets[s.Name] = s
			els, err := c.GetSetElements(s)
			if err != nil {
				return nil, fmt.Errorf("list set %s: %w", s.Name, err)
			}
			for _, e := range els {
				st.elements = append(st.elements, setElem{s, e})
			}
		}
	}
	if st.bridge != nil {
		chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyBridge)
		if err != nil {
			return nil, fmt.Errorf("list chains: %w", err)
		}
		for _, ch := range chains {
			if ch.Table.Name == TableName && strings.HasPrefix(ch.Name, vmChainPrefix) {
				st.vmChains = append(st.vmChains, ch)
			}
		}
	}
	return st, nil
}

// deleteVM queues the deletion of a VM's elements and, if withChain, its
// chain (AddVM keeps the chain and flushes it). It reports whether there
// was anything to delete.
func (st *state) deleteVM(c *nftables.Conn, id string, withChain bool) bool {
	found := false
	bySet := map[*nftables.Set][]nftables.SetElement{}
	for _, el := range st.elements {
		if el.elem.Comment == id {
			// Only the key identifies an element to delete.
			bySet[el.set] = append(bySet[el.set], nftables.SetElement{Key: el.elem.Key})
		}
	}
	for s, els := range bySet {
		_ = c.SetDeleteElements(s, els) // only fails for anonymous sets
		found = true
	}
	if withChain {
		for _, ch := range st.vmChains {
			if ch.Name == vmChainPrefix+id {
				c.DelChain(ch)
				found = true
			}
		}
	}
	return found
}
