package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/testenv"
)

// TestRemovePartialsUnmounts: a *.partial staging directory with a bind
// mount inside (as a killed mmdebstrap leaves /dev in its chroot) is
// removed by removePartials (daemon start, image prune) without touching
// what the mount shows. In a mount namespace of the test's own.
func TestRemovePartialsUnmounts(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Missing(t, "root (mounts)")
	}
	outside := t.TempDir()
	canary := filepath.Join(outside, "canary")
	if err := os.WriteFile(canary, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &Daemon{cfg: config.Daemon{StateDir: t.TempDir()}, log: testLogger(t)}
	partial := filepath.Join(d.stagingRoot(), "build-123.partial")
	errc := make(chan error, 1)
	var removed []string
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with its namespace
		if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
			errc <- err
			return
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			errc <- err
			return
		}
		mp := filepath.Join(partial, "rootfs", "dev")
		if err := os.MkdirAll(mp, 0o755); err != nil {
			errc <- err
			return
		}
		if err := unix.Mount(outside, mp, "", unix.MS_BIND, ""); err != nil {
			errc <- err
			return
		}
		if _, err := os.Stat(filepath.Join(mp, "canary")); err != nil {
			errc <- fmt.Errorf("bind mount not visible: %w", err)
			return
		}
		var err error
		removed, _, err = d.removePartials(0)
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(canary); err != nil || string(b) != "keep me" {
		t.Fatalf("the mounted directory's file was touched: %q %v", b, err)
	}
	if _, err := os.Stat(partial); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("staging dir still there: %v", err)
	}
	if len(removed) != 1 || removed[0] != partial {
		t.Fatalf("removed %v, want [%s]", removed, partial)
	}
}

// Daemon start (removePartials(resumableMaxAge)) removes interrupted
// pulls' and builds' staging dirs, but keeps a catalog bundle's resumable
// one younger than resumableMaxAge and written since the machine booted;
// image prune (0) removes them all.
func TestRemovePartialsKeepsRecentResumable(t *testing.T) {
	d := &Daemon{cfg: config.Daemon{StateDir: t.TempDir()}, log: testLogger(t)}
	mk := func(name string, age time.Duration) string {
		p := filepath.Join(d.stagingRoot(), name)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		when := time.Now().Add(-age)
		if err := os.Chtimes(p, when, when); err != nil {
			t.Fatal(err)
		}
		return p
	}
	fresh := mk("image-sha256-0123456789abcdef.partial", 0) // written after this boot
	old := mk("kernel-sha256-0123456789abcdef.partial", 2*resumableMaxAge)
	build := mk("build-123.partial", time.Minute)
	removed, _, err := d.removePartials(resumableMaxAge)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(removed)
	if want := []string{build, old}; !slices.Equal(removed, want) {
		t.Errorf("daemon start removed %v, want %v", removed, want)
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Errorf("recent resumable staging dir removed at start: %v", err)
	}
	if removed, _, err := d.removePartials(0); err != nil || len(removed) != 1 || removed[0] != fresh {
		t.Errorf("prune removed %v (%v), want %s", removed, err, fresh)
	}
}
