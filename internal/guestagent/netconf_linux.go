package guestagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
)

// The guest's network (agentproto.Config.Network), applied by init through
// netlink once the modules are loaded (virtio_net is a module in most
// kernels, so the kernel's ip= can't do it): each card, found by its MAC,
// gets its MTU, its address and the default route, and is brought up.
// Routes are added with the "static" protocol, which
// systemd-networkd's KeepConfiguration=static keeps too.

// linkWaitTimeout bounds the wait for a card to appear.
const linkWaitTimeout = 5 * time.Second

// configureNetwork applies nc. It returns a line per card for the console,
// and every failure, joined.
func configureNetwork(ctx context.Context, nc *agentproto.NetworkConfig) ([]string, error) {
	var done []string
	var errs []error
	if err := loopbackUp(); err != nil {
		errs = append(errs, err)
	}
	for _, ifc := range nc.Interfaces {
		name, err := configureInterface(ctx, ifc)
		if err != nil {
			errs = append(errs, fmt.Errorf("network card %s: %w", ifc.MAC, err))
			continue
		}
		desc := fmt.Sprintf("%s (%s): up", name, ifc.MAC)
		if ifc.Address != "" {
			desc += " " + ifc.Address
		}
		if ifc.Gateway != "" {
			desc += " via " + ifc.Gateway
		}
		done = append(done, desc)
	}
	return done, errors.Join(errs...)
}

func configureInterface(ctx context.Context, ifc agentproto.Interface) (string, error) {
	mac, err := net.ParseMAC(ifc.MAC)
	if err != nil {
		return "", fmt.Errorf("bad MAC: %w", err)
	}
	var pfx netip.Prefix
	if ifc.Address != "" {
		if pfx, err = netip.ParsePrefix(ifc.Address); err != nil {
			return "", fmt.Errorf("bad address: %w", err)
		}
	}
	var gw netip.Addr
	if ifc.Gateway != "" {
		if gw, err = netip.ParseAddr(ifc.Gateway); err != nil {
			return "", fmt.Errorf("bad gateway: %w", err)
		}
	}
	link, err := waitLink(ctx, mac, linkWaitTimeout)
	if err != nil {
		return "", err
	}
	name := link.Attrs().Name
	if ifc.MTU > 0 && link.Attrs().MTU != ifc.MTU {
		if err := netlink.LinkSetMTU(link, ifc.MTU); err != nil {
			return name, fmt.Errorf("%s: set MTU %d: %w", name, ifc.MTU, err)
		}
	}
	if pfx.IsValid() {
		addr := &netlink.Addr{IPNet: prefixNet(pfx)}
		if err := netlink.AddrReplace(link, addr); err != nil {
			return name, fmt.Errorf("%s: add address %s: %w", name, pfx, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return name, fmt.Errorf("%s: set up: %w", name, err)
	}
	if gw.IsValid() {
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw.AsSlice(), Protocol: unix.RTPROT_STATIC}
		if gw.Is4() {
			r.Dst = &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		} else {
			r.Dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		if !pfx.IsValid() || !pfx.Masked().Contains(gw) {
			r.Flags = int(netlink.FLAG_ONLINK)
		}
		if err := netlink.RouteReplace(r); err != nil {
			return name, fmt.Errorf("%s: default route via %s: %w", name, gw, err)
		}
	}
	return name, nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// waitLink returns the link with the MAC address mac, waiting up to
// timeout for it to appear.
func waitLink(ctx context.Context, mac net.HardwareAddr, timeout time.Duration) (netlink.Link, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		link, err := linkByMAC(mac)
		if err == nil {
			return link, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w after %s (%s)", err, timeout, linkNames())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

var errNoLink = errors.New("no network card with this MAC")

func linkByMAC(mac net.HardwareAddr) (netlink.Link, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		if l.Attrs().HardwareAddr.String() == mac.String() {
			return l, nil
		}
	}
	return nil, errNoLink
}

// linkNames lists the guest's cards for an error, with a hint when it has
// none at all.
func linkNames() string {
	links, err := netlink.LinkList()
	if err != nil {
		return "list links: " + err.Error()
	}
	var names []string
	for _, l := range links {
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		names = append(names, l.Attrs().Name+"="+l.Attrs().HardwareAddr.String())
	}
	if len(names) == 0 {
		return "the guest has no network card: is virtio_net among the boot modules, and built for this kernel?"
	}
	return "cards: " + strings.Join(names, " ")
}

// networkState reports, for Info.Network, what the guest's cards have now:
// Configured when every card of nc is up with its address and default
// route. Error is initErr, what init reported when it applied nc: a setup
// that failed (the host gives up on the boot), unlike a card that lacks
// something now (not configured, yet).
func networkState(nc *agentproto.NetworkConfig, initErr string) *agentproto.NetworkState {
	st, _ := networkStateWhy(nc, initErr)
	return st
}

// networkStateWhy is networkState, and what the cards lack.
func networkStateWhy(nc *agentproto.NetworkConfig, initErr string) (*agentproto.NetworkState, []string) {
	if nc == nil {
		return nil, nil
	}
	st := &agentproto.NetworkState{Error: initErr}
	var problems []string
	for _, ifc := range nc.Interfaces {
		addrs, problem := interfaceState(ifc)
		st.Addresses = append(st.Addresses, addrs...)
		if problem != "" {
			problems = append(problems, problem)
		}
	}
	st.Configured = len(problems) == 0 && initErr == ""
	return st, problems
}

// interfaceState returns a card's addresses, and what it lacks of ifc.
func interfaceState(ifc agentproto.Interface) (addrs []string, problem string) {
	mac, err := net.ParseMAC(ifc.MAC)
	if err != nil {
		return nil, fmt.Sprintf("network card %s: bad MAC", ifc.MAC)
	}
	link, err := linkByMAC(mac)
	if err != nil {
		return nil, fmt.Sprintf("network card %s: %v", ifc.MAC, err)
	}
	name := link.Attrs().Name
	list, err := netlink.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Sprintf("%s: list addresses: %v", name, err)
	}
	has := false
	want, _ := netip.ParsePrefix(ifc.Address)
	for _, a := range list {
		if a.IP.IsLinkLocalUnicast() {
			continue
		}
		p, ok := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		if !ok {
			continue
		}
		pfx := netip.PrefixFrom(p.Unmap(), ones)
		addrs = append(addrs, pfx.String())
		has = has || pfx == want
	}
	switch {
	case link.Attrs().Flags&net.FlagUp == 0:
		return addrs, fmt.Sprintf("%s is down", name)
	case ifc.Address != "" && !has:
		return addrs, fmt.Sprintf("%s lacks its address %s", name, ifc.Address)
	}
	if ifc.Gateway == "" {
		return addrs, ""
	}
	gw, err := netip.ParseAddr(ifc.Gateway)
	if err != nil {
		return addrs, fmt.Sprintf("%s: bad gateway %q", name, ifc.Gateway)
	}
	family := netlink.FAMILY_V4
	if gw.Is6() {
		family = netlink.FAMILY_V6
	}
	routes, err := netlink.RouteList(link, family)
	if err != nil {
		return addrs, fmt.Sprintf("%s: list routes: %v", name, err)
	}
	for _, r := range routes {
		isDefault := r.Dst == nil
		if r.Dst != nil {
			ones, _ := r.Dst.Mask.Size()
			isDefault = ones == 0
		}
		if g, ok := netip.AddrFromSlice(r.Gw); ok && isDefault && g.Unmap() == gw {
			return addrs, ""
		}
	}
	return addrs, fmt.Sprintf("%s has no default route via %s", name, gw)
}
