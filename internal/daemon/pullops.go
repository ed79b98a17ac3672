package daemon

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
)

// The registry of running pulls. A pull runs in a goroutine of its own,
// with a context of its own (a child of the daemon's, not of any call):
// the calls waiting on it only watch it. A client that goes away stops
// watching, and the pull goes on, finishes and registers what it made; a
// second call for the same thing (the same key) watches the same pull,
// gets its progress frames from then on and the same result; a cancel
// (v1.pull.cancel) cancels the pull's own context, and the pull unwinds
// (its staging directory removed, nothing registered).

// errPullCancelled is the cause of a cancelled pull's context.
var errPullCancelled = errors.New("pull cancelled")

// pullFunc does one pull, reporting progress; it returns a store.Image
// or a store.Kernel.
type pullFunc func(ctx context.Context, progress func(api.Progress)) (any, error)

// pullRegistry holds the running pulls by key.
type pullRegistry struct {
	mu  sync.Mutex
	ops map[string]*pullOp
	wg  sync.WaitGroup // one per running pull
}

// pullOp is one running pull.
type pullOp struct {
	kind   string // "image" or "kernel"
	key    string
	refs   []string // the refs it answers to (cancel): what was asked, the names it resolved to; guarded by the registry's mu
	cancel context.CancelCauseFunc
	done   chan struct{} // closed once res and err are set

	res any
	err error

	mu   sync.Mutex
	last *api.Progress // the latest frame, for watchers that come later
	subs map[*pullWatcher]struct{}
	// wanted: a client asked for this pull itself (image pull, kernel
	// pull, vm create), not only another pull (an image's kernel); it
	// then runs to its end whoever leaves. nested counts the other pulls
	// waiting for it: when the last one is cancelled and nobody wanted
	// it, it is cancelled too.
	wanted bool
	nested int
}

// pullCtxKey marks the context of a running pull (its op), so that a pull
// started inside it (an image's kernel) knows it is nested.
type pullCtxKey struct{}

// start returns the running pull of key (adding refs to the ones it
// answers to), or starts fn as a new one with a context derived from
// parent (the daemon's).
func (r *pullRegistry) start(parent context.Context, kind, key string, refs []string, fn pullFunc) *pullOp {
	r.mu.Lock()
	defer r.mu.Unlock()
	if op := r.ops[key]; op != nil {
		for _, ref := range refs {
			if !slices.Contains(op.refs, ref) {
				op.refs = append(op.refs, ref)
			}
		}
		return op
	}
	if r.ops == nil {
		r.ops = map[string]*pullOp{}
	}
	ctx, cancel := context.WithCancelCause(parent)
	op := &pullOp{kind: kind, key: key, refs: slices.Clone(refs), cancel: cancel, done: make(chan struct{}), subs: map[*pullWatcher]struct{}{}}
	r.ops[key] = op
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		res, err := fn(context.WithValue(ctx, pullCtxKey{}, op), op.publish)
		if err != nil && errors.Is(context.Cause(ctx), errPullCancelled) {
			err = fmt.Errorf("%s pull of %s cancelled: %w", kind, errdefs.Quote(refs[0]), context.Canceled)
		}
		cancel(nil)
		r.mu.Lock()
		delete(r.ops, key)
		r.mu.Unlock()
		op.res, op.err = res, err
		close(op.done)
	}()
	return op
}

// find returns the running pull of kind that answers to ref.
func (r *pullRegistry) find(kind, ref string) *pullOp {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, op := range r.ops {
		if op.kind == kind && slices.Contains(op.refs, ref) {
			return op
		}
	}
	return nil
}

// running lists the refs of the running pulls (for messages).
func (r *pullRegistry) running() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, op := range r.ops {
		out = append(out, op.kind+" "+op.refs[0])
	}
	slices.Sort(out)
	return out
}

// wait waits for the running pulls to end (after the daemon's context,
// their parent, ended: they unwind), at most timeout; it reports whether
// they all ended.
func (r *pullRegistry) wait(timeout time.Duration) bool {
	done := make(chan struct{})
	go func() {
		r.wg.Wait()
		close(done)
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// publish records a progress frame and hands it to the watchers. It
// never blocks on a watcher: each keeps what it hasn't sent yet,
// coalesced.
func (op *pullOp) publish(p api.Progress) {
	op.mu.Lock()
	defer op.mu.Unlock()
	op.last = &p
	for w := range op.subs {
		w.push(p)
	}
}

// watch relays the pull's progress to progress (nil: none) until it
// ends, and returns its result. When ctx ends first (the client went
// away), it returns ctx's error and the pull goes on.
func (op *pullOp) watch(ctx context.Context, progress func(api.Progress)) (any, error) {
	w := &pullWatcher{wake: make(chan struct{}, 1)}
	op.mu.Lock()
	if op.last != nil {
		w.push(*op.last)
	}
	op.subs[w] = struct{}{}
	_, nested := ctx.Value(pullCtxKey{}).(*pullOp)
	if nested {
		op.nested++
	} else {
		op.wanted = true
	}
	op.mu.Unlock()
	defer func() {
		op.mu.Lock()
		delete(op.subs, w)
		orphan := false
		if nested {
			op.nested--
			orphan = op.nested == 0 && !op.wanted && ctx.Err() != nil
		}
		op.mu.Unlock()
		if orphan {
			// The pulls that needed it were cancelled and no client
			// asked for it: stop it too.
			op.cancel(errPullCancelled)
		}
	}()
	flush := func() {
		for _, p := range w.take() {
			if progress != nil {
				progress(p)
			}
		}
	}
	for {
		select {
		case <-op.done:
			flush()
			return op.res, op.err
		case <-w.wake:
			flush()
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// pullWatcher is the frames one watcher hasn't sent yet.
type pullWatcher struct {
	mu      sync.Mutex
	pending []api.Progress
	wake    chan struct{}
}

// maxPending bounds the frames a slow watcher holds: frames of one phase
// replace each other, and past this many phases the newest replaces the
// last.
const maxPending = 32

func (w *pullWatcher) push(p api.Progress) {
	w.mu.Lock()
	n := len(w.pending)
	switch {
	case n > 0 && w.pending[n-1].Phase == p.Phase, n >= maxPending:
		w.pending[n-1] = p
	default:
		w.pending = append(w.pending, p)
	}
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *pullWatcher) take() []api.Progress {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := w.pending
	w.pending = nil
	return out
}

// cancelPull cancels the running pull of kind answering to ref and waits
// until it has unwound (nothing it made is left), or ctx ends.
func (d *Daemon) cancelPull(ctx context.Context, kind, ref string) error {
	op := d.pulls.find(kind, ref)
	if op == nil {
		running := d.pulls.running()
		hint := "none is running"
		if len(running) > 0 {
			hint = "running: " + fmt.Sprint(running)
		}
		return fmt.Errorf("no %s pull of %s is running (%s): %w", kind, errdefs.Quote(ref), hint, errdefs.ErrNotFound)
	}
	op.cancel(errPullCancelled)
	select {
	case <-op.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
