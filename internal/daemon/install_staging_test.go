package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

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
		removed, _, err = d.removePartials()
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
