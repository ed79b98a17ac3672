package disk

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/vmm"
)

// qemuCheck runs `qemu-img check` on a qcow2 image and fails the test on
// any error, leak or corruption it reports.
func qemuCheck(t *testing.T, path string) {
	t.Helper()
	out := run(t, "qemu-img", "check", "-f", "qcow2", path)
	if !strings.Contains(out, "No errors were found") {
		t.Errorf("qemu-img check %s:\n%s", path, out)
	}
}

// wantInfo checks qemu-img's view of an overlay.
func wantInfo(t *testing.T, path, backing, backingFmt string, size int64) {
	t.Helper()
	info := qemuInfo(t, path)
	if info["format"] != "qcow2" {
		t.Errorf("format = %v, want qcow2", info["format"])
	}
	if info["backing-filename"] != backing {
		t.Errorf("backing-filename = %v, want %q", info["backing-filename"], backing)
	}
	if info["backing-filename-format"] != backingFmt {
		t.Errorf("backing-filename-format = %v, want %s", info["backing-filename-format"], backingFmt)
	}
	if vs, _ := info["virtual-size"].(float64); int64(vs) != size {
		t.Errorf("virtual-size = %v, want %d", info["virtual-size"], size)
	}
}

// sameData fails unless the overlay, converted to raw by qemu-img (every
// read going through its backing file), holds base's bytes followed by
// zeros up to its virtual size.
func sameData(t *testing.T, overlay, base string, size int64) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "converted.raw")
	run(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", overlay, out)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(want)) < size {
		want = append(want, make([]byte, size-int64(len(want)))...)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("overlay %s converted to raw (%d bytes) differs from its base %s padded to %d bytes", overlay, len(got), base, size)
	}
}

func TestQcow2OverlaySizes(t *testing.T) {
	needTool(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.img")
	makeBase(t, base, mib, 0)
	for _, tc := range []struct {
		name       string
		size, want int64
	}{
		{"1MiB", mib, mib},
		{"1GiB", gib, gib},
		{"20GiB", 20 * gib, 20 * gib},
		{"not a multiple of the cluster", gib + 3*512, gib + 3*512},
		{"not a multiple of the sector", 3*mib + 1000, 3*mib + 1024},
		{"L1 table over two clusters", 5 << 40, 5 << 40}, // 5 TiB: 80 KiB of L1 table
	} {
		t.Run(tc.name, func(t *testing.T) {
			dest := filepath.Join(t.TempDir(), "root")
			res, err := NewCloner(nil, "/nonexistent/qemu-img").Clone(t.Context(), CloneRequest{
				Base: base, Dest: dest, Formats: []string{vmm.FormatQcow2}, Size: tc.size,
			})
			if err != nil {
				t.Fatal(err)
			}
			if res.Size != tc.want || res.Format != vmm.FormatQcow2 || res.Strategy != StrategyQcow2Overlay {
				t.Errorf("result = %+v, want a qcow2 overlay of %d bytes", res, tc.want)
			}
			qemuCheck(t, dest)
			wantInfo(t, dest, base, vmm.FormatRaw, tc.want)
			if got, err := VirtualSize(t.Context(), dest, vmm.FormatQcow2); err != nil || got != tc.want {
				t.Errorf("VirtualSize = %d, %v; want %d", got, err, tc.want)
			}
			if st, err := os.Stat(dest); err != nil || st.Size() > 4*mib {
				t.Errorf("overlay file: %v, %v; want a few clusters of metadata", st, err)
			}
			if tc.size <= 16*mib {
				sameData(t, dest, base, tc.want)
			}
		})
	}
}

func TestQcow2OverlayMatchesQemuImg(t *testing.T) {
	// The overlay's structures sit where qemu-img puts them: the same
	// refcount table, refcount block and L1 table offsets and sizes.
	needTool(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.img")
	makeBase(t, base, mib, 0)
	for _, size := range []int64{mib, 20 * gib} {
		ours := filepath.Join(dir, "ours.qcow2")
		theirs := filepath.Join(dir, "theirs.qcow2")
		os.Remove(ours)
		os.Remove(theirs)
		if _, err := NewCloner(nil, "").Clone(t.Context(), CloneRequest{Base: base, Dest: ours, Formats: []string{vmm.FormatQcow2}, Size: size}); err != nil {
			t.Fatal(err)
		}
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, theirs, strconv.FormatInt(size, 10))
		a, b := readAll(t, ours), readAll(t, theirs)
		for _, f := range []struct {
			name     string
			off, len int
		}{{"version", 4, 4}, {"cluster_bits", 20, 4}, {"size", 24, 8}, {"l1_size", 36, 4}, {"l1_table_offset", 40, 8},
			{"refcount_table_offset", 48, 8}, {"refcount_table_clusters", 56, 4}, {"refcount_order", 96, 4}} {
			if !bytes.Equal(a[f.off:f.off+f.len], b[f.off:f.off+f.len]) {
				t.Errorf("size %d: %s = %x, qemu-img's %x", size, f.name, a[f.off:f.off+f.len], b[f.off:f.off+f.len])
			}
		}
		if len(a) != len(b) {
			t.Errorf("size %d: file is %d bytes, qemu-img's %d", size, len(a), len(b))
		}
		for _, region := range []int64{qcow2ClusterSize, 2 * qcow2ClusterSize, 3 * qcow2ClusterSize} {
			end := min(region+qcow2ClusterSize, int64(len(a)), int64(len(b)))
			if !bytes.Equal(a[region:end], b[region:end]) {
				t.Errorf("size %d: cluster at %#x differs from qemu-img's", size, region)
			}
		}
	}
}

func readAll(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestQcow2OverlayBackingNameWithSpaces(t *testing.T) {
	needTool(t, "qemu-img")
	dir := filepath.Join(t.TempDir(), "my images", "debian 12")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(dir, "root fs (v2).img")
	makeBase(t, base, 2*mib, 0, mib)
	dest := filepath.Join(t.TempDir(), "root")
	res, err := NewCloner(nil, "").Clone(t.Context(), CloneRequest{Base: base, Dest: dest, Formats: []string{vmm.FormatQcow2}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Size != 2*mib {
		t.Errorf("size = %d, want the base's %d", res.Size, 2*mib)
	}
	qemuCheck(t, dest)
	wantInfo(t, dest, base, vmm.FormatRaw, 2*mib)
	if got, err := BackingFile(dest); err != nil || got != base {
		t.Errorf("BackingFile = %q, %v; want %q", got, err, base)
	}
	sameData(t, dest, base, 2*mib)
}

func TestQcow2OverlayOfQcow2(t *testing.T) {
	needTool(t, "qemu-img")
	dir := t.TempDir()
	raw := filepath.Join(dir, "raw.img")
	makeBase(t, raw, 4*mib, 0, 3*mib)
	// A qcow2 base of its own data (not an overlay), with a virtual size
	// unlike its file's.
	base := filepath.Join(dir, "base.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)
	t.Run("default size", func(t *testing.T) {
		dest := filepath.Join(t.TempDir(), "root")
		res, err := NewCloner(nil, "/nonexistent/qemu-img").Clone(t.Context(), CloneRequest{Base: base, Dest: dest, Formats: []string{vmm.FormatQcow2}})
		if err != nil {
			t.Fatal(err)
		}
		if res.Size != 4*mib {
			t.Errorf("size = %d, want the base's virtual size %d", res.Size, 4*mib)
		}
		qemuCheck(t, dest)
		wantInfo(t, dest, base, vmm.FormatQcow2, 4*mib)
		sameData(t, dest, raw, 4*mib)
	})
	t.Run("larger", func(t *testing.T) {
		dest := filepath.Join(t.TempDir(), "root")
		if _, err := NewCloner(nil, "/nonexistent/qemu-img").Clone(t.Context(), CloneRequest{Base: base, Dest: dest, Formats: []string{vmm.FormatQcow2}, Size: 8 * mib}); err != nil {
			t.Fatal(err)
		}
		qemuCheck(t, dest)
		wantInfo(t, dest, base, vmm.FormatQcow2, 8*mib)
		sameData(t, dest, raw, 8*mib)
	})
	t.Run("smaller than its virtual size", func(t *testing.T) {
		dest := filepath.Join(t.TempDir(), "root")
		// Above the file's size, below the virtual size.
		size := max(3*mib, fileSize(t, base)+512)
		if _, err := NewCloner(nil, "").Clone(t.Context(), CloneRequest{Base: base, Dest: dest, Formats: []string{vmm.FormatQcow2}, Size: size}); err == nil {
			t.Fatalf("a %d-byte overlay of a 4 MiB image: want an error", size)
		}
		mustNotExist(t, dest)
	})
	t.Run("header not read here: qemu-img makes it", func(t *testing.T) {
		// A qcow2 base with an incompatible feature (extended L2
		// entries): this package reads no feature.
		old := filepath.Join(t.TempDir(), "extl2.qcow2")
		if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on", raw, old).CombinedOutput(); err != nil {
			t.Skipf("this qemu-img makes no extended L2 image: %v: %s", err, out)
		}
		if binary.BigEndian.Uint64(readAll(t, old)[72:]) == 0 {
			t.Fatal("qemu-img made an extended L2 image without an incompatible feature bit")
		}
		dest := filepath.Join(t.TempDir(), "root")
		log, buf := logBuffer()
		res, err := NewCloner(log, "").Clone(t.Context(), CloneRequest{Base: old, Dest: dest, Formats: []string{vmm.FormatQcow2}})
		if err != nil {
			t.Fatal(err)
		}
		if res.Size != 4*mib {
			t.Errorf("size = %d, want %d", res.Size, 4*mib)
		}
		if !strings.Contains(buf.String(), "by=qemu-img") {
			t.Errorf("log does not say qemu-img made it: %s", buf)
		}
		qemuCheck(t, dest)
		wantInfo(t, dest, old, vmm.FormatQcow2, 4*mib)
		sameData(t, dest, raw, 4*mib)
	})
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func TestQcow2Layout(t *testing.T) {
	// No qemu-img needed: the header's fields where the format puts them.
	f, err := os.Create(filepath.Join(t.TempDir(), "o.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, err := writeQcow2Overlay(f, 20*gib+1, "/images/a b.img", vmm.FormatRaw)
	if err != nil {
		t.Fatal(err)
	}
	if size != 20*gib+512 {
		t.Errorf("size = %d, want %d", size, 20*gib+512)
	}
	b := readAll(t, f.Name())
	be := binary.BigEndian
	h, err := readQcow2Header(bytes.NewReader(b), f.Name())
	if err != nil || h.version != 3 || h.size != 20*gib+512 || h.incompat != 0 {
		t.Errorf("header = %+v, %v", h, err)
	}
	if l1 := be.Uint32(b[36:]); l1 != 41 {
		t.Errorf("l1_size = %d, want 41 (20 GiB + 512 bytes in 512 MiB L2 tables)", l1)
	}
	if got := int64(len(b)); got != 3*qcow2ClusterSize+41*8 {
		t.Errorf("file is %d bytes, want the L1 table's end %d", got, 3*qcow2ClusterSize+41*8)
	}
	off, n := be.Uint64(b[8:]), be.Uint32(b[16:])
	if got := string(b[off : off+uint64(n)]); got != "/images/a b.img" {
		t.Errorf("backing file name = %q", got)
	}
	if got := be.Uint64(b[qcow2ClusterSize:]); got != 2*qcow2ClusterSize {
		t.Errorf("refcount table's first entry = %#x, want the block at %#x", got, 2*qcow2ClusterSize)
	}
	for i := range 5 {
		want := uint16(0)
		if i < 4 {
			want = 1
		}
		if got := be.Uint16(b[2*qcow2ClusterSize+2*i:]); got != want {
			t.Errorf("refcount of cluster %d = %d, want %d", i, got, want)
		}
	}
	for _, bad := range []struct {
		size         int64
		backing, fmt string
	}{{0, "/b", "raw"}, {-1, "/b", "raw"}, {mib, "", "raw"}, {mib, "/" + strings.Repeat("x", 1023), "raw"}, {mib, "/b", "vmdk"}, {5 << 50, "/b", "raw"}} { // 5 PiB: past qemu's L1 limit
		if _, err := newQcow2Layout(bad.size, bad.backing, bad.fmt); err == nil {
			t.Errorf("layout of %d bytes, backing %.10q (%s): want an error", bad.size, bad.backing, bad.fmt)
		}
	}
}
