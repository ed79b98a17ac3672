package guestagent

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/kmod/kmodtest"
)

func TestRemoveOnDevice(t *testing.T) {
	root := t.TempDir()
	keep := filepath.Join(root, "newroot")
	for _, d := range []string{"a/b/c", "newroot/inside", "empty"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"a/file", "a/b/c/deep", "top", "newroot/inside/precious"} {
		if err := os.WriteFile(filepath.Join(root, f), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/etc/passwd", filepath.Join(root, "link")); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(root, &st); err != nil {
		t.Fatal(err)
	}
	removeOnDevice(root, st.Dev, keep)
	ents, _ := os.ReadDir(root)
	if len(ents) != 1 || ents[0].Name() != "newroot" {
		t.Errorf("left: %v", ents)
	}
	if _, err := os.Stat(filepath.Join(keep, "inside/precious")); err != nil {
		t.Errorf("skipped tree touched: %v", err)
	}
	if _, err := os.Stat("/etc/passwd"); err != nil {
		t.Errorf("symlink target removed: %v", err)
	}
	// Another device number: nothing is removed.
	os.WriteFile(filepath.Join(root, "other"), nil, 0o644)
	removeOnDevice(root, st.Dev+1, "")
	if _, err := os.Stat(filepath.Join(root, "other")); err != nil {
		t.Errorf("file on another device removed: %v", err)
	}
}

func TestRunInitRefusesNonPID1(t *testing.T) {
	if os.Getpid() == 1 {
		t.Skip("running as PID 1")
	}
	if code := runInit([]string{"/banger/init"}); code != 2 {
		t.Errorf("runInit as PID %d = %d, want 2", os.Getpid(), code)
	}
}

// moduleRelease names the kernel a module that failed to load was built
// for, in the console's module failure line.
func TestModuleRelease(t *testing.T) {
	dir := t.TempDir()
	ko := filepath.Join(dir, "virtio_blk.ko")
	if err := os.WriteFile(ko, kmodtest.Module("virtio_blk", "6.1.0-1-other"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := moduleRelease(ko); got != "6.1.0-1-other" {
		t.Errorf("moduleRelease = %q", got)
	}
	bad := filepath.Join(dir, "bad.ko")
	os.WriteFile(bad, []byte("garbage"), 0o644)
	for _, p := range []string{bad, filepath.Join(dir, "missing.ko"), filepath.Join(dir, "x.ko.xz")} {
		if got := moduleRelease(p); got != "" {
			t.Errorf("moduleRelease(%s) = %q, want empty", p, got)
		}
	}
}
