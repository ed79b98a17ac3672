package ociimport

import (
	"archive/tar"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"golang.org/x/sys/unix"
)

// The layers of the multi-layer test image: whiteouts of files and
// directories, opaque directories, replacements of every kind, owners,
// special bits, device nodes, hard links, xattrs.
func multiLayers() [][]ent {
	capab := "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
	l1 := []ent{
		dir("etc/"), file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"), file("etc/gone", "x"),
		dir("usr/"), dir("usr/bin/"),
		{name: "usr/bin/ping", typ: tar.TypeReg, mode: 0o755, body: "ELF ping", xattrs: map[string]string{"security.capability": capab}},
		{name: "usr/bin/su", typ: tar.TypeReg, mode: 0o4755, body: "ELF su"},
		hardlink("usr/bin/su2", "usr/bin/su"),
		dir("usr/share/"), dir("usr/share/doc/"), file("usr/share/doc/a", "a"), file("usr/share/doc/b", "b"),
		dir("usr/share/keep/"), file("usr/share/keep/k", "k"),
		dir("dev/"),
		{name: "dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3},
		{name: "dev/loop0", typ: tar.TypeBlock, mode: 0o660, major: 7, minor: 0, gid: 6},
		{name: "dev/fifo", typ: tar.TypeFifo, mode: 0o600},
		{name: "home/", typ: tar.TypeDir, mode: 0o755},
		{name: "home/dev/", typ: tar.TypeDir, mode: 0o700, uid: 1000, gid: 1000},
		{name: "home/dev/.profile", typ: tar.TypeReg, mode: 0o600, uid: 1000, gid: 1000, body: "export A=1"},
		dir("var/"), dir("var/lib/"), dir("var/lib/old/"), file("var/lib/old/data", "old"),
		file("replace-me-by-dir", "file"), dir("replace-me-by-file/"), file("replace-me-by-file/x", "x"),
		symlink("lib", "usr/lib"), dir("usr/lib/"), file("usr/lib/libc.so", "libc"),
		{name: "tmp/", typ: tar.TypeDir, mode: 0o1777},
	}
	l2 := []ent{
		file("etc/.wh.gone", ""),
		file("etc/passwd", "root:x:0:0::/root:/bin/sh\ndev:x:1000:1000::/home/dev:/bin/sh\n"),
		dir("usr/share/doc/"), file("usr/share/doc/.wh..wh..opq", ""), file("usr/share/doc/c", "c"),
		dir("var/lib/"), file("var/lib/.wh.old", ""),
		dir("replace-me-by-dir/"), file("replace-me-by-dir/inside", "in"),
		file("replace-me-by-file", "now a file"),
		{name: "usr/bin/ping", typ: tar.TypeReg, mode: 0o750, body: "ELF ping 2", gid: 10,
			xattrs: map[string]string{"security.capability": capab, "user.note": "hi"}},
	}
	l3 := []ent{
		dir("usr/share/"), file("usr/share/.wh..wh..opq", ""), dir("usr/share/new/"), file("usr/share/new/n", "n"),
		symlink("etc/alternatives", "/usr/bin"), hardlink("usr/bin/ping-link", "usr/bin/ping"),
	}
	return [][]ent{l1, l2, l3}
}

func TestFlattenMatchesExtract(t *testing.T) {
	requireRoot(t)
	img := testImage(t, "amd64", multiLayers()...)
	reg := startRegistry(t, nil)
	ref := reg + "/test/multi:v1"
	push(t, ref, img)

	root, s, err := resolveFlatten(t, ref, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if s.Layers() != 3 || s.Ref != ref || s.Name != "multi-v1" {
		t.Errorf("source: %d layers, ref %q, name %q", s.Layers(), s.Ref, s.Name)
	}
	d, _ := img.Digest()
	if s.Digest != d.String() {
		t.Errorf("digest %s, want %s", s.Digest, d)
	}

	rc := mutate.Extract(img)
	want := readTar(t, rc)
	rc.Close()
	got := readTree(t, root)

	for name, w := range want {
		g, ok := got[name]
		if !ok {
			t.Errorf("%s: missing from the tree (want %v)", name, w)
			continue
		}
		if w.typ == tar.TypeLink {
			target := want[w.link]
			if g.content != target.content || statIno(t, filepath.Join(root, name)) != statIno(t, filepath.Join(root, w.link)) {
				t.Errorf("%s: not a hard link of %s", name, w.link)
			}
			continue
		}
		if w.typ == tar.TypeDir && w.mtime != g.mtime {
			// Directory times are set last; compare them too.
			t.Errorf("%s: dir mtime %d, want %d", name, g.mtime, w.mtime)
		}
		if g != w {
			t.Errorf("%s:\n got %v\nwant %v", name, g, w)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("%s: in the tree, not in the flattened image", name)
		}
	}
	// Spot checks of what the layers meant, beyond agreeing with Extract.
	for _, p := range []string{"etc/gone", "var/lib/old", "usr/share/doc", "usr/share/keep"} {
		if _, err := os.Lstat(filepath.Join(root, p)); !os.IsNotExist(err) {
			t.Errorf("%s should be gone: %v", p, err)
		}
	}
	buf := make([]byte, 64)
	n, err := unix.Lgetxattr(filepath.Join(root, "usr/bin/ping"), "security.capability", buf)
	if err != nil || n != 20 {
		t.Errorf("security.capability: %d bytes, %v", n, err)
	}
	if n, err := unix.Lgetxattr(filepath.Join(root, "usr/bin/ping"), "user.note", buf); err != nil || string(buf[:n]) != "hi" {
		t.Errorf("user.note: %q, %v", buf[:max(n, 0)], err)
	}
}

// outsideState lists what exists under dir (names and contents), to
// prove a flatten wrote nothing there.
func outsideState(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() && d.Name() == "root" && p != dir {
			return filepath.SkipDir // the image root itself
		}
		b, _ := os.ReadFile(p)
		var st unix.Stat_t
		unix.Lstat(p, &st)
		out = append(out, p+"|"+string(b)+"|"+strings.Repeat("l", int(st.Nlink)))
		return nil
	})
	slices.Sort(out)
	return out
}

func TestHostileLayers(t *testing.T) {
	requireRoot(t)
	reg := startRegistry(t, nil)
	base := t.TempDir()
	outside := filepath.Join(base, "outside")
	canary := filepath.Join(outside, "canary")
	if err := os.MkdirAll(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(canary, []byte("canary"), 0o644); err != nil {
		t.Fatal(err)
	}
	abs := strings.TrimPrefix(outside, "/")
	cases := []struct {
		name    string
		layers  [][]ent
		wantErr bool
		check   func(t *testing.T, root string)
	}{
		{name: "dotdot", layers: [][]ent{{file("../outside/canary", "pwned")}}, wantErr: true},
		{name: "dotdot-deep", layers: [][]ent{{file("a/../../outside/x", "pwned")}}, wantErr: true},
		{name: "absolute", layers: [][]ent{{file("/etc/passwd", "mine"), file(canary, "inside")}},
			check: func(t *testing.T, root string) {
				if b, _ := os.ReadFile(filepath.Join(root, "etc/passwd")); string(b) != "mine" {
					t.Errorf("/etc/passwd in root: %q", b)
				}
				if b, _ := os.ReadFile(filepath.Join(root, abs, "canary")); string(b) != "inside" {
					t.Errorf("absolute canary name in root: %q", b)
				}
			}},
		{name: "symlink-root-then-through", layers: [][]ent{{symlink("a", "/")}, {file("a/etc/shadow", "x"), file("a"+outside+"/canary", "pwned")}},
			check: func(t *testing.T, root string) {
				if b, _ := os.ReadFile(filepath.Join(root, "etc/shadow")); string(b) != "x" {
					t.Errorf("a/etc/shadow should land in root/etc/shadow: %q", b)
				}
			}},
		{name: "symlink-dotdot-parent", layers: [][]ent{{symlink("d", "../outside")}, {file("d/canary", "pwned"), file("d/new", "pwned")}}, wantErr: true},
		{name: "symlink-absolute-parent", layers: [][]ent{{symlink("d", outside)}, {file("d/canary", "pwned")}}, wantErr: true},
		{name: "symlink-parent-same-layer", layers: [][]ent{{symlink("d", outside), file("d/canary", "pwned")}}, wantErr: true},
		{name: "symlink-chain", layers: [][]ent{{symlink("l1", "l2"), symlink("l2", "sub/../l3"), symlink("l3", "/../../.."+outside)}, {file("l1/canary", "pwned")}}, wantErr: true},
		{name: "hardlink-absolute", layers: [][]ent{{hardlink("h", canary)}}, wantErr: true},
		{name: "hardlink-dotdot", layers: [][]ent{{hardlink("h", "../outside/canary")}}, wantErr: true},
		{name: "hardlink-etc-shadow", layers: [][]ent{{hardlink("h", "/etc/shadow")}}, wantErr: true},
		{name: "hardlink-through-symlink", layers: [][]ent{{symlink("s", outside)}, {hardlink("h", "s/canary")}}, wantErr: true},
		{name: "file-over-symlink", layers: [][]ent{{symlink("f", canary)}, {file("f", "replaced")}},
			check: func(t *testing.T, root string) {
				fi, err := os.Lstat(filepath.Join(root, "f"))
				if err != nil || !fi.Mode().IsRegular() {
					t.Errorf("f should be a regular file now: %v %v", fi, err)
				}
			}},
		{name: "whiteout-through-symlink", layers: [][]ent{{symlink("w", outside)}, {file("w/.wh.canary", "")}}},
		{name: "opaque-through-symlink", layers: [][]ent{{symlink("w", outside)}, {file("w/.wh..wh..opq", "")}}},
		{name: "dir-over-symlink", layers: [][]ent{{symlink("d", outside)}, {dir("d/"), file("d/canary", "inside")}},
			check: func(t *testing.T, root string) {
				if b, _ := os.ReadFile(filepath.Join(root, "d/canary")); string(b) != "inside" {
					t.Errorf("d/canary: %q", b)
				}
			}},
		{name: "device-node-of-host-disk", layers: [][]ent{{{name: "sda", typ: tar.TypeBlock, mode: 0o666, major: 8}}},
			check: func(t *testing.T, root string) {
				if fi, err := os.Lstat(filepath.Join(root, "sda")); err != nil || fi.Mode()&os.ModeDevice == 0 {
					t.Errorf("sda: %v %v", fi, err)
				}
			}},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img := testImage(t, "amd64", c.layers...)
			ref := reg + "/hostile/" + c.name + ":v" + string(rune('0'+i%10))
			push(t, ref, img)
			s, err := Resolve(t.Context(), ref, Options{})
			if err != nil {
				t.Fatal(err)
			}
			// The root lives inside base, beside outside/: a climb of one
			// level would reach the canary.
			root := filepath.Join(base, "root")
			os.RemoveAll(root)
			if err := emptyDir(root); err != nil {
				t.Fatal(err)
			}
			before := outsideState(t, base)
			_, err = flatten(t.Context(), s.layers, root, nil, nil)
			if c.wantErr && err == nil {
				t.Errorf("flatten succeeded, want an error")
			}
			if !c.wantErr && err != nil {
				t.Errorf("flatten: %v", err)
			}
			if err != nil && c.name == "dotdot" && !errors.Is(err, ErrUnsafeEntry) {
				t.Errorf("error %v is not ErrUnsafeEntry", err)
			}
			if b, _ := os.ReadFile(canary); string(b) != "canary" {
				t.Fatalf("canary changed: %q", b)
			}
			if after := outsideState(t, base); !slices.Equal(before, after) {
				t.Fatalf("outside the root changed:\nbefore %q\nafter  %q", before, after)
			}
			if c.check != nil && err == nil {
				c.check(t, root)
			}
		})
	}
}

// Cases where mutate.Extract's flattened tar is not what a container
// runtime makes: a file written through a symlinked directory lands in
// its target (inside the root), and a whiteout hides only lower layers,
// not an entry of its own layer.
func TestFlattenRuntimeSemantics(t *testing.T) {
	requireRoot(t)
	img := testImage(t, "amd64",
		[]ent{symlink("lib", "usr/lib"), dir("usr/"), dir("usr/lib/"), dir("tmp/"), file("tmp/old", "old")},
		[]ent{file("lib/libm.so", "libm"), file(".wh.tmp", ""), dir("tmp/"), file("tmp/new", "new"), file("tmp/.wh.new", "")},
	)
	reg := startRegistry(t, nil)
	push(t, reg+"/sem/x:latest", img)
	root, s, err := resolveFlatten(t, reg+"/sem/x", Options{})
	if err != nil {
		t.Fatal(err)
	}
	if s.Name != "x" || s.Ref != reg+"/sem/x:latest" {
		t.Errorf("name %q ref %q", s.Name, s.Ref)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "usr/lib/libm.so")); string(b) != "libm" {
		t.Errorf("lib/libm.so through the lib symlink: %q", b)
	}
	if fi, err := os.Lstat(filepath.Join(root, "lib")); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("lib should stay a symlink: %v %v", fi, err)
	}
	if _, err := os.Lstat(filepath.Join(root, "tmp/old")); !os.IsNotExist(err) {
		t.Errorf("tmp/old should be whited out: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "tmp/new")); string(b) != "new" {
		t.Errorf("tmp/new (same layer as its whiteout) should stay: %q", b)
	}
}
