package qemu

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/vmm"
)

// validateNet checks a spec's network card.
func validateNet(n *vmm.Net) error {
	if n == nil {
		return nil
	}
	mac, err := net.ParseMAC(n.MAC)
	if err != nil || len(mac) != 6 || mac[0]&1 != 0 {
		return fmt.Errorf("invalid spec: network card mac %q: want a unicast EUI-48 address", n.MAC)
	}
	switch n.Mode {
	case vmm.NetTAP:
		if n.TAP == nil {
			return errors.New("invalid spec: network tap without an open TAP device")
		}
		if len(n.Forwards) > 0 {
			return errors.New("invalid spec: a TAP network card has no VMM port forwards (the daemon forwards them)")
		}
	case vmm.NetUser:
		for _, f := range n.Forwards {
			a, err := netip.ParseAddr(f.HostIP)
			switch {
			case f.Proto != "tcp" && f.Proto != "udp":
				return fmt.Errorf("invalid spec: forward protocol %q: want tcp or udp", f.Proto)
			case err != nil || !a.Is4():
				return fmt.Errorf("invalid spec: forward host address %q: QEMU's user network forwards IPv4 addresses only", f.HostIP)
			case f.HostPort < 1 || f.HostPort > 65535 || f.GuestPort < 1 || f.GuestPort > 65535:
				return fmt.Errorf("invalid spec: forward %d->%d: ports are 1 to 65535", f.HostPort, f.GuestPort)
			}
		}
	default:
		return fmt.Errorf("invalid spec: network mode %q: want %s or %s", n.Mode, vmm.NetTAP, vmm.NetUser)
	}
	return nil
}

// netArgs are the arguments of the VM's network card: a virtio-net device
// on the microvm's virtio-mmio bus, backed by the TAP device QEMU
// inherits as descriptor tapFD, or by QEMU's user-mode network stack with
// its host forwards. None when n is nil.
func netArgs(n *vmm.Net, tapFD int) []string {
	if n == nil {
		return nil
	}
	var netdev string
	switch n.Mode {
	case vmm.NetTAP:
		netdev = "tap,id=net0,fd=" + strconv.Itoa(tapFD)
	case vmm.NetUser:
		var b strings.Builder
		b.WriteString("user,id=net0")
		for _, f := range n.Forwards {
			fmt.Fprintf(&b, ",hostfwd=%s:%s:%d-:%d", f.Proto, f.HostIP, f.HostPort, f.GuestPort)
		}
		netdev = b.String()
	}
	return []string{
		"-netdev", netdev,
		"-device", "virtio-net-device,netdev=net0,mac=" + strings.ToLower(n.MAC),
	}
}

// dupFile duplicates f (close-on-exec): the driver closes its copies of
// the descriptors it passes to QEMU, never the caller's.
func dupFile(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("duplicate %s: %w", f.Name(), err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}
