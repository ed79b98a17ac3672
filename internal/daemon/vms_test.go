package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/vmm"
)

// vmDirs lists state_dir/vms.
func vmDirs(t *testing.T, e *testEnv) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(e.cfg.StateDir, "vms"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, en := range ents {
		out = append(out, en.Name())
	}
	return out
}

func vmNames(t *testing.T, d *testDaemon) []string {
	t.Helper()
	vms, err := d.c.VMList(testCtx(t))
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	var out []string
	for _, v := range vms {
		out = append(out, v.Name)
	}
	return out
}

func TestCreateRejectsBadRequestsAndLeavesNothing(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	first, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "taken"}, nil)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if first.State != api.StateStopped || first.Image != "default" || first.DiskBytes != 64<<10 || first.VMM != "fake" {
		t.Errorf("created vm = %+v; want stopped, image default, 64 KiB disk, vmm fake", first)
	}

	tests := []struct {
		name string
		p    api.VMCreateParams
		kind error
		hint string
	}{
		{"invalid name", api.VMCreateParams{Name: "Bad_Name"}, errdefs.ErrInvalid, "lowercase"},
		{"duplicate name", api.VMCreateParams{Name: "taken"}, errdefs.ErrAlreadyExists, `"taken" already exists`},
		{"unknown image", api.VMCreateParams{Name: "a", Image: "nope"}, errdefs.ErrNotFound, "banger image ls"},
		{"disk smaller than image", api.VMCreateParams{Name: "b", DiskBytes: 4096}, errdefs.ErrInvalid, "smaller than image"},
		{"too many cpus", api.VMCreateParams{Name: "c", CPUs: 65}, errdefs.ErrInvalid, "1 to 64"},
		{"unknown accel", api.VMCreateParams{Name: "d", Accel: "xen"}, errdefs.ErrInvalid, "auto, kvm or tcg"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := d.c.VMCreate(ctx, tc.p, nil)
			wireErr(t, "create", err, tc.kind)
			if !strings.Contains(err.Error(), tc.hint) {
				t.Errorf("error %q does not contain %q", err, tc.hint)
			}
			if got := vmNames(t, d); !slices.Equal(got, []string{"taken"}) {
				t.Errorf("vms after failed create = %v, want [taken]", got)
			}
			if got := vmDirs(t, e); !slices.Equal(got, []string{first.ID}) {
				t.Errorf("vm dirs after failed create = %v, want [%s]", got, first.ID)
			}
		})
	}
}

func TestConcurrentCreatesOfOneNameHaveOneWinner(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	const n = 8
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			_, errs[i] = d.c.VMCreate(ctx, api.VMCreateParams{Name: "racer"}, nil)
		})
	}
	wg.Wait()
	wins := 0
	for _, err := range errs {
		switch {
		case err == nil:
			wins++
		case !errors.Is(err, errdefs.ErrAlreadyExists):
			t.Errorf("losing create: %v, want ErrAlreadyExists", err)
		}
	}
	if wins != 1 {
		t.Errorf("%d creates of one name succeeded, want 1", wins)
	}
	if got := vmNames(t, d); !slices.Equal(got, []string{"racer"}) {
		t.Errorf("vms = %v, want [racer]", got)
	}
	if got := vmDirs(t, e); len(got) != 1 {
		t.Errorf("vm dirs = %v, want one", got)
	}
}

func TestStartExecStop(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	var ph phases
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "happy", Start: true, CPUs: 1, MemoryMiB: 128}, ph.add)
	if err != nil {
		t.Fatalf("create --start: %v", err)
	}
	if got := ph.names(); !inOrder(got, "clone root disk", "build initramfs", "boot", "wait for agent") {
		t.Errorf("progress phases = %v", got)
	}
	fv := e.fake.byName("happy")
	if vm.State != api.StateRunning || vm.PID != fv.handle.PID || vm.Accel != vmm.AccelKVM || vm.StartedAt == nil {
		t.Errorf("vm after start = %+v; want running with pid %d, accel kvm, started_at", vm, fv.handle.PID)
	}
	if vm.Guest == nil || vm.Guest.InitMode != "agent" || vm.Guest.AgentVersion == "" {
		t.Errorf("guest info = %+v; want the agent's answer (init mode agent)", vm.Guest)
	}
	// The fake booted what the daemon built: the image's initrd, then
	// banger's archive with the agent binary as init.
	agentBin, _ := os.ReadFile(e.cfg.AgentBinary)
	if string(fv.initramfs["banger/init"]) != string(agentBin) {
		t.Errorf("initramfs /banger/init is not the agent binary")
	}
	if _, ok := fv.initramfs["etc/image-marker"]; !ok {
		t.Errorf("initramfs lacks the image's initrd (files: %v)", keys(fv.initramfs))
	}
	if fv.spec.Kernel != e.kernel || fv.spec.CPUs != 1 || fv.spec.MemoryMiB != 128 || fv.spec.Cmdline != kernelCmdline {
		t.Errorf("spec = %+v", fv.spec)
	}

	code, out, errOut, err := execResult(t, d, "happy", "", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	if code != 3 || out != "to-stdout\n" || errOut != "to-stderr\n" {
		t.Errorf("exec = code %d, stdout %q, stderr %q; want 3, %q, %q", code, out, errOut, "to-stdout\n", "to-stderr\n")
	}
	code, out, _, err = execResult(t, d, "happy", "fed through stdin", "cat")
	if err != nil || code != 0 || out != "fed through stdin" {
		t.Errorf("exec cat = %d, %q, %v; want 0, the stdin", code, out, err)
	}

	ph = phases{}
	vm, err = d.c.VMStop(ctx, api.VMStopParams{Name: "happy"}, ph.add)
	if err != nil {
		t.Fatalf("stop: %v", err)
	}
	if vm.State != api.StateStopped || vm.PID != 0 {
		t.Errorf("vm after stop = %s pid %d, want stopped without pid", vm.State, vm.PID)
	}
	ops := e.fake.callsFor("happy")
	if !slices.Contains(ops, "agent-shutdown") || slices.Contains(ops, "acpi") || slices.Contains(ops, "kill") {
		t.Errorf("driver calls = %v; want a stop through the agent only", ops)
	}
	if got := ph.names(); !slices.Equal(got, []string{"shutdown through agent"}) {
		t.Errorf("stop phases = %v", got)
	}
	if e.fake.Alive(fv.handle) {
		t.Errorf("vmm pid %d still runs after stop", fv.handle.PID)
	}
	if left := runtimeFiles(vm.Dir); len(left) > 0 {
		t.Errorf("runtime files left after stop: %v", left)
	}

	// A stopped VM starts again, with a new VMM process.
	vm2, err := d.c.VMStart(ctx, api.VMStartParams{Name: "happy"}, nil)
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	if vm2.State != api.StateRunning || vm2.PID == 0 || vm2.PID == fv.handle.PID {
		t.Errorf("vm after second start = %s pid %d (first pid %d)", vm2.State, vm2.PID, fv.handle.PID)
	}
	if code, out, _, err := execResult(t, d, "happy", "", "echo", "again"); err != nil || code != 0 || out != "again\n" {
		t.Errorf("exec after restart = %d, %q, %v", code, out, err)
	}
	_, err = d.c.VMStart(ctx, api.VMStartParams{Name: "happy"}, nil)
	wireErr(t, "start of a running vm", err, errdefs.ErrFailedPrecondition)
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func TestStopEscalates(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		behave   fakeBehaviour
		wantOps  []string
		notOps   []string
		phases   []string
		minDelay time.Duration
	}{
		{
			name:     "agent ignores shutdown: ACPI",
			behave:   fakeBehaviour{IgnoreAgentShutdown: true},
			wantOps:  []string{"agent-shutdown", "acpi", "cleanup"},
			notOps:   []string{"kill"},
			phases:   []string{"shutdown through agent", "ACPI power button"},
			minDelay: time.Second,
		},
		{
			name:     "agent and ACPI ignored: kill",
			behave:   fakeBehaviour{IgnoreAgentShutdown: true, IgnoreACPI: true},
			wantOps:  []string{"agent-shutdown", "acpi", "kill", "cleanup"},
			phases:   []string{"shutdown through agent", "ACPI power button", "kill"},
			minDelay: 1500 * time.Millisecond, // the timeout, then half of it
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e, d := setup(t, nil)
			e.fake.setBehaviour("stubborn", tc.behave)
			createStarted(t, d, "stubborn")
			fv := e.fake.byName("stubborn")
			var ph phases
			start := time.Now()
			vm, err := d.c.VMStop(testCtx(t), api.VMStopParams{Name: "stubborn", Timeout: "1s"}, ph.add)
			took := time.Since(start)
			if err != nil {
				t.Fatalf("stop: %v", err)
			}
			if vm.State != api.StateStopped {
				t.Errorf("state after stop = %s, want stopped", vm.State)
			}
			if e.fake.Alive(fv.handle) {
				t.Errorf("vmm still runs after stop")
			}
			ops := e.fake.callsFor("stubborn")
			if !inOrder(ops, tc.wantOps...) {
				t.Errorf("driver calls = %v; want %v in this order", ops, tc.wantOps)
			}
			for _, op := range tc.notOps {
				if slices.Contains(ops, op) {
					t.Errorf("driver calls = %v; want no %s", ops, op)
				}
			}
			if got := ph.names(); !slices.Equal(got, tc.phases) {
				t.Errorf("stop phases = %v, want %v", got, tc.phases)
			}
			if took < tc.minDelay {
				t.Errorf("stop took %v; it escalated before the timeout (%v)", took, tc.minDelay)
			}
			if left := runtimeFiles(vm.Dir); len(left) > 0 {
				t.Errorf("runtime files left after stop: %v", left)
			}
		})
	}
}

func TestStopTimeoutValidation(t *testing.T) {
	t.Parallel()
	_, d := setup(t, nil)
	createStarted(t, d, "v")
	_, err := d.c.VMStop(testCtx(t), api.VMStopParams{Name: "v", Timeout: "-1s"}, nil)
	wireErr(t, "stop with a negative timeout", err, errdefs.ErrInvalid)
	if vm := inspect(t, d, "v"); vm.State != api.StateRunning {
		t.Errorf("state after refused stop = %s, want running", vm.State)
	}
}

func TestStartAgentNeverReady(t *testing.T) {
	t.Parallel()
	e, d := setup(t, func(c *config.Daemon) { c.ReadyTimeout = config.Duration{Duration: time.Second} })
	e.fake.setBehaviour("mute", fakeBehaviour{AgentSilent: true})
	ctx := testCtx(t)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "mute"}, nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err := d.c.VMStart(ctx, api.VMStartParams{Name: "mute"}, nil)
	if err == nil {
		t.Fatal("start succeeded with an agent that never answers")
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("start failed after %v; ready_timeout is 1s", took)
	}
	for _, want := range []string{`vm "mute" did not become ready: stuck in phase 'kernel to agent'`, "the VM was stopped", "fake kernel booting mute"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("start error %q does not contain %q", err, want)
		}
	}
	vm := inspect(t, d, "mute")
	if vm.State != api.StateStopped || vm.PID != 0 {
		t.Errorf("vm after failed start: %s pid %d, want stopped", vm.State, vm.PID)
	}
	if !strings.Contains(vm.LastError, "stuck in phase 'kernel to agent'") {
		t.Errorf("last error = %q, want the agent failure", vm.LastError)
	}
	fv := e.fake.byName("mute")
	if e.fake.Alive(fv.handle) {
		t.Errorf("vmm still runs after failed start")
	}
	if ops := e.fake.callsFor("mute"); !inOrder(ops, "start", "dial", "kill") {
		t.Errorf("driver calls = %v; want start, dial, kill", ops)
	}
	if left := runtimeFiles(vm.Dir); len(left) > 0 {
		t.Errorf("runtime files left: %v", left)
	}
}

func TestStartDriverFailure(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	e.fake.setBehaviour("doomed", fakeBehaviour{StartErr: errors.New("no kvm today")})
	ctx := testCtx(t)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "doomed"}, nil); err != nil {
		t.Fatal(err)
	}
	_, err := d.c.VMStart(ctx, api.VMStartParams{Name: "doomed"}, nil)
	if err == nil || !strings.Contains(err.Error(), "no kvm today") {
		t.Fatalf("start error = %v, want the driver's", err)
	}
	vm := inspect(t, d, "doomed")
	if vm.State != api.StateStopped || vm.LastError != "no kvm today" {
		t.Errorf("vm after failed start: state %s, last error %q", vm.State, vm.LastError)
	}
	if left := runtimeFiles(vm.Dir); len(left) > 0 {
		t.Errorf("runtime files left: %v", left)
	}

	// Once the driver works, the VM starts and the error is cleared.
	e.fake.setBehaviour("doomed", fakeBehaviour{})
	vm, err = d.c.VMStart(ctx, api.VMStartParams{Name: "doomed"}, nil)
	if err != nil {
		t.Fatalf("second start: %v", err)
	}
	if vm.State != api.StateRunning || vm.LastError != "" {
		t.Errorf("vm after second start: %s, last error %q", vm.State, vm.LastError)
	}
}

func TestGuestPowerOffIsNoticed(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	vm := createStarted(t, d, "leaver")
	e.fake.byName("leaver").powerOff()
	ctx := testCtx(t)
	waitFor(ctx, t, "the vm to be recorded stopped", func() bool {
		return inspect(t, d, "leaver").State == api.StateStopped
	})
	ops := e.fake.callsFor("leaver")
	if !slices.Contains(ops, "cleanup") || slices.Contains(ops, "kill") || slices.Contains(ops, "acpi") {
		t.Errorf("driver calls = %v; want a cleanup and no stop", ops)
	}
	if left := runtimeFiles(vm.Dir); len(left) > 0 {
		t.Errorf("runtime files left: %v", left)
	}
	_, _, _, err := execResult(t, d, "leaver", "", "true")
	wireErr(t, "exec after poweroff", err, errdefs.ErrFailedPrecondition)
}

func TestExecOnStoppedVM(t *testing.T) {
	t.Parallel()
	_, d := setup(t, nil)
	if _, err := d.c.VMCreate(testCtx(t), api.VMCreateParams{Name: "idle"}, nil); err != nil {
		t.Fatal(err)
	}
	_, _, _, err := execResult(t, d, "idle", "", "true")
	wireErr(t, "exec on a stopped vm", err, errdefs.ErrFailedPrecondition)
	if !strings.Contains(err.Error(), "banger vm start idle") {
		t.Errorf("error %q does not say how to start the vm", err)
	}
	_, _, _, err = execResult(t, d, "ghost", "", "true")
	wireErr(t, "exec on an unknown vm", err, errdefs.ErrNotFound)
	_, _, _, err = execResult(t, d, "idle", "")
	wireErr(t, "exec without a command", err, errdefs.ErrInvalid)
}

func TestRemoveRunningVM(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	vm := createStarted(t, d, "busy")
	fv := e.fake.byName("busy")

	err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "busy"})
	wireErr(t, "rm of a running vm", err, errdefs.ErrFailedPrecondition)
	if !strings.Contains(err.Error(), "rm -f") {
		t.Errorf("error %q does not mention rm -f", err)
	}
	if got := inspect(t, d, "busy"); got.State != api.StateRunning || !e.fake.Alive(fv.handle) {
		t.Errorf("vm after refused rm: %s", got.State)
	}

	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "busy", Force: true}); err != nil {
		t.Fatalf("rm -f: %v", err)
	}
	_, err = d.c.VMInspect(ctx, "busy")
	wireErr(t, "inspect after rm", err, errdefs.ErrNotFound)
	if _, err := os.Stat(vm.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("vm dir after rm -f: %v, want gone", err)
	}
	if e.fake.Alive(fv.handle) {
		t.Errorf("vmm still runs after rm -f")
	}
	if ops := e.fake.callsFor("busy"); !slices.Contains(ops, "kill") {
		t.Errorf("driver calls = %v; want a kill", ops)
	}
}

func TestReconcileAfterRestart(t *testing.T) {
	t.Parallel()
	e, d1 := setup(t, nil)
	gone := createStarted(t, d1, "gone")
	lives := createStarted(t, d1, "lives")
	d1.close()

	// While no daemon runs, one VMM dies.
	goneVM := e.fake.byName("gone")
	goneVM.powerOff()
	if left := runtimeFiles(gone.Dir); len(left) == 0 {
		t.Fatalf("the fake should leave runtime files of a dead vmm for the daemon to clean")
	}
	livesVM := e.fake.byName("lives")

	d2 := e.start()
	vm := inspect(t, d2, "gone")
	if vm.State != api.StateStopped || vm.PID != 0 {
		t.Errorf("dead vm after restart: %s pid %d, want stopped", vm.State, vm.PID)
	}
	if ops := e.fake.callsFor("gone"); ops[len(ops)-1] != "cleanup" {
		t.Errorf("driver calls for the dead vm = %v; want a cleanup last", ops)
	}
	if left := runtimeFiles(gone.Dir); len(left) > 0 {
		t.Errorf("runtime files of the dead vm left: %v", left)
	}

	vm = inspect(t, d2, "lives")
	if vm.State != api.StateRunning || vm.PID != lives.PID || vm.PID != livesVM.handle.PID {
		t.Errorf("live vm after restart: %s pid %d, want running pid %d", vm.State, vm.PID, lives.PID)
	}
	code, out, _, err := execResult(t, d2, "lives", "", "echo", "adopted")
	if err != nil || code != 0 || out != "adopted\n" {
		t.Errorf("exec in adopted vm = %d, %q, %v", code, out, err)
	}

	// The adopted VM is watched: its exit is noticed.
	livesVM.powerOff()
	waitFor(testCtx(t), t, "the adopted vm to be recorded stopped", func() bool {
		return inspect(t, d2, "lives").State == api.StateStopped
	})
}

func TestStopAdoptedVMGoesThroughAgent(t *testing.T) {
	t.Parallel()
	e, d1 := setup(t, nil)
	createStarted(t, d1, "kept")
	d1.close()
	d2 := e.start()
	vm, err := d2.c.VMStop(testCtx(t), api.VMStopParams{Name: "kept"}, nil)
	if err != nil {
		t.Fatalf("stop: %v", err)
	}
	if vm.State != api.StateStopped {
		t.Errorf("state = %s, want stopped", vm.State)
	}
	if ops := e.fake.callsFor("kept"); !slices.Contains(ops, "agent-shutdown") || slices.Contains(ops, "acpi") {
		t.Errorf("driver calls = %v; want the adopted vm stopped through its agent", ops)
	}
}

func TestSecondDaemonOnStateDirRefused(t *testing.T) {
	t.Parallel()
	e, _ := setup(t, nil)
	cfg := e.cfg
	cfg.SocketPath = filepath.Join(e.dir, "other.sock")
	err := run(testCtx(t), cfg, e.log, deps{newDriver: func() vmm.Driver { return e.fake }})
	if err == nil || !strings.Contains(err.Error(), "in use by another bangerd") {
		t.Errorf("second daemon on one state dir: %v", err)
	}
}

// A client that gives up on a graceful stop (Ctrl-C in banger vm stop)
// must not get the VM killed: the escalation ends with the request.
func TestCancelledStopDoesNotKill(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	e.fake.setBehaviour("slow", fakeBehaviour{IgnoreAgentShutdown: true, IgnoreACPI: true})
	createStarted(t, d, "slow")
	fv := e.fake.byName("slow")

	ctx, cancel := context.WithCancel(testCtx(t))
	_, err := d.c.VMStop(ctx, api.VMStopParams{Name: "slow", Timeout: "30s"}, func(p api.Progress) {
		if p.Phase == "shutdown through agent" {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled stop: %v, want context.Canceled", err)
	}
	// rm without force takes the VM's lock, so it runs after the stop
	// handler ended; it must find the VM still running.
	err = d.c.VMRemove(testCtx(t), api.VMRemoveParams{Name: "slow"})
	wireErr(t, "rm after a cancelled stop", err, errdefs.ErrFailedPrecondition)
	if ops := e.fake.callsFor("slow"); slices.Contains(ops, "kill") {
		t.Errorf("driver calls = %v; a cancelled stop killed the vm", ops)
	}
	if !e.fake.Alive(fv.handle) || inspect(t, d, "slow").State != api.StateRunning {
		t.Errorf("vm not running after a cancelled stop")
	}
}

// Reads (vm ls, inspect) must not wait for a VM that is still booting.
func TestListWhileBooting(t *testing.T) {
	t.Parallel()
	e, d := setup(t, func(c *config.Daemon) { c.ReadyTimeout = config.Duration{Duration: 30 * time.Second} })
	e.fake.setBehaviour("booting", fakeBehaviour{AgentSilent: true})
	if _, err := d.c.VMCreate(testCtx(t), api.VMCreateParams{Name: "booting"}, nil); err != nil {
		t.Fatal(err)
	}
	startCtx, cancelStart := context.WithCancel(testCtx(t))
	defer cancelStart()
	started := make(chan error, 1)
	go func() {
		_, err := d.c.VMStart(startCtx, api.VMStartParams{Name: "booting"}, nil)
		started <- err
	}()
	waitFor(testCtx(t), t, "the daemon to dial the agent", func() bool {
		return slices.Contains(e.fake.callsFor("booting"), "dial")
	})

	lctx, cancel := context.WithTimeout(testCtx(t), 5*time.Second)
	defer cancel()
	vms, err := d.c.VMList(lctx)
	if err != nil {
		t.Fatalf("list while a vm boots: %v", err)
	}
	if len(vms) != 1 || vms[0].State != api.StateStarting || vms[0].Guest != nil {
		t.Errorf("list while booting = %+v; want the vm starting, no guest info yet", vms)
	}

	// Giving up on the start stops the VM.
	cancelStart()
	if err := <-started; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled start: %v", err)
	}
	waitFor(testCtx(t), t, "the vm to be stopped", func() bool {
		return inspect(t, d, "booting").State == api.StateStopped
	})
}

func TestStartVMMCrashesAtBoot(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil) // ready_timeout 10s: the crash must end the wait long before
	e.fake.setBehaviour("crashy", fakeBehaviour{CrashAtBoot: true})
	ctx := testCtx(t)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "crashy"}, nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err := d.c.VMStart(ctx, api.VMStartParams{Name: "crashy"}, nil)
	if err == nil || !strings.Contains(err.Error(), "exited during boot") || !strings.Contains(err.Error(), "fake kernel booting crashy") {
		t.Fatalf("start error = %v; want the VM exited during boot, with console output", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("start took %v to notice the crash", took)
	}
	vm := inspect(t, d, "crashy")
	if vm.State != api.StateStopped || !strings.Contains(vm.LastError, "exited during boot") {
		t.Errorf("vm after crash: %s, last error %q", vm.State, vm.LastError)
	}
	if left := runtimeFiles(vm.Dir); len(left) > 0 {
		t.Errorf("runtime files left: %v", left)
	}
}

func TestConcurrentStartsBootOnce(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "twice"}, nil); err != nil {
		t.Fatal(err)
	}
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range errs {
		wg.Go(func() { _, errs[i] = d.c.VMStart(ctx, api.VMStartParams{Name: "twice"}, nil) })
	}
	wg.Wait()
	ok, refused := 0, 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, errdefs.ErrFailedPrecondition) && (strings.Contains(err.Error(), "already running") || strings.Contains(err.Error(), "is booting")):
			refused++
		default:
			t.Errorf("start: %v", err)
		}
	}
	if ok != 1 || refused != 1 {
		t.Errorf("concurrent starts: %d succeeded, %d refused; want 1 and 1", ok, refused)
	}
	n := 0
	for _, op := range e.fake.callsFor("twice") {
		if op == "start" {
			n++
		}
	}
	if n != 1 {
		t.Errorf("driver started the vm %d times", n)
	}
}

func TestKill(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	createStarted(t, d, "victim")
	vm, err := d.c.VMKill(ctx, "victim")
	if err != nil {
		t.Fatalf("kill: %v", err)
	}
	if vm.State != api.StateStopped {
		t.Errorf("state after kill = %s", vm.State)
	}
	if ops := e.fake.callsFor("victim"); !slices.Contains(ops, "kill") || slices.Contains(ops, "agent-shutdown") || slices.Contains(ops, "acpi") {
		t.Errorf("driver calls = %v; want a kill and nothing graceful", ops)
	}
	_, err = d.c.VMKill(ctx, "victim")
	wireErr(t, "kill of a stopped vm", err, errdefs.ErrFailedPrecondition)
	_, err = d.c.VMStop(ctx, api.VMStopParams{Name: "victim"}, nil)
	wireErr(t, "stop of a stopped vm", err, errdefs.ErrFailedPrecondition)
}

// vm kill (and rm -f) of a VM still waiting for its agent ends the wait at
// once instead of queueing behind it until ready_timeout.
func TestKillAbortsBoot(t *testing.T) {
	t.Parallel()
	e, d := setup(t, func(c *config.Daemon) { c.ReadyTimeout = config.Duration{Duration: time.Minute} })
	e.fake.setBehaviour("stuck", fakeBehaviour{AgentSilent: true})
	ctx := testCtx(t)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "stuck"}, nil); err != nil {
		t.Fatal(err)
	}
	startErr := make(chan error, 1)
	go func() {
		_, err := d.c.VMStart(ctx, api.VMStartParams{Name: "stuck"}, nil)
		startErr <- err
	}()
	waitFor(ctx, t, "the VM to boot", func() bool { return inspect(t, d, "stuck").PID != 0 })
	begin := time.Now()
	if _, err := d.c.VMKill(ctx, "stuck"); err != nil && !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("kill: %v", err)
	}
	if took := time.Since(begin); took > 20*time.Second {
		t.Fatalf("kill waited %v for the boot", took)
	}
	if err := <-startErr; err == nil {
		t.Fatal("start succeeded although the VM was killed")
	}
	if vm := inspect(t, d, "stuck"); vm.State != api.StateStopped || e.fake.Alive(e.fake.byName("stuck").handle) {
		t.Fatalf("after kill: state %s", vm.State)
	}
}
