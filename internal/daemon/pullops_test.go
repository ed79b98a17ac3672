package daemon

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
)

// Two watchers of one key share one run; each gets the frames published
// after it came (and the latest one before), and the same result.
func TestPullRegistryShares(t *testing.T) {
	var r pullRegistry
	var runs atomic.Int32
	release := make(chan struct{})
	started := make(chan struct{})
	fn := func(ctx context.Context, progress func(api.Progress)) (any, error) {
		runs.Add(1)
		progress(api.Progress{Phase: "download", Done: 1, Total: 10})
		close(started)
		<-release
		progress(api.Progress{Phase: "download", Done: 10, Total: 10})
		progress(api.Progress{Phase: "install"})
		return "result", nil
	}
	ctx := testCtx(t)
	op1 := r.start(context.Background(), "image", "image:x@1", []string{"x"}, fn)
	<-started
	op2 := r.start(context.Background(), "image", "image:x@1", []string{"x@1"}, func(context.Context, func(api.Progress)) (any, error) {
		t.Error("a second run started")
		return nil, nil
	})
	if op1 != op2 {
		t.Fatal("second start of the same key made another op")
	}
	if r.find("image", "x@1") != op1 || r.find("image", "x") != op1 || r.find("kernel", "x") != nil {
		t.Fatal("find by either ref should give the op, of its kind only")
	}
	var wg sync.WaitGroup
	frames := make([][]api.Progress, 2)
	results := make([]any, 2)
	for i, op := range []*pullOp{op1, op2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			results[i], err = op.watch(ctx, func(p api.Progress) { frames[i] = append(frames[i], p) })
			if err != nil {
				t.Errorf("watcher %d: %v", i, err)
			}
		}()
	}
	time.Sleep(20 * time.Millisecond) // let the watchers subscribe (not needed for correctness)
	close(release)
	wg.Wait()
	if runs.Load() != 1 {
		t.Fatalf("%d runs, want 1", runs.Load())
	}
	for i := range 2 {
		if results[i] != "result" {
			t.Errorf("watcher %d got %v", i, results[i])
		}
		f := frames[i]
		if len(f) == 0 || f[len(f)-1].Phase != "install" {
			t.Errorf("watcher %d frames %v: want the last phase, install", i, f)
		}
		if f[0].Phase != "download" {
			t.Errorf("watcher %d frames %v: want the latest frame at subscription first", i, f)
		}
	}
	if r.find("image", "x") != nil {
		t.Error("a finished op is still registered")
	}
}

// A watcher whose context ends returns; the pull goes on and finishes.
func TestPullRegistryWatcherLeaves(t *testing.T) {
	var r pullRegistry
	release := make(chan struct{})
	finished := make(chan struct{})
	op := r.start(context.Background(), "image", "k", []string{"x"}, func(ctx context.Context, progress func(api.Progress)) (any, error) {
		select {
		case <-release:
		case <-ctx.Done():
			t.Error("the pull was cancelled when its watcher left")
		}
		close(finished)
		return 1, nil
	})
	wctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(10 * time.Millisecond); cancel() }()
	if _, err := op.watch(wctx, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("watch = %v, want the watcher's cancellation", err)
	}
	close(release)
	<-finished
	res, err := op.watch(testCtx(t), nil)
	if err != nil || res != 1 {
		t.Fatalf("after the pull: %v, %v", res, err)
	}
	if !r.wait(10 * time.Second) {
		t.Fatal("the pull did not end")
	}
}

// cancelPull cancels the op's context, waits until it returned, and its
// watchers get a context.Canceled error.
func TestPullRegistryCancel(t *testing.T) {
	d := &Daemon{}
	unwound := make(chan struct{})
	op := d.pulls.start(context.Background(), "kernel", "k", []string{"generic"}, func(ctx context.Context, progress func(api.Progress)) (any, error) {
		<-ctx.Done()
		time.Sleep(20 * time.Millisecond) // unwinding
		close(unwound)
		return nil, fmt.Errorf("download: %w", ctx.Err())
	})
	if err := d.cancelPull(testCtx(t), "image", "generic"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("cancel of another kind: %v, want not found", err)
	}
	if err := d.cancelPull(testCtx(t), "kernel", "generic"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-unwound:
	default:
		t.Fatal("cancelPull returned before the pull unwound")
	}
	_, err := op.watch(testCtx(t), nil)
	if !errors.Is(err, context.Canceled) || errdefs.Code(err) != api.CodeCanceled {
		t.Fatalf("watch after cancel: %v", err)
	}
}

// A watcher that doesn't take its frames never blocks the pull.
func TestPullWatcherCoalesces(t *testing.T) {
	w := &pullWatcher{wake: make(chan struct{}, 1)}
	for i := range 1000 {
		w.push(api.Progress{Phase: "download", Done: int64(i)})
	}
	for i := range 100 {
		w.push(api.Progress{Phase: fmt.Sprint("p", i)})
	}
	got := w.take()
	if len(got) > maxPending {
		t.Fatalf("%d frames pending, want at most %d", len(got), maxPending)
	}
	if got[0].Done != 999 || got[len(got)-1].Phase != "p99" {
		t.Fatalf("frames %v: want the download's last and the newest phase", got)
	}
}
