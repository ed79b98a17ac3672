// Package undo is a stack of undo steps for multi-step operations, in the
// shape of firecracker-go-sdk's handlers: every step that creates something
// (a directory, a process, a TAP device, a firewall rule, a forwarded port)
// pushes the function that removes it. If the operation fails, Run undoes
// the steps in reverse order; if it succeeds, Release keeps everything.
//
//	s := undo.New(log)
//	defer s.Run(ctx) // no-op once released
//	dir := mkdir(); s.Push("remove vm dir", func(context.Context) error { return os.RemoveAll(dir) })
//	...
//	s.Release()
//
// Each step runs at most once. A failing step is logged and the following
// ones still run. A Stack is not safe for concurrent use.
package undo

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
)

// Step is one registered undo function.
type Step struct {
	Name string
	Fn   func(ctx context.Context) error
}

// Stack holds undo steps; the zero value is not usable, call New.
type Stack struct {
	log   *slog.Logger
	steps []Step
	done  bool
}

// New returns an empty stack that logs failing steps to log (nil: discard).
func New(log *slog.Logger) *Stack {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Stack{log: log}
}

// Push registers the undo of a step that succeeded. Pushing onto a stack
// that already ran or was released runs nothing and panics: it is a bug.
func (s *Stack) Push(name string, fn func(ctx context.Context) error) {
	if s.done {
		panic(fmt.Sprintf("undo: Push(%q) after Run or Release", name))
	}
	s.steps = append(s.steps, Step{Name: name, Fn: fn})
}

// Len is the number of steps registered and not yet run.
func (s *Stack) Len() int { return len(s.steps) }

// Release forgets every step: the operation succeeded and keeps what it made.
func (s *Stack) Release() {
	s.steps, s.done = nil, true
}

// Run undoes the registered steps in reverse order, once: later calls (and
// calls after Release) do nothing. Failures are logged and joined into the
// returned error; every step runs regardless. The steps get a context that
// is not cancelled with ctx: an undo must finish even when the request that
// failed was cancelled.
func (s *Stack) Run(ctx context.Context) error {
	if s.done {
		return nil
	}
	s.done = true
	ctx = context.WithoutCancel(ctx)
	var errs []error
	for i := len(s.steps) - 1; i >= 0; i-- {
		st := s.steps[i]
		if err := st.Fn(ctx); err != nil {
			s.log.Warn("undo failed", "step", st.Name, "err", err)
			errs = append(errs, fmt.Errorf("undo %s: %w", st.Name, err))
		}
	}
	s.steps = nil
	return errors.Join(errs...)
}
