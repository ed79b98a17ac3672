package testenv

import (
	"testing"
)

// fakeTB records how a test ended.
type fakeTB struct {
	testing.TB
	skipped, failed bool
	msg             string
}

func (f *fakeTB) Helper()                        {}
func (f *fakeTB) Skip(args ...any)               { f.skipped = true; f.msg = args[0].(string) }
func (f *fakeTB) Fatalf(format string, a ...any) { f.failed = true; f.msg = format }

func TestMissing(t *testing.T) {
	t.Setenv("CI", "")
	f := &fakeTB{}
	Missing(f, "no %s", "qemu")
	if !f.skipped || f.failed || f.msg != "no qemu" {
		t.Fatalf("outside CI: skipped=%v failed=%v msg=%q, want a skip", f.skipped, f.failed, f.msg)
	}
	t.Setenv("CI", "true")
	f = &fakeTB{}
	Missing(f, "no %s", "qemu")
	if f.skipped || !f.failed {
		t.Fatalf("with CI set: skipped=%v failed=%v, want a failure", f.skipped, f.failed)
	}
}
