package kmod_test

import (
	"compress/gzip"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/kmod"
	"github.com/bangerdev/banger/internal/kmod/kmodtest"

	"github.com/bangerdev/banger/internal/testenv"
)

const rel = "6.1.0-57-cloud-amd64"

func TestFindReleaseLayouts(t *testing.T) {
	tmp := t.TempDir()
	// A copy of /lib/modules/<rel> named build/modules.
	renamed := filepath.Join(tmp, "build", "modules")
	kmodtest.WriteRelease(t, renamed, rel)
	// A /lib/modules-like parent, with the release as a symlink.
	parent := filepath.Join(tmp, "mods")
	os.MkdirAll(parent, 0o755)
	if err := os.Symlink(renamed, filepath.Join(parent, rel)); err != nil {
		t.Fatal(err)
	}
	kmodtest.WriteRelease(t, filepath.Join(parent, "5.10.0-9-amd64"), "5.10.0-9-amd64")
	// A root filesystem layout.
	root := filepath.Join(tmp, "root")
	kmodtest.WriteRelease(t, filepath.Join(root, "lib", "modules", rel), rel)
	// A parent whose only release directory has another name.
	odd := filepath.Join(tmp, "odd")
	kmodtest.WriteRelease(t, filepath.Join(odd, "custom"), rel)

	for in, want := range map[string]string{
		renamed:                               renamed,
		parent:                                filepath.Join(parent, rel),
		root:                                  filepath.Join(root, "lib", "modules", rel),
		filepath.Join(root, "lib", "modules"): filepath.Join(root, "lib", "modules", rel),
		odd:                                   filepath.Join(odd, "custom"),
	} {
		got, err := kmod.FindRelease(in, rel, nil)
		if err != nil || got != want {
			t.Errorf("FindRelease(%s) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestFindReleaseRefuses(t *testing.T) {
	tmp := t.TempDir()
	other := "6.1.0-27-cloud-amd64"
	// The release directory itself, built for another kernel.
	wrong := filepath.Join(tmp, "modules")
	kmodtest.WriteRelease(t, wrong, other)
	// A directory named after the kernel, holding another release's modules.
	liar := filepath.Join(tmp, "liar")
	kmodtest.WriteRelease(t, filepath.Join(liar, rel), other)
	// A parent with another release only.
	parent := filepath.Join(tmp, "parent")
	kmodtest.WriteRelease(t, filepath.Join(parent, other), other)
	for _, dir := range []string{wrong, liar, parent} {
		_, err := kmod.FindRelease(dir, rel, nil)
		var re *kmod.ReleaseError
		if !errors.Is(err, kmod.ErrWrongRelease) || !errors.As(err, &re) {
			t.Fatalf("FindRelease(%s) = %v; want a ReleaseError", dir, err)
		}
		if msg := err.Error(); !strings.Contains(msg, rel) || !strings.Contains(msg, other) {
			t.Errorf("FindRelease(%s): %q does not name both releases", dir, msg)
		}
	}
	// No modules.dep anywhere.
	empty := t.TempDir()
	_, err := kmod.FindRelease(empty, rel, nil)
	if !errors.Is(err, kmod.ErrWrongRelease) || !strings.Contains(err.Error(), "no modules.dep") || !strings.Contains(err.Error(), rel) {
		t.Errorf("empty dir: %v", err)
	}
}

func TestFindReleaseUnverifiable(t *testing.T) {
	// Modules that can't be read (xz-compressed here: not readable with
	// the standard library) leave only the layout to go by.
	tmp := t.TempDir()
	top := filepath.Join(tmp, "modules")
	os.MkdirAll(filepath.Join(top, "kernel"), 0o755)
	os.WriteFile(filepath.Join(top, "kernel", "a.ko.xz"), []byte("\xfd7zXZ"), 0o644)
	os.WriteFile(filepath.Join(top, "modules.dep"), []byte("kernel/a.ko.xz:\n"), 0o644)
	if got, err := kmod.FindRelease(top, rel, nil); err != nil || got != top {
		t.Errorf("unverifiable release dir given directly: %q, %v", got, err)
	}
	// Named after another release, the name is all there is: refused.
	other := filepath.Join(tmp, "x", "5.10.0-9-amd64")
	if err := os.MkdirAll(filepath.Dir(other), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(top, other); err != nil {
		t.Fatal(err)
	}
	if _, err := kmod.FindRelease(other, rel, nil); !errors.Is(err, kmod.ErrWrongRelease) || !strings.Contains(err.Error(), "5.10.0-9-amd64") {
		t.Errorf("unverifiable dir named after another release: %v", err)
	}
	if err := os.Rename(other, top); err != nil {
		t.Fatal(err)
	}
	// As a child named otherwise it can't be told apart from another
	// release: refused, naming it.
	if _, err := kmod.FindRelease(tmp, rel, nil); !errors.Is(err, kmod.ErrWrongRelease) || !strings.Contains(err.Error(), "unverified") {
		t.Errorf("unverifiable child: %v", err)
	}
}

func TestModuleFileRelease(t *testing.T) {
	dir := t.TempDir()
	ko := filepath.Join(dir, "a.ko")
	os.WriteFile(ko, kmodtest.Module("a", rel), 0o644)
	if got, err := kmod.ModuleFileRelease(ko); err != nil || got != rel {
		t.Errorf("ko: %q, %v", got, err)
	}
	gz := filepath.Join(dir, "b.ko.gz")
	f, _ := os.Create(gz)
	zw := gzip.NewWriter(f)
	zw.Write(kmodtest.Module("b", "5.10"))
	zw.Close()
	f.Close()
	if got, err := kmod.ModuleFileRelease(gz); err != nil || got != "5.10" {
		t.Errorf("ko.gz: %q, %v", got, err)
	}
	txt := filepath.Join(dir, "c.ko")
	os.WriteFile(txt, []byte("not elf"), 0o644)
	if _, err := kmod.ModuleFileRelease(txt); err == nil {
		t.Error("non-ELF module: no error")
	}
}

// TestModuleFileReleaseTestImage reads the vermagic of a real Debian module.
func TestModuleFileReleaseTestImage(t *testing.T) {
	dir := os.Getenv("BANGER_TESTIMAGE_DIR")
	if dir == "" {
		dir = "/var/cache/banger/testimage"
	}
	b, err := os.ReadFile(filepath.Join(dir, "kernel-release"))
	if err != nil {
		testenv.Missing(t, "no test image: %v", err)
	}
	want := strings.TrimSpace(string(b))
	rd := filepath.Join(dir, "modules", "lib", "modules", want)
	got, err := kmod.ModuleFileRelease(filepath.Join(rd, "kernel", "drivers", "block", "virtio_blk.ko"))
	if err != nil || got != want {
		t.Errorf("virtio_blk.ko: %q, %v; want %q", got, err, want)
	}
	if got, err := kmod.FindRelease(rd, want, nil); err != nil || got != rd {
		t.Errorf("FindRelease(%s) = %q, %v", rd, got, err)
	}
	if _, err := kmod.FindRelease(rd, "6.1.0-1-other", nil); !errors.Is(err, kmod.ErrWrongRelease) {
		t.Errorf("test image modules accepted for another release: %v", err)
	}
}
