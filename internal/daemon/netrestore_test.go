package daemon

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/firewall"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/testenv/netns"
)

// hostNetDaemon starts a daemon with the real host network (in the test's
// namespace: callers run under netns.RunTest) and the fake VMM, with the
// default image, and returns it with a Firewall that reads banger's rules.
func hostNetDaemon(t *testing.T) (*testEnv, *testDaemon, *firewall.Firewall) {
	t.Helper()
	requireRoot(t)
	for _, tool := range []string{"ip", "nft", "iptables-nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Missing(t, "%s is missing", tool)
		}
	}
	e := newEnv(t, func(c *config.Daemon) {
		bridged(c)
		c.DNSServers = []string{"127.0.0.1"} // never asked: no guest
	})
	e.hostNetwork = true
	d := e.start()
	if _, err := d.c.ImageRegister(testCtx(t), api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd}); err != nil {
		t.Fatal(err)
	}
	fw, err := firewall.New(firewall.Config{Bridge: "banger0", Subnet: netip.MustParsePrefix("10.77.0.0/24"), Gateway: netip.MustParseAddr("10.77.0.1")})
	if err != nil {
		t.Fatal(err)
	}
	return e, d, fw
}

// Every bridged start ensures the firewall again, not only the daemon's
// first: an iptables FORWARD policy of drop set after it (Docker started
// later) gets banger's accept rules at the next start, and banger's
// tables removed under running VMs come back with those VMs' rules.
func TestHostNetworkEnsureEveryStart(t *testing.T) {
	if !netns.InChild() {
		netns.New(t, "bgde").RunTest(t)
		return
	}
	_, d, fw := hostNetDaemon(t)
	ctx := testCtx(t)
	a, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "a", Start: true, MemoryMiB: 128, CPUs: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	nsRun(t, "iptables-nft", "-P", "FORWARD", "DROP")
	nsRun(t, "nft", "delete", "table", "inet", "banger")
	nsRun(t, "nft", "delete", "table", "bridge", "banger")
	b, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "b", Start: true, MemoryMiB: 128, CPUs: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	out := nsRun(t, "iptables-nft", "-S", "FORWARD")
	for _, want := range []string{"-A FORWARD -i banger0 -j ACCEPT", "-A FORWARD -o banger0 -j ACCEPT"} {
		if strings.Count(out, want) != 1 {
			t.Errorf("iptables FORWARD after a second start: want one %q:\n%s", want, out)
		}
	}
	ids, err := fw.VMs()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{a.ID, b.ID}
	slices.Sort(want)
	if !slices.Equal(ids, want) {
		t.Errorf("VMs with rules after banger's tables were removed and b started: %v, want a's and b's %v", ids, want)
	}
}

// A daemon start removes only stale TAPs: TUN/TAP links named as banger
// names them ("bg-" and 12 hex digits) that no running VM owns. A dummy
// named bg-foo and a veth named like a TAP are someone else's.
func TestHostNetworkSweepOnlyTAPs(t *testing.T) {
	if !netns.InChild() {
		netns.New(t, "bgds").RunTest(t)
		return
	}
	requireRoot(t)
	nsRun(t, "ip", "link", "add", "bg-foo", "type", "bridge") // (no dummy module here)
	nsRun(t, "ip", "link", "add", "bg-0123456789ab", "type", "veth", "peer", "name", "vethpeer0")
	nsRun(t, "ip", "tuntap", "add", "dev", "bg-00000000beef", "mode", "tap")
	hostNetDaemon(t) // its start sweeps
	out := nsRun(t, "ip", "-o", "link", "show")
	for _, kept := range []string{"bg-foo", "bg-0123456789ab"} {
		if !strings.Contains(out, kept+":") && !strings.Contains(out, kept+"@") {
			t.Errorf("the daemon's sweep removed %s, which is not a TAP of banger's:\n%s", kept, out)
		}
	}
	if strings.Contains(out, "bg-00000000beef") {
		t.Errorf("the daemon's sweep kept the stale TAP bg-00000000beef:\n%s", out)
	}
}

// A subnet that overlaps a host route is refused at create, before
// anything is made: a clear error naming the route, no VM, no bridge.
func TestHostNetworkCreateSubnetOverlap(t *testing.T) {
	if !netns.InChild() {
		netns.New(t, "bgdo").RunTest(t)
		return
	}
	requireRoot(t)
	nsRun(t, "ip", "link", "add", "br-lan", "type", "bridge")
	nsRun(t, "ip", "addr", "add", "10.77.0.129/25", "dev", "br-lan")
	nsRun(t, "ip", "link", "set", "br-lan", "up")
	_, d, _ := hostNetDaemon(t)
	ctx := testCtx(t)
	_, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "ov", MemoryMiB: 128, CPUs: 1}, nil)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "10.77.0.128/25") {
		t.Fatalf("create on a subnet overlapping the route to 10.77.0.128/25: %v, want a failed precondition naming it", err)
	}
	vms, err := d.c.VMList(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(vms) != 0 {
		t.Errorf("a refused create left VMs: %v", vms)
	}
	if out := nsRun(t, "ip", "-o", "link", "show"); strings.Contains(out, "banger0") {
		t.Errorf("a refused create made the bridge:\n%s", out)
	}
}

// A bridge made anew under running VMs gets their TAPs back: at the next
// bridged start, and at a daemon start (restoreNetwork).
func TestHostNetworkReattachTAPs(t *testing.T) {
	if !netns.InChild() {
		netns.New(t, "bgda").RunTest(t)
		return
	}
	e, d, _ := hostNetDaemon(t)
	ctx := testCtx(t)
	a, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "a", Start: true, MemoryMiB: 128, CPUs: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	onBridge := func(when string) {
		t.Helper()
		out := nsRun(t, "ip", "-d", "link", "show", "dev", a.Network.TAP)
		if !strings.Contains(out, "master banger0") || !strings.Contains(out, "isolated on") {
			t.Errorf("%s: a's tap is not an isolated port of banger0: %s", when, out)
		}
	}
	onBridge("started")
	nsRun(t, "ip", "link", "del", "banger0")
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "b", Start: true, MemoryMiB: 128, CPUs: 1}, nil); err != nil {
		t.Fatal(err)
	}
	onBridge("the bridge made again at b's start")
	d.close()
	nsRun(t, "ip", "link", "del", "banger0")
	e.start()
	onBridge("the bridge made again at the daemon's start")
}

// A port taken when a VM starts is the VM's problem to solve, not a
// create's: the error says the port is fixed for this VM (user mode:
// before QEMU fails on it). A port forward not restored at a daemon
// start shows in the VM's LastError (vm inspect), and a later clean
// daemon start clears it.
func TestPortTakenAtStartAndRestore(t *testing.T) {
	t.Parallel()
	requireRoot(t)
	e, d := setup(t, bridged)
	ctx := testCtx(t)
	port := freePort(t)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "u", Network: api.NetworkUser, MemoryMiB: 128, CPUs: 1, Ports: []string{itoa(port) + ":22"}}, nil); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:"+itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	_, err = d.c.VMStart(ctx, api.VMStartParams{Name: "u"}, nil)
	l.Close()
	if err == nil || !strings.Contains(err.Error(), "fixed for this VM: free it, or recreate the VM with another -p") {
		t.Errorf("start of a user-mode VM whose port is taken: %v, want the port named fixed for this VM", err)
	}

	a, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "a", Start: true, MemoryMiB: 128, CPUs: 1, Ports: []string{itoa(freePort(t)) + ":80"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	d.close()
	e.net.mu.Lock()
	e.net.portsErr = errors.New("host port 127.0.0.1:1/tcp is already in use")
	e.net.mu.Unlock()
	d = e.start()
	if got := inspect(t, d, a.Name); got.State != api.StateRunning || !strings.Contains(got.LastError, "forwarded ports were not restored") || !strings.Contains(got.LastError, "already in use") {
		t.Errorf("a after a restart that could not forward its port: %s, last error %q; want it running, the failure shown", got.State, got.LastError)
	}
	d.close()
	e.net.mu.Lock()
	e.net.portsErr = nil
	e.net.mu.Unlock()
	d = e.start()
	if got := inspect(t, d, a.Name); got.LastError != "" {
		t.Errorf("a after a clean restart: last error %q, want none", got.LastError)
	}
}

// bangerd --teardown-network removes banger's bridge, tables and
// iptables accept rules, and nothing else; it refuses while bangerd runs
// or a bridged VM runs.
func TestTeardownNetwork(t *testing.T) {
	if !netns.InChild() {
		netns.New(t, "bgdt").RunTest(t)
		return
	}
	requireRoot(t)
	if _, err := exec.LookPath("iptables-nft"); err != nil {
		testenv.Missing(t, "iptables-nft is missing")
	}
	nsRun(t, "iptables-nft", "-P", "FORWARD", "DROP")
	nsRun(t, "iptables-nft", "-A", "FORWARD", "-i", "other0", "-j", "ACCEPT") // not banger's
	e, d, _ := hostNetDaemon(t)
	ctx := testCtx(t)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "a", Start: true, MemoryMiB: 128, CPUs: 1}, nil); err != nil {
		t.Fatal(err)
	}
	if err := TeardownNetwork(e.cfg); err == nil || !strings.Contains(err.Error(), "stop bangerd first") {
		t.Errorf("teardown while bangerd runs: %v", err)
	}
	d.close()
	if err := TeardownNetwork(e.cfg); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("teardown while a bridged VM runs: %v, want ErrFailedPrecondition", err)
	}
	d = e.start()
	if _, err := d.c.VMStop(ctx, api.VMStopParams{Name: "a"}, nil); err != nil {
		t.Fatal(err)
	}
	d.close()
	if err := TeardownNetwork(e.cfg); err != nil {
		t.Fatalf("teardown with bangerd and VMs stopped: %v", err)
	}
	if out := nsRun(t, "ip", "-o", "link", "show"); strings.Contains(out, "banger0") {
		t.Errorf("bridge left after teardown:\n%s", out)
	}
	if out := nsRun(t, "nft", "list", "tables"); strings.Contains(out, "banger") {
		t.Errorf("banger's tables left after teardown:\n%s", out)
	}
	out := nsRun(t, "iptables-nft", "-S", "FORWARD")
	if strings.Contains(out, "banger0") || !strings.Contains(out, "-A FORWARD -i other0 -j ACCEPT") || !strings.Contains(out, "-P FORWARD DROP") {
		t.Errorf("iptables FORWARD after teardown (want banger's rules gone, the rest kept):\n%s", out)
	}
	if err := TeardownNetwork(e.cfg); err != nil {
		t.Errorf("a second teardown: %v", err)
	}
	// The VM is still there, and starts again with a network made anew.
	d = e.start()
	if _, err := d.c.VMStart(ctx, api.VMStartParams{Name: "a"}, nil); err != nil {
		t.Fatalf("start after teardown: %v", err)
	}
}

// A subnet overlapping a host route: bangerd warns at start (it serves
// user-mode and stopped VMs), and a bridged create fails with the error,
// nothing made.
func TestSubnetOverlapWarnsAtStart(t *testing.T) {
	t.Parallel()
	requireRoot(t)
	e := newEnv(t, bridged)
	e.net.subnetErr = fmt.Errorf("subnet 10.77.0.0/24 overlaps the host's route(s) to 10.77.0.128/25: %w", errdefs.ErrFailedPrecondition)
	var logs syncBuffer
	e.log = slog.New(slog.NewTextHandler(io.MultiWriter(&logs, &testWriter{t: t}), nil))
	d := e.start()
	if _, err := d.c.ImageRegister(testCtx(t), api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd}); err != nil {
		t.Fatal(err)
	}
	if s := logs.String(); !strings.Contains(s, "level=WARN") || !strings.Contains(s, "10.77.0.128/25") {
		t.Errorf("no warning naming the overlap at daemon start:\n%s", s)
	}
	ctx := testCtx(t)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "b", MemoryMiB: 128, CPUs: 1}, nil); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("bridged create on an overlapping subnet: %v", err)
	}
	if vms, err := d.c.VMList(ctx); err != nil || len(vms) != 0 {
		t.Errorf("after a refused create: %v, %v", vms, err)
	}
}
