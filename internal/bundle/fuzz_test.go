package bundle

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
)

// FuzzInstall feeds arbitrary streams to Install: it must never panic or
// hang, and a failure is a corrupt-bundle error (or the source's).
func FuzzInstall(f *testing.F) {
	rootfs := []byte("rootfs content")
	m := imageManifest(fileOf("rootfs.ext4", RoleRootfs, rootfs))
	good := craft(&testing.T{}, manifestEntry(&testing.T{}, m), reg("rootfs.ext4", rootfs))
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd, 0x00})
	f.Add([]byte{0x50, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 1, 2})
	f.Fuzz(func(t *testing.T, data []byte) {
		done := make(chan error, 1)
		dir := t.TempDir()
		go func() {
			_, err := Install(context.Background(), &memSource{data: data}, dir, InstallOptions{})
			done <- err
		}()
		select {
		case err := <-done:
			if err != nil && !errors.Is(err, errdefs.ErrInvalid) {
				t.Fatalf("error of another kind: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("Install hangs on %x", data)
		}
	})
}
