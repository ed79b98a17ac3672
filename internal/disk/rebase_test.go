package disk

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/bangerdev/banger/internal/vmm"
)

// A qcow2 overlay moved onto a copy of its base reads the same disk, and
// no longer needs the original: what image promote does to VM disks.
func TestRebaseOntoCopy(t *testing.T) {
	needTool(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "orig", "rootfs.img")
	if err := os.Mkdir(filepath.Dir(base), 0o755); err != nil {
		t.Fatal(err)
	}
	makeBase(t, base, 64*mib, 0, 32*mib)
	c := NewCloner(nil, "")
	overlay := filepath.Join(dir, "root.qcow2")
	if _, err := c.Clone(t.Context(), CloneRequest{Base: base, Dest: overlay, Formats: []string{vmm.FormatQcow2}}); err != nil {
		t.Fatal(err)
	}
	// The guest writes: qemu-img writes into the overlay.
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", overlay)
	run(t, "qemu-img", "convert", "-O", "raw", overlay, filepath.Join(dir, "before.raw"))
	if got, err := BackingFile(overlay); err != nil || got != base {
		t.Fatalf("BackingFile = %q, %v; want %q", got, err, base)
	}

	cp := filepath.Join(dir, "managed", "rootfs.img")
	if err := os.Mkdir(filepath.Dir(cp), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := CopyFile(t.Context(), base, cp, CopyOptions{Mode: 0o644}); err != nil {
		t.Fatal(err)
	}
	if err := c.Rebase(t.Context(), overlay, cp); err != nil {
		t.Fatal(err)
	}
	if got, err := BackingFile(overlay); err != nil || got != cp {
		t.Fatalf("after rebase BackingFile = %q, %v; want %q", got, err, cp)
	}
	if err := os.RemoveAll(filepath.Dir(base)); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "convert", "-O", "raw", overlay, filepath.Join(dir, "after.raw"))
	if a, b := dataChecksum(t, filepath.Join(dir, "before.raw")), dataChecksum(t, filepath.Join(dir, "after.raw")); a != b {
		t.Errorf("disk content changed by the rebase: %s → %s", a, b)
	}
	if info := qemuInfo(t, overlay); info["backing-filename-format"] != "raw" {
		t.Errorf("backing format = %v, want raw", info["backing-filename-format"])
	}
}

func TestBackingFileErrors(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "raw")
	if err := os.WriteFile(raw, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := BackingFile(raw); err == nil {
		t.Error("a raw file was read as qcow2")
	}
	if _, err := BackingFile(filepath.Join(dir, "none")); err == nil {
		t.Error("a missing file gave no error")
	}
}
