package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/client"
	"github.com/bangerdev/banger/internal/errdefs"
)

// waitGone waits until the daemon no longer knows the VM and its
// directory is gone.
func waitGone(ctx context.Context, t *testing.T, d *testDaemon, vm api.VM) {
	t.Helper()
	waitFor(ctx, t, "vm "+vm.Name+" to be removed", func() bool {
		_, err := d.c.VMInspect(ctx, vm.Name)
		if !errors.Is(err, errdefs.ErrNotFound) {
			return false
		}
		_, err = os.Stat(vm.Dir)
		return errors.Is(err, os.ErrNotExist)
	})
}

func createAutoRemove(t *testing.T, d *testDaemon, name string) api.VM {
	t.Helper()
	vm, err := d.c.VMCreate(testCtx(t), api.VMCreateParams{Name: name, Start: true, AutoRemove: true, MemoryMiB: 128, CPUs: 1}, nil)
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	if !vm.AutoRemove || vm.State != api.StateRunning {
		t.Fatalf("vm %s: auto_remove %v, state %s", name, vm.AutoRemove, vm.State)
	}
	return vm
}

// The client of an exec on an auto-remove VM goes away mid-command (the
// CLI was killed): the daemon removes the VM and kills its VMM.
func TestAutoRemoveWhenExecClientGoes(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	vm := createAutoRemove(t, d, "ephemeral")
	ctx := testCtx(t)
	execCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	marker := filepath.Join(t.TempDir(), "running")
	go func() {
		_, err := d.c.VMExec(execCtx, api.VMExecParams{Name: "ephemeral", Argv: []string{"sh", "-c", "touch " + marker + "; exec sleep 60"}}, client.ExecIO{})
		done <- err
	}()
	waitFor(ctx, t, "the command to run", func() bool { _, err := os.Stat(marker); return err == nil })
	cancel()
	<-done
	waitGone(ctx, t, d, vm)
	if fv := e.fake.byName("ephemeral"); e.fake.Alive(fv.handle) {
		t.Error("the VMM of the removed VM still runs")
	}
}

// An exec that ends normally removes the VM too; a VM without AutoRemove
// stays.
func TestAutoRemoveWhenCommandEnds(t *testing.T) {
	t.Parallel()
	_, d := setup(t, nil)
	vm := createAutoRemove(t, d, "once")
	createStarted(t, d, "keeper")
	if code, _, _, err := execResult(t, d, "once", "", "true"); err != nil || code != 0 {
		t.Fatalf("exec = %d, %v", code, err)
	}
	if code, _, _, err := execResult(t, d, "keeper", "", "true"); err != nil || code != 0 {
		t.Fatalf("exec = %d, %v", code, err)
	}
	ctx := testCtx(t)
	waitGone(ctx, t, d, vm)
	if got := inspect(t, d, "keeper"); got.State != api.StateRunning {
		t.Errorf("a VM without auto-remove is %s after its exec", got.State)
	}
}

// A client that created and started an auto-remove VM and never came back
// (killed before its exec): the VM is removed after the grace period.
func TestAutoRemoveWhenClientNeverComesBack(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.autoRemoveGrace = 200 * time.Millisecond
	d := e.start()
	ctx := testCtx(t)
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd}); err != nil {
		t.Fatal(err)
	}
	vm := createAutoRemove(t, d, "orphan")
	waitGone(ctx, t, d, vm)
}

// The VMM of an auto-remove VM exits with no call on it: removed. And at
// daemon start, an auto-remove VM left by the previous daemon is removed,
// its VMM killed.
func TestAutoRemoveAtVMMExitAndDaemonStart(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	gone := createAutoRemove(t, d, "poweroff")
	ctx := testCtx(t)
	// Keep a call on "leftover" while the daemon stops, so only the next
	// start can remove it.
	left := createAutoRemove(t, d, "leftover")
	execCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	marker := filepath.Join(t.TempDir(), "running")
	go func() {
		_, _ = d.c.VMExec(execCtx, api.VMExecParams{Name: "leftover", Argv: []string{"sh", "-c", "touch " + marker + "; exec sleep 60"}}, client.ExecIO{})
	}()
	waitFor(ctx, t, "the command to run", func() bool { _, err := os.Stat(marker); return err == nil })

	e.fake.byName("poweroff").powerOff()
	waitGone(ctx, t, d, gone)

	d.close()
	fv := e.fake.byName("leftover")
	if !e.fake.Alive(fv.handle) {
		t.Fatal("the VMM died with the daemon")
	}
	d = e.start()
	waitGone(ctx, t, d, left)
	if e.fake.Alive(fv.handle) {
		t.Error("the VMM of an auto-remove VM survived the daemon's start")
	}
}

// The client of `vm run --rm` is killed while the VM boots: the start is
// aborted and the VM removed at once (not after the grace period).
func TestAutoRemoveWhenClientGoesDuringBoot(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil) // grace: the default 30s
	e.fake.setBehaviour("early", fakeBehaviour{AgentSilent: true})
	ctx := testCtx(t)
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "early", AutoRemove: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	startCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = d.c.VMStart(startCtx, api.VMStartParams{Name: "early"}, nil)
	}()
	waitFor(ctx, t, "the agent to be dialed", func() bool { return inOrder(e.fake.callsFor("early"), "start", "dial") })
	cancel()
	<-done
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	waitGone(wctx, t, d, vm)
}
