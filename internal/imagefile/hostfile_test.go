package imagefile

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/bangerdev/banger/internal/hostfile"
)

// An artifact that is a symlink out of its directory (to a root-only file
// or a host disk) is refused: bangerd reads image files as root.
func TestValidateArtifactsRefusesSymlinkOut(t *testing.T) {
	f := newFixture(t)
	outside := t.TempDir()
	for _, field := range []string{FieldRootfs, FieldKernel, FieldInitrd} {
		a := f.a
		var p *string
		switch field {
		case FieldRootfs:
			p = &a.Rootfs
		case FieldKernel:
			p = &a.Kernel
		case FieldInitrd:
			p = &a.Initrd
		}
		// A copy outside the directory, valid in itself.
		b, err := os.ReadFile(*p)
		if err != nil {
			t.Fatal(err)
		}
		target := writeFile(t, filepath.Join(outside, field), b, 0o600)
		link := filepath.Join(filepath.Dir(*p), field+"-link")
		if err := os.Symlink(target, link); err != nil {
			t.Fatal(err)
		}
		*p = link
		err = ValidateArtifacts(a)
		var ae *ArtifactError
		if !errors.Is(err, hostfile.ErrOutside) || !errors.As(err, &ae) || ae.Field != field {
			t.Errorf("%s linking to %s: %v; want an ArtifactError for %s matching hostfile.ErrOutside", field, target, err, field)
		}
	}
}
