package bundle

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/testenv"
)

// entry is a tar entry of a hand-made bundle.
type entry struct {
	hdr  tar.Header
	data []byte
}

func reg(name string, data []byte) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Size: int64(len(data)), Mode: 0o644}, data: data}
}

// craft makes a bundle of the given entries, one zstd frame each.
func craft(t *testing.T, entries ...entry) []byte {
	t.Helper()
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	var out, tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	flush := func() {
		if tb.Len() > 0 {
			out.Write(enc.EncodeAll(tb.Bytes(), nil))
			tb.Reset()
		}
	}
	for _, e := range entries {
		if err := tw.WriteHeader(&e.hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(e.data); err != nil {
			t.Fatal(err)
		}
		if err := tw.Flush(); err != nil {
			t.Fatal(err)
		}
		flush()
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	flush()
	return out.Bytes()
}

// withoutLastFrame cuts a bundle's last frame (the tar end marker).
func withoutLastFrame(t *testing.T, data []byte) []byte {
	t.Helper()
	sp := newSplitter(bytes.NewReader(data), 0, nil)
	var last int64
	for {
		f, err := sp.next()
		if errors.Is(err, io.EOF) {
			return data[:last]
		}
		if err != nil {
			t.Fatal(err)
		}
		last = f.start
		if _, err := f.readAll(nil); err != nil {
			t.Fatal(err)
		}
	}
}

func manifestEntry(t *testing.T, m *Manifest) entry {
	t.Helper()
	data, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return reg(ManifestName, data)
}

func imageManifest(files ...File) *Manifest {
	return &Manifest{Schema: 1, Kind: KindImage, Name: "deb", Version: "1", Arch: runtime.GOARCH, User: "dev", Files: files}
}

func fileOf(p, role string, data []byte) File {
	return File{Path: p, Role: role, Size: int64(len(data)), SHA256: sha(data)}
}

// installIn installs data into a directory inside a parent holding a
// canary, and checks nothing was written beside it.
func installIn(t *testing.T, data []byte, opts InstallOptions) (string, *Manifest, error) {
	t.Helper()
	parent := t.TempDir()
	writeFile(t, filepath.Join(parent, "canary"), []byte("canary"))
	dir := filepath.Join(parent, "dir")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	m, err := Install(context.Background(), &memSource{data: data}, dir, opts)
	ents, _ := os.ReadDir(parent)
	if len(ents) != 2 {
		t.Errorf("install wrote beside its directory: %v", ents)
	}
	if b, _ := os.ReadFile(filepath.Join(parent, "canary")); string(b) != "canary" {
		t.Error("canary changed")
	}
	return dir, m, err
}

func TestInstallRefuses(t *testing.T) {
	rootfs := []byte("rootfs content")
	good := imageManifest(fileOf("rootfs.ext4", RoleRootfs, rootfs))
	goodData := craft(t, manifestEntry(t, good), reg("rootfs.ext4", rootfs))
	bad := func(mutate func(m *Manifest)) entry {
		m := imageManifest(fileOf("rootfs.ext4", RoleRootfs, rootfs))
		mutate(m)
		return manifestEntry(t, m)
	}
	sym := entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "rootfs.ext4", Linkname: "/etc/passwd"}}
	hard := entry{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "rootfs.ext4", Linkname: "../canary"}}
	for _, tc := range []struct {
		name string
		data []byte
		opts InstallOptions
		want string
	}{
		{"checksum", craft(t, bad(func(m *Manifest) { m.Files[0].SHA256 = sha([]byte("other")) }), reg("rootfs.ext4", rootfs)), InstallOptions{}, "rootfs.ext4: sha256 "},
		{"size", craft(t, bad(func(m *Manifest) { m.Files[0].Size++ }), reg("rootfs.ext4", rootfs)), InstallOptions{}, "the archive holds 14 bytes, the manifest says 15"},
		{"truncated", goodData[:len(goodData)-20], InstallOptions{}, "truncated archive"},
		{"truncated at a frame", withoutLastFrame(t, goodData), InstallOptions{}, "truncated archive"},
		{"not listed", craft(t, manifestEntry(t, good), reg("rootfs.ext4", rootfs), reg("extra", nil)), InstallOptions{}, `archive entry "extra" is not in the manifest`},
		{"missing", craft(t, bad(func(m *Manifest) { m.Files = append(m.Files, fileOf("work-seed.ext4", RoleWorkSeed, nil)) }), reg("rootfs.ext4", rootfs)), InstallOptions{}, "the archive lacks files its manifest lists: work-seed.ext4"},
		{"twice", craft(t, manifestEntry(t, good), reg("rootfs.ext4", rootfs), reg("rootfs.ext4", rootfs)), InstallOptions{}, "appears twice"},
		{"dotdot in manifest", craft(t, bad(func(m *Manifest) { m.Files[0].Path = "../rootfs.ext4" }), reg("../rootfs.ext4", rootfs)), InstallOptions{}, "want a clean relative path"},
		{"absolute in manifest", craft(t, bad(func(m *Manifest) { m.Files[0].Path = "/etc/passwd" }), reg("/etc/passwd", rootfs)), InstallOptions{}, "want a clean relative path"},
		{"unclean in manifest", craft(t, bad(func(m *Manifest) { m.Files[0].Path = "a/../../x" }), reg("a/../../x", rootfs)), InstallOptions{}, "want a clean relative path"},
		{"dotdot in archive", craft(t, manifestEntry(t, good), reg("../canary", rootfs)), InstallOptions{}, `"../canary" is not in the manifest`},
		{"dir outside", craft(t, manifestEntry(t, good), entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "../x/", Mode: 0o755}}), InstallOptions{}, "want a clean relative path"},
		{"symlink", craft(t, manifestEntry(t, good), sym), InstallOptions{}, `type '2' is not allowed`},
		{"hardlink", craft(t, manifestEntry(t, good), hard), InstallOptions{}, `type '1' is not allowed`},
		{"kind", goodData, InstallOptions{Kind: KindKernel}, "bundle holds image deb@1 for " + runtime.GOARCH + ", want kernel NAME@VERSION"},
		{"name", goodData, InstallOptions{Name: "other"}, "want a bundle other@VERSION"},
		{"arch", goodData, InstallOptions{Arch: "riscv64"}, "for riscv64"},
		{"too big", goodData, InstallOptions{MaxBytes: 10}, "holds more than the 10 bytes of files allowed"},
		{"schema", craft(t, bad(func(m *Manifest) { m.Schema = 2 })), InstallOptions{}, "manifest schema 2"},
		{"no manifest", craft(t, reg("rootfs.ext4", rootfs)), InstallOptions{}, `first entry is "rootfs.ext4", not manifest.json`},
		{"bundle sum", goodData, InstallOptions{SHA256: sha([]byte("x"))}, "the bundle's sha256 is " + sha(goodData)},
		{"not zstd", []byte("PK\x03\x04 a zip file"), InstallOptions{}, "not a zstd frame at offset 0"},
		{"empty", nil, InstallOptions{}, "the archive ends before its end marker"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := installIn(t, tc.data, tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
			if !errors.Is(err, errdefs.ErrInvalid) {
				t.Errorf("error %v is not ErrInvalid", err)
			}
		})
	}
	dir, m, err := installIn(t, goodData, InstallOptions{Kind: KindImage, Name: "deb", Version: "1", SHA256: sha(goodData)})
	if err != nil || m.User != "dev" {
		t.Fatalf("good bundle: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "rootfs.ext4")); !bytes.Equal(b, rootfs) {
		t.Error("rootfs differs")
	}
}

func TestResumeAfterInterruption(t *testing.T) {
	m, data, src := kernelBundle(t, 64<<10)
	for i := 1; i < 12; i++ {
		failAt := int64(len(data) * i / 12)
		t.Run(fmt.Sprint(failAt), func(t *testing.T) {
			dst := t.TempDir()
			s := &memSource{data: data, failAt: failAt}
			opts := InstallOptions{SHA256: sha(data)}
			in := &installer{opts: opts, src: s} // checkpoint at every frame
			if _, err := in.install(context.Background(), dst); !errors.Is(err, errNetwork) {
				t.Fatalf("first install: %v, want the source's error", err)
			}
			if _, err := Install(context.Background(), s, dst, opts); err != nil {
				t.Fatal(err)
			}
			if s.opens[1] == 0 || s.opens[1] > failAt {
				t.Errorf("resumed at %d (failed at %d)", s.opens[1], failAt)
			}
			sameTree(t, m, src, dst)
		})
	}
}

func TestResumeOtherBundleRefused(t *testing.T) {
	_, data, _ := kernelBundle(t, 64<<10)
	dst := t.TempDir()
	s := &memSource{data: data, failAt: int64(len(data) / 2)}
	if _, err := Install(context.Background(), s, dst, InstallOptions{SHA256: sha(data)}); !errors.Is(err, errNetwork) {
		t.Fatal(err)
	}
	_, err := Install(context.Background(), s, dst, InstallOptions{SHA256: sha([]byte("new version"))})
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "partial install of another bundle") {
		t.Fatalf("error %v", err)
	}
}

// zstdCLI compresses the plain tar stream of a bundle with the zstd
// program (one frame), from a file (content size in the header) or a pipe
// (no content size).
func zstdCLI(t *testing.T, bundle []byte, pipe bool) []byte {
	t.Helper()
	if _, err := exec.LookPath("zstd"); err != nil {
		testenv.Missing(t, "zstd not installed")
	}
	dec, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := dec.DecodeAll(bundle, nil)
	if err != nil {
		t.Fatal(err)
	}
	var cmd *exec.Cmd
	if pipe {
		cmd = exec.Command("zstd", "-q", "-c")
		cmd.Stdin = bytes.NewReader(plain)
	} else {
		p := filepath.Join(t.TempDir(), "b.tar")
		writeFile(t, p, plain)
		cmd = exec.Command("zstd", "-q", "-c", p)
	}
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestInstallZstdCLIBundle(t *testing.T) {
	m, data, src := kernelBundle(t, 64<<10)
	for _, pipe := range []bool{false, true} {
		t.Run(fmt.Sprint("pipe=", pipe), func(t *testing.T) {
			one := zstdCLI(t, data, pipe)
			if f, err := newSplitter(bytes.NewReader(one), 0, nil).next(); err != nil || (f.contentSize < 0) != pipe {
				t.Fatalf("zstd CLI frame: %+v, %v", f, err)
			}
			dst := t.TempDir()
			s := &memSource{data: one, failAt: int64(len(one) / 2)}
			if _, err := Install(context.Background(), s, dst, InstallOptions{}); !errors.Is(err, errNetwork) {
				t.Fatal(err)
			}
			if _, err := Install(context.Background(), s, dst, InstallOptions{}); err != nil {
				t.Fatal(err)
			}
			if s.opens[1] != 0 {
				t.Errorf("a single-frame bundle resumed at %d, want 0", s.opens[1])
			}
			sameTree(t, m, src, dst)
		})
	}
}

func TestSparseRootfs(t *testing.T) {
	src := t.TempDir()
	rootfs := make([]byte, 64<<20)
	for _, off := range []int{0, 5 << 20, 40<<20 + 100, len(rootfs) - 4096} {
		copy(rootfs[off:], random(4096))
	}
	writeFile(t, filepath.Join(src, "rootfs.ext4"), rootfs)
	m := imageManifest(File{Path: "rootfs.ext4", Role: RoleRootfs})
	var buf bytes.Buffer
	if err := Write(context.Background(), &buf, m, src); err != nil {
		t.Fatal(err)
	}
	if buf.Len() > 1<<20 {
		t.Errorf("a mostly-zero 64 MiB rootfs compressed to %d bytes", buf.Len())
	}
	// Its runs of zeros are frames of zero RLE blocks, which Install doesn't
	// decode, and which the zstd program reads as well.
	sp := newSplitter(bytes.NewReader(buf.Bytes()), 0, nil)
	zeroFrames := 0
	for {
		f, err := sp.next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.readAll(nil); err != nil {
			t.Fatal(err)
		}
		if f.zeroRLE && f.rleSize == f.contentSize {
			zeroFrames++
		}
	}
	if zeroFrames < 6 {
		t.Errorf("%d frames of zeros, want at least 6", zeroFrames)
	}
	if _, err := exec.LookPath("zstd"); err == nil {
		cmd := exec.Command("zstd", "-q", "-d", "-c")
		cmd.Stdin = bytes.NewReader(buf.Bytes())
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("zstd -d: %v", err)
		}
		dec, _ := zstd.NewReader(nil)
		want, err := dec.DecodeAll(buf.Bytes(), nil)
		if err != nil || !bytes.Equal(out, want) {
			t.Fatalf("zstd -d and DecodeAll differ (%v)", err)
		}
	}
	dst := t.TempDir()
	if _, err := Install(context.Background(), &memSource{data: buf.Bytes()}, dst, InstallOptions{}); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(dst, "rootfs.ext4"))
	if !bytes.Equal(got, rootfs) {
		t.Fatal("rootfs differs")
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dst, "rootfs.ext4"), &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 1<<20 {
		t.Errorf("rootfs uses %d bytes on disk, want holes for its zeros (<1 MiB)", used)
	}
}

func TestWriteFramesAtEntriesAndEvery(t *testing.T) {
	_, data, _ := kernelBundle(t, 64<<10)
	sp := newSplitter(bytes.NewReader(data), 0, nil)
	frames := 0
	for {
		f, err := sp.next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.readAll(nil); err != nil {
			t.Fatal(err)
		}
		if f.contentSize < 0 || f.contentSize > 64<<10+4096 {
			t.Errorf("frame of %d bytes", f.contentSize)
		}
		frames++
	}
	// manifest, 517000 bytes of kernel in 64 KiB frames (8), initrd, 3
	// modules, end marker.
	if frames < 14 {
		t.Errorf("%d frames", frames)
	}
	if sp.off != int64(len(data)) {
		t.Errorf("splitter stopped at %d of %d", sp.off, len(data))
	}
}

func TestWriteRefuses(t *testing.T) {
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "real"), []byte("x"))
	if err := os.Symlink("real", filepath.Join(src, "link")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		m    *Manifest
		want string
	}{
		{imageManifest(File{Path: "link", Role: RoleRootfs}), "not a regular file"},
		{imageManifest(File{Path: "missing", Role: RoleRootfs}), "no such file"},
		{imageManifest(File{Path: "real", Role: RoleKernel}), `role "kernel" is not one of a image bundle's`},
		{imageManifest(), "a image bundle has 0 rootfs file(s); want 1"},
		{imageManifest(File{Path: "real", Role: RoleRootfs}, File{Path: "real/x", Role: RoleWorkSeed}), "as a file and as the directory"},
	} {
		err := Write(context.Background(), &bytes.Buffer{}, tc.m, src)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("error %v, want %q", err, tc.want)
		}
	}
}

// A bundle made by hand with GNU tar and the zstd program installs.
func TestInstallGNUTarBundle(t *testing.T) {
	for _, tool := range []string{"tar", "zstd"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Missing(t, "%s not installed", tool)
		}
	}
	src := t.TempDir()
	rootfs := append(random(10000), make([]byte, 100000)...)
	writeFile(t, filepath.Join(src, "rootfs.ext4"), rootfs)
	data, err := json.Marshal(imageManifest(fileOf("rootfs.ext4", RoleRootfs, rootfs)))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(src, ManifestName), data)
	out := filepath.Join(t.TempDir(), "b.tar.zst")
	cmd := exec.Command("tar", "--zstd", "-cf", out, "-C", src, ManifestName, "rootfs.ext4")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tar: %v: %s", err, b)
	}
	bundle, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	dir, _, err := installIn(t, bundle, InstallOptions{SHA256: sha(bundle)})
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "rootfs.ext4")); !bytes.Equal(b, rootfs) {
		t.Error("rootfs differs")
	}
}
