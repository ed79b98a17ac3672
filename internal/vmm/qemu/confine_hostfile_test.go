package qemu

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/bangerdev/banger/internal/hostfile"
	"github.com/bangerdev/banger/internal/vmm"
)

// A confined QEMU gets its image files from the driver, which opens them
// without following a symlink out of their directory: an image's rootfs
// swapped for a link to a host disk or a root-only file is refused.
func TestConfinedOpensRefuseSymlinksOut(t *testing.T) {
	dir := t.TempDir()
	outside := t.TempDir()
	secret := filepath.Join(outside, "secret.raw")
	if err := os.WriteFile(secret, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	images := filepath.Join(dir, "images")
	if err := os.Mkdir(images, 0o755); err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(images, "rootfs.img")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	top := filepath.Join(dir, "root.qcow2")
	qemuImg(t, top, base, "raw")

	cf := &confinedFiles{}
	if _, err := cf.openDisk(vmm.Disk{Path: top, Format: vmm.FormatQcow2}); err != nil {
		t.Fatalf("a disk on a plain backing file: %v", err)
	}
	cf.close()

	// The image's rootfs becomes a link out of its directory.
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, base); err != nil {
		t.Fatal(err)
	}
	cf = &confinedFiles{}
	_, err := cf.openDisk(vmm.Disk{Path: top, Format: vmm.FormatQcow2})
	cf.close()
	if !errors.Is(err, hostfile.ErrOutside) {
		t.Errorf("backing file linking to %s: %v, want hostfile.ErrOutside", secret, err)
	}
	kernel := filepath.Join(images, "vmlinuz")
	if err := os.Symlink(secret, kernel); err != nil {
		t.Fatal(err)
	}
	cf = &confinedFiles{}
	_, err = cf.readOnlyFile(kernel)
	cf.close()
	if !errors.Is(err, hostfile.ErrOutside) {
		t.Errorf("kernel linking to %s: %v, want hostfile.ErrOutside", secret, err)
	}
}
