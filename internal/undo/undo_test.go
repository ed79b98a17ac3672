package undo

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"
)

func TestRunReverseOrderOnce(t *testing.T) {
	s := New(nil)
	var got []string
	for _, n := range []string{"a", "b", "c"} {
		s.Push(n, func(context.Context) error { got = append(got, n); return nil })
	}
	if s.Len() != 3 {
		t.Fatalf("Len = %d, want 3", s.Len())
	}
	if err := s.Run(context.Background()); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if err := s.Run(context.Background()); err != nil {
		t.Fatalf("second Run: %v", err)
	}
	if want := []string{"c", "b", "a"}; !slices.Equal(got, want) {
		t.Fatalf("ran %v, want %v (reverse order, once)", got, want)
	}
}

func TestReleaseKeepsEverything(t *testing.T) {
	s := New(nil)
	ran := false
	s.Push("x", func(context.Context) error { ran = true; return nil })
	s.Release()
	if err := s.Run(context.Background()); err != nil || ran {
		t.Fatalf("Run after Release: err %v, ran %v; want nothing run", err, ran)
	}
}

func TestErrorsLoggedJoinedAndLaterStepsRun(t *testing.T) {
	var logs bytes.Buffer
	s := New(slog.New(slog.NewTextHandler(&logs, nil)))
	errA, errC := errors.New("boom a"), errors.New("boom c")
	var got []string
	s.Push("a", func(context.Context) error { got = append(got, "a"); return errA })
	s.Push("b", func(context.Context) error { got = append(got, "b"); return nil })
	s.Push("c", func(context.Context) error { got = append(got, "c"); return errC })
	err := s.Run(context.Background())
	if !errors.Is(err, errA) || !errors.Is(err, errC) {
		t.Fatalf("Run = %v, want both failures joined", err)
	}
	if want := []string{"c", "b", "a"}; !slices.Equal(got, want) {
		t.Fatalf("ran %v, want %v", got, want)
	}
	if !strings.Contains(logs.String(), "step=a") || !strings.Contains(logs.String(), "step=c") {
		t.Fatalf("failures not logged: %s", logs.String())
	}
}

func TestStepsGetAContextThatOutlivesTheRequest(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	s := New(nil)
	var stepErr error
	s.Push("x", func(ctx context.Context) error { stepErr = ctx.Err(); return nil })
	if err := s.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if stepErr != nil {
		t.Fatalf("undo step saw a cancelled context: %v", stepErr)
	}
}

func TestPushAfterRunPanics(t *testing.T) {
	s := New(nil)
	_ = s.Run(context.Background())
	defer func() {
		if recover() == nil {
			t.Fatal("Push after Run did not panic")
		}
	}()
	s.Push("late", func(context.Context) error { return nil })
}
