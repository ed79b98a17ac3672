package kerneldeb

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/ulikunitz/xz"

	"github.com/bangerdev/banger/internal/kerneldeb/kerneldebtest"
	"github.com/bangerdev/banger/internal/kmod"
	"github.com/bangerdev/banger/internal/kmod/kmodtest"
)

// Debian's cloud kernel package gives a kernel and a modules tree whose
// index resolves the virtio modules a guest boots with, the same index
// depmod writes.
func TestExtractDebianPackage(t *testing.T) {
	deb := kerneldebtest.Deb(t)
	dir := filepath.Join(t.TempDir(), "k")
	var done, total int64
	res, err := ExtractWith(context.Background(), deb, dir, Options{Progress: func(d, t int64) { done, total = d, t }})
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^6\.1\.0-[0-9]+-cloud-amd64$`).MatchString(res.Release) || !strings.Contains(deb, res.Release) {
		t.Errorf("release %q of %s", res.Release, deb)
	}
	if st, _ := os.Stat(deb); done != st.Size() || total != st.Size() {
		t.Errorf("progress ended at %d/%d, want %d", done, total, st.Size())
	}
	if res.Package != "linux-image-"+res.Release || !strings.Contains(deb, "_"+res.Version+"_") || len(res.SHA256) != 64 {
		t.Errorf("package %q version %q sha256 %q of %s", res.Package, res.Version, res.SHA256, deb)
	}
	if res.Kernel != filepath.Join(dir, "vmlinuz") || res.ModulesDir != filepath.Join(dir, "modules") || res.Modules < 500 {
		t.Errorf("result %+v", res)
	}
	relDir, err := kmod.FindRelease(res.ModulesDir, res.Release, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(relDir, "modules.dep"))
	if err != nil {
		t.Fatal(err)
	}
	dep, err := kmod.ParseModulesDep(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	bf, _ := os.Open(filepath.Join(relDir, "modules.builtin"))
	builtin, _ := kmod.ParseModulesBuiltin(bf)
	bf.Close()
	files, missing := dep.Resolve([]string{"virtio_blk", "virtio_net", "virtio_console", "virtio_pci", "ext4"})
	for _, m := range missing {
		if !builtin[m] {
			t.Errorf("module %s is neither in modules.dep nor built in", m)
		}
	}
	for _, want := range []string{"virtio_blk", "virtio_net"} {
		if !slices.ContainsFunc(files, func(f string) bool { return kmod.ModuleName(f) == want }) {
			t.Errorf("%s not resolved: %v", want, files)
		}
	}
	for _, f := range files {
		if _, err := os.Stat(filepath.Join(relDir, f)); err != nil {
			t.Errorf("resolved module %s: %v", f, err)
		}
	}
	// Only boot's files: no /usr/share/doc, no System.map, no config.
	ents, _ := os.ReadDir(dir)
	if len(ents) != 2 {
		t.Errorf("extracted %v, want vmlinuz and modules", ents)
	}

	// The same index as depmod's, line for line (dependencies as sets).
	if _, err := exec.LookPath("depmod"); err != nil {
		t.Log("no depmod: index not compared")
		return
	}
	ours := filepath.Join(relDir, "modules.dep")
	if err := os.Rename(ours, ours+".banger"); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("depmod", "-b", res.ModulesDir, res.Release).CombinedOutput(); err != nil {
		t.Fatalf("depmod: %v: %s", err, out)
	}
	want, _ := os.ReadFile(ours)
	got, _ := os.ReadFile(ours + ".banger")
	if w, g := depSets(string(want)), depSets(string(got)); !mapsEqual(w, g) {
		n := 0
		for k, v := range w {
			if g[k] != v && n < 5 {
				t.Errorf("module %s: depmod %q, ours %q", k, v, g[k])
				n++
			}
		}
		t.Errorf("modules.dep differs from depmod's (%d and %d lines)", len(w), len(g))
	}
}

func depSets(s string) map[string]string {
	out := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		p, deps, _ := strings.Cut(l, ":")
		f := strings.Fields(deps)
		slices.Sort(f)
		out[p] = strings.Join(f, " ")
	}
	return out
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

type entry struct {
	name     string
	typ      byte
	body     []byte
	linkname string
}

// makeDeb writes a .deb (ar: debian-binary, control.tar, data.tar.xz)
// holding entries.
func makeDeb(t *testing.T, entries []entry) string {
	t.Helper()
	var data bytes.Buffer
	xw, err := xz.NewWriter(&data)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(xw)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: 0o644, Size: int64(len(e.body)), Linkname: e.linkname}
		if e.typ == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag != tar.TypeReg {
			h.Size = 0
			h.Mode = 0o755
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			tw.Write(e.body)
		}
	}
	tw.Close()
	xw.Close()
	var control bytes.Buffer
	cw := tar.NewWriter(&control)
	cf := []byte("Package: linux-image-test\nVersion: 6.1.9-1\nDescription: a test\n continued: not a field\n")
	cw.WriteHeader(&tar.Header{Name: "./control", Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(cf))})
	cw.Write(cf)
	cw.Close()
	var ar bytes.Buffer
	ar.WriteString("!<arch>\n")
	for _, m := range []struct {
		name string
		b    []byte
	}{{"debian-binary", []byte("2.0\n")}, {"control.tar", control.Bytes()}, {"data.tar.xz", data.Bytes()}} {
		fmt.Fprintf(&ar, "%-16s%-12d%-6d%-6d%-8s%-10d`\n", m.name, 0, 0, 0, "100644", len(m.b))
		ar.Write(m.b)
		if len(m.b)%2 == 1 {
			ar.WriteByte('\n')
		}
	}
	p := filepath.Join(t.TempDir(), "linux-image-test.deb")
	if err := os.WriteFile(p, ar.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func xzBytes(t *testing.T, b []byte) []byte {
	var out bytes.Buffer
	w, _ := xz.NewWriter(&out)
	w.Write(b)
	w.Close()
	return out.Bytes()
}

const rel = "6.1.0-9-test"

// A small package: compressed modules are stored plain, modules.dep has
// the transitive dependencies in depmod's order, the rest is left out.
func TestExtractSmallPackage(t *testing.T) {
	deb := makeDeb(t, []entry{
		{name: "./", typ: tar.TypeDir},
		{name: "./boot/vmlinuz-" + rel, body: kmodtest.Kernel(rel)},
		{name: "./boot/System.map-" + rel, body: []byte("map")},
		{name: "./usr/share/doc/x/changelog", body: []byte("doc")},
		{name: "./lib/modules/" + rel + "/kernel/drivers/virtio/virtio_ring.ko", body: kmodtest.ModuleDepends("virtio_ring", rel)},
		{name: "./lib/modules/" + rel + "/kernel/drivers/virtio/virtio.ko.xz", body: xzBytes(t, kmodtest.ModuleDepends("virtio", rel, "virtio_ring"))},
		{name: "./lib/modules/" + rel + "/kernel/drivers/block/virtio_blk.ko", body: kmodtest.ModuleDepends("virtio_blk", rel, "virtio")},
		{name: "./lib/modules/" + rel + "/modules.order", body: []byte("kernel/drivers/block/virtio_blk.ko\nkernel/drivers/virtio/virtio.ko.xz\n")},
		{name: "./lib/modules/" + rel + "/build", typ: tar.TypeSymlink, linkname: "/usr/src/linux-headers-" + rel},
	})
	dir := filepath.Join(t.TempDir(), "k")
	res, err := Extract(context.Background(), deb, dir)
	if err != nil {
		t.Fatal(err)
	}
	if res.Release != rel || res.Modules != 3 || res.Package != "linux-image-test" || res.Version != "6.1.9-1" {
		t.Errorf("result %+v", res)
	}
	b, _ := os.ReadFile(deb)
	if sum := sha256.Sum256(b); res.SHA256 != hex.EncodeToString(sum[:]) {
		t.Errorf("sha256 %s, want %x", res.SHA256, sum)
	}
	relDir := filepath.Join(dir, "modules", "lib", "modules", rel)
	dep, _ := os.ReadFile(filepath.Join(relDir, "modules.dep"))
	want := "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n" +
		"kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n" +
		"kernel/drivers/virtio/virtio_ring.ko:\n"
	if string(dep) != want {
		t.Errorf("modules.dep:\n%s\nwant:\n%s", dep, want)
	}
	if b, err := os.ReadFile(filepath.Join(relDir, "kernel/drivers/virtio/virtio.ko")); err != nil || !bytes.Equal(b, kmodtest.ModuleDepends("virtio", rel, "virtio_ring")) {
		t.Errorf("decompressed module: %v", err)
	}
	for _, p := range []string{"build", "kernel/drivers/virtio/virtio.ko.xz"} {
		if _, err := os.Lstat(filepath.Join(relDir, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s written (%v)", p, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "usr")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("documentation written")
	}
}

// Hostile packages never write outside the destination, and packages
// that aren't one kernel with its modules are refused.
func TestExtractHostile(t *testing.T) {
	good := []entry{
		{name: "boot/vmlinuz-" + rel, body: kmodtest.Kernel(rel)},
		{name: "lib/modules/" + rel + "/kernel/a.ko", body: kmodtest.Module("a", rel)},
	}
	for _, tc := range []struct {
		name    string
		entries []entry
		want    error
	}{
		{"dotdot", append(good, entry{name: "lib/modules/" + rel + "/../../../../canary", body: []byte("x")}), ErrUnsafe},
		{"dotdot top", append(good, entry{name: "../canary", body: []byte("x")}), ErrUnsafe},
		{"absolute", append(good, entry{name: "/lib/modules/" + rel + "/x.ko", body: []byte("x")}), ErrUnsafe},
		{"symlinked parent", append(slices.Clone(good),
			entry{name: "lib/modules/" + rel + "/kernel/evil", typ: tar.TypeSymlink, linkname: "../../../../../.."},
			entry{name: "lib/modules/" + rel + "/kernel/evil/canary", body: []byte("x")}), nil},
		{"hardlink out", append(slices.Clone(good),
			entry{name: "lib/modules/" + rel + "/kernel/h.ko", typ: tar.TypeLink, linkname: "/etc/shadow"}), nil},
		{"bad release dir", append(good, entry{name: "lib/modules/a b/x.ko", body: []byte("x")}), ErrNotKernelPackage},
		{"no kernel", good[1:], ErrNotKernelPackage},
		{"no modules", good[:1], ErrNotKernelPackage},
		{"two kernels", append(slices.Clone(good), entry{name: "boot/vmlinuz-6.2.0-1", body: kmodtest.Kernel("6.2.0-1")}), ErrNotKernelPackage},
		{"kernel of another release", []entry{{name: "boot/vmlinuz-" + rel, body: kmodtest.Kernel("6.9.9-other")}, good[1]}, ErrNotKernelPackage},
		{"duplicate file", append(slices.Clone(good), good[1]), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := t.TempDir()
			canary := filepath.Join(base, "canary")
			deb := makeDeb(t, tc.entries)
			dir := filepath.Join(base, "a", "b", "c", "d", "k")
			res, err := Extract(context.Background(), deb, dir)
			if _, serr := os.Lstat(canary); !errors.Is(serr, os.ErrNotExist) {
				t.Fatalf("wrote outside the destination: %v", serr)
			}
			if _, serr := os.Lstat(filepath.Join(filepath.Dir(dir), "canary")); !errors.Is(serr, os.ErrNotExist) {
				t.Fatalf("wrote outside the destination: %v", serr)
			}
			filepath.WalkDir(dir, func(p string, de os.DirEntry, err error) error {
				if err == nil && de.Type()&os.ModeSymlink != 0 {
					t.Errorf("a symlink was made: %s", p)
				}
				return nil
			})
			switch {
			case tc.want != nil && !errors.Is(err, tc.want):
				t.Fatalf("err = %v, want %v", err, tc.want)
			case tc.want == nil && tc.name != "duplicate file" && err != nil:
				t.Fatalf("err = %v (links are skipped, not errors)", err)
			case tc.name == "duplicate file" && err == nil:
				t.Fatalf("a duplicate entry overwrote a file: %+v", res)
			}
		})
	}
	if _, err := Extract(context.Background(), "/nonexistent.deb", t.TempDir()); err == nil {
		t.Error("extracted a missing file")
	}
	notDeb := filepath.Join(t.TempDir(), "x.deb")
	os.WriteFile(notDeb, []byte("hello"), 0o644)
	if _, err := Extract(context.Background(), notDeb, filepath.Join(t.TempDir(), "k")); !errors.Is(err, ErrNotKernelPackage) {
		t.Errorf("not a deb: %v", err)
	}
	full := t.TempDir()
	os.WriteFile(filepath.Join(full, "x"), nil, 0o644)
	if _, err := Extract(context.Background(), makeDeb(t, good), full); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Errorf("into a non-empty directory: %v", err)
	}
}

// BenchmarkExtractDebianPackage: Debian's cloud kernel package to a
// kernel and an indexed modules tree (compare: dpkg-deb -x + depmod -b).
func BenchmarkExtractDebianPackage(b *testing.B) {
	deb := kerneldebtest.Deb(b)
	for i := 0; i < b.N; i++ {
		dir := filepath.Join(b.TempDir(), "k")
		if _, err := Extract(context.Background(), deb, dir); err != nil {
			b.Fatal(err)
		}
	}
}
