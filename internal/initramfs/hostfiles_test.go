package initramfs

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/bangerdev/banger/internal/hostfile"
)

// A module in the image's modules tree that is a symlink out of the tree
// (to a root-only file, here a stand-in for /etc/shadow) is refused: the
// daemon reads as root, and the file must never reach a guest.
func TestModuleSymlinkOutOfTreeRefused(t *testing.T) {
	const secretText = "root:$y$SECRET-HASH:19000:0:99999:7:::"
	secret := filepath.Join(t.TempDir(), "shadow")
	if err := os.WriteFile(secret, []byte(secretText), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, link := range []struct{ name, target string }{
		{"absolute", secret},
		{"relative", "../../../../../../../../../../../../../../../.." + secret},
	} {
		t.Run(link.name, func(t *testing.T) {
			root := fakeModules(t, "6.1.0-test")
			rel := filepath.Join(root, "lib/modules/6.1.0-test")
			mod := filepath.Join(rel, "kernel/drivers/block/virtio_blk.ko")
			if err := os.Remove(mod); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(link.target, mod); err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			err := Write(&out, Options{AgentBinary: writeFakeAgent(t), ModulesDir: root, KernelRelease: "6.1.0-test"})
			if !errors.Is(err, hostfile.ErrOutside) {
				t.Errorf("build with %s: %v, want an error matching hostfile.ErrOutside", mod, err)
			}
			if bytes.Contains(out.Bytes(), []byte("SECRET-HASH")) {
				t.Fatal("the root-only file was packed into the initramfs")
			}
		})
	}
}

// Symlinks that stay inside the release directory work (depmod trees made
// with cp -s, or deduplicated, have them).
func TestModuleSymlinkInsideTree(t *testing.T) {
	root := fakeModules(t, "6.1.0-test")
	rel := filepath.Join(root, "lib/modules/6.1.0-test")
	mod := filepath.Join(rel, "kernel/drivers/block/virtio_blk.ko")
	if err := os.Rename(mod, filepath.Join(rel, "virtio_blk.real")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../../../virtio_blk.real", mod); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := Write(&out, Options{AgentBinary: writeFakeAgent(t), ModulesDir: root, KernelRelease: "6.1.0-test"}); err != nil {
		t.Fatal(err)
	}
	dir := extract(t, out.Bytes())
	b, err := os.ReadFile(filepath.Join(dir, "lib/modules/6.1.0-test/kernel/drivers/block/virtio_blk.ko"))
	if err != nil || string(b) != "fake module virtio_blk" {
		t.Errorf("packed module: %q %v", b, err)
	}
}

// The image's initrd is read without following a symlink out of its
// directory.
func TestBaseInitrdSymlinkOutRefused(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("SECRET"), 0o600); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initrd.img")
	if err := os.Symlink(secret, initrd); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "out.img")
	err := Build(context.Background(), dst, Options{AgentBinary: writeFakeAgent(t), BaseInitrd: initrd})
	if !errors.Is(err, hostfile.ErrOutside) {
		t.Errorf("build with a base initrd linking to %s: %v, want hostfile.ErrOutside", secret, err)
	}
	if _, err := os.Stat(dst); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("initramfs written anyway: %v", err)
	}
}
