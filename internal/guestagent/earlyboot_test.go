package guestagent

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestEarlyBootUnit(t *testing.T) {
	u := earlyBootUnit()
	for _, want := range []string{"After=sysinit.target", "DefaultDependencies=no", "Type=oneshot", earlyBootMarker} {
		if !strings.Contains(u, want) {
			t.Errorf("unit lacks %q:\n%s", want, u)
		}
	}
}

func TestEarlyBootChecker(t *testing.T) {
	ctx := context.Background()
	for _, mode := range []string{InitModeAgent, InitModeOther, ""} {
		c := newEarlyBootChecker(mode)
		c.systemdSaysActive = func(context.Context) bool { t.Errorf("mode %q asked systemd", mode); return false }
		if done, sig := c.check(ctx); !done || sig == "" {
			t.Errorf("mode %q: done %v signal %q, want done", mode, done, sig)
		}
	}

	type fixture struct {
		c     *earlyBootChecker
		now   time.Time
		asks  int
		reply bool
		root  string
	}
	newFixture := func(t *testing.T, withUnit bool) *fixture {
		f := &fixture{root: t.TempDir(), now: time.Unix(1000, 0)}
		f.c = newEarlyBootChecker(InitModeSystemd)
		f.c.root, f.c.started = f.root, f.now
		f.c.now = func() time.Time { return f.now }
		f.c.systemdSaysActive = func(context.Context) bool { f.asks++; return f.reply }
		if withUnit {
			p := filepath.Join(f.root, systemdRuntimeUnits, earlyBootUnitName)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(earlyBootUnit()), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return f
	}
	mark := func(t *testing.T, f *fixture) {
		p := filepath.Join(f.root, earlyBootMarker)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("unit marker", func(t *testing.T) {
		f := newFixture(t, true)
		if done, _ := f.c.check(ctx); done {
			t.Fatal("done before the marker exists")
		}
		f.now = f.now.Add(time.Second)
		if done, _ := f.c.check(ctx); done {
			t.Fatal("done before the marker exists")
		}
		if f.asks != 0 {
			t.Errorf("systemd asked %d times while the unit is installed and young", f.asks)
		}
		mark(t, f)
		if done, sig := f.c.check(ctx); !done || sig != earlyBootByUnit {
			t.Errorf("with the marker: done %v signal %q, want true %q", done, sig, earlyBootByUnit)
		}
		// Remembered: /run/banger removed later does not undo readiness.
		os.RemoveAll(filepath.Join(f.root, earlyBootDir))
		if done, _ := f.c.check(ctx); !done {
			t.Error("readiness forgotten")
		}
	})

	t.Run("late marker falls back to systemctl", func(t *testing.T) {
		f := newFixture(t, true)
		f.now = f.now.Add(earlyBootFallbackAfter)
		if done, sig := f.c.check(ctx); done || sig != earlyBootBySystemctl || f.asks != 1 {
			t.Fatalf("done %v signal %q asks %d, want false %q 1", done, sig, f.asks, earlyBootBySystemctl)
		}
		f.c.check(ctx)
		if f.asks != 1 {
			t.Errorf("systemd asked %d times within %s", f.asks, systemctlInterval)
		}
		f.now = f.now.Add(systemctlInterval)
		f.reply = true
		if done, sig := f.c.check(ctx); !done || sig != earlyBootBySystemctl || f.asks != 2 {
			t.Errorf("done %v signal %q asks %d, want true %q 2", done, sig, f.asks, earlyBootBySystemctl)
		}
	})

	t.Run("no unit asks systemctl at once", func(t *testing.T) {
		f := newFixture(t, false)
		f.reply = true
		if done, sig := f.c.check(ctx); !done || sig != earlyBootBySystemctl || f.asks != 1 {
			t.Errorf("done %v signal %q asks %d, want true %q 1", done, sig, f.asks, earlyBootBySystemctl)
		}
	})
}

func TestExplainPTYError(t *testing.T) {
	err := explainPTYError(os.ErrNotExist, t.TempDir())
	if !strings.Contains(err.Error(), "is not mounted yet") || !strings.Contains(err.Error(), "still booting") {
		t.Errorf("without devpts: %v", err)
	}
	if _, statErr := os.Stat("/dev/pts/ptmx"); statErr == nil {
		err = explainPTYError(os.ErrPermission, "/dev/pts")
		if strings.Contains(err.Error(), "not mounted") {
			t.Errorf("with devpts mounted: %v", err)
		}
	}
}
