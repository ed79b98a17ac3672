package bridgenet

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/testenv/netns"
)

func TestNames(t *testing.T) {
	if got := TAPName("0123456789abcdef"); got != "bg-0123456789ab" || ValidName(got) != nil {
		t.Fatalf("TAPName = %q", got)
	}
	m := MAC("0123456789abcdef")
	if len(m) != 6 || m[0] != 0x02 {
		t.Fatalf("MAC = %s, want 02:...", m)
	}
	if m.String() != MAC("0123456789abcdef").String() || m.String() == MAC("0123456789abcdee").String() {
		t.Fatalf("MAC is not a stable function of the id: %s", m)
	}
	for _, bad := range []string{"", "0123456789abcdef", "a/b", "a b", "a:b", ".", ".."} {
		if err := ValidName(bad); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("ValidName(%q) = %v, want invalid", bad, err)
		}
	}
	if err := ValidName("banger0"); err != nil {
		t.Fatal(err)
	}
}

func TestEnsureBridge(t *testing.T) {
	ns := netns.New(t, "bgbr")
	gw := netip.MustParsePrefix("10.77.0.1/24")
	br := Bridge{Name: "bgtest0", Gateway: gw, MTU: 1400}
	do(t, ns, func() error { return EnsureBridge(br) })
	checkBridge := func() {
		t.Helper()
		out := ns.Run(t, "ip", "-o", "-4", "addr", "show", "dev", "bgtest0")
		if !strings.Contains(out, "inet 10.77.0.1/24") || strings.Count(out, "inet ") != 1 {
			t.Fatalf("bridge addresses: %s", out)
		}
		out = ns.Run(t, "ip", "-d", "link", "show", "dev", "bgtest0")
		if !strings.Contains(out, "mtu 1400") || !strings.Contains(out, "bridge ") || !strings.Contains(out, ",UP") {
			t.Fatalf("bridge link: %s", out)
		}
		if !strings.Contains(out, "link/ether "+BridgeMAC("bgtest0").String()) {
			t.Fatalf("bridge mac, want %s: %s", BridgeMAC("bgtest0"), out)
		}
		if v := strings.TrimSpace(ns.Run(t, "cat", "/proc/sys/net/ipv6/conf/bgtest0/disable_ipv6")); v != "1" {
			t.Fatalf("disable_ipv6 = %s", v)
		}
	}
	checkBridge()
	// Adopted as it is: idempotent.
	do(t, ns, func() error { return EnsureBridge(br) })
	checkBridge()
	// A wrong address and MTU, and down: repaired.
	ns.Run(t, "ip", "addr", "flush", "dev", "bgtest0")
	ns.Run(t, "ip", "addr", "add", "10.88.0.1/16", "dev", "bgtest0")
	ns.Run(t, "ip", "addr", "add", "10.77.0.1/25", "dev", "bgtest0")
	ns.Run(t, "ip", "link", "set", "bgtest0", "mtu", "1300", "address", "02:00:00:00:00:01", "down")
	do(t, ns, func() error { return EnsureBridge(br) })
	checkBridge()

	// A link of another kind with the name is refused.
	ns.Run(t, "ip", "link", "add", "bgdummy", "type", "veth", "peer", "name", "bgdummy1")
	err := ns.Do(func() error { return EnsureBridge(Bridge{Name: "bgdummy", Gateway: gw}) })
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "is a veth") {
		t.Fatalf("bridge over a veth: %v", err)
	}
	for _, bad := range []Bridge{
		{Name: "bgtest0", Gateway: netip.MustParsePrefix("10.77.0.0/24")},
		{Name: "bgtest0", Gateway: netip.MustParsePrefix("fd00::1/64")},
		{Name: "bgtest0", Gateway: netip.MustParsePrefix("10.77.0.1/32")},
		{Name: "bgtest0", Gateway: gw, MTU: 100},
		{Name: "a-much-too-long-name", Gateway: gw},
	} {
		if err := ns.Do(func() error { return EnsureBridge(bad) }); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("EnsureBridge(%+v) = %v, want invalid", bad, err)
		}
	}
}

func TestOpenTAP(t *testing.T) {
	ns := netns.New(t, "bgtap")
	do(t, ns, func() error {
		return EnsureBridge(Bridge{Name: "bgtest0", Gateway: netip.MustParsePrefix("10.77.0.1/24"), MTU: 1400})
	})
	var iso, open *os.File
	do(t, ns, func() (err error) {
		if iso, err = OpenTAP("bg-iso", "bgtest0", true); err != nil {
			return err
		}
		open, err = OpenTAP("bg-open", "bgtest0", false)
		return err
	})
	out := ns.Run(t, "ip", "-d", "link", "show", "dev", "bg-iso")
	for _, want := range []string{"master bgtest0", "isolated on", "mtu 1400", "tun type tap", ",UP"} {
		if !strings.Contains(out, want) {
			t.Errorf("bg-iso lacks %q: %s", want, out)
		}
	}
	// The bridge keeps its own MAC with ports.
	if out := ns.Run(t, "ip", "link", "show", "dev", "bgtest0"); !strings.Contains(out, "link/ether "+BridgeMAC("bgtest0").String()) {
		t.Errorf("bridge mac with ports: %s", out)
	}
	if out := ns.Run(t, "ip", "-d", "link", "show", "dev", "bg-open"); !strings.Contains(out, "isolated off") || !strings.Contains(out, "master bgtest0") {
		t.Errorf("bg-open: %s", out)
	}
	var names []string
	do(t, ns, func() (err error) { names, err = Links("bg-"); return err })
	if !slices.Equal(names, []string{"bg-iso", "bg-open"}) {
		t.Fatalf("Links(bg-) = %v", names)
	}
	// A second TAP with a taken name fails and leaves the first alone.
	err := ns.Do(func() error { _, err := OpenTAP("bg-iso", "bgtest0", true); return err })
	if !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("OpenTAP of a taken name: %v", err)
	}
	ns.Run(t, "ip", "link", "show", "dev", "bg-iso")

	// The TAP goes with its last descriptor.
	if err := iso.Close(); err != nil {
		t.Fatal(err)
	}
	if out, err := ns.Command(t.Context(), "ip", "link", "show", "dev", "bg-iso").CombinedOutput(); err == nil {
		t.Fatalf("bg-iso still exists after its fd closed: %s", out)
	}
	// DeleteLink removes an open one; deleting it again is no error.
	do(t, ns, func() error { return DeleteLink("bg-open") })
	do(t, ns, func() error { return DeleteLink("bg-open") })
	_ = open.Close()
	do(t, ns, func() (err error) { names, err = Links("bg-"); return err })
	if len(names) != 0 {
		t.Fatalf("links left: %v", names)
	}

	// Errors leave nothing behind: not a bridge, and a failure after the
	// TAP was made (the sysctl file can't be written).
	ns.Run(t, "ip", "link", "add", "bgdummy", "type", "veth", "peer", "name", "bgdummy1")
	if err := ns.Do(func() error { _, err := OpenTAP("bg-x", "bgdummy", false); return err }); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("OpenTAP on a veth: %v", err)
	}
	notDir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notDir, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	procSys = notDir
	err = ns.Do(func() error { _, err := OpenTAP("bg-y", "bgtest0", false); return err })
	procSys = "/proc/sys"
	if err == nil || !strings.Contains(err.Error(), "ipv6") {
		t.Fatalf("OpenTAP with a broken sysctl: %v", err)
	}
	do(t, ns, func() (err error) { names, err = Links("bg-"); return err })
	if len(names) != 0 {
		t.Fatalf("a failed OpenTAP left %v", names)
	}
}

func TestIPv4Forwarding(t *testing.T) {
	ns := netns.New(t, "bgfwd")
	ns.Run(t, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
	for i, want := range []bool{true, false} {
		var changed bool
		do(t, ns, func() (err error) { changed, err = EnableIPv4Forwarding(); return err })
		if changed != want {
			t.Fatalf("call %d: changed = %v, want %v", i, changed, want)
		}
		if v := strings.TrimSpace(ns.Run(t, "cat", "/proc/sys/net/ipv4/ip_forward")); v != "1" {
			t.Fatalf("ip_forward = %s", v)
		}
	}
}

func TestRoutesAndLAN(t *testing.T) {
	ns := netns.New(t, "bgrt")
	do(t, ns, func() error {
		return EnsureBridge(Bridge{Name: "bgtest0", Gateway: netip.MustParsePrefix("10.77.0.1/24")})
	})
	ns.Run(t, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
	ns.Run(t, "ip", "link", "set", "lan0", "up")
	ns.Run(t, "ip", "link", "set", "lan1", "up")
	ns.Run(t, "ip", "addr", "add", "192.168.5.10/24", "dev", "lan0")
	ns.Run(t, "ip", "addr", "add", "10.76.1.2/16", "dev", "lan0") // 10.76.0.0/16: no overlap
	ns.Run(t, "ip", "route", "add", "default", "via", "192.168.5.1")
	ns.Run(t, "ip", "route", "add", "10.0.0.0/8", "via", "192.168.5.1")
	ns.Run(t, "ip", "route", "add", "10.77.0.128/25", "dev", "lan0", "table", "52")

	var got []netip.Prefix
	do(t, ns, func() (err error) {
		got, err = RouteConflicts(netip.MustParsePrefix("10.77.0.0/24"), "bgtest0")
		return err
	})
	want := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("10.77.0.128/25")}
	if !slices.Equal(got, want) {
		t.Fatalf("RouteConflicts = %v, want %v", got, want)
	}
	// Without naming it, the bridge's own route conflicts too.
	do(t, ns, func() (err error) { got, err = RouteConflicts(netip.MustParsePrefix("10.77.0.0/24"), ""); return err })
	if !slices.Contains(got, netip.MustParsePrefix("10.77.0.0/24")) {
		t.Fatalf("RouteConflicts without own bridge = %v", got)
	}
	do(t, ns, func() (err error) {
		got, err = RouteConflicts(netip.MustParsePrefix("172.31.0.0/24"), "bgtest0")
		return err
	})
	if len(got) != 0 {
		t.Fatalf("RouteConflicts of a free subnet = %v", got)
	}

	do(t, ns, func() (err error) { got, err = LANPrefixes("bgtest0"); return err })
	want = []netip.Prefix{netip.MustParsePrefix("10.76.0.0/16"), netip.MustParsePrefix("192.168.5.0/24")}
	if !slices.Equal(got, want) {
		t.Fatalf("LANPrefixes = %v, want %v", got, want)
	}
}

// do runs fn inside ns and fails t on error.
func do(t *testing.T, ns *netns.NS, fn func() error) {
	t.Helper()
	if err := ns.Do(fn); err != nil {
		t.Fatal(err)
	}
}

func TestIsTAPName(t *testing.T) {
	for name, want := range map[string]bool{
		TAPName("0123456789abcdef"): true,
		"bg-0123456789ab":           true,
		"bg-foo":                    false,
		"bg-0123456789AB":           false,
		"bg-0123456789a":            false,
		"bg-0123456789abc":          false,
		"xx-0123456789ab":           false,
	} {
		if got := IsTAPName(name); got != want {
			t.Errorf("IsTAPName(%q) = %v, want %v", name, got, want)
		}
	}
}

// AttachTAP puts a running VM's TAP on a bridge made anew (isolation,
// MTU, up), is idempotent, and refuses a link that is not a TAP.
func TestAttachTAP(t *testing.T) {
	ns := netns.New(t, "bgatt")
	do(t, ns, func() error {
		return EnsureBridge(Bridge{Name: "bgtest0", Gateway: netip.MustParsePrefix("10.77.0.1/24"), MTU: 1400})
	})
	var tap *os.File
	do(t, ns, func() (err error) { tap, err = OpenTAP("bg-att", "bgtest0", true); return err })
	defer tap.Close()
	// The bridge is removed and made again: the TAP is on no bridge.
	do(t, ns, func() error { return DeleteLink("bgtest0") })
	do(t, ns, func() error {
		return EnsureBridge(Bridge{Name: "bgtest0", Gateway: netip.MustParsePrefix("10.77.0.1/24"), MTU: 1400})
	})
	if out := ns.Run(t, "ip", "-d", "link", "show", "dev", "bg-att"); strings.Contains(out, "master") {
		t.Fatalf("bg-att still on a bridge after it was deleted: %s", out)
	}
	for range 2 { // the second is a no-op
		do(t, ns, func() error { return AttachTAP("bg-att", "bgtest0", true) })
		out := ns.Run(t, "ip", "-d", "link", "show", "dev", "bg-att")
		for _, want := range []string{"master bgtest0", "isolated on", "mtu 1400", ",UP"} {
			if !strings.Contains(out, want) {
				t.Errorf("bg-att after AttachTAP lacks %q: %s", want, out)
			}
		}
	}
	do(t, ns, func() error { return AttachTAP("bg-att", "bgtest0", false) })
	if out := ns.Run(t, "ip", "-d", "link", "show", "dev", "bg-att"); !strings.Contains(out, "isolated off") {
		t.Errorf("AttachTAP(isolated=false) left: %s", out)
	}
	ns.Run(t, "ip", "link", "add", "bg-veth", "type", "veth", "peer", "name", "bg-veth1")
	if err := ns.Do(func() error { return AttachTAP("bg-veth", "bgtest0", true) }); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("AttachTAP of a veth: %v, want ErrFailedPrecondition", err)
	}
}
