package firewall

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/bangerdev/banger/internal/testenv/netns"
)

// BenchmarkEnsure measures Ensure on existing tables (what a daemon start
// or a repeated Ensure costs) with 50 VMs.
func BenchmarkEnsure(b *testing.B) {
	ns, f := benchFirewall(b, 50)
	b.ResetTimer()
	if err := ns.Do(func() error {
		for b.Loop() {
			if err := f.Ensure(); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkAddRemoveVM measures one VM's AddVM and RemoveVM next to 50
// others (each reads banger's sets, then writes one batch).
func BenchmarkAddRemoveVM(b *testing.B) {
	ns, f := benchFirewall(b, 50)
	vm := benchVM(200)
	b.ResetTimer()
	if err := ns.Do(func() error {
		for b.Loop() {
			if err := f.AddVM(vm); err != nil {
				return err
			}
			if err := f.RemoveVM(vm.ID); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
}

func benchVM(i int) VM {
	id := fmt.Sprintf("%04x000000000000", i)
	return VM{ID: id, TAP: "bg-" + id[:12], MAC: net.HardwareAddr{2, 0, 0, 0, byte(i >> 8), byte(i)},
		IP: netip.AddrFrom4([4]byte{10, 77, byte(i >> 8), byte(i)}), AllowLAN: i%2 == 0}
}

func benchFirewall(b *testing.B, vms int) (*netns.NS, *Firewall) {
	ns := netns.New(b, "fwbench")
	f, err := New(Config{Bridge: "banger0", Subnet: netip.MustParsePrefix("10.77.0.0/16"), Gateway: netip.MustParseAddr("10.77.0.1")})
	if err != nil {
		b.Fatal(err)
	}
	if err := ns.Do(func() error {
		if err := f.Ensure(); err != nil {
			return err
		}
		for i := 2; i < 2+vms; i++ {
			if err := f.AddVM(benchVM(i)); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	return ns, f
}
