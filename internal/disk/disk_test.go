package disk

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/vmm"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
	gib = int64(1) << 30
)

func needTool(tb testing.TB, name string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		testenv.Missing(tb, "%s not installed", name)
	}
	return p
}

func run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// makeBase creates a sparse file of size bytes with a distinct 1 MiB
// pattern written at each offset in dataAt.
func makeBase(tb testing.TB, path string, size int64, dataAt ...int64) {
	tb.Helper()
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		tb.Fatal(err)
	}
	for i, off := range dataAt {
		buf := bytes.Repeat([]byte{byte(i + 1), 0x5a, byte(off >> 20), 0xc3}, int(mib/4))
		if _, err := f.WriteAt(buf, off); err != nil {
			tb.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		tb.Fatal(err)
	}
}

func checksum(tb testing.TB, path string) string {
	tb.Helper()
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		tb.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// checksumN hashes the first n bytes of path.
func checksumN(tb testing.TB, path string, n int64) string {
	tb.Helper()
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.CopyN(h, f, n); err != nil {
		tb.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// dataChecksum hashes the size and the data extents (offset and bytes) of a
// sparse file: a fast stand-in for checksum on large, mostly empty files.
func dataChecksum(tb testing.TB, path string) string {
	tb.Helper()
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		tb.Fatal(err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "size %d\n", st.Size())
	for off := int64(0); off < st.Size(); {
		data, err := f.Seek(off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		} else if err != nil {
			tb.Fatal(err)
		}
		hole, err := f.Seek(data, unix.SEEK_HOLE)
		if err != nil {
			tb.Fatal(err)
		}
		fmt.Fprintf(h, "data at %d\n", data)
		if _, err := io.Copy(h, io.NewSectionReader(f, data, hole-data)); err != nil {
			tb.Fatal(err)
		}
		off = hole
	}
	return hex.EncodeToString(h.Sum(nil))
}

func allocated(tb testing.TB, path string) int64 {
	tb.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		tb.Fatal(err)
	}
	return st.Blocks * 512
}

func qemuInfo(tb testing.TB, path string) map[string]any {
	tb.Helper()
	out := run(tb, "qemu-img", "info", "-U", "--output=json", path)
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		tb.Fatalf("parse qemu-img info: %v\n%s", err, out)
	}
	return m
}

func mustNotExist(tb testing.TB, path string) {
	tb.Helper()
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		tb.Fatalf("%s should not exist (lstat: %v)", path, err)
	}
}

// logBuffer returns a logger writing text records to a buffer.
func logBuffer() (*slog.Logger, *bytes.Buffer) {
	var buf bytes.Buffer
	return slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})), &buf
}

func TestCloneQcow2Overlay(t *testing.T) {
	needTool(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "rootfs.img")
	makeBase(t, base, gib, 0, 512*mib)
	baseSum := dataChecksum(t, base)

	c := NewCloner(nil, "")
	dest := filepath.Join(dir, "vm", "root.qcow2")
	if err := os.Mkdir(filepath.Dir(dest), 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	res, err := c.Clone(t.Context(), CloneRequest{
		Base: base, Dest: dest, Formats: []string{vmm.FormatQcow2, vmm.FormatRaw}, Size: 2 * gib,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("qcow2 overlay of a 1 GiB base made in %v", time.Since(start))
	want := CloneResult{Path: dest, Format: vmm.FormatQcow2, Strategy: StrategyQcow2Overlay, Size: 2 * gib}
	if res != want {
		t.Fatalf("result = %+v, want %+v", res, want)
	}

	info := qemuInfo(t, dest)
	if info["format"] != "qcow2" {
		t.Errorf("format = %v, want qcow2", info["format"])
	}
	if info["backing-filename"] != base {
		t.Errorf("backing-filename = %v, want %s", info["backing-filename"], base)
	}
	if info["backing-filename-format"] != "raw" {
		t.Errorf("backing-filename-format = %v, want raw", info["backing-filename-format"])
	}
	if vs, _ := info["virtual-size"].(float64); int64(vs) != 2*gib {
		t.Errorf("virtual-size = %v, want %d", info["virtual-size"], 2*gib)
	}
	if got, err := VirtualSize(t.Context(), dest, vmm.FormatQcow2); err != nil || got != 2*gib {
		t.Errorf("VirtualSize = %d, %v; want %d", got, err, 2*gib)
	}
	// No data was copied: the overlay holds only qcow2 metadata.
	st, err := os.Stat(dest)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() > mib || allocated(t, dest) > mib {
		t.Errorf("overlay is %d bytes (%d allocated): data seems copied", st.Size(), allocated(t, dest))
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("overlay mode = %v, want 0600", st.Mode().Perm())
	}

	// The overlay reads the base's data; writes to it leave the base alone.
	if _, err := exec.LookPath("qemu-io"); err == nil {
		run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1 1", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 1536M 1M", dest)
		out := run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 1536M 1M", dest)
		if strings.Contains(out, "Pattern verification failed") {
			t.Errorf("reading back the overlay: %s", out)
		}
	} else {
		run(t, "qemu-img", "resize", "-f", "qcow2", dest, "3G") // a write to the overlay's metadata at least
	}
	if got := dataChecksum(t, base); got != baseSum {
		t.Error("base image changed after writing to the overlay")
	}
}

func TestCloneQcow2DefaultSize(t *testing.T) {
	needTool(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "rootfs.img")
	makeBase(t, base, 100*mib, 0)
	res, err := NewCloner(nil, "").Clone(t.Context(), CloneRequest{
		Base: base, Dest: filepath.Join(dir, "d.qcow2"), Formats: []string{vmm.FormatQcow2},
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Size != 100*mib {
		t.Errorf("size = %d, want %d", res.Size, 100*mib)
	}
	if vs, _ := qemuInfo(t, res.Path)["virtual-size"].(float64); int64(vs) != 100*mib {
		t.Errorf("virtual-size = %v, want %d", vs, 100*mib)
	}
}

// mountXFS makes a reflink-capable XFS filesystem on a loop device backed by
// a file in a temporary directory and mounts it. Cleanup unmounts it and
// detaches the loop device.
func mountXFS(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a loop device needs root")
	}
	needTool(t, "mkfs.xfs")
	needTool(t, "losetup")
	dir := t.TempDir()
	img := filepath.Join(dir, "xfs.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(300 * mib); err != nil {
		t.Fatal(err)
	}
	f.Close()
	run(t, "mkfs.xfs", "-q", "-m", "reflink=1", img)
	loop := strings.TrimSpace(run(t, "losetup", "--find", "--show", img))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", loop).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", loop, err, out)
		}
	})
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "mount", "-t", "xfs", loop, mnt)
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	return mnt
}

func freeBytes(tb testing.TB, dir string) int64 {
	tb.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		tb.Fatal(err)
	}
	return int64(st.Bfree) * st.Bsize
}

func TestCloneReflinkXFS(t *testing.T) {
	mnt := mountXFS(t)
	ok, err := ReflinkSupported(mnt)
	if err != nil || !ok {
		t.Fatalf("ReflinkSupported(xfs) = %v, %v; want true", ok, err)
	}

	base := filepath.Join(mnt, "rootfs.img")
	const dataSize = 128 << 20
	makeBase(t, base, 200*mib)
	{ // fill the first 128 MiB with real data
		f, err := os.OpenFile(base, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.CopyN(f, strings.NewReader(strings.Repeat("banger-rootfs-data-", dataSize/19+1)), dataSize); err != nil {
			t.Fatal(err)
		}
		f.Sync()
		f.Close()
	}
	baseSum := checksum(t, base)
	free := freeBytes(t, mnt)

	log, logs := logBuffer()
	dest := filepath.Join(mnt, "root.img")
	start := time.Now()
	res, err := NewCloner(log, "").Clone(t.Context(), CloneRequest{
		Base: base, Dest: dest, Formats: []string{vmm.FormatRaw}, Size: 256 * mib,
	})
	elapsed := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("reflink clone of %d MiB of data made in %v", dataSize>>20, elapsed)
	want := CloneResult{Path: dest, Format: vmm.FormatRaw, Strategy: StrategyReflink, Size: 256 * mib}
	if res != want {
		t.Fatalf("result = %+v, want %+v", res, want)
	}
	if strings.Contains(logs.String(), "level=WARN") {
		t.Errorf("unexpected warning: %s", logs)
	}
	if elapsed > 2*time.Second {
		t.Errorf("reflink clone took %v; it should be instant", elapsed)
	}
	// Data is shared: the clone took (almost) no space.
	if used := free - freeBytes(t, mnt); used > 16*mib {
		t.Errorf("clone used %d MiB of free space; data should be shared", used>>20)
	}
	if st, err := os.Stat(dest); err != nil || st.Size() != 256*mib {
		t.Fatalf("clone size: %v, %v; want %d", st, err, 256*mib)
	}
	if got := checksumN(t, dest, 200*mib); got != baseSum {
		t.Error("clone content differs from base")
	}
	// A write to the clone leaves the base unchanged.
	f, err := os.OpenFile(dest, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xee}, int(mib)), 4*mib); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if got := checksum(t, base); got != baseSum {
		t.Error("base changed after writing to the clone")
	}
}

// sparseDirs returns directories on ext4 (the test's temp dir here) and
// tmpfs where available, for the sparse-copy fallback.
func sparseDirs(t *testing.T) map[string]string {
	dirs := map[string]string{"tempdir": t.TempDir()}
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "banger-disk-test-")
		if err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			dirs["tmpfs"] = d
		}
	}
	return dirs
}

func TestCloneSparseCopyFallback(t *testing.T) {
	for name, dir := range sparseDirs(t) {
		t.Run(name, func(t *testing.T) {
			base := filepath.Join(dir, "rootfs.img")
			makeBase(t, base, 64*mib, 0, 32*mib, 63*mib)
			baseSum := checksum(t, base)

			log, logs := logBuffer()
			c := NewCloner(log, "")
			c.noReflink = true // force the fallback even where reflink works
			dest := filepath.Join(dir, "root.img")
			res, err := c.Clone(t.Context(), CloneRequest{
				Base: base, Dest: dest, Formats: []string{vmm.FormatRaw}, Size: 96 * mib,
			})
			if err != nil {
				t.Fatal(err)
			}
			want := CloneResult{Path: dest, Format: vmm.FormatRaw, Strategy: StrategySparseCopy, Size: 96 * mib}
			if res != want {
				t.Fatalf("result = %+v, want %+v", res, want)
			}
			if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "made a full sparse copy") {
				t.Errorf("want a warning about the sparse copy, got: %s", logs)
			}
			t.Logf("log: %s", strings.TrimSpace(logs.String()))
			st, err := os.Stat(dest)
			if err != nil {
				t.Fatal(err)
			}
			if st.Size() != 96*mib {
				t.Errorf("size = %d, want %d", st.Size(), 96*mib)
			}
			if got := checksumN(t, dest, 64*mib); got != baseSum {
				t.Error("copy content differs from base")
			}
			if a := allocated(t, dest); a > 4*mib {
				t.Errorf("copy allocates %d bytes; holes were not kept (3 MiB of data)", a)
			}
			if got := checksum(t, base); got != baseSum {
				t.Error("base changed")
			}
		})
	}
}

// Without the knob, a filesystem that can't reflink (ext4, tmpfs) falls
// back to the sparse copy on its own.
func TestCloneRawFallsBackWithoutReflink(t *testing.T) {
	dir := t.TempDir()
	ok, err := ReflinkSupported(dir)
	if err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(dir, "rootfs.img")
	makeBase(t, base, 16*mib, 0)
	res, err := NewCloner(nil, "").Clone(t.Context(), CloneRequest{
		Base: base, Dest: filepath.Join(dir, "d.img"), Formats: []string{vmm.FormatRaw},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := StrategySparseCopy
	if ok {
		want = StrategyReflink
	}
	if res.Strategy != want || res.Size != 16*mib {
		t.Errorf("result = %+v, want strategy %s size %d", res, want, 16*mib)
	}
}

func TestCloneSmallerThanBase(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "rootfs.img")
	makeBase(t, base, 10*mib, 0)
	for _, formats := range [][]string{{vmm.FormatQcow2}, {vmm.FormatRaw}} {
		dest := filepath.Join(dir, "d-"+formats[0])
		_, err := NewCloner(nil, "").Clone(t.Context(), CloneRequest{Base: base, Dest: dest, Formats: formats, Size: 5 * mib})
		if err == nil || !strings.Contains(err.Error(), "smaller than the image") {
			t.Errorf("%v: err = %v, want a size error", formats, err)
		}
		mustNotExist(t, dest)
	}
}

func TestCloneDestExists(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "rootfs.img")
	makeBase(t, base, 10*mib, 0)
	for _, formats := range [][]string{{vmm.FormatQcow2}, {vmm.FormatRaw}} {
		dest := filepath.Join(dir, "existing-"+formats[0])
		if err := os.WriteFile(dest, []byte("keep me"), 0o640); err != nil {
			t.Fatal(err)
		}
		_, err := NewCloner(nil, "").Clone(t.Context(), CloneRequest{Base: base, Dest: dest, Formats: formats})
		if !errors.Is(err, fs.ErrExist) {
			t.Errorf("%v: err = %v, want fs.ErrExist", formats, err)
		}
		if b, err := os.ReadFile(dest); err != nil || string(b) != "keep me" {
			t.Errorf("%v: existing file changed: %q, %v", formats, b, err)
		}
	}
}

func TestCloneFailureLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "rootfs.img")
	makeBase(t, base, 10*mib, 0)

	// A qcow2 base with an incompatible feature bit: qemu-img, not this
	// package, makes its overlays.
	featured := filepath.Join(dir, "featured.qcow2")
	f, err := os.Create(featured)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writeQcow2Overlay(f, 10*mib, base, vmm.FormatRaw); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0, 0, 0, 0, 0, 0, 0, 0x10}, 72); err != nil { // extended L2 entries
		t.Fatal(err)
	}
	f.Close()
	t.Run("qemu-img fails", func(t *testing.T) {
		dest := filepath.Join(dir, "fail.qcow2")
		_, err := NewCloner(nil, "false").Clone(t.Context(), CloneRequest{Base: featured, Dest: dest, Formats: []string{vmm.FormatQcow2}})
		if err == nil {
			t.Fatal("want an error")
		}
		mustNotExist(t, dest)
	})
	t.Run("qemu-img missing", func(t *testing.T) {
		dest := filepath.Join(dir, "missing.qcow2")
		_, err := NewCloner(nil, filepath.Join(dir, "no-qemu-img")).Clone(t.Context(), CloneRequest{Base: featured, Dest: dest, Formats: []string{vmm.FormatQcow2}})
		if err == nil {
			t.Fatal("want an error")
		}
		mustNotExist(t, dest)
	})
	t.Run("qcow2 overlay without qemu-img", func(t *testing.T) {
		dest := filepath.Join(dir, "no-qemu-img.qcow2")
		if _, err := NewCloner(nil, filepath.Join(dir, "no-qemu-img")).Clone(t.Context(), CloneRequest{Base: base, Dest: dest, Formats: []string{vmm.FormatQcow2}}); err != nil {
			t.Fatalf("a raw base's overlay needs no qemu-img: %v", err)
		}
	})
	t.Run("canceled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		for _, formats := range [][]string{{vmm.FormatQcow2}, {vmm.FormatRaw}} {
			dest := filepath.Join(dir, "canceled-"+formats[0])
			_, err := NewCloner(nil, "").Clone(ctx, CloneRequest{Base: base, Dest: dest, Formats: formats})
			if !errors.Is(err, context.Canceled) {
				t.Errorf("%v: err = %v, want context.Canceled", formats, err)
			}
			mustNotExist(t, dest)
		}
	})
	t.Run("canceled during sparse copy", func(t *testing.T) {
		big := filepath.Join(dir, "big.img")
		makeBase(t, big, 64*mib, 0, 8*mib, 16*mib, 24*mib, 32*mib, 40*mib, 48*mib, 56*mib)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		dest := filepath.Join(dir, "canceled-copy.img")
		_, err := CopyFile(ctx, big, dest, CopyOptions{NoReflink: true, Progress: func(done, total int64) {
			if done > 0 {
				cancel()
			}
		}})
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v, want context.Canceled", err)
		}
		mustNotExist(t, dest)
	})
}

func TestCloneBadRequests(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "rootfs.img")
	makeBase(t, base, mib, 0)
	empty := filepath.Join(dir, "empty.img")
	makeBase(t, empty, 0)
	cases := map[string]CloneRequest{
		"relative base": {Base: "rootfs.img", Dest: filepath.Join(dir, "a"), Formats: []string{vmm.FormatRaw}},
		"missing base":  {Base: filepath.Join(dir, "nope"), Dest: filepath.Join(dir, "b"), Formats: []string{vmm.FormatRaw}},
		"dir base":      {Base: dir, Dest: filepath.Join(dir, "c"), Formats: []string{vmm.FormatRaw}},
		"empty base":    {Base: empty, Dest: filepath.Join(dir, "d"), Formats: []string{vmm.FormatRaw}},
		"no formats":    {Base: base, Dest: filepath.Join(dir, "e")},
		"bad format":    {Base: base, Dest: filepath.Join(dir, "f"), Formats: []string{"vmdk"}},
		"negative size": {Base: base, Dest: filepath.Join(dir, "g"), Formats: []string{vmm.FormatRaw}, Size: -1},
		"dest is base":  {Base: base, Dest: base, Formats: []string{vmm.FormatRaw}},
		"no dest dir":   {Base: base, Dest: filepath.Join(dir, "x", "y"), Formats: []string{vmm.FormatRaw}},
	}
	for name, req := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := NewCloner(nil, "").Clone(t.Context(), req)
			if err == nil {
				t.Fatal("want an error")
			}
			t.Log(err)
			if req.Dest != base {
				mustNotExist(t, req.Dest)
			}
		})
	}
}

func TestReflinkSupportedProbe(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReflinkSupported(dir); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 0 {
		t.Errorf("probe left files behind: %v, %v", entries, err)
	}
	if _, err := ReflinkSupported(filepath.Join(dir, "missing")); err == nil {
		t.Error("probe of a missing directory: want an error")
	}
}

func TestVirtualSizeRaw(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "r.img")
	makeBase(t, p, 3*gib)
	if got, err := VirtualSize(t.Context(), p, vmm.FormatRaw); err != nil || got != 3*gib {
		t.Errorf("VirtualSize raw = %d, %v", got, err)
	}
	if _, err := VirtualSize(t.Context(), p, "vmdk"); err == nil {
		t.Error("unknown format: want an error")
	}
	if _, err := VirtualSize(t.Context(), filepath.Join(dir, "nope"), vmm.FormatRaw); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: err = %v", err)
	}
}

func TestCopyFile(t *testing.T) {
	for name, dir := range sparseDirs(t) {
		t.Run(name, func(t *testing.T) {
			src := filepath.Join(dir, "src.img")
			makeBase(t, src, 40*mib, 0, 20*mib)
			var last int64 = -1
			var calls int
			dst := filepath.Join(dir, "dst.img")
			strategy, err := CopyFile(t.Context(), src, dst, CopyOptions{Mode: 0o640, NoReflink: true, Progress: func(done, total int64) {
				calls++
				if total != 40*mib {
					t.Errorf("total = %d", total)
				}
				if done < last {
					t.Errorf("progress went back: %d after %d", done, last)
				}
				last = done
			}})
			if err != nil {
				t.Fatal(err)
			}
			if strategy != StrategySparseCopy {
				t.Errorf("strategy = %s", strategy)
			}
			if last != 40*mib || calls < 2 {
				t.Errorf("progress ended at %d after %d calls", last, calls)
			}
			if checksum(t, dst) != checksum(t, src) {
				t.Error("content differs")
			}
			if a := allocated(t, dst); a > 3*mib {
				t.Errorf("copy allocates %d bytes, want about 2 MiB", a)
			}
			if st, _ := os.Stat(dst); st.Mode().Perm() != 0o640 {
				t.Errorf("mode = %v, want 0640", st.Mode().Perm())
			}
			if _, err := CopyFile(t.Context(), src, dst, CopyOptions{}); !errors.Is(err, fs.ErrExist) {
				t.Errorf("copy onto an existing file: err = %v, want fs.ErrExist", err)
			}
		})
	}
}

func TestCopyFileReflinkXFS(t *testing.T) {
	mnt := mountXFS(t)
	src := filepath.Join(mnt, "src.img")
	makeBase(t, src, 64*mib, 0, 32*mib)
	dst := filepath.Join(mnt, "dst.img")
	var last int64
	strategy, err := CopyFile(t.Context(), src, dst, CopyOptions{Progress: func(done, total int64) { last = done }})
	if err != nil {
		t.Fatal(err)
	}
	if strategy != StrategyReflink || last != 64*mib {
		t.Errorf("strategy = %s, progress = %d", strategy, last)
	}
	if checksum(t, dst) != checksum(t, src) {
		t.Error("content differs")
	}
}

func benchmarkCloneQcow2(b *testing.B, size int64) {
	needTool(b, "qemu-img")
	dir := b.TempDir()
	base := filepath.Join(dir, "rootfs.img")
	makeBase(b, base, size, 0, size/2, size-mib)
	c := NewCloner(nil, "")
	i := 0
	var overlay int64
	for b.Loop() {
		dest := filepath.Join(dir, fmt.Sprintf("d%d.qcow2", i))
		i++
		if _, err := c.Clone(b.Context(), CloneRequest{Base: base, Dest: dest, Formats: []string{vmm.FormatQcow2, vmm.FormatRaw}}); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		st, err := os.Stat(dest)
		if err != nil {
			b.Fatal(err)
		}
		overlay = st.Size()
		os.Remove(dest)
		b.StartTimer()
	}
	b.ReportMetric(float64(overlay), "overlay-bytes")
}

func BenchmarkCloneQcow2_1GiB(b *testing.B)  { benchmarkCloneQcow2(b, gib) }
func BenchmarkCloneQcow2_20GiB(b *testing.B) { benchmarkCloneQcow2(b, 20*gib) }
