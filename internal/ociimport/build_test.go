package ociimport

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/testenv"
)

func debugfs(t *testing.T, img, cmd string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", cmd, img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs -R %q: %v: %s", cmd, err, out)
	}
	return string(out)
}

func TestBuildMakesExt4(t *testing.T) {
	requireRoot(t)
	for _, tool := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Missing(t, "%s (e2fsprogs)", tool)
		}
	}
	capab := "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
	img := testImage(t, "amd64",
		[]ent{dir("etc/"), file("etc/os-release", "ID=oci-test\n"), dir("bin/"),
			{name: "bin/ping", typ: tar.TypeReg, mode: 0o4755, uid: 0, gid: 0, body: "ELF", xattrs: map[string]string{"security.capability": capab}},
			dir("dev/"), {name: "dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3},
			{name: "home/", typ: tar.TypeDir, mode: 0o755}, {name: "home/u/", typ: tar.TypeDir, mode: 0o700, uid: 1000, gid: 1001}},
		[]ent{hardlink("bin/ping2", "bin/ping"), file("etc/big", strings.Repeat("x", 3<<20))},
	)
	reg := startRegistry(t, nil)
	push(t, reg+"/build/x:1", img)
	s, err := Resolve(t.Context(), reg+"/build/x:1", Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	dir := t.TempDir()
	var phases []string
	var lastLayers api.Progress
	b, err := s.Build(t.Context(), dir, BuildOptions{HeadroomMiB: 16, Progress: func(p api.Progress) {
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
		}
		if p.Phase == PhaseLayers {
			lastLayers = p
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if b.Rootfs != filepath.Join(dir, RootfsName) {
		t.Errorf("rootfs %s", b.Rootfs)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("staging dir holds %v, want only %s (the work tree removed)", ents, RootfsName)
	}
	if strings.Join(phases, ",") != PhaseLayers+","+PhaseMkfs {
		t.Errorf("phases %v", phases)
	}
	if lastLayers.Total == 0 || lastLayers.Done != lastLayers.Total || lastLayers.Unit != "bytes" {
		t.Errorf("last layers progress %+v: want done == total bytes", lastLayers)
	}
	fi, _ := os.Stat(b.Rootfs)
	if fi.Size() < 16<<20+3<<20 || fi.Size() > 64<<20 {
		t.Errorf("rootfs is %d MiB, want content + 16 MiB headroom + metadata", fi.Size()>>20)
	}
	if out := debugfs(t, b.Rootfs, "cat /etc/os-release"); !strings.Contains(out, "ID=oci-test") {
		t.Errorf("os-release: %q", out)
	}
	st := debugfs(t, b.Rootfs, "stat /bin/ping")
	for _, want := range []string{"Mode:  04755", "Links: 2", "security.capability"} {
		if !strings.Contains(st, want) {
			t.Errorf("stat /bin/ping lacks %q:\n%s", want, st)
		}
	}
	if st := debugfs(t, b.Rootfs, "stat /dev/null"); !strings.Contains(st, "character special") || !strings.Contains(st, "Device major/minor number: 01:03") {
		t.Errorf("/dev/null:\n%s", st)
	}
	if st := debugfs(t, b.Rootfs, "stat /home/u"); !strings.Contains(st, "User:  1000   Group:  1001") {
		t.Errorf("/home/u owner:\n%s", st)
	}
	if st := debugfs(t, b.Rootfs, "stat /"); !strings.Contains(st, "User:     0   Group:     0") {
		t.Errorf("root dir owner:\n%s", st)
	}
}

func TestExt4Geometry(t *testing.T) {
	size, inodes := ext4Geometry(TreeUsage{Bytes: 300 << 20, Inodes: 20000}, 512)
	if size < (300+512)<<20 || size > (300+512+200)<<20 {
		t.Errorf("size %d MiB for 300 MiB + 512 MiB headroom", size>>20)
	}
	if inodes < 22000 {
		t.Errorf("inodes %d for 20000 entries", inodes)
	}
	_, inodes = ext4Geometry(TreeUsage{Bytes: 1 << 20, Inodes: 100000}, 0)
	if inodes < 110000 {
		t.Errorf("inodes %d for 100000 small entries", inodes)
	}
}

// A FROM scratch image (one static binary) gets an /etc for the files
// the agent writes at boot.
func TestBuildScratchGetsEtc(t *testing.T) {
	requireRoot(t)
	if _, err := exec.LookPath("debugfs"); err != nil {
		testenv.Missing(t, "debugfs (e2fsprogs)")
	}
	img := testImage(t, "amd64", []ent{{name: "app", typ: tar.TypeReg, mode: 0o755, body: "ELF static"}})
	reg := startRegistry(t, nil)
	push(t, reg+"/scratch/app:1", img)
	s, err := Resolve(t.Context(), reg+"/scratch/app:1", Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := s.Build(t.Context(), t.TempDir(), BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if out := debugfs(t, b.Rootfs, "ls -l /"); !strings.Contains(out, " etc") || !strings.Contains(out, " app") {
		t.Errorf("root of a scratch image:\n%s", out)
	}
}

// A sparse file (a layer claiming a huge file of zeros, as lastlog is)
// stays sparse in the tree and the ext4 stays small.
func TestBuildSparseFile(t *testing.T) {
	requireRoot(t)
	if _, err := exec.LookPath("debugfs"); err != nil {
		testenv.Missing(t, "debugfs (e2fsprogs)")
	}
	big := strings.Repeat("\x00", 8<<20) + "end" + strings.Repeat("\x00", 4<<20)
	img := testImage(t, "amd64", []ent{dir("var/"), file("var/lastlog", big), file("var/small", "x\x00\x00y")})
	reg := startRegistry(t, nil)
	push(t, reg+"/sparse/x:1", img)
	s, err := Resolve(t.Context(), reg+"/sparse/x:1", Options{})
	if err != nil {
		t.Fatal(err)
	}
	var tree string
	b, err := s.Build(t.Context(), t.TempDir(), BuildOptions{DiscardTree: func(p string) {
		tree = filepath.Join(t.TempDir(), "tree")
		if err := os.Rename(p, tree); err != nil {
			t.Fatal(err)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(tree, "root/var/lastlog"))
	if string(got) != big {
		t.Fatalf("lastlog content differs (%d bytes, want %d)", len(got), len(big))
	}
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(tree, "root/var/lastlog"), &st); err != nil || st.Blocks*512 > 1<<20 {
		t.Errorf("lastlog uses %d bytes on disk, want a sparse file: %v", st.Blocks*512, err)
	}
	if b, _ := os.ReadFile(filepath.Join(tree, "root/var/small")); string(b) != "x\x00\x00y" {
		t.Errorf("small: %q", b)
	}
	if stat := debugfs(t, b.Rootfs, "stat /var/lastlog"); !strings.Contains(stat, "Size: 12582915") {
		t.Errorf("lastlog in the ext4:\n%s", stat)
	}
}

func TestHoleWriter(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 50; i++ {
		var want []byte
		for len(want) < 1<<20 {
			n := rng.IntN(3 * holeBlock)
			chunk := make([]byte, n)
			if rng.IntN(2) == 0 {
				for j := range chunk {
					chunk[j] = byte(rng.IntN(3)) // zeros inside data too
				}
			}
			want = append(want, chunk...)
		}
		f, err := os.Create(filepath.Join(t.TempDir(), "f"))
		if err != nil {
			t.Fatal(err)
		}
		w := &holeWriter{f: f}
		for p := want; len(p) > 0; {
			n := min(len(p), 1+rng.IntN(200<<10))
			if _, err := w.Write(p[:n]); err != nil {
				t.Fatal(err)
			}
			p = p[n:]
		}
		if err := w.finish(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		got, _ := os.ReadFile(f.Name())
		if !bytes.Equal(got, want) {
			t.Fatalf("round %d: content differs (%d bytes, want %d)", i, len(got), len(want))
		}
	}
}

// A cancelled import stops, its goroutines end, and nothing stays in its
// directory.
func TestBuildCancelled(t *testing.T) {
	requireRoot(t)
	img := testImage(t, "amd64", []ent{file("a", strings.Repeat("a", 4<<20))}, []ent{file("b", strings.Repeat("b", 4<<20))})
	reg := startRegistry(t, nil)
	push(t, reg+"/cancel/x:1", img)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	s, err := Resolve(ctx, reg+"/cancel/x:1", Options{})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	_, err = s.Build(ctx, dir, BuildOptions{Progress: func(p api.Progress) {
		if p.Phase == PhaseLayers {
			cancel()
		}
	}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled build: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("left in the directory: %v", entries)
	}
}
