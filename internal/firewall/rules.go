package firewall

import (
	"net"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Names of banger's sets and chains.
const (
	setVMIPs     = "vm_ips"   // inet: every VM's IP
	setHostOK    = "host_ok"  // inet: VM IPs allowed to reach the host
	setVMOK      = "vm_ok"    // inet: VM IPs allowed VM-to-VM
	setLANOK     = "lan_ok"   // inet: VM IPs allowed to the LAN ranges
	setLLOK      = "ll_ok"    // inet: VM IPs allowed to link-local
	mapPorts     = "ports"    // bridge: TAP -> jump vm-ID
	setVMPorts   = "vm_ports" // bridge: TAPs allowed VM-to-VM
	chainVMIn    = "vm_input"
	chainVMFwd   = "vm_forward"
	chainVMToVM  = "vm_to_vm"
	bridgeFilter = -200 // the bridge family's "filter" priority
)

var (
	accept = nftables.ChainPolicyAccept
	inet   = &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
	bridge = &nftables.Table{Name: TableName, Family: nftables.TableFamilyBridge}
)

// sets returns banger's sets, fresh structures for one batch.
func sets() []*nftables.Set {
	ip := func(name string) *nftables.Set {
		return &nftables.Set{Table: inet, Name: name, KeyType: nftables.TypeIPAddr}
	}
	return []*nftables.Set{
		ip(setVMIPs), ip(setHostOK), ip(setVMOK), ip(setLANOK), ip(setLLOK),
		// Interface names are in host byte order for nft (so it shows them).
		{Table: bridge, Name: mapPorts, KeyType: nftables.TypeIFName, KeyByteOrder: binaryutil.NativeEndian, DataType: nftables.TypeVerdict, IsMap: true},
		{Table: bridge, Name: setVMPorts, KeyType: nftables.TypeIFName, KeyByteOrder: binaryutil.NativeEndian},
	}
}

// build queues banger's tables, sets and base chains into c. With fresh,
// existing tables are deleted first (with their per-VM state); without,
// they are updated: the base chains are flushed and filled again.
func (f *Firewall) build(c *nftables.Conn, fresh bool) {
	if fresh {
		// Adding before deleting makes the delete valid when the table
		// doesn't exist.
		for _, t := range []*nftables.Table{inet, bridge} {
			c.AddTable(t)
			c.DelTable(t)
		}
	}
	c.AddTable(inet)
	c.AddTable(bridge)
	byName := map[string]*nftables.Set{}
	for _, s := range sets() {
		_ = c.AddSet(s, nil) // fails only for anonymous or badly typed sets
		byName[s.Name] = s
	}
	chain := func(t *nftables.Table, name string, hook *nftables.ChainHook, typ nftables.ChainType, prio int32) *nftables.Chain {
		ch := &nftables.Chain{Name: name, Table: t}
		if hook != nil {
			ch.Hooknum, ch.Type, ch.Priority, ch.Policy = hook, typ, nftables.ChainPriorityRef(nftables.ChainPriority(prio)), &accept
		}
		c.AddChain(ch)
		c.FlushChain(ch)
		return ch
	}
	add := func(ch *nftables.Chain, parts ...[]expr.Any) {
		var e []expr.Any
		for _, p := range parts {
			e = append(e, p...)
		}
		c.AddRule(&nftables.Rule{Table: ch.Table, Chain: ch, Exprs: e})
	}
	br := f.cfg.Bridge

	// inet: NAT.
	post := chain(inet, "postrouting", nftables.ChainHookPostrouting, nftables.ChainTypeNAT, 100)
	add(post, nfproto(unix.NFPROTO_IPV4, true), ipPrefix(offSaddr, f.cfg.Subnet), ifname(expr.MetaKeyOIFNAME, br, false), []expr.Any{&expr.Masq{}})

	// inet: VMs to the host.
	vmIn := chain(inet, chainVMIn, nil, "", 0)
	in := chain(inet, "input", nftables.ChainHookInput, nftables.ChainTypeFilter, 0)
	add(in, ifname(expr.MetaKeyIIFNAME, br, true), jump(chainVMIn))
	add(vmIn, ctEstablished(), verdict(expr.VerdictAccept))
	add(vmIn, nfproto(unix.NFPROTO_IPV4, false), verdict(expr.VerdictDrop))
	add(vmIn, l4proto(unix.IPPROTO_UDP), port(offDport, 67), verdict(expr.VerdictAccept))
	// (meta nfproto ipv4 before an IPv4 match, implied by the rule above
	// but written so that nft shows `ip daddr`.)
	v4 := nfproto(unix.NFPROTO_IPV4, true)
	add(vmIn, v4, lookup(offSaddr, byName[setVMIPs], true), verdict(expr.VerdictDrop))
	for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
		add(vmIn, v4, ipAddr(offDaddr, f.cfg.Gateway), l4proto(proto), port(offDport, 53), verdict(expr.VerdictAccept))
	}
	if f.cfg.AllowHost {
		add(vmIn, verdict(expr.VerdictAccept))
	} else {
		add(vmIn, v4, lookup(offSaddr, byName[setHostOK], false), verdict(expr.VerdictAccept))
		add(vmIn, verdict(expr.VerdictDrop))
	}

	// inet: VMs through the host.
	vmToVM := chain(inet, chainVMToVM, nil, "", 0)
	vmFwd := chain(inet, chainVMFwd, nil, "", 0)
	fwd := chain(inet, "forward", nftables.ChainHookForward, nftables.ChainTypeFilter, 0)
	add(fwd, ctEstablished(), verdict(expr.VerdictAccept))
	add(fwd, ifname(expr.MetaKeyIIFNAME, br, true), jump(chainVMFwd))
	add(fwd, ifname(expr.MetaKeyOIFNAME, br, true), verdict(expr.VerdictDrop))
	add(vmFwd, nfproto(unix.NFPROTO_IPV4, false), verdict(expr.VerdictDrop))
	add(vmFwd, v4, lookup(offSaddr, byName[setVMIPs], true), verdict(expr.VerdictDrop))
	add(vmFwd, ifname(expr.MetaKeyOIFNAME, br, true), jump(chainVMToVM))
	if !f.cfg.AllowLinkLocal {
		for _, p := range metadataRanges {
			add(vmFwd, v4, ipPrefix(offDaddr, p), lookup(offSaddr, byName[setLLOK], true), verdict(expr.VerdictDrop))
		}
	}
	if !f.cfg.AllowLAN {
		for _, p := range f.lan {
			add(vmFwd, v4, ipPrefix(offDaddr, p), lookup(offSaddr, byName[setLANOK], true), verdict(expr.VerdictDrop))
		}
	}
	add(vmFwd, verdict(expr.VerdictAccept))
	if f.cfg.AllowVMToVM {
		add(vmToVM, verdict(expr.VerdictAccept))
	} else {
		add(vmToVM, v4, lookup(offSaddr, byName[setVMOK], false), lookup(offDaddr, byName[setVMOK], false), verdict(expr.VerdictAccept))
		add(vmToVM, verdict(expr.VerdictDrop))
	}

	// bridge: every frame from a VM's port goes through its VM's chain.
	// (Not scoped with meta ibrname: some kernels lack nft_meta_bridge.
	// The map holds only banger's TAPs.)
	pre := chain(bridge, "prerouting", nftables.ChainHookPrerouting, nftables.ChainTypeFilter, bridgeFilter)
	add(pre, meta(expr.MetaKeyIIFNAME), vmap(byName[mapPorts]))
	add(pre, meta(expr.MetaKeyIIFNAME), cmp(expr.CmpOpEq, []byte(f.cfg.TAPPrefix)), verdict(expr.VerdictDrop)) // nft: iifname "bg-*"
	// bridge: VM to VM at layer 2 (br_netfilter may be off).
	bfwd := chain(bridge, "forward", nftables.ChainHookForward, nftables.ChainTypeFilter, bridgeFilter)
	if !f.cfg.AllowVMToVM {
		add(bfwd, meta(expr.MetaKeyIIFNAME), lookupReg(byName[setVMPorts]),
			meta(expr.MetaKeyOIFNAME), lookupReg(byName[setVMPorts]), verdict(expr.VerdictAccept))
		add(bfwd, meta(expr.MetaKeyIIFNAME), lookupReg(byName[mapPorts]), verdict(expr.VerdictDrop))
	}
}

// set returns banger's set of that name.
func (st *state) set(name string) *nftables.Set { return st.sets[name] }

// addVM queues a VM's chain (flushed and filled again when it exists) and
// its elements.
func (f *Firewall) addVM(c *nftables.Conn, st *state, vm VM) {
	ch := c.AddChain(&nftables.Chain{Name: vmChainPrefix + vm.ID, Table: st.bridge})
	c.FlushChain(ch)
	add := func(parts ...[]expr.Any) {
		var e []expr.Any
		for _, p := range parts {
			e = append(e, p...)
		}
		c.AddRule(&nftables.Rule{Table: ch.Table, Chain: ch, Exprs: e})
	}
	ip := vm.IP.As4()
	add(etherSaddr(vm.MAC, false), verdict(expr.VerdictDrop))
	// ARP: Ethernet/IPv4, sender = the VM (0.0.0.0 for address probes).
	for _, sender := range [][]byte{ip[:], {0, 0, 0, 0}} {
		add(etherType(unix.ETH_P_ARP), payload(expr.PayloadBaseNetworkHeader, 0, 6), cmp(expr.CmpOpEq, []byte{0, 1, 8, 0, 6, 4}),
			payload(expr.PayloadBaseNetworkHeader, 8, 6), cmp(expr.CmpOpEq, vm.MAC),
			payload(expr.PayloadBaseNetworkHeader, 14, 4), cmp(expr.CmpOpEq, sender), verdict(expr.VerdictAccept))
	}
	// IPv4 from the VM's address, or a DHCP request before it has one.
	add(etherType(unix.ETH_P_IP), ipAddr(offSaddr, vm.IP), verdict(expr.VerdictAccept))
	add(etherType(unix.ETH_P_IP), ipAddr(offSaddr, netip.IPv4Unspecified()), ipAddr(offDaddr, netip.AddrFrom4([4]byte{255, 255, 255, 255})),
		l4proto(unix.IPPROTO_UDP), port(offSport, 68), port(offDport, 67), verdict(expr.VerdictAccept))
	add(verdict(expr.VerdictDrop))

	tap := nftables.SetElement{Key: ifnameKey(vm.TAP), Comment: vm.ID}
	addr := nftables.SetElement{Key: ip[:], Comment: vm.ID}
	jumpEl := tap
	jumpEl.VerdictData = &expr.Verdict{Kind: expr.VerdictJump, Chain: ch.Name}
	_ = c.SetAddElements(st.set(mapPorts), []nftables.SetElement{jumpEl})
	_ = c.SetAddElements(st.set(setVMIPs), []nftables.SetElement{addr})
	if vm.AllowVMToVM {
		_ = c.SetAddElements(st.set(setVMPorts), []nftables.SetElement{tap})
		_ = c.SetAddElements(st.set(setVMOK), []nftables.SetElement{addr})
	}
	for _, a := range []struct {
		on  bool
		set string
	}{{vm.AllowHost, setHostOK}, {vm.AllowLAN, setLANOK}, {vm.AllowLinkLocal, setLLOK}} {
		if a.on {
			_ = c.SetAddElements(st.set(a.set), []nftables.SetElement{addr})
		}
	}
}

// Offsets in the IPv4 header and the transport header.
const (
	offSaddr = 12
	offDaddr = 16
	offSport = 0
	offDport = 2
)

func meta(key expr.MetaKey) []expr.Any { return []expr.Any{&expr.Meta{Key: key, Register: 1}} }

func payload(base expr.PayloadBase, off, n uint32) []expr.Any {
	return []expr.Any{&expr.Payload{DestRegister: 1, Base: base, Offset: off, Len: n}}
}

func cmp(op expr.CmpOp, data []byte) []expr.Any {
	return []expr.Any{&expr.Cmp{Op: op, Register: 1, Data: data}}
}

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }

func jump(chain string) []expr.Any {
	return []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: chain}}
}

// ifname matches an interface name (meta key iifname or oifname)
// the way nft and iptables-nft do: the name and its NUL.
func ifname(key expr.MetaKey, name string, eq bool) []expr.Any {
	op := expr.CmpOpEq
	if !eq {
		op = expr.CmpOpNeq
	}
	return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: op, Register: 1, Data: append([]byte(name), 0)}}
}

// ifnameKey is an interface name as a set key: IFNAMSIZ bytes.
func ifnameKey(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func nfproto(proto byte, eq bool) []expr.Any {
	op := expr.CmpOpEq
	if !eq {
		op = expr.CmpOpNeq
	}
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}, &expr.Cmp{Op: op, Register: 1, Data: []byte{proto}}}
}

func l4proto(proto byte) []expr.Any {
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}}}
}

func port(off uint32, p uint16) []expr.Any {
	return append(payload(expr.PayloadBaseTransportHeader, off, 2), cmp(expr.CmpOpEq, binaryutil.BigEndian.PutUint16(p))...)
}

func ctEstablished() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

func ipAddr(off uint32, a netip.Addr) []expr.Any {
	b := a.As4()
	return append(payload(expr.PayloadBaseNetworkHeader, off, 4), cmp(expr.CmpOpEq, b[:])...)
}

func ipPrefix(off uint32, p netip.Prefix) []expr.Any {
	if p.Bits() == 32 {
		return ipAddr(off, p.Addr())
	}
	mask := net.CIDRMask(p.Bits(), 32)
	b := p.Masked().Addr().As4()
	return append(payload(expr.PayloadBaseNetworkHeader, off, 4),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b[:]})
}

func lookup(off uint32, s *nftables.Set, invert bool) []expr.Any {
	return append(payload(expr.PayloadBaseNetworkHeader, off, 4),
		&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID, Invert: invert})
}

func lookupReg(s *nftables.Set) []expr.Any {
	return []expr.Any{&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID}}
}

func vmap(s *nftables.Set) []expr.Any {
	return []expr.Any{&expr.Lookup{SourceRegister: 1, DestRegister: 0, IsDestRegSet: true, SetName: s.Name, SetID: s.ID}}
}

func etherType(t uint16) []expr.Any {
	return append(payload(expr.PayloadBaseLLHeader, 12, 2), cmp(expr.CmpOpEq, binaryutil.BigEndian.PutUint16(t))...)
}

func etherSaddr(mac net.HardwareAddr, eq bool) []expr.Any {
	op := expr.CmpOpEq
	if !eq {
		op = expr.CmpOpNeq
	}
	return append(payload(expr.PayloadBaseLLHeader, 6, 6), cmp(op, mac)...)
}
