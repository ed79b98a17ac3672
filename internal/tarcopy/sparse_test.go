package tarcopy

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestSourceHidesSparseMajor: through tarSource, archive/tar hands a
// PAX GNU sparse 1.0 entry over as a regular file holding its map and
// data (no zeros for its holes), and sparse1x0 restores its name and
// apparent size.
func TestSourceHidesSparseMajor(t *testing.T) {
	src := filepath.Join(t.TempDir(), "tree")
	os.Mkdir(src, 0o755)
	makeSparse(t, filepath.Join(src, "sparse"), 1<<30, 5<<20)
	if a := allocated(t, filepath.Join(src, "sparse")); a > 1<<20 {
		t.Skipf("the test filesystem doesn't keep holes (%d bytes allocated)", a)
	}
	var stream bytes.Buffer
	if err := Write(&stream, src, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	s := newTarSource(bytes.NewReader(stream.Bytes()))
	tr := tar.NewReader(s)
	var names []string
	for {
		if _, err := io.Copy(io.Discard, tr); err != nil {
			t.Fatal(err)
		}
		s.beginHeaders()
		hdr, err := tr.Next()
		s.endHeaders()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		physical := hdr.Size
		sparse, err := sparse1x0(hdr)
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, hdr.Name)
		if hdr.Name != "tree/sparse" {
			continue
		}
		if !sparse || hdr.Size != 1<<30 || physical > 8192 {
			t.Errorf("sparse entry: sparse=%v, size %d, %d bytes of content", sparse, hdr.Size, physical)
		}
		segs, err := readSparseMap(tr, hdr.Size)
		if err != nil || len(segs) != 1 || segs[0].off != 5<<20 {
			t.Errorf("sparse map: %v, %v", segs, err)
		}
	}
	if fmt.Sprint(names) != "[tree/ tree/sparse]" {
		t.Errorf("entries %v", names)
	}
}

// TestSourceKeepsLookalikes: names and contents that look like the
// sparse record come through unchanged, in ustar fields, PAX paths, GNU
// long names and file contents.
func TestSourceKeepsLookalikes(t *testing.T) {
	rec := paxRecord("GNU.sparse.major", "1")
	long := "tree/" + strings.Repeat("l", 120) + rec
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	files := map[string]string{
		"tree/GNU.sparse.major=1": rec + rec,
		"tree/" + rec:             "GNU.sparse.major=1\n",
		"tree/é" + rec:            rec,
		long:                      strings.Repeat(rec, 1000),
	}
	tw.WriteHeader(&tar.Header{Name: "tree/", Typeflag: tar.TypeDir, Mode: 0o755})
	for name, body := range files {
		format := tar.FormatPAX
		if name == long {
			format = tar.FormatGNU
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body)), Format: format}); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, body)
	}
	tw.Close()
	dest := t.TempDir()
	if err := Extract(bytes.NewReader(b.Bytes()), dest, ExtractOptions{Base: "tree"}); err != nil {
		t.Fatal(err)
	}
	for name, body := range files {
		got, err := os.ReadFile(filepath.Join(dest, name))
		if err != nil || string(got) != body {
			t.Errorf("%q: %q, %v; want %q", name, got, err, body)
		}
	}
}

// sparseStream is a PAX GNU sparse 1.0 entry tree/s of apparent size
// realsize with the given map text (padded here) and data, then the end
// of the archive.
func sparseStream(realsize int64, mapText, data string) []byte {
	mapBytes := []byte(mapText)
	mapBytes = append(mapBytes, make([]byte, pad(int64(len(mapBytes))))...)
	body := paxRecord("GNU.sparse.major", "1") + paxRecord("GNU.sparse.minor", "0") +
		paxRecord("GNU.sparse.name", "tree/s") + paxRecord("GNU.sparse.realsize", strconv.FormatInt(realsize, 10))
	var out []byte
	out = append(out, ustar{name: "tree/", typ: tar.TypeDir, mode: 0o755}.block()...)
	out = append(out, ustar{name: "PaxHeaders.0/s", typ: tar.TypeXHeader, mode: 0o644, size: int64(len(body))}.block()...)
	out = append(out, body...)
	out = append(out, make([]byte, pad(int64(len(body))))...)
	size := int64(len(mapBytes) + len(data))
	out = append(out, ustar{name: "GNUSparseFile.0/s", typ: tar.TypeReg, mode: 0o644, size: size}.block()...)
	out = append(out, mapBytes...)
	out = append(out, data...)
	out = append(out, make([]byte, pad(size)+1024)...)
	return out
}

func TestExtractSparseEntries(t *testing.T) {
	const mib = 1 << 20
	dest := t.TempDir()
	data := strings.Repeat("a", 5000) + strings.Repeat("b", 3)
	err := Extract(bytes.NewReader(sparseStream(100*mib, fmt.Sprintf("2\n%d\n5000\n%d\n3\n", mib, 100*mib-3), data)), dest, ExtractOptions{Base: "tree"})
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dest, "tree", "s")
	fi, err := os.Stat(p)
	if err != nil || fi.Size() != 100*mib {
		t.Fatalf("tree/s: %v, %v; want %d bytes", fi, err, 100*mib)
	}
	if a := allocated(t, p); a > 64<<10 {
		t.Errorf("tree/s: %d bytes allocated, want about its data", a)
	}
	f, _ := os.Open(p)
	defer f.Close()
	for off, want := range map[int64]string{0: "\x00\x00", mib - 1: "\x00aa", mib + 4999: "a\x00", 100*mib - 4: "\x00bbb"} {
		got := make([]byte, len(want))
		if _, err := f.ReadAt(got, off); err != nil || string(got) != want {
			t.Errorf("at %d: %q, %v; want %q", off, got, err, want)
		}
	}

	// A file ending with a hole, and one with no data at all.
	for _, tt := range []struct{ mapText, data string }{{"1\n0\n2\n", "xy"}, {"0\n", ""}} {
		dest := t.TempDir()
		if err := Extract(bytes.NewReader(sparseStream(10*mib, tt.mapText, tt.data)), dest, ExtractOptions{Base: "tree"}); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(dest, "tree", "s"))
		if err != nil || len(got) != 10*mib || string(got[:len(tt.data)]) != tt.data {
			t.Errorf("map %q: %d bytes, %v", tt.mapText, len(got), err)
		}
	}
}

// TestExtractRefusesHostileSparseEntries: bad maps, data that doesn't
// match the map and sizes past the limit are refused, leaving nothing.
func TestExtractRefusesHostileSparseEntries(t *testing.T) {
	const limit = 1 << 30
	tests := []struct {
		name, mapText, data string
		realsize            int64
		want                error
	}{
		{"region past the end", "1\n100\n10\n", "0123456789", 105, tar.ErrHeader},
		{"regions overlap", "2\n0\n10\n5\n10\n", strings.Repeat("x", 20), 1000, tar.ErrHeader},
		{"regions out of order", "2\n100\n1\n0\n1\n", "xy", 1000, tar.ErrHeader},
		{"negative offset", "1\n-1\n1\n", "x", 1000, tar.ErrHeader},
		{"huge count", "99999999999\n", "", 1000, tar.ErrHeader},
		{"offset overflow", "1\n9223372036854775807\n9223372036854775807\n", "", 1000, tar.ErrHeader},
		{"not a number", "1\nzero\n1\n", "x", 1000, tar.ErrHeader},
		{"more data than the map", "1\n0\n1\n", "xyz", 1000, tar.ErrHeader},
		{"less data than the map", "1\n0\n100\n", "xyz", 1000, io.ErrUnexpectedEOF},
		{"truncated map", "2\n0\n1\n", "", 1000, io.ErrUnexpectedEOF},
		{"map longer than 1 MiB", "1" + strings.Repeat("0", 2<<20) + "\n", "", 1000, tar.ErrHeader},
		{"claim past the limit", "1\n0\n1\n", "x", limit + 1, ErrTooLarge},
		{"negative size", "0\n", "", -5, tar.ErrHeader},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dest := filepath.Join(t.TempDir(), "dest")
			err := Extract(bytes.NewReader(sparseStream(tt.realsize, tt.mapText, tt.data)), dest, ExtractOptions{Base: "tree", MaxFileSize: limit})
			if !errors.Is(err, tt.want) {
				t.Fatalf("extract: %v, want %v", err, tt.want)
			}
			if !strings.Contains(err.Error(), `"tree/s"`) {
				t.Errorf("error %q does not name tree/s", err)
			}
			if _, err := os.Lstat(dest); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("destination left after the refused copy: %v", err)
			}
		})
	}
}

// TestExtractGNUTarSparse: GNU tar's own PAX sparse 1.0 archives.
func TestExtractGNUTarSparse(t *testing.T) {
	tarBin, err := exec.LookPath("tar")
	if err != nil {
		t.Skip("no tar")
	}
	src := t.TempDir()
	os.Mkdir(filepath.Join(src, "tree"), 0o755)
	makeSparse(t, filepath.Join(src, "tree", "s"), 300<<20, 0, 7<<20, 300<<20-9)
	if a := allocated(t, filepath.Join(src, "tree", "s")); a > 1<<20 {
		t.Skipf("the test filesystem doesn't keep holes (%d bytes allocated)", a)
	}
	out, err := exec.Command(tarBin, "-C", src, "--format=posix", "--sparse", "--sparse-version=1.0", "-cf", "-", "tree").Output()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(out, []byte(sparseMajorRecord)) {
		t.Fatal("GNU tar wrote no sparse 1.0 entry")
	}
	dest := t.TempDir()
	if err := Extract(bytes.NewReader(out), dest, ExtractOptions{Base: "tree"}); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(filepath.Join(src, "tree", "s"))
	got, err := os.ReadFile(filepath.Join(dest, "tree", "s"))
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("tree/s differs (%d bytes, want %d): %v", len(got), len(want), err)
	}
	if a := allocated(t, filepath.Join(dest, "tree", "s")); a > 1<<20 {
		t.Errorf("tree/s: %d bytes allocated", a)
	}
}
