package bridgenet

import (
	"errors"
	"fmt"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/errdefs"
)

// OpenTAP makes the TAP device name (IFF_TAP, IFF_NO_PI, IFF_VNET_HDR: what
// QEMU's virtio-net expects), not persistent, attaches it to bridge with
// the bridge's MTU, sets its bridge port isolated when isolated (isolated
// ports can't talk to each other through the bridge, only to the bridge
// and non-isolated ports), and brings it up. The TAP exists as long as the
// returned file (or a copy of its descriptor, the VMM's) is open. On error
// nothing is left: the descriptor is closed, and the TAP with it.
//
// A link already named name is an error (errdefs.ErrAlreadyExists).
func OpenTAP(name, bridge string, isolated bool) (f *os.File, err error) {
	if err := ValidName(name); err != nil {
		return nil, fmt.Errorf("tap: %w", err)
	}
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		return nil, fmt.Errorf("tap %s: find bridge %s: %w", name, bridge, err)
	}
	if br.Type() != "bridge" {
		return nil, fmt.Errorf("tap %s: link %s is a %s, not a bridge: %w", name, bridge, br.Type(), errdefs.ErrFailedPrecondition)
	}
	if _, err := netlink.LinkByName(name); err == nil {
		return nil, fmt.Errorf("tap %s: a link with this name exists (left by a crash? remove it): %w", name, errdefs.ErrAlreadyExists)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("tap %s: open /dev/net/tun (is the tun module loaded?): %w", name, err)
	}
	f = os.NewFile(uintptr(fd), "/dev/net/tun:"+name)
	created := false
	defer func() {
		if err != nil {
			_ = f.Close()
			// Closing the only descriptor removes a non-persistent TAP; this
			// covers one made persistent meanwhile. Never another's TAP.
			if l, lerr := netlink.LinkByName(name); created && lerr == nil && l.Type() == "tuntap" {
				_ = netlink.LinkDel(l)
			}
			f = nil
		}
	}()
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return nil, fmt.Errorf("tap %s: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		if errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("tap %s: in use by another process: %w", name, errdefs.ErrAlreadyExists)
		}
		return nil, fmt.Errorf("tap %s: create (TUNSETIFF): %w", name, err)
	}
	created = true
	link, err := netlink.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("tap %s: find it: %w", name, err)
	}
	if mtu := br.Attrs().MTU; mtu != 0 && link.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			return nil, fmt.Errorf("tap %s: set mtu %d: %w", name, mtu, err)
		}
	}
	if err := disableIPv6(name); err != nil {
		return nil, fmt.Errorf("tap %s: %w", name, err)
	}
	if err := netlink.LinkSetMaster(link, br); err != nil {
		return nil, fmt.Errorf("tap %s: attach to bridge %s: %w", name, bridge, err)
	}
	if err := netlink.LinkSetIsolated(link, isolated); err != nil {
		return nil, fmt.Errorf("tap %s: set bridge port isolation %v: %w", name, isolated, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("tap %s: bring up: %w", name, err)
	}
	return f, nil
}

// AttachTAP attaches the existing TAP name to bridge again (a bridge made
// anew, or adopted, under running VMs: their TAPs were detached with the
// old one): the bridge's MTU, bridge port isolation as isolated, up. A TAP
// already attached is set the same way (idempotent). A link name that is
// not a TUN/TAP device is an error (errdefs.ErrFailedPrecondition).
func AttachTAP(name, bridge string, isolated bool) error {
	if err := ValidName(name); err != nil {
		return fmt.Errorf("tap: %w", err)
	}
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		return fmt.Errorf("tap %s: find bridge %s: %w", name, bridge, err)
	}
	if br.Type() != "bridge" {
		return fmt.Errorf("tap %s: link %s is a %s, not a bridge: %w", name, bridge, br.Type(), errdefs.ErrFailedPrecondition)
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("tap %s: find it: %w", name, err)
	}
	if link.Type() != "tuntap" {
		return fmt.Errorf("tap %s: the link is a %s, not a TAP: %w", name, link.Type(), errdefs.ErrFailedPrecondition)
	}
	if mtu := br.Attrs().MTU; mtu != 0 && link.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			return fmt.Errorf("tap %s: set mtu %d: %w", name, mtu, err)
		}
	}
	if link.Attrs().MasterIndex != br.Attrs().Index {
		if err := netlink.LinkSetMaster(link, br); err != nil {
			return fmt.Errorf("tap %s: attach to bridge %s: %w", name, bridge, err)
		}
	}
	if err := netlink.LinkSetIsolated(link, isolated); err != nil {
		return fmt.Errorf("tap %s: set bridge port isolation %v: %w", name, isolated, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("tap %s: bring up: %w", name, err)
	}
	return nil
}
