package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/bundle"
	"github.com/bangerdev/banger/internal/catalog"
)

type fileSource string

func (f fileSource) Size() int64 {
	st, err := os.Stat(string(f))
	if err != nil {
		return -1
	}
	return st.Size()
}

func (f fileSource) Open(ctx context.Context, off int64) (io.ReadCloser, error) {
	r, err := os.Open(string(f))
	if err != nil {
		return nil, err
	}
	_, err = r.Seek(off, io.SeekStart)
	return r, err
}

func TestImageBundle(t *testing.T) {
	dir := t.TempDir()
	write := func(p string, data string) {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(dir, "vmlinuz"), "kernel image")
	write(filepath.Join(dir, "mods/modules.dep"), "kernel/a.ko:\n")
	write(filepath.Join(dir, "mods/kernel/a.ko"), "module")
	if err := os.Symlink("/usr/src/linux", filepath.Join(dir, "mods/build")); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "k.tar.zst")
	cat := filepath.Join(dir, "catalog.json")
	var stdout, stderr bytes.Buffer
	a := &app{stdout: &stdout, stderr: &stderr}
	code := a.main(context.Background(), []string{"banger", "image", "bundle", "--kind", "kernel", "--name", "generic-6.1", "--version", "2026.12.06",
		"--arch", "amd64", "--release", "6.1.0-28-cloud-amd64", "--file", "kernel=" + filepath.Join(dir, "vmlinuz"), "--modules", filepath.Join(dir, "mods"),
		"-o", out, "--catalog", cat, "--build", "debian-cloud"})
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), "not regular files): build") {
		t.Errorf("stderr %q should name the symlink left out", stderr.String())
	}
	var e catalog.Entry
	if err := json.Unmarshal(stdout.Bytes(), &e); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(out)
	if e.URL != "k.tar.zst" || e.Size != st.Size() || e.Release != "6.1.0-28-cloud-amd64" || len(e.SHA256) != 64 {
		t.Errorf("entry %+v", e)
	}
	c, err := catalog.Load(context.Background(), catalog.Kernels, []byte(`{"schema":1}`), []string{cat}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := c.Resolve("generic-6.1@2026.12.06"); err != nil || got.SHA256 != e.SHA256 || got.URL != "file://"+out || got.Arch != "amd64" {
		t.Errorf("catalog entry %+v, %v", got, err)
	}
	dst := t.TempDir()
	m, err := bundle.Install(context.Background(), fileSource(out), dst, bundle.InstallOptions{Kind: bundle.KindKernel, Arch: "amd64", SHA256: e.SHA256})
	if err != nil {
		t.Fatal(err)
	}
	if m.File(bundle.RoleKernel).Path != "vmlinuz" || len(m.Files) != 3 {
		t.Errorf("manifest %+v", m)
	}
	if b, _ := os.ReadFile(filepath.Join(dst, "modules/kernel/a.ko")); string(b) != "module" {
		t.Errorf("module %q", b)
	}
}
