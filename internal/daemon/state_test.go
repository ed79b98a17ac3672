package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/client"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/store"
)

// phaseGate records the boot phases VMs reach and holds a boot in the
// phases it is told to, until the boot's context ends.
type phaseGate struct {
	mu      sync.Mutex
	reached map[string]chan struct{} // "vm/phase" -> closed when reached
	hold    map[string]bool          // "vm/phase" -> block there
}

func newPhaseGate() *phaseGate {
	return &phaseGate{reached: map[string]chan struct{}{}, hold: map[string]bool{}}
}

func (g *phaseGate) ch(key string) chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	c, ok := g.reached[key]
	if !ok {
		c = make(chan struct{})
		g.reached[key] = c
	}
	return c
}

func (g *phaseGate) onPhase(ctx context.Context, vm, phase string) {
	key := vm + "/" + phase
	c := g.ch(key)
	g.mu.Lock()
	select {
	case <-c:
	default:
		close(c)
	}
	hold := g.hold[key]
	g.mu.Unlock()
	if hold {
		<-ctx.Done()
	}
}

func (g *phaseGate) holdAt(vm, phase string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.hold[vm+"/"+phase] = true
}

func (g *phaseGate) wait(ctx context.Context, t *testing.T, vm, phase string) {
	t.Helper()
	select {
	case <-g.ch(vm + "/" + phase):
	case <-ctx.Done():
		t.Fatalf("vm %s never reached phase %q", vm, phase)
	}
}

// A stop, kill or rm of a booting VM aborts the boot in any phase; the
// aborted start reports a cancellation; nothing of the boot is left. A
// second start of the booting VM says it is booting. No phase here ends on
// its own (the initramfs build is held, the VMM's start hangs, the agent
// never answers and ready_timeout is an hour): a call that waited behind
// the boot would end at its context's deadline instead, which is checked.
func TestStopKillRemoveAbortBootInEveryPhase(t *testing.T) {
	t.Parallel()
	gate := newPhaseGate()
	e := newEnv(t, func(c *config.Daemon) { c.ReadyTimeout = config.Duration{Duration: time.Hour} })
	e.onPhase = gate.onPhase
	d := e.start()
	ctx := testCtx(t)
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd}); err != nil {
		t.Fatal(err)
	}
	for i, phase := range []string{"build initramfs", "boot", "wait for agent"} {
		for _, op := range []string{"stop", "kill", "rm"} {
			name := fmt.Sprintf("p%d-%s", i, op)
			t.Run(name, func(t *testing.T) {
				// Generous: only a call stuck behind the boot reaches it.
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				switch phase {
				case "build initramfs":
					gate.holdAt(name, phase)
				case "boot":
					e.fake.setBehaviour(name, fakeBehaviour{HangStart: true})
				case "wait for agent":
					e.fake.setBehaviour(name, fakeBehaviour{AgentSilent: true})
				}
				vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: name, MemoryMiB: 128, CPUs: 1}, nil)
				if err != nil {
					t.Fatal(err)
				}
				startErr := make(chan error, 1)
				go func() {
					_, err := d.c.VMStart(ctx, api.VMStartParams{Name: name}, nil)
					startErr <- err
				}()
				gate.wait(ctx, t, name, phase)
				if got := inspect(t, d, name); got.State != api.StateStarting {
					t.Errorf("vm %s during %q is %s, want starting", name, phase, got.State)
				}
				if phase == "wait for agent" {
					waitFor(ctx, t, "the agent to be dialed", func() bool { return inOrder(e.fake.callsFor(name), "start", "dial") })
				}

				_, err = d.c.VMStart(ctx, api.VMStartParams{Name: name}, nil)
				if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
					t.Fatalf("second start during %q waited behind the boot: %v", phase, err)
				}
				wireErr(t, "second start of a booting VM", err, errdefs.ErrFailedPrecondition)

				switch op {
				case "stop":
					_, err = d.c.VMStop(ctx, api.VMStopParams{Name: name}, nil)
				case "kill":
					_, err = d.c.VMKill(ctx, name)
				case "rm":
					err = d.c.VMRemove(ctx, api.VMRemoveParams{Name: name})
				}
				if ctx.Err() != nil {
					t.Fatalf("%s during %q waited behind the boot: %v", op, phase, err)
				}
				if err != nil {
					t.Fatalf("%s during %q: %v", op, phase, err)
				}
				// The boot can't end by itself: the start returns because the
				// op aborted it.
				select {
				case err := <-startErr:
					if !errors.Is(err, context.Canceled) {
						t.Errorf("aborted start returned %v, want a cancellation", err)
					}
				case <-ctx.Done():
					t.Fatalf("start still running after the %s returned", op)
				}
				if fv := e.fake.byName(name); fv != nil && e.fake.Alive(fv.handle) {
					t.Errorf("the VMM of the aborted boot still runs")
				}
				if op == "rm" {
					if _, err := d.c.VMInspect(ctx, name); !errors.Is(err, errdefs.ErrNotFound) {
						t.Errorf("inspect after rm: %v, want not found", err)
					}
					if _, err := os.Stat(vm.Dir); !errors.Is(err, os.ErrNotExist) {
						t.Errorf("vm dir after rm: %v", err)
					}
					return
				}
				got := inspect(t, d, name)
				if got.State != api.StateStopped || got.PID != 0 {
					t.Errorf("after %s: %s pid %d, want stopped", op, got.State, got.PID)
				}
				if left := runtimeFiles(vm.Dir); len(left) > 0 {
					t.Errorf("runtime files left: %v", left)
				}
				if _, err := os.Stat(filepath.Join(vm.Dir, fileInitrd)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("initramfs of the aborted boot left: %v", err)
				}
			})
		}
	}
}

// vm rm deletes the row before the files: when the files can't be
// removed, the VM is gone anyway and the next daemon start removes them.
func TestRemoveDeletesRowBeforeFiles(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	var failRemove sync.Mutex // held: removals fail
	failRemove.Lock()
	e.removeDir = func(p string) error {
		if failRemove.TryLock() {
			failRemove.Unlock()
			return os.RemoveAll(p)
		}
		return errors.New("injected removal failure")
	}
	d := e.start()
	ctx := testCtx(t)
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd}); err != nil {
		t.Fatal(err)
	}
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "gone"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "gone"}); err != nil {
		t.Fatalf("rm with a failing file removal: %v (the row is gone: rm succeeded)", err)
	}
	if _, err := d.c.VMInspect(ctx, "gone"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("inspect after rm: %v, want not found", err)
	}
	if _, err := os.Stat(vm.Dir); err != nil {
		t.Fatalf("vm dir: %v (the injected failure should have kept it)", err)
	}
	d.close()
	failRemove.Unlock()
	e.start()
	if _, err := os.Stat(vm.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("vm dir after restart: %v, want removed by reconcile", err)
	}
}

// The monitor of a VMM that exits marks the VM stopped only if the row
// still records the handle it watched: a newer boot's handle is kept.
func TestMonitorWithStaleHandleKeepsNewerBoot(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	createStarted(t, d, "reborn")
	ctx := testCtx(t)
	st, err := store.Open(ctx, filepath.Join(e.cfg.StateDir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	row, err := st.GetVM(ctx, "reborn")
	if err != nil {
		t.Fatal(err)
	}
	// A newer boot recorded its handle (as startVM does) before the old
	// VMM's monitor ran.
	row.Handle = `{"driver":"fake","pid":1,"start_time":1}`
	if err := st.UpdateVM(ctx, row); err != nil {
		t.Fatal(err)
	}
	fv := e.fake.byName("reborn")
	fv.powerOff()
	waitFor(ctx, t, "the monitor to see the exit", func() bool {
		return inspect(t, d, "reborn").PID == 0 // the daemon forgot the VMM
	})
	// The monitor records the exit after it forgot the VMM; wait for its
	// driver cleanup, which follows, then check the row.
	waitFor(ctx, t, "the monitor's cleanup", func() bool { return inOrder(e.fake.callsFor("reborn"), "start", "cleanup") })
	d.close()
	got, err := st.GetVM(ctx, "reborn")
	if err != nil {
		t.Fatal(err)
	}
	if got.State != api.StateRunning || got.Handle != row.Handle {
		t.Fatalf("a stale monitor changed the newer boot's row: state %s handle %q", got.State, got.Handle)
	}
}

// A VM name equal to another VM's id is refused (ids made before ids
// started with a digit can look like names).
func TestNameEqualToAnotherIDRefused(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "first"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c := vm.ID[0]; c < '0' || c > '9' {
		t.Errorf("new id %q does not start with a digit (it could be a name)", vm.ID)
	}
	st, err := store.Open(ctx, filepath.Join(e.cfg.StateDir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	old, err := st.GetVM(ctx, "first")
	if err != nil {
		t.Fatal(err)
	}
	old.ID, old.Name, old.Dir = "abcdef0123456789", "old", filepath.Join(e.cfg.StateDir, "vms", "abcdef0123456789")
	if err := st.InsertVM(ctx, old); err != nil {
		t.Fatal(err)
	}
	_, err = d.c.VMCreate(ctx, api.VMCreateParams{Name: "abcdef0123456789"}, nil)
	wireErr(t, "create a VM named like another's id", err, errdefs.ErrAlreadyExists)
	if got, err := d.c.VMInspect(ctx, "abcdef0123456789"); err != nil || got.Name != "old" {
		t.Fatalf("inspect by id = %q, %v; want old", got.Name, err)
	}
	if err := st.DeleteVM(ctx, old.ID); err != nil {
		t.Fatal(err)
	}
}

// Errors quote at most a short prefix of the user's input.
func TestErrorsQuoteAShortPrefixOfInput(t *testing.T) {
	t.Parallel()
	_, d := setup(t, nil)
	ctx := testCtx(t)
	long := "a" + strings.Repeat("b", 100<<10)
	_, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: long}, nil)
	wireErr(t, "create with a 100 KiB name", err, errdefs.ErrInvalid)
	if len(err.Error()) > 400 {
		t.Errorf("create error is %d bytes long", len(err.Error()))
	}
	_, err = d.c.VMInspect(ctx, long)
	wireErr(t, "inspect a 100 KiB name", err, errdefs.ErrNotFound)
	if len(err.Error()) > 400 {
		t.Errorf("inspect error is %d bytes long", len(err.Error()))
	}
	_, err = d.c.VMCreate(ctx, api.VMCreateParams{Name: "x", Image: long}, nil)
	wireErr(t, "create from a 100 KiB image ref", err, errdefs.ErrNotFound)
	if len(err.Error()) > 400 {
		t.Errorf("image ref error is %d bytes long", len(err.Error()))
	}
	_, err = d.c.VMCreate(ctx, api.VMCreateParams{Name: strings.Repeat("a", 10<<20)}, nil)
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("create with a 10 MB name = %v, want ErrInvalid", err)
	}
}

// endless is stdin that never ends, like yes's output.
type endless struct{}

func (endless) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = "y\n"[i%2]
	}
	return len(p), nil
}

// A command that stops reading its input ("yes | banger vm exec x --
// head -1") returns, and the daemon's input pump leaves no goroutine
// behind. Not parallel: it counts the process's goroutines.
func TestExecEndlessStdinLeavesNoGoroutine(t *testing.T) {
	_, d := setup(t, nil)
	createStarted(t, d, "yes")
	ctx := testCtx(t)
	// Warm up: the agent connection and its goroutines exist from here on.
	if code, _, _, err := execResult(t, d, "yes", "", "true"); err != nil || code != 0 {
		t.Fatalf("exec true = %d, %v", code, err)
	}
	pumps := func() int {
		buf := make([]byte, 1<<20)
		st := string(buf[:runtime.Stack(buf, true)])
		return strings.Count(st, "daemon.pumpInput")
	}
	base := runtime.NumGoroutine()
	for i := 0; i < 3; i++ {
		var out syncBuffer
		code, err := d.c.VMExec(ctx, api.VMExecParams{Name: "yes", Argv: []string{"head", "-1"}}, client.ExecIO{Stdin: endless{}, Stdout: &out, Stderr: &out})
		if err != nil || code != 0 || out.String() != "y\n" {
			t.Fatalf("exec head -1 with endless stdin = %d, %q, %v", code, out.String(), err)
		}
	}
	waitFor(ctx, t, "the input pumps to end", func() bool { return pumps() == 0 })
	waitFor(ctx, t, fmt.Sprintf("the goroutine count to return to %d", base), func() bool { return runtime.NumGoroutine() <= base })
}

// A start whose client goes away after the agent answered (during
// --wait-boot) leaves the VM running and recorded as running: it is not
// unwound, and its row keeps the VMM's handle.
func TestStartCancelledAfterReadyKeepsVMRunning(t *testing.T) {
	t.Parallel()
	gate := newPhaseGate()
	gate.holdAt("late", "wait for the guest's boot")
	e := newEnv(t, nil)
	e.onPhase = gate.onPhase
	d := e.start()
	ctx := testCtx(t)
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "late"}, nil); err != nil {
		t.Fatal(err)
	}
	startCtx, cancel := context.WithCancel(ctx)
	startErr := make(chan error, 1)
	go func() {
		_, err := d.c.VMStart(startCtx, api.VMStartParams{Name: "late", WaitBoot: true}, nil)
		startErr <- err
	}()
	gate.wait(ctx, t, "late", "wait for the guest's boot")
	cancel()
	if err := <-startErr; err == nil {
		t.Fatal("a cancelled start succeeded")
	}
	waitFor(ctx, t, "the start to end", func() bool { return inspect(t, d, "late").State != api.StateStarting })
	got := inspect(t, d, "late")
	if got.State != api.StateRunning || got.PID == 0 || !e.fake.Alive(e.fake.byName("late").handle) {
		t.Fatalf("after a start cancelled during --wait-boot: state %s pid %d; want the VM running", got.State, got.PID)
	}
	if code, _, _, err := execResult(t, d, "late", "", "true"); err != nil || code != 0 {
		t.Fatalf("exec in the VM = %d, %v", code, err)
	}
}

// What a failed start leaves outside the VM's directory (a confined
// QEMU's cgroup) is released by vm rm, and, for VMs that no longer exist,
// by reconcile at the next daemon start; a VM that exists keeps its own.
func TestFailedStartResourcesReleased(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	ids := map[string]string{}
	for _, name := range []string{"rmd", "kept"} {
		vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: name}, nil)
		if err != nil {
			t.Fatal(err)
		}
		ids[name] = vm.ID
		e.fake.setBehaviour(name, fakeBehaviour{StartErr: errors.New("injected start failure"), LeakOnStartErr: true})
		if _, err := d.c.VMStart(ctx, api.VMStartParams{Name: name}, nil); err == nil {
			t.Fatalf("start %s succeeded, want the injected failure", name)
		}
		if !e.fake.holds(vm.ID) {
			t.Fatalf("the fake holds nothing for %s after its failed start", name)
		}
	}
	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "rmd"}); err != nil {
		t.Fatal(err)
	}
	if e.fake.holds(ids["rmd"]) {
		t.Error("vm rm left the resource of a failed start")
	}
	// A VM removed by a daemon that didn't release it (an older daemon,
	// or a crash between the row's deletion and the release).
	e.fake.mu.Lock()
	e.fake.held["0123456789abcdef"] = true
	e.fake.mu.Unlock()
	d.close()
	e.start()
	if e.fake.holds("0123456789abcdef") {
		t.Error("reconcile left the resource of a VM that no longer exists")
	}
	if !e.fake.holds(ids["kept"]) {
		t.Error("reconcile released the resource of a VM that exists")
	}
}
