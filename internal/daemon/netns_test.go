package daemon

import (
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/bridgenet"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/firewall"
	"github.com/bangerdev/banger/internal/testenv/netns"
)

// The daemon's real host network (bridgeHost: bridge, TAPs, nftables,
// DHCP, DNS, port forwarders) with the fake VMM, run whole inside a
// network namespace this test makes: what a bridged VM's start makes, what
// its stop removes, what a daemon restart keeps and restores, what rm
// leaves (nothing). No traffic goes to a guest (the fake has none).
func TestHostNetworkInNamespace(t *testing.T) {
	if !netns.InChild() {
		ns := netns.New(t, "bgdn")
		ns.RunTest(t)
		return
	}
	requireRoot(t)
	e := newEnv(t, func(c *config.Daemon) {
		bridged(c)
		c.DNSServers = []string{"127.0.0.1"} // never asked: no guest
	})
	e.hostNetwork = true
	d := e.start()
	if _, err := d.c.ImageRegister(testCtx(t), api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd}); err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	port := freePort(t)
	fw, err := firewall.New(firewall.Config{Bridge: "banger0", Subnet: netip.MustParsePrefix("10.77.0.0/24"), Gateway: netip.MustParseAddr("10.77.0.1")})
	if err != nil {
		t.Fatal(err)
	}
	state := func() (taps, rules []string) {
		t.Helper()
		taps, err := bridgenet.Links(bridgenet.TAPPrefix)
		if err != nil {
			t.Fatal(err)
		}
		rules, err = fw.VMs()
		if err != nil {
			t.Fatal(err)
		}
		return taps, rules
	}
	portBound := func() bool {
		l, err := net.Listen("tcp", "127.0.0.1:"+itoa(port))
		if err != nil {
			return true
		}
		l.Close()
		return false
	}

	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "b", Start: true, MemoryMiB: 128, CPUs: 1, Ports: []string{itoa(port) + ":80"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	br, err := netlink.LinkByName("banger0")
	if err != nil {
		t.Fatalf("no bridge: %v", err)
	}
	addrs, _ := netlink.AddrList(br, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != "10.77.0.1/24" {
		t.Errorf("bridge addresses %v, want 10.77.0.1/24", addrs)
	}
	tap, err := netlink.LinkByName(vm.Network.TAP)
	if err != nil || tap.Attrs().MasterIndex != br.Attrs().Index {
		t.Fatalf("tap %s: %v (master %v), want on banger0", vm.Network.TAP, err, tap)
	}
	taps, rules := state()
	if !slices.Equal(taps, []string{vm.Network.TAP}) || !slices.Equal(rules, []string{vm.ID}) || !portBound() {
		t.Fatalf("running vm: taps %v, rules %v, port bound %v", taps, rules, portBound())
	}
	// DNS answers on the gateway (TCP accepts), DHCP is bound.
	if c, err := net.DialTimeout("tcp", "10.77.0.1:53", 5*time.Second); err != nil {
		t.Errorf("dns forwarder on the gateway: %v", err)
	} else {
		c.Close()
	}
	if out := nsRun(t, "ss", "-Hlun", "sport", "= :67"); !strings.Contains(out, "banger0") {
		t.Errorf("no dhcp server bound to banger0: %q", out)
	}

	if _, err := d.c.VMStop(ctx, api.VMStopParams{Name: "b"}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "the tap to go with the vmm", func() bool { taps, _ := state(); return len(taps) == 0 })
	// Someone deletes the bridge: the next start makes it again.
	if err := bridgenet.DeleteLink("banger0"); err != nil {
		t.Fatal(err)
	}
	if _, rules := state(); len(rules) != 0 || portBound() {
		t.Errorf("stopped vm: rules %v, port bound %v", rules, portBound())
	}

	// A daemon restart keeps a running VM's TAP and rules, and forwards
	// its ports again.
	if _, err := d.c.VMStart(ctx, api.VMStartParams{Name: "b"}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName("banger0"); err != nil {
		t.Fatalf("the bridge was not made again: %v", err)
	}
	if c, err := net.DialTimeout("tcp", "10.77.0.1:53", 5*time.Second); err != nil {
		t.Errorf("dns forwarder after the bridge came back: %v", err)
	} else {
		c.Close()
	}
	d.close()
	if taps, rules := state(); len(taps) != 1 || len(rules) != 1 || portBound() {
		t.Fatalf("daemon stopped: taps %v, rules %v (want kept), port bound %v (want not)", taps, rules, portBound())
	}
	// What a crash left of a VM that no longer exists (a persistent TAP,
	// rules) goes at the next start.
	nsRun(t, "ip", "tuntap", "add", "dev", "bg-0000000057a1", "mode", "tap")
	if err := fw.AddVM(firewall.VM{ID: "stale", TAP: "bg-0000000057a1", MAC: bridgenet.MAC("stale"), IP: netip.MustParseAddr("10.77.0.200")}); err != nil {
		t.Fatal(err)
	}
	if taps, rules := state(); len(taps) != 2 || len(rules) != 2 {
		t.Fatalf("stale tap and rules not made: %v, %v", taps, rules)
	}
	d = e.start()
	if taps, rules := state(); !slices.Equal(taps, []string{vm.Network.TAP}) || !slices.Equal(rules, []string{vm.ID}) || !portBound() {
		t.Fatalf("daemon restarted: taps %v, rules %v (want only the running VM's), port bound %v", taps, rules, portBound())
	}
	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "b", Force: true}); err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "the tap to go", func() bool { taps, _ := state(); return len(taps) == 0 })
	if _, rules := state(); len(rules) != 0 || portBound() {
		t.Errorf("after rm: rules %v, port bound %v", rules, portBound())
	}
}

func nsRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := execCommand(name, args...)
	if err != nil {
		t.Fatalf("%s %v: %v: %s", name, args, err, out)
	}
	return out
}

func execCommand(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}
