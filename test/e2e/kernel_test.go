//go:build e2e

package e2e

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/kerneldeb/kerneldebtest"
)

// TestKernelImportDeb: Debian's cloud kernel package imported as a
// kernel object boots an image registered with it (its virtio modules
// resolved through the module index banger wrote); kernel rm is refused
// while an image or a VM uses it, and works after; image prune --all
// removes an unused imported kernel.
func TestKernelImportDeb(t *testing.T) {
	deb := kerneldebtest.Deb(t)
	e := newEnv(t)
	e.RegisterImages()
	out := e.Must("kernel", "import", "debcloud", "--deb", deb)
	var k api.Kernel
	if err := json.Unmarshal([]byte(e.Must("kernel", "inspect", "debcloud")), &k); err != nil {
		t.Fatal(err)
	}
	if !k.Managed || k.Source != api.SourceImported || k.Release == "" || !strings.Contains(out, k.Release) ||
		!strings.Contains(deb, "_"+k.Version+"_") || !strings.HasPrefix(k.Digest, "sha256:") ||
		!strings.HasPrefix(k.Kernel, filepath.Join(e.StateDir(), "kernels")) {
		t.Fatalf("imported kernel: %+v (import said %q)", k, out)
	}
	e.Must("image", "register", "debk", "--rootfs", filepath.Join(imageDir, "busybox-rootfs.ext4"), "--kernel", "debcloud")
	if ls := e.Must("image", "ls"); !strings.Contains(ls, "KERNEL") || !strings.Contains(ls, "debcloud") {
		t.Errorf("image ls does not show the kernel:\n%s", ls)
	}

	got := e.Must("vm", "run", "--rm", "--name", "debkvm", "--image", "debk", "--accel", "tcg", "--memory", "256", "--", "uname", "-r")
	if strings.TrimSpace(got) != k.Release {
		t.Fatalf("uname -r = %q, want the imported kernel's release %s", got, k.Release)
	}

	e.Fails("image(s) debk", "kernel", "rm", "debcloud")
	// A VM booting it through --kernel holds it too.
	e.Must("vm", "create", "--name", "withk", "--image", "tiny", "--kernel", "debcloud")
	if vm := e.Inspect("withk"); vm.Kernel != "debcloud" {
		t.Errorf("vm create --kernel: vm boots %q", vm.Kernel)
	}
	e.Must("image", "rm", "debk")
	e.Fails("VM(s) withk", "kernel", "rm", "debcloud")
	e.Must("vm", "rm", "withk")
	e.Must("kernel", "rm", "debcloud")
	if ls := e.Must("kernel", "ls"); strings.Contains(ls, "debcloud") {
		t.Errorf("kernel ls after rm:\n%s", ls)
	}
	if dirs, _ := filepath.Glob(filepath.Join(e.StateDir(), "kernels", "*")); len(dirs) != 0 {
		t.Errorf("kernel files left: %v", dirs)
	}

	// image prune keeps imported kernels and registered images; --all
	// removes unused imported kernels, never registered images.
	e.Must("kernel", "import", "again", "--deb", deb)
	if out := e.Must("image", "prune"); strings.Contains(out, "again") || !strings.Contains(out, "reclaimed") {
		t.Errorf("image prune:\n%s", out)
	}
	out = e.Must("image", "prune", "--all")
	if !strings.Contains(out, "removed kernel again") || strings.Contains(out, "removed image") || !strings.Contains(out, "reclaimed") {
		t.Errorf("image prune --all:\n%s", out)
	}
	if ls := e.Must("image", "ls"); !strings.Contains(ls, "tiny") || !strings.Contains(ls, "debian") {
		t.Errorf("registered images after prune --all:\n%s", ls)
	}
	if dirs, _ := filepath.Glob(filepath.Join(e.StateDir(), "kernels", "*")); len(dirs) != 0 {
		t.Errorf("kernel files left after prune: %v", dirs)
	}
}
