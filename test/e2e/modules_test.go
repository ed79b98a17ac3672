//go:build e2e

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/kmod/kmodtest"
)

// copyTree copies src to dst (hard links when both are on one filesystem,
// as cp -al does; a full copy otherwise).
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-al", src, dst).CombinedOutput(); err != nil {
		os.RemoveAll(dst)
		if out2, err2 := exec.Command("cp", "-a", src, dst).CombinedOutput(); err2 != nil {
			t.Fatalf("copy %s: %v: %s (cp -al: %s)", src, err2, out2, out)
		}
	}
}

// TestModulesRenamedDir registers the test image's kernel with its modules
// copied to a directory named build/modules (modules.dep at its top, no
// initrd: the modules can come only from there) and boots it. Before the
// release was read from the kernel, the modules were packed as release
// "modules" and the boot ended in "root device /dev/vda did not appear".
// Then a copy whose virtio_blk.ko was built for another kernel is refused,
// and one whose virtio_blk.ko is broken boots into a clear error.
func TestModulesRenamedDir(t *testing.T) {
	e := newEnv(t)
	release := kernelRelease(t)
	src := filepath.Join(imageDir, "modules", "lib", "modules", release)
	tmp := t.TempDir()
	kernel := filepath.Join(imageDir, "vmlinuz")
	busybox := filepath.Join(imageDir, "busybox-rootfs.ext4")

	mods := filepath.Join(tmp, "build", "modules")
	copyTree(t, src, mods)
	e.Must("image", "register", "renamed", "--rootfs", busybox, "--kernel", kernel, "--modules", mods)

	start := time.Now()
	out, errOut, code := e.Banger("vm", "run", "--rm", "--image", "renamed", "--memory", "256", "--",
		"sh", "-c", "uname -r; cut -d' ' -f1 /proc/modules")
	if code != 0 {
		t.Fatalf("vm run with modules in build/modules: exit %d\nstderr: %s", code, errOut)
	}
	lines := strings.Fields(out)
	if len(lines) == 0 || lines[0] != release {
		t.Fatalf("uname -r = %q, want %q", out, release)
	}
	for _, m := range []string{"virtio_blk", "virtio_mmio", "virtio_console"} {
		if !strings.Contains(" "+strings.Join(lines[1:], " ")+" ", " "+m+" ") {
			t.Errorf("module %s not loaded in the guest; /proc/modules: %v", m, lines[1:])
		}
	}
	t.Logf("boot with build/modules and run took %s", time.Since(start).Round(time.Millisecond))

	// A modules tree whose root disk driver can't be loaded: the boot
	// fails, and the error says that module loading failed.
	broken := filepath.Join(tmp, "broken", "modules")
	copyTree(t, src, broken)
	blk := filepath.Join(broken, "kernel", "drivers", "block", "virtio_blk.ko")
	if err := os.Remove(blk); err != nil { // a hard link: the original stays
		t.Fatal(err)
	}
	// A module file built for another kernel (its vermagic says so) is
	// refused at register.
	if err := os.WriteFile(blk, kmodtest.Module("virtio_blk", "6.1.0-1-other"), 0o644); err != nil {
		t.Fatal(err)
	}
	e.Fails("built for kernel 6.1.0-1-other, not for the kernel's release "+release, "image", "register", "broken", "--rootfs", busybox, "--kernel", kernel, "--modules", broken)
	// One whose release can't be read passes register, and fails in the
	// guest.
	if err := os.WriteFile(blk, []byte("\x7fELF but not a kernel module\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e.Must("image", "register", "broken", "--rootfs", busybox, "--kernel", kernel, "--modules", broken)
	e.Must("vm", "create", "--name", "nomods", "--image", "broken", "--memory", "256")
	_, errOut, code = e.Banger("vm", "start", "nomods")
	if code == 0 {
		t.Fatal("vm start with a broken virtio_blk.ko succeeded")
	}
	for _, l := range strings.Split(errOut, "\n") {
		if strings.Contains(l, "did not become ready") {
			t.Logf("vm start error: %s", l)
		}
	}
	for _, want := range []string{"kernel module loading failed in the guest", "could not load virtio_blk"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("vm start error lacks %q:\n%s", want, errOut)
		}
	}
	logs := e.Must("vm", "logs", "nomods")
	if !strings.Contains(logs, "kernel modules failed to load: kernel "+release+" could not load virtio_blk") {
		t.Errorf("console lacks the module failure line:\n%s", logs)
	}
}
