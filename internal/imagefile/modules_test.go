package imagefile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/kmod"
	"github.com/bangerdev/banger/internal/kmod/kmodtest"
)

// modulesFixture is a rootfs, a kernel of release rel and modules built for
// modRel in a directory named build/modules (a renamed copy of
// /lib/modules/<modRel>).
func modulesFixture(t *testing.T, rel, modRel string) Artifacts {
	t.Helper()
	dir := t.TempDir()
	mods := filepath.Join(dir, "build", "modules")
	kmodtest.WriteRelease(t, mods, modRel)
	return Artifacts{
		Rootfs:     extMagic(t, sparseFile(t, filepath.Join(dir, "rootfs.ext4"), 8*mib, 0)),
		Kernel:     writeFile(t, filepath.Join(dir, "vmlinuz"), kmodtest.Kernel(rel), 0o644),
		ModulesDir: mods,
	}
}

func TestValidateModulesRenamedDir(t *testing.T) {
	const rel = "6.1.0-57-cloud-amd64"
	a := modulesFixture(t, rel, rel)
	if err := ValidateArtifacts(a); err != nil {
		t.Fatalf("renamed modules dir refused: %v", err)
	}
	if got, err := KernelRelease(a.Kernel); err != nil || got != rel {
		t.Errorf("KernelRelease = %q, %v", got, err)
	}
	// A /lib/modules-like parent whose release directory is a symlink.
	parent := filepath.Join(t.TempDir(), "modules")
	os.MkdirAll(parent, 0o755)
	if err := os.Symlink(a.ModulesDir, filepath.Join(parent, rel)); err != nil {
		t.Fatal(err)
	}
	a.ModulesDir = parent
	if err := ValidateArtifacts(a); err != nil {
		t.Fatalf("parent with a symlinked release dir refused: %v", err)
	}
}

func TestValidateModulesWrongRelease(t *testing.T) {
	a := modulesFixture(t, "6.1.0-57-cloud-amd64", "6.1.0-27-cloud-amd64")
	err := ValidateArtifacts(a)
	if !errors.Is(err, ErrInvalid) || !errors.Is(err, kmod.ErrWrongRelease) {
		t.Fatalf("err = %v; want ErrInvalid and kmod.ErrWrongRelease", err)
	}
	var ae *ArtifactError
	if !errors.As(err, &ae) || ae.Field != FieldModules {
		t.Errorf("want a modules ArtifactError, got %#v", err)
	}
	for _, want := range []string{"6.1.0-57-cloud-amd64", "6.1.0-27-cloud-amd64", a.ModulesDir} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not mention %q", err, want)
		}
	}
}

func TestValidateModulesKernelWithoutRelease(t *testing.T) {
	a := modulesFixture(t, "6.1.0-57-cloud-amd64", "6.1.0-57-cloud-amd64")
	// A bzImage header without a kernel_version string.
	b := kmodtest.Kernel("x")
	b[0x20e], b[0x20f] = 0, 0
	writeFile(t, a.Kernel, b, 0o644)
	err := ValidateArtifacts(a)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "does not say its release") {
		t.Errorf("err = %v", err)
	}
	// Without modules the release is not needed.
	a.ModulesDir = ""
	if err := ValidateArtifacts(a); err != nil {
		t.Errorf("no modules: %v", err)
	}
}
