package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/bridgenet"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/testenv/netns"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmtest"
)

const testMAC = "02:5e:aa:01:02:03"

// argValues returns the values that follow flag in args.
func argValues(args []string, flag string) []string {
	var out []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			out = append(out, args[i+1])
		}
	}
	return out
}

func TestNetArgs(t *testing.T) {
	tap, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer tap.Close()
	spec := vmm.Spec{ID: "id", Name: "n", Dir: "/d", CPUs: 1, MemoryMiB: 128, Kernel: "/k", RootDisk: vmm.Disk{Path: "/r", Format: vmm.FormatRaw}}
	if got := BuildArgs(spec, vmm.AccelTCG, PathsFor(spec.Dir)); slices.Contains(got, "-netdev") {
		t.Errorf("no Net, yet a network card: %q", got)
	}
	spec.Net = &vmm.Net{Mode: vmm.NetTAP, MAC: "02:5E:AA:01:02:03", TAP: tap, TAPName: "bg-x"}
	got := BuildArgs(spec, vmm.AccelTCG, PathsFor(spec.Dir))
	if nd := argValues(got, "-netdev"); !slices.Equal(nd, []string{"tap,id=net0,fd=3"}) {
		t.Errorf("tap netdev = %q", nd)
	}
	if !slices.Contains(argValues(got, "-device"), "virtio-net-device,netdev=net0,mac="+testMAC) {
		t.Errorf("no virtio-net device with the mac: %q", got)
	}
	spec.Net = &vmm.Net{Mode: vmm.NetUser, MAC: testMAC, Forwards: []vmm.Forward{
		{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 2222, GuestPort: 22},
		{Proto: "udp", HostIP: "0.0.0.0", HostPort: 5353, GuestPort: 53},
	}}
	got = BuildArgs(spec, vmm.AccelTCG, PathsFor(spec.Dir))
	if nd := argValues(got, "-netdev"); !slices.Equal(nd, []string{"user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp:0.0.0.0:5353-:53"}) {
		t.Errorf("user netdev = %q", nd)
	}
}

func TestNetValidation(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	os.WriteFile(file, []byte("x"), 0o644)
	good := vmm.Spec{ID: "v", Dir: dir, CPUs: 1, MemoryMiB: 128, Kernel: file, RootDisk: vmm.Disk{Path: file, Format: vmm.FormatRaw}}
	for name, n := range map[string]*vmm.Net{
		"bad mode":          {Mode: "bridge", MAC: testMAC},
		"bad mac":           {Mode: vmm.NetUser, MAC: "02:00"},
		"multicast mac":     {Mode: vmm.NetUser, MAC: "03:00:00:00:00:01"},
		"tap without fd":    {Mode: vmm.NetTAP, MAC: testMAC},
		"ipv6 forward":      {Mode: vmm.NetUser, MAC: testMAC, Forwards: []vmm.Forward{{Proto: "tcp", HostIP: "::1", HostPort: 1, GuestPort: 1}}},
		"bad forward proto": {Mode: vmm.NetUser, MAC: testMAC, Forwards: []vmm.Forward{{Proto: "sctp", HostIP: "127.0.0.1", HostPort: 1, GuestPort: 1}}},
		"bad forward port":  {Mode: vmm.NetUser, MAC: testMAC, Forwards: []vmm.Forward{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 70000, GuestPort: 1}}},
	} {
		s := good
		s.Net = n
		_, err := New(Config{Binary: "/nonexistent/qemu"}, nil).Start(context.Background(), s)
		if !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s: Start = %v, want ErrInvalid", name, err)
		}
	}
}

// netGuestInit prints every network card the guest has, with its MAC.
const netGuestInit = vmmtest.GuestPrelude + `for i in /sys/class/net/*; do echo "vmmtest-net=$($bb basename $i)/$($bb cat $i/address)"; done
echo ` + vmmtest.Marker + `
while :; do $bb sleep 3600; done
`

// TestBootUserNet boots guests with a user-mode network card, unconfined
// and confined: the guest sees a card with the spec's MAC, and QEMU
// listens on the forwarded host port (127.0.0.1).
func TestBootUserNet(t *testing.T) {
	requireQEMU(t)
	img := findTestImageWith(t, append(slices.Clone(guestModules), "virtio_net"))
	for _, confined := range []bool{false, true} {
		t.Run(fmt.Sprintf("confined=%v", confined), func(t *testing.T) {
			cfg := Config{}
			if confined {
				cfg.Confine = testConfine(t)
			}
			spec := img.spec(t, filepath.Join(t.TempDir(), "vm"), vmmtest.RunForever)
			if err := vmmtest.BusyboxInitramfs(spec.Initrd, img.busybox, netGuestInit, img.modules); err != nil {
				t.Fatal(err)
			}
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			port := l.Addr().(*net.TCPAddr).Port
			l.Close()
			spec.Net = &vmm.Net{Mode: vmm.NetUser, MAC: testMAC, Forwards: []vmm.Forward{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: port, GuestPort: 22}}}
			d := New(cfg, testLogger(t))
			ctx, cancel := context.WithTimeout(context.Background(), vmmtest.Timeout)
			defer cancel()
			h, err := d.Start(ctx, spec)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Kill(context.Background(), h)
			if err := vmmtest.WaitForConsole(ctx, spec.ConsoleLog, vmmtest.Marker); err != nil {
				t.Fatal(err)
			}
			console, _ := os.ReadFile(spec.ConsoleLog)
			if !strings.Contains(string(console), "/"+testMAC) {
				t.Errorf("the guest has no network card with mac %s:\n%s", testMAC, console)
			}
			c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
			if err != nil {
				t.Errorf("qemu does not listen on the forwarded port %d: %v", port, err)
			} else {
				c.Close()
			}
			if err := d.Kill(ctx, h); err != nil {
				t.Fatal(err)
			}
			assertNoRuntimeFiles(t, d, spec.Dir)
		})
	}
}

// tapGuestInit brings the card up with an address and pings the bridge.
const tapGuestInit = vmmtest.GuestPrelude + `for i in /sys/class/net/*; do echo "vmmtest-net=$($bb basename $i)/$($bb cat $i/address)"; done
dev=$($bb grep -l ` + testMAC + ` /sys/class/net/*/address | $bb cut -d/ -f5)
$bb ip addr add 10.99.0.2/24 dev $dev
$bb ip link set $dev up
if $bb ping -c 1 -W 5 10.99.0.1 >/dev/null 2>&1 || $bb ping -c 1 -W 5 10.99.0.1 >/dev/null 2>&1; then echo vmmtest-ping=ok; else echo vmmtest-ping=failed; fi
echo ` + vmmtest.Marker + `
while :; do $bb sleep 3600; done
`

// TestBootTAP boots guests with a TAP card on a bridge, unconfined and
// confined; the bridge and the TAPs are made inside a network namespace
// this test makes (QEMU only gets the TAP's descriptor). The guest sees
// the card and reaches the bridge's address through it, and the TAP is
// gone once QEMU is (the driver's caller closed its descriptor after
// Start, as the daemon does).
func TestBootTAP(t *testing.T) {
	requireQEMU(t)
	img := findTestImageWith(t, append(slices.Clone(guestModules), "virtio_net"))
	ns := netns.New(t, "bgqt")
	gw := netip.MustParsePrefix("10.99.0.1/24")
	if err := ns.Do(func() error { return bridgenet.EnsureBridge(bridgenet.Bridge{Name: "bgtest0", Gateway: gw}) }); err != nil {
		t.Fatal(err)
	}
	links := func(name string) []string {
		var l []string
		if err := ns.Do(func() (err error) { l, err = bridgenet.Links(name); return err }); err != nil {
			t.Fatal(err)
		}
		return l
	}
	for _, confined := range []bool{false, true} {
		t.Run(fmt.Sprintf("confined=%v", confined), func(t *testing.T) {
			cfg := Config{}
			if confined {
				cfg.Confine = testConfine(t)
			}
			spec := img.spec(t, filepath.Join(t.TempDir(), "vm"), vmmtest.RunForever)
			if err := vmmtest.BusyboxInitramfs(spec.Initrd, img.busybox, tapGuestInit, img.modules); err != nil {
				t.Fatal(err)
			}
			tapName := bridgenet.TAPName(spec.ID)
			var tap *os.File
			if err := ns.Do(func() (err error) { tap, err = bridgenet.OpenTAP(tapName, "bgtest0", true); return err }); err != nil {
				t.Fatal(err)
			}
			spec.Net = &vmm.Net{Mode: vmm.NetTAP, MAC: testMAC, TAP: tap, TAPName: tapName}
			d := New(cfg, testLogger(t))
			ctx, cancel := context.WithTimeout(context.Background(), vmmtest.Timeout)
			defer cancel()
			h, err := d.Start(ctx, spec)
			tap.Close()
			if err != nil {
				t.Fatal(err)
			}
			defer d.Kill(context.Background(), h)
			if err := vmmtest.WaitForConsole(ctx, spec.ConsoleLog, vmmtest.Marker); err != nil {
				t.Fatal(err)
			}
			console, _ := os.ReadFile(spec.ConsoleLog)
			if !strings.Contains(string(console), "/"+testMAC) || !strings.Contains(string(console), "vmmtest-ping=ok") {
				t.Errorf("the guest's card (mac %s) does not reach the bridge:\n%s", testMAC, console)
			}
			if l := links(tapName); len(l) != 1 {
				t.Errorf("tap %s missing while QEMU runs: %v", tapName, l)
			}
			if err := d.Kill(ctx, h); err != nil {
				t.Fatal(err)
			}
			if l := links(tapName); len(l) != 0 {
				t.Errorf("tap %s left after QEMU exited", tapName)
			}
		})
	}
}
