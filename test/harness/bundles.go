package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/bundle"
	"github.com/bangerdev/banger/internal/catalog"
)

// Bundles are the test image as catalog bundles (docs/image-catalog.md):
// a kernel bundle of its vmlinuz, initrd and modules tree, and an image
// bundle of its rootfs.ext4 booting that kernel.
type Bundles struct {
	Dir           string // holds kernel.tar.zst and image.tar.zst
	Kernel, Image catalog.Entry
}

// MakeBundles returns the test image's bundles: kernel NAME kernelName,
// image imageName (user dev), both version 1.0; URLs are filled by
// Catalog. They are written once (about a minute) into a cache next to
// the test image (imageDir + "-bundles/<names>") and reused while the
// test image's stamp is the same.
func MakeBundles(t testing.TB, imageDir, imageName, kernelName string) Bundles {
	t.Helper()
	stamp, err := os.ReadFile(filepath.Join(imageDir, "stamp"))
	if err != nil {
		t.Fatal(err)
	}
	key := fmt.Sprintf("schema %d\n%s", bundle.Schema, stamp)
	dir := filepath.Join(filepath.Clean(imageDir)+"-bundles", imageName+"-"+kernelName)
	if b, ok := cachedBundles(dir, key); ok {
		return b
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".build-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	b := makeBundles(t, imageDir, tmp, imageName, kernelName)
	meta, _ := json.Marshal(b)
	if err := os.WriteFile(filepath.Join(tmp, "bundles.json"), meta, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "stamp"), []byte(key), 0o644); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		t.Fatal(err)
	}
	b.Dir = dir
	return b
}

// cachedBundles reads the bundles cached in dir when its stamp is key.
func cachedBundles(dir, key string) (Bundles, bool) {
	var b Bundles
	if got, err := os.ReadFile(filepath.Join(dir, "stamp")); err != nil || string(got) != key {
		return b, false
	}
	meta, err := os.ReadFile(filepath.Join(dir, "bundles.json"))
	if err != nil || json.Unmarshal(meta, &b) != nil {
		return b, false
	}
	b.Dir = dir
	return b, true
}

func makeBundles(t testing.TB, imageDir, dir, imageName, kernelName string) Bundles {
	t.Helper()
	b := Bundles{Dir: dir}
	release := KernelRelease(t, imageDir)
	km := bundle.Manifest{Schema: bundle.Schema, Kind: bundle.KindKernel, Name: kernelName, Version: "1.0", Arch: runtime.GOARCH, Release: release,
		Files: []bundle.File{{Path: "vmlinuz", Role: bundle.RoleKernel}, {Path: "initrd.img", Role: bundle.RoleInitrd}}}
	err := filepath.WalkDir(filepath.Join(imageDir, "modules"), func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err // symlinks (build, source) are not needed to boot
		}
		rel, _ := filepath.Rel(imageDir, p)
		km.Files = append(km.Files, bundle.File{Path: filepath.ToSlash(rel), Role: bundle.RoleModules})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	b.Kernel = writeBundle(t, &km, imageDir, filepath.Join(dir, "kernel.tar.zst"))
	im := bundle.Manifest{Schema: bundle.Schema, Kind: bundle.KindImage, Name: imageName, Version: "1.0", Arch: runtime.GOARCH,
		Kernel: kernelName, User: "dev", Files: []bundle.File{{Path: "rootfs.ext4", Role: bundle.RoleRootfs}}}
	b.Image = writeBundle(t, &im, imageDir, filepath.Join(dir, "image.tar.zst"))
	b.Image.Kernel, b.Image.User = kernelName, "dev"
	b.Kernel.Release = release
	return b
}

func writeBundle(t testing.TB, m *bundle.Manifest, src, out string) catalog.Entry {
	t.Helper()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	cw := &countWriter{}
	if err := bundle.Write(context.Background(), io.MultiWriter(f, h, cw), m, src); err != nil {
		t.Fatalf("write bundle %s: %v", out, err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return catalog.Entry{Name: m.Name, Version: m.Version, Arch: m.Arch, URL: filepath.Base(out), Size: cw.n, SHA256: hex.EncodeToString(h.Sum(nil))}
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// Catalog returns the catalog file of the bundles, served at base (their
// URLs: base + "/" + file).
func (b Bundles) Catalog(base string) []byte {
	k, im := b.Kernel, b.Image
	k.URL = strings.TrimSuffix(base, "/") + "/" + k.URL
	im.URL = strings.TrimSuffix(base, "/") + "/" + im.URL
	out, _ := json.Marshal(catalog.File{Schema: catalog.Schema, Images: []catalog.Entry{im}, Kernels: []catalog.Entry{k}})
	return out
}

// ServeBundles serves the bundles (/kernel.tar.zst, /image.tar.zst) and
// their catalog (/catalog.json) on 127.0.0.1 (Range requests included)
// until the test ends, and returns the server's base URL. count, when
// not nil, is called with each request's path.
func ServeBundles(t testing.TB, b Bundles, count func(path string)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + l.Addr().String()
	cat := b.Catalog(base)
	files := map[string]string{"/kernel.tar.zst": filepath.Join(b.Dir, "kernel.tar.zst"), "/image.tar.zst": filepath.Join(b.Dir, "image.tar.zst")}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if count != nil {
			count(r.URL.Path)
		}
		if r.URL.Path == "/catalog.json" {
			w.Write(cat)
			return
		}
		p, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		http.ServeFile(w, r, p)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return base
}
