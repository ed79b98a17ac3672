package daemon

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
)

// fakeHostNet is hostNet without the host: it records what the daemon
// asks. Like the host's, its state (rules, TAPs) outlives a daemon;
// its port forwarders don't (they are the daemon's goroutines).
type fakeHostNet struct {
	mu        sync.Mutex
	ensures   int
	ensureErr error
	subnetErr error
	addErr    error
	portsErr  error
	taps      map[string]*os.File // by VM id: the TAP handed out last
	isolated  map[string]bool     // by VM id: the TAP's isolation
	attached  map[string]int      // by VM id: AttachTAP calls
	rules     map[string]bool     // VMs with firewall rules
	ports     map[string][]store.Port
	sweeps    []map[string]bool
	closes    int
}

func newFakeHostNet() *fakeHostNet {
	return &fakeHostNet{taps: map[string]*os.File{}, isolated: map[string]bool{}, attached: map[string]int{}, rules: map[string]bool{}, ports: map[string][]store.Port{}}
}

func (f *fakeHostNet) new(ctx context.Context, cfg config.Daemon, st *store.Store, log *slog.Logger) hostNet {
	return f
}

func (f *fakeHostNet) Ensure(ctx context.Context) (remade, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ensures++
	return remade{}, f.ensureErr
}

func (f *fakeHostNet) CheckSubnet() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.subnetErr
}

func (f *fakeHostNet) OpenTAP(v store.VM) (*os.File, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	tap, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	f.taps[v.ID] = tap
	f.isolated[v.ID] = !slices.Contains(v.Allow, allowVM)
	return tap, nil
}

func (f *fakeHostNet) AttachTAP(v store.VM) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.attached[v.ID]++
	return nil
}

func (f *fakeHostNet) AddVM(v store.VM) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.addErr != nil {
		return f.addErr
	}
	f.rules[v.ID] = true
	return nil
}

func (f *fakeHostNet) RemoveVM(id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.rules, id)
	return nil
}

func (f *fakeHostNet) StartPorts(v store.VM) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.portsErr != nil {
		return f.portsErr
	}
	if _, ok := f.ports[v.ID]; ok {
		return errdefs.ErrAlreadyExists
	}
	f.ports[v.ID] = v.Ports
	return nil
}

func (f *fakeHostNet) StopPorts(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.ports, id)
}

func (f *fakeHostNet) Sweep(keep map[string]bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sweeps = append(f.sweeps, keep)
	for id := range f.rules {
		if !keep[id] {
			delete(f.rules, id)
		}
	}
	return nil
}

func (f *fakeHostNet) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closes++
	clear(f.ports)
}

// state returns the VMs with rules and with forwarded ports, sorted.
func (f *fakeHostNet) state() (rules, ports []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for id := range f.rules {
		rules = append(rules, id)
	}
	for id := range f.ports {
		ports = append(ports, id)
	}
	sort.Strings(rules)
	sort.Strings(ports)
	return rules, ports
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("bridged VMs need bangerd to run as root")
	}
}

// A bridged VM's start makes its host side (bridge once, TAP, rules,
// port forwarders), hands the VMM its TAP and closes its own copy, and
// tells the agent its address, gateway, DNS and SSH keys; its end (stop,
// rm) removes the rules and forwarders.
func TestBridgedStartWiresNetwork(t *testing.T) {
	t.Parallel()
	requireRoot(t)
	e, d := setup(t, bridged)
	ctx := testCtx(t)
	port := freePort(t)
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "b", Start: true, MemoryMiB: 128, CPUs: 1,
		Ports: []string{itoa(port) + ":80"}, SSHKeys: []string{testSSHKey}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	fv := e.fake.byName("b")
	n := fv.spec.Net
	if n == nil || n.Mode != vmm.NetTAP || n.MAC != vm.Network.MAC || n.TAPName != vm.Network.TAP || !fv.tapOpen {
		t.Fatalf("spec.Net = %+v (tap open at start: %v), want the VM's TAP", n, fv.tapOpen)
	}
	if fileOpen(e.net.taps[vm.ID]) {
		t.Error("the daemon kept its TAP descriptor after the VMM started")
	}
	if !e.net.isolated[vm.ID] {
		t.Error("the TAP of a VM without --allow vm is not isolated")
	}
	want := &agentproto.NetworkConfig{
		Interfaces: []agentproto.Interface{{MAC: vm.Network.MAC, Address: "10.77.0.2/24", Gateway: "10.77.0.1", MTU: 1500}},
		DNS:        []string{"10.77.0.1"},
	}
	if got := fv.agentCfg.Network; got == nil || !slices.Equal(got.Interfaces, want.Interfaces) || !slices.Equal(got.DNS, want.DNS) {
		t.Errorf("agent network = %+v, want %+v", got, want)
	}
	if s := fv.agentCfg.SSH; s == nil || s.User != "" || !slices.Equal(s.AuthorizedKeys, []string{testSSHKey}) {
		t.Errorf("agent ssh = %+v", s)
	}
	rules, ports := e.net.state()
	if !slices.Equal(rules, []string{vm.ID}) || !slices.Equal(ports, []string{vm.ID}) {
		t.Fatalf("rules %v, ports %v; want the vm's", rules, ports)
	}
	if _, err := d.c.VMStop(ctx, api.VMStopParams{Name: "b"}, nil); err != nil {
		t.Fatal(err)
	}
	if rules, ports := e.net.state(); len(rules) != 0 || len(ports) != 0 {
		t.Errorf("after stop: rules %v, ports %v", rules, ports)
	}
	// Started again, then removed while running.
	if _, err := d.c.VMStart(ctx, api.VMStartParams{Name: "b"}, nil); err != nil {
		t.Fatal(err)
	}
	if rules, _ := e.net.state(); len(rules) != 1 {
		t.Fatalf("after restart: rules %v", rules)
	}
	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "b", Force: true}); err != nil {
		t.Fatal(err)
	}
	if rules, ports := e.net.state(); len(rules) != 0 || len(ports) != 0 {
		t.Errorf("after rm: rules %v, ports %v", rules, ports)
	}
	if e.net.ensures < 2 {
		t.Errorf("bridge ensured %d times, want once per bridged start", e.net.ensures)
	}
}

// A failure in the network's set-up unwinds what was made: no rules, no
// forwarders, the TAP closed, the VM stopped with the error.
func TestBridgedStartFailuresUnwind(t *testing.T) {
	t.Parallel()
	requireRoot(t)
	e, d := setup(t, bridged)
	ctx := testCtx(t)
	for _, tc := range []struct {
		name string
		set  func(f *fakeHostNet, err error)
	}{
		{"ensure", func(f *fakeHostNet, err error) { f.ensureErr = err }},
		{"firewall", func(f *fakeHostNet, err error) { f.addErr = err }},
		{"ports", func(f *fakeHostNet, err error) { f.portsErr = err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			boom := errors.New("boom " + tc.name)
			e.net.mu.Lock()
			e.net.ensureErr, e.net.addErr, e.net.portsErr = nil, nil, nil
			tc.set(e.net, boom)
			e.net.mu.Unlock()
			_, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "f-" + tc.name, Start: true, MemoryMiB: 128, CPUs: 1, Ports: []string{itoa(freePort(t)) + ":80"}}, nil)
			if err == nil || !strings.Contains(err.Error(), boom.Error()) {
				t.Fatalf("start: %v, want %v", err, boom)
			}
			vm := inspect(t, d, "f-"+tc.name)
			if vm.State != api.StateStopped || vm.LastError == "" {
				t.Errorf("vm after a failed start: %s, last error %q", vm.State, vm.LastError)
			}
			if rules, ports := e.net.state(); len(rules) != 0 || len(ports) != 0 {
				t.Errorf("rules %v, ports %v left", rules, ports)
			}
			e.net.mu.Lock()
			tap := e.net.taps[vm.ID]
			e.net.mu.Unlock()
			if (tc.name != "ensure") != (tap != nil) {
				t.Errorf("tap made: %v", tap != nil)
			}
			if tap != nil && fileOpen(tap) {
				t.Error("TAP left open")
			}
			if calls := e.fake.callsFor("f-" + tc.name); slices.Contains(calls, "start") {
				t.Errorf("the VMM was started: %v", calls)
			}
		})
	}
}

// A bridged VM that keeps running through a daemon restart gets its
// rules and forwarders back; the rules of a VM that stopped meanwhile go.
func TestBridgedNetworkAfterRestart(t *testing.T) {
	t.Parallel()
	requireRoot(t)
	e, d := setup(t, bridged)
	ctx := testCtx(t)
	a, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "a", Start: true, MemoryMiB: 128, CPUs: 1, Ports: []string{itoa(freePort(t)) + ":80"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	b := createStartedBridged(t, d, "b")
	d.close()
	rules, ports := e.net.state()
	if !slices.Equal(rules, sorted(a.ID, b.ID)) || len(ports) != 0 {
		t.Fatalf("after daemon stop: rules %v (want both kept), ports %v (the daemon's forwarders end with it)", rules, ports)
	}
	e.fake.byName("b").powerOff() // exits while no daemon watches
	d = e.start()
	rules, ports = e.net.state()
	if !slices.Equal(rules, []string{a.ID}) || !slices.Equal(ports, []string{a.ID}) {
		t.Errorf("after restart: rules %v, ports %v; want only a's", rules, ports)
	}
	e.net.mu.Lock()
	last := e.net.sweeps[len(e.net.sweeps)-1]
	e.net.mu.Unlock()
	if !last[a.ID] || last[b.ID] {
		t.Errorf("sweep kept %v, want a only", last)
	}
	if got := inspect(t, d, "a"); got.State != api.StateRunning || got.Network.IP != a.Network.IP {
		t.Errorf("a after restart: %s %+v", got.State, got.Network)
	}
}

// A user-mode VM's card is QEMU's user network with the VM's ports as
// its forwards, and the guest gets QEMU's addresses; no host network.
func TestUserNetworkStart(t *testing.T) {
	t.Parallel()
	e, d := setup(t, func(c *config.Daemon) { c.Network = api.NetworkUser })
	ctx := testCtx(t)
	port := freePort(t)
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "u", Start: true, MemoryMiB: 128, CPUs: 1, Ports: []string{itoa(port) + ":22"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	fv := e.fake.byName("u")
	n := fv.spec.Net
	want := []vmm.Forward{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: port, GuestPort: 22}}
	if n == nil || n.Mode != vmm.NetUser || n.MAC != vm.Network.MAC || n.TAP != nil || !slices.Equal(n.Forwards, want) {
		t.Fatalf("spec.Net = %+v", n)
	}
	if got := fv.agentCfg.Network; got == nil || len(got.Interfaces) != 1 || got.Interfaces[0].Address != "10.0.2.15/24" ||
		got.Interfaces[0].Gateway != "10.0.2.2" || !slices.Equal(got.DNS, []string{"10.0.2.3"}) {
		t.Errorf("agent network = %+v", got)
	}
	if e.net.ensures != 0 {
		t.Errorf("a user-mode start set up the bridge")
	}
	if def := createStarted(t, d, "n"); def.Network == nil || def.Network.Mode != api.NetworkUser {
		t.Errorf("with network = user in the config, a VM's network is %+v", def.Network)
	}
}

func createStartedBridged(t *testing.T, d *testDaemon, name string) api.VM {
	t.Helper()
	vm := createStarted(t, d, name)
	if vm.Network == nil || vm.Network.Mode != api.NetworkBridge {
		t.Fatalf("vm %s is not bridged: %+v", name, vm.Network)
	}
	return vm
}

func sorted(s ...string) []string { sort.Strings(s); return s }

// A bridged VM made before the subnet changed gets an address of the new
// subnet at its next start.
func TestBridgedVMMovesToANewSubnet(t *testing.T) {
	t.Parallel()
	requireRoot(t)
	e, d := setup(t, bridged)
	ctx := testCtx(t)
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "m"}, nil)
	if err != nil || vm.Network.IP != "10.77.0.2" {
		t.Fatalf("create: %+v, %v", vm.Network, err)
	}
	d.close()
	e.cfg.Subnet = "10.78.0.0/24"
	d = e.start()
	got, err := d.c.VMStart(ctx, api.VMStartParams{Name: "m"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.Network.IP != "10.78.0.2" || got.Network.Gateway != "10.78.0.1" {
		t.Errorf("after the subnet changed: %+v, want 10.78.0.2 via 10.78.0.1", got.Network)
	}
	if a := e.fake.byName("m").agentCfg.Network; a == nil || a.Interfaces[0].Address != "10.78.0.2/24" {
		t.Errorf("agent network %+v", a)
	}
}

// "Ready" includes the network: a start waits until the guest reports
// its network configured, and fails with the guest's error when its
// set-up failed.
func TestReadyWaitsForTheNetwork(t *testing.T) {
	t.Parallel()
	e, d := setup(t, func(c *config.Daemon) { c.Network = api.NetworkUser })
	ctx := testCtx(t)
	e.fake.setBehaviour("slow", fakeBehaviour{NetworkUpAt: 8})
	createStarted(t, d, "slow")
	infos := 0
	for _, c := range e.fake.callsFor("slow") {
		if c == "net-info" {
			infos++
		}
	}
	if infos < 8 {
		t.Errorf("the start asked the guest's network %d times: it did not wait for it (up at the 8th)", infos)
	}
	e.fake.setBehaviour("broken", fakeBehaviour{NetworkError: "no card with mac 02:00:00:00:00:01"})
	_, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "broken", Start: true, MemoryMiB: 128, CPUs: 1}, nil)
	if err == nil || !strings.Contains(err.Error(), "network setup failed: no card with mac") {
		t.Fatalf("start with a failed guest network: %v", err)
	}
	if got := inspect(t, d, "broken"); got.State != api.StateStopped {
		t.Errorf("vm with a failed network is %s, want stopped", got.State)
	}
}
