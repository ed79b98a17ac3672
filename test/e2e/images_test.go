//go:build e2e

package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/disk"
)

// copyImage copies the busybox test image (rootfs, kernel, modules) into
// dir, so that the test may change and delete the files.
func copyImage(t *testing.T, dir string) (rootfs, kernel, modules string) {
	t.Helper()
	for _, name := range []string{"busybox-rootfs.ext4", "vmlinuz", "modules"} {
		if out, err := exec.Command("cp", "-a", "--reflink=auto", filepath.Join(imageDir, name), dir).CombinedOutput(); err != nil {
			t.Fatalf("copy %s: %v\n%s", name, err, out)
		}
	}
	return filepath.Join(dir, "busybox-rootfs.ext4"), filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "modules")
}

// TestImageFilesAndPromote: a changed image file stops vm create with a
// clear error; image promote moves the disks of existing VMs (stopped at
// once, running at their next start) onto banger's copy, so that the
// original files can be deleted and every VM still boots with its data.
func TestImageFilesAndPromote(t *testing.T) {
	e := newEnv(t)
	src := t.TempDir()
	rootfs, kernel, modules := copyImage(t, src)
	e.Must("image", "register", "mine", "--rootfs", rootfs, "--kernel", kernel, "--modules", modules)

	t.Run("changed-file", func(t *testing.T) {
		e.T = t
		later := time.Now().Add(time.Hour)
		if err := os.Chtimes(kernel, later, later); err != nil {
			t.Fatal(err)
		}
		_, errOut, code := e.Banger("vm", "create", "--name", "never", "--image", "mine")
		if code == 0 || !strings.Contains(errOut, "kernel "+kernel+" changed") || !strings.Contains(errOut, "image promote") {
			t.Fatalf("create from an image whose kernel was touched: exit %d, %s", code, errOut)
		}
		if dirs := e.VMDirs(); len(dirs) != 0 {
			t.Fatalf("vm dirs left: %v", dirs)
		}
		// Re-registering takes the files as they are now.
		e.Must("image", "rm", "mine")
		e.Must("image", "register", "mine", "--rootfs", rootfs, "--kernel", kernel, "--modules", modules)
	})

	t.Run("promote-with-vms", func(t *testing.T) {
		e.T = t
		e.Must("vm", "create", "--name", "keep", "--image", "mine", "--accel", "tcg", "--memory", "256", "--start")
		e.Must("vm", "exec", "keep", "--", "sh", "-c", "echo persisted > /marker && sync")
		e.Must("vm", "stop", "keep")
		e.Must("vm", "create", "--name", "live", "--image", "mine", "--accel", "tcg", "--memory", "256", "--start")

		_, errOut, code := e.Banger("image", "promote", "mine")
		if code != 0 || !strings.Contains(errOut, "verify copy") {
			t.Fatalf("promote: exit %d, %s", code, errOut)
		}
		if !strings.Contains(errOut, "vm live runs") {
			t.Errorf("promote does not say the running VM moves later: %s", errOut)
		}
		var im api.Image
		if err := json.Unmarshal([]byte(e.Must("image", "inspect", "mine")), &im); err != nil {
			t.Fatal(err)
		}
		if !im.Managed || !strings.HasPrefix(im.Rootfs, e.StateDir()) {
			t.Fatalf("promoted image: %+v", im)
		}
		if b, err := disk.BackingFile(e.Inspect("keep").DiskPath); err != nil || b != im.Rootfs {
			t.Fatalf("stopped VM's disk backed by %q (%v), want the managed copy %s", b, err, im.Rootfs)
		}
		// The running VM still reads the original; deleting it is safe (QEMU
		// has it open) and the VM goes on.
		if err := os.RemoveAll(src); err != nil {
			t.Fatal(err)
		}
		if out := e.Must("vm", "exec", "live", "--", "cat", "/proc/version"); !strings.Contains(out, "Linux") {
			t.Fatalf("running VM after the originals were deleted: %q", out)
		}
		e.Must("vm", "stop", "live")

		e.Must("vm", "start", "keep")
		if out := e.Must("vm", "exec", "keep", "--", "cat", "/marker"); out != "persisted\n" {
			t.Fatalf("data written before promote: %q", out)
		}
		e.Must("vm", "start", "live")
		if b, err := disk.BackingFile(e.Inspect("live").DiskPath); err != nil || b != im.Rootfs {
			t.Fatalf("the VM that ran during promote is backed by %q (%v) after its restart, want %s", b, err, im.Rootfs)
		}
		if out := e.Must("vm", "exec", "live", "--", "echo", "ok"); out != "ok\n" {
			t.Fatalf("exec after restart: %q", out)
		}
	})
}
