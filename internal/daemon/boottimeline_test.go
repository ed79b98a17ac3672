package daemon

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
)

func phaseNames(tl *api.BootTimeline) []string {
	var out []string
	for _, p := range tl.Phases {
		out = append(out, p.Name)
	}
	return out
}

// A start returns only once the guest reports its early boot done, and
// records where the time went; the timeline outlives the start and the
// daemon.
func TestStartWaitsForEarlyBoot(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	e.fake.setBehaviour("slow", fakeBehaviour{EarlyBootInfos: 4})
	var ph phases
	vm, err := d.c.VMCreate(testCtx(t), api.VMCreateParams{Name: "slow", Start: true, MemoryMiB: 128, CPUs: 1}, ph.add)
	if err != nil {
		t.Fatal(err)
	}
	if !inOrder(ph.names(), "build initramfs", "boot", "wait for agent", "wait for early boot") {
		t.Errorf("progress phases %v", ph.names())
	}
	// The info of the ready VM is the one that said early boot is done.
	if vm.Guest == nil {
		t.Fatalf("no guest info after start")
	}
	tl := vm.BootTimeline
	if tl == nil {
		t.Fatal("no boot timeline after start")
	}
	want := []string{api.PhaseClone, api.PhaseInitramfs, api.PhaseVMMStart, api.PhaseKernelToAgent, api.PhaseEarlyBoot, api.PhaseFullBoot}
	if got := phaseNames(tl); !slices.Equal(got, want) {
		t.Fatalf("phases %v, want %v", got, want)
	}
	if !tl.Ready || tl.Error != "" {
		t.Errorf("timeline ready %v error %q", tl.Ready, tl.Error)
	}
	for i, p := range tl.Phases[:len(tl.Phases)-1] {
		if p.Running || p.DurationMS <= 0 {
			t.Errorf("phase %s: running %v, %.3f ms", p.Name, p.Running, p.DurationMS)
		}
		if i > 0 && p.StartedAt.Before(tl.Phases[i-1].StartedAt) {
			t.Errorf("phase %s starts before %s", p.Name, tl.Phases[i-1].Name)
		}
	}
	// Full boot is recorded in the background (the agent as PID 1 has
	// nothing more to wait for).
	waitFor(testCtx(t), t, "the full boot to be recorded", func() bool {
		tl := inspect(t, d, "slow").BootTimeline
		return tl != nil && tl.Done && !tl.Phases[len(tl.Phases)-1].Running
	})

	d.close()
	d2 := e.start()
	tl2 := inspect(t, d2, "slow").BootTimeline
	if tl2 == nil || !slices.Equal(phaseNames(tl2), want) || !tl2.Done {
		t.Errorf("timeline after a daemon restart: %+v", tl2)
	}

	// A second start has no clone phase.
	if _, err := d2.c.VMKill(testCtx(t), "slow"); err != nil {
		t.Fatal(err)
	}
	vm, err = d2.c.VMStart(testCtx(t), api.VMStartParams{Name: "slow", WaitBoot: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := phaseNames(vm.BootTimeline); !slices.Equal(got, want[1:]) || !vm.BootTimeline.Done {
		t.Errorf("second start: phases %v done %v, want %v done", got, vm.BootTimeline.Done, want[1:])
	}
}

// A guest whose early boot never ends fails the start in that phase.
func TestStartEarlyBootNeverDone(t *testing.T) {
	t.Parallel()
	e, d := setup(t, func(c *config.Daemon) { c.ReadyTimeout = config.Duration{Duration: time.Second} })
	e.fake.setBehaviour("stuck", fakeBehaviour{EarlyBootNever: true})
	if _, err := d.c.VMCreate(testCtx(t), api.VMCreateParams{Name: "stuck"}, nil); err != nil {
		t.Fatal(err)
	}
	_, err := d.c.VMStart(testCtx(t), api.VMStartParams{Name: "stuck"}, nil)
	if err == nil {
		t.Fatal("start succeeded though early boot never ended")
	}
	for _, want := range []string{`vm "stuck" did not become ready: stuck in phase 'early boot'`, "the VM was stopped", "fake kernel booting stuck"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("start error %q does not contain %q", err, want)
		}
	}
	vm := inspect(t, d, "stuck")
	if vm.State != api.StateStopped {
		t.Errorf("state %s after the failed start", vm.State)
	}
	tl := vm.BootTimeline
	if tl == nil || tl.Ready || tl.Error == "" || tl.Phases[len(tl.Phases)-1].Name != api.PhaseEarlyBoot || tl.Phases[len(tl.Phases)-1].Running {
		t.Errorf("timeline after a start stuck in early boot: %+v", tl)
	}
}

// A connection lost while early boot runs (a keepalive unanswered in a
// guest busy booting) is redialed: the start still succeeds.
func TestStartEarlyBootRedials(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	// Info requests: 1 in the dial's version check, 2 when connected, 3
	// the first early boot poll.
	e.fake.setBehaviour("flaky", fakeBehaviour{EarlyBootDropAt: 3, EarlyBootInfos: 5})
	vm, err := d.c.VMCreate(testCtx(t), api.VMCreateParams{Name: "flaky", Start: true, MemoryMiB: 128, CPUs: 1}, nil)
	if err != nil {
		t.Fatalf("start with a connection lost during early boot: %v", err)
	}
	if vm.State != api.StateRunning || vm.BootTimeline == nil || !vm.BootTimeline.Ready {
		t.Errorf("vm %s, timeline %+v", vm.State, vm.BootTimeline)
	}
	calls := e.fake.callsFor("flaky")
	if !inOrder(calls, "dial", "agent-drop", "dial") {
		t.Errorf("driver calls %v: want a dial again after the drop", calls)
	}
}

// A --wait-boot that times out after the VM became ready names the phase
// and leaves the VM running, recorded as running.
func TestWaitBootTimeoutLeavesVMRunning(t *testing.T) {
	t.Parallel()
	e, d := setup(t, func(c *config.Daemon) { c.ReadyTimeout = config.Duration{Duration: 2 * time.Second} })
	e.fake.setBehaviour("long", fakeBehaviour{InitMode: "systemd"})
	if _, err := d.c.VMCreate(testCtx(t), api.VMCreateParams{Name: "long"}, nil); err != nil {
		t.Fatal(err)
	}
	_, err := d.c.VMStart(testCtx(t), api.VMStartParams{Name: "long", WaitBoot: true}, nil)
	if err == nil || !strings.Contains(err.Error(), "stuck in phase 'full boot'") {
		t.Fatalf("start --wait-boot: %v; want stuck in phase 'full boot'", err)
	}
	vm := inspect(t, d, "long")
	if vm.State != api.StateRunning || !e.fake.Alive(e.fake.byName("long").handle) {
		t.Errorf("after the --wait-boot timeout: state %s, vmm alive %v; want running", vm.State, e.fake.Alive(e.fake.byName("long").handle))
	}
	if tl := vm.BootTimeline; tl == nil || !tl.Ready || tl.Error == "" {
		t.Errorf("timeline %+v: want ready, with the error", tl)
	}
	if code, out, _, err := execResult(t, d, "long", "", "echo", "ok"); err != nil || code != 0 || out != "ok\n" {
		t.Errorf("exec after the --wait-boot timeout: %d %q %v", code, out, err)
	}
}

// A phase still running is reported with the time it has lasted so far;
// once nothing records it (the daemon restarted), as not running, with why.
func TestTimelineRunningPhase(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	e.fake.setBehaviour("booting", fakeBehaviour{InitMode: "systemd"}) // full boot never ends here
	vm := createStarted(t, d, "booting")
	last := func(vm api.VM) api.BootPhase { return vm.BootTimeline.Phases[len(vm.BootTimeline.Phases)-1] }
	if p := last(vm); p.Name != api.PhaseFullBoot || !p.Running {
		t.Fatalf("after the start: last phase %+v, want full boot running", p)
	}
	first := last(vm).DurationMS
	waitFor(testCtx(t), t, "the running phase to grow", func() bool { return last(inspect(t, d, "booting")).DurationMS > first })

	d.close()
	d2 := e.start()
	vm = inspect(t, d2, "booting")
	if p := last(vm); p.Running || !strings.Contains(vm.BootTimeline.Error, "not recorded to its end") {
		t.Errorf("after a daemon restart: last phase %+v, error %q", p, vm.BootTimeline.Error)
	}
}

func TestNetworkReady(t *testing.T) {
	up := &agentproto.NetworkState{Configured: true}
	for _, tc := range []struct {
		info    agentproto.Info
		withNet bool
		ready   bool
		err     bool
	}{
		{agentproto.Info{ProtoVersion: "1.3", Network: &agentproto.NetworkState{}}, false, true, false},
		{agentproto.Info{ProtoVersion: "1.2"}, true, true, false},
		{agentproto.Info{ProtoVersion: "1.3"}, true, true, false},
		{agentproto.Info{ProtoVersion: "1.3", Network: &agentproto.NetworkState{}}, true, false, false},
		{agentproto.Info{ProtoVersion: "1.4", Network: up}, true, true, false},
		{agentproto.Info{ProtoVersion: "1.3", Network: &agentproto.NetworkState{Error: "no card"}}, true, false, true},
		{agentproto.Info{ProtoVersion: "2.0", Network: &agentproto.NetworkState{}}, true, true, false},
	} {
		ready, err := networkReady(tc.info, tc.withNet)
		if ready != tc.ready || (err != nil) != tc.err {
			t.Errorf("networkReady(%+v, %v) = %v, %v", tc.info, tc.withNet, ready, err)
		}
	}
}
