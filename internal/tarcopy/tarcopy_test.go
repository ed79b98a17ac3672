package tarcopy

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestEntryName(t *testing.T) {
	ok := map[string]string{
		"a":          "a",
		"./a":        "a",
		"a/b/":       "a/b",
		"./":         ".",
		"a//b/./c":   "a/b/c",
		"..a/b..":    "..a/b..",
		"dir/...":    "dir/...",
		"x/.hidden/": "x/.hidden",
	}
	for in, want := range ok {
		got, err := entryName(in)
		if err != nil || got != want {
			t.Errorf("entryName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "..", "../a", "a/../../b", "a/..", "/etc/passwd", "/", "a\x00b"} {
		if _, err := entryName(bad); !errors.Is(err, ErrUnsafePath) {
			t.Errorf("entryName(%q): %v, want ErrUnsafePath", bad, err)
		}
	}
}

func TestQuoteIsShort(t *testing.T) {
	q := quote(strings.Repeat("x", 10000))
	if len(q) > 80 {
		t.Errorf("quote of a long name is %d bytes", len(q))
	}
}

// entry describes one crafted tar entry.
type entry struct {
	name, body, link string
	typ              byte
	mode             int64
}

func tarOf(t *testing.T, entries ...entry) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range entries {
		typ := e.typ
		if typ == 0 {
			typ = tar.TypeReg
		}
		mode := e.mode
		if mode == 0 {
			mode = 0o644
			if typ == tar.TypeDir {
				mode = 0o755
			}
		}
		hdr := &tar.Header{Name: e.name, Typeflag: typ, Mode: mode, Linkname: e.link, ModTime: time.Unix(1600000000, 0)}
		if typ == tar.TypeReg {
			hdr.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if typ == tar.TypeReg {
			io.WriteString(tw, e.body)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// sparseClaim is a PAX GNU sparse 1.0 entry named name that claims
// realsize bytes and carries one byte of data, as a hostile guest could
// send it.
func sparseClaim(name string, realsize int64) []byte {
	mapBytes := []byte(fmt.Sprintf("1\n%d\n1\n", realsize-1))
	mapBytes = append(mapBytes, make([]byte, pad(int64(len(mapBytes))))...)
	body := paxRecord("GNU.sparse.major", "1") + paxRecord("GNU.sparse.minor", "0") +
		paxRecord("GNU.sparse.name", name) + paxRecord("GNU.sparse.realsize", strconv.FormatInt(realsize, 10))
	var out []byte
	out = append(out, ustar{name: "PaxHeaders.0/x", typ: tar.TypeXHeader, mode: 0o644, size: int64(len(body))}.block()...)
	out = append(out, body...)
	out = append(out, make([]byte, pad(int64(len(body))))...)
	size := int64(len(mapBytes)) + 1
	out = append(out, ustar{name: "GNUSparseFile.0/x", typ: tar.TypeReg, mode: 0o644, size: size}.block()...)
	out = append(out, mapBytes...)
	out = append(out, 'x')
	out = append(out, make([]byte, pad(size)+1024)...)
	return out
}

// snapshot lists every path under dir with its size and mode, to compare
// before and after a refused copy.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	m := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		content := ""
		if fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			content = string(b)
		}
		m[p] = fmt.Sprintf("%v %q", fi.Mode(), content)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestExtractRefusesHostileStreams feeds crafted streams, as a hostile
// guest would send them, and checks that each is refused with the right
// error, that nothing outside the destination changed and that the
// partial copy is gone while what was at the destination before stays.
func TestExtractRefusesHostileStreams(t *testing.T) {
	tests := []struct {
		name    string
		entries []entry
		raw     []byte // appended after the entries
		want    error
		mention string // the error names the offending entry
		archive bool
	}{
		{"dotdot", []entry{{name: "tree/", typ: tar.TypeDir}, {name: "tree/../../x", body: "pwned"}}, nil, ErrUnsafePath, "tree/../../x", false},
		{"absolute", []entry{{name: "tree/a", body: "a"}, {name: "/OUTSIDE/abs", body: "pwned"}}, nil, ErrUnsafePath, "/OUTSIDE/abs", false},
		{"symlink then write through", []entry{
			{name: "tree/", typ: tar.TypeDir},
			{name: "tree/evil", typ: tar.TypeSymlink, link: "/OUTSIDE"},
			{name: "tree/evil/pwned", body: "pwned"}}, nil, ErrUnsafePath, "tree/evil", false},
		{"relative symlink then mkdir through", []entry{
			{name: "tree/evil", typ: tar.TypeSymlink, link: "../../outside"},
			{name: "tree/evil/newdir/", typ: tar.TypeDir}}, nil, ErrUnsafePath, "tree/evil", false},
		{"symlinked parent inside the tree", []entry{
			{name: "tree/sub/", typ: tar.TypeDir},
			{name: "tree/l", typ: tar.TypeSymlink, link: "sub"},
			{name: "tree/l/f", body: "x"}}, nil, ErrUnsafePath, "tree/l", false},
		{"hard link outside", []entry{{name: "tree/f", body: "x"},
			{name: "tree/h", typ: tar.TypeLink, link: "../outside/secret"}}, nil, ErrUnsafePath, "tree/h", false},
		{"hard link to a file this copy did not write", []entry{{name: "tree/f", body: "x"},
			{name: "tree/h", typ: tar.TypeLink, link: "tree/old"}}, nil, ErrUnsafePath, "tree/old", false},
		{"hard link through a symlink", []entry{
			{name: "tree/s", typ: tar.TypeSymlink, link: "/OUTSIDE"},
			{name: "tree/h", typ: tar.TypeLink, link: "tree/s/secret"}}, nil, ErrUnsafePath, "tree/s/secret", false},
		{"entry outside the base name", []entry{{name: "tree/f", body: "x"},
			{name: "other/f", body: "x"}}, nil, ErrUnsafePath, "other/f", false},
		{"sibling with the base as prefix", []entry{{name: "treehouse", body: "x"}}, nil, ErrUnsafePath, "treehouse", false},
		{"fifo", []entry{{name: "tree/f", body: "x"}, {name: "tree/fifo", typ: tar.TypeFifo}}, nil, ErrSpecialFile, "tree/fifo", false},
		{"device node", []entry{{name: "tree/sda", typ: tar.TypeBlock}}, nil, ErrSpecialFile, "tree/sda", false},
		{"sparse claim past the limit", []entry{{name: "tree/f", body: "x"}}, sparseClaim("tree/huge", 1<<50), ErrTooLarge, "tree/huge", false},
		{"parent not in the stream", []entry{{name: "tree/a/b/c/d/f", body: "x"}}, nil, ErrUnsafePath, "tree/a", false},
		{"name past PATH_MAX", []entry{{name: "tree/" + strings.Repeat("a/", 3000) + "f", body: "x"}}, nil, ErrUnsafePath, "tree/" + strings.Repeat("a/", 3000) + "f", false},
		{"dense file past the limit", []entry{{name: "tree/big", body: strings.Repeat("x", 2<<20)}}, nil, ErrTooLarge, "tree/big", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := t.TempDir()
			outside := filepath.Join(base, "outside")
			os.Mkdir(outside, 0o755)
			os.WriteFile(filepath.Join(outside, "secret"), []byte("original"), 0o644)
			dest := filepath.Join(base, "dest")
			os.MkdirAll(filepath.Join(dest, "tree"), 0o755)
			os.WriteFile(filepath.Join(dest, "tree", "old"), []byte("kept"), 0o644)
			before := snapshot(t, base)

			var ents []entry
			for _, e := range tt.entries {
				e.name = strings.ReplaceAll(e.name, "/OUTSIDE", outside)
				e.link = strings.ReplaceAll(e.link, "/OUTSIDE", outside)
				ents = append(ents, e)
			}
			stream := tarOf(t, ents...)
			if tt.raw != nil {
				stream = append(stream[:len(stream)-1024], tt.raw...)
			}
			err := Extract(bytes.NewReader(stream), dest, ExtractOptions{Base: "tree", Archive: tt.archive, MaxFileSize: 1 << 20})
			if !errors.Is(err, tt.want) {
				t.Fatalf("extract: %v, want %v", err, tt.want)
			}
			mention := strings.ReplaceAll(tt.mention, "/OUTSIDE", outside)
			if !strings.Contains(err.Error(), quote(mention)) {
				t.Errorf("error %q does not name %q", err, mention)
			}
			after := snapshot(t, base)
			for p, v := range after {
				if before[p] != v {
					t.Errorf("%s: %s after the refused copy, was %s", p, v, before[p])
				}
			}
			for p := range before {
				if _, ok := after[p]; !ok {
					t.Errorf("%s removed by the refused copy", p)
				}
			}
		})
	}
}

func TestExtractRemovesTheDestinationItCreated(t *testing.T) {
	base := t.TempDir()
	dest := filepath.Join(base, "new", "dest")
	err := Extract(bytes.NewReader(tarOf(t,
		entry{name: "tree/", typ: tar.TypeDir}, entry{name: "tree/a/", typ: tar.TypeDir}, entry{name: "tree/a/b/", typ: tar.TypeDir},
		entry{name: "tree/a/b/f", body: "x"}, entry{name: "x/y", body: "x"})), dest, ExtractOptions{Base: "tree"})
	if !errors.Is(err, ErrUnsafePath) {
		t.Fatalf("extract: %v, want ErrUnsafePath", err)
	}
	if _, err := os.Lstat(filepath.Join(base, "new")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("destination parents left behind: %v", err)
	}
}

func TestExtractPreDestinationSymlink(t *testing.T) {
	// The destination already holds a symlink under the base name: an
	// entry through it is refused rather than written to its target.
	base := t.TempDir()
	outside := filepath.Join(base, "outside")
	os.Mkdir(outside, 0o755)
	dest := filepath.Join(base, "dest")
	os.Mkdir(dest, 0o755)
	os.Symlink(outside, filepath.Join(dest, "tree"))
	err := Extract(bytes.NewReader(tarOf(t, entry{name: "tree/f", body: "x"})), dest, ExtractOptions{Base: "tree"})
	if !errors.Is(err, ErrUnsafePath) {
		t.Fatalf("extract: %v, want ErrUnsafePath", err)
	}
	if _, err := os.Lstat(filepath.Join(outside, "f")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("file written through the symlink: %v", err)
	}
}

func TestExtractModesAndOwnership(t *testing.T) {
	stream := tarOf(t,
		entry{name: "tree/", typ: tar.TypeDir, mode: 0o1777},
		entry{name: "tree/suid", body: "x", mode: 0o4755},
		entry{name: "tree/sgid", body: "x", mode: 0o2711},
		entry{name: "tree/link", typ: tar.TypeSymlink, link: "suid"},
	)
	want := map[bool]map[string]fs.FileMode{
		false: {"tree": fs.ModeDir | 0o777, "tree/suid": 0o755, "tree/sgid": 0o711},
		true:  {"tree": fs.ModeDir | fs.ModeSticky | 0o777, "tree/suid": fs.ModeSetuid | 0o755, "tree/sgid": fs.ModeSetgid | 0o711},
	}
	for _, archive := range []bool{false, true} {
		t.Run(fmt.Sprintf("archive=%v", archive), func(t *testing.T) {
			dest := t.TempDir()
			opts := ExtractOptions{Base: "tree", Archive: archive}
			if os.Geteuid() == 0 {
				opts.Owner = &Owner{UID: 4321, GID: 4322}
			}
			if err := Extract(bytes.NewReader(stream), dest, opts); err != nil {
				t.Fatal(err)
			}
			for name, mode := range want[archive] {
				fi, err := os.Lstat(filepath.Join(dest, name))
				if err != nil {
					t.Fatal(err)
				}
				if fi.Mode() != mode {
					t.Errorf("%s: mode %v, want %v", name, fi.Mode(), mode)
				}
				if opts.Owner == nil {
					continue
				}
				st := fi.Sys().(*syscall.Stat_t)
				wantUID, wantGID := 4321, 4322
				if archive { // the stream's owner (tarOf writes 0)
					wantUID, wantGID = 0, 0
				}
				if int(st.Uid) != wantUID || int(st.Gid) != wantGID {
					t.Errorf("%s: owner %d:%d, want %d:%d", name, st.Uid, st.Gid, wantUID, wantGID)
				}
			}
		})
	}
}

func TestExtractSpecialFilesWithArchive(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("creating device nodes needs root")
	}
	dest := t.TempDir()
	err := Extract(bytes.NewReader(tarOf(t, entry{name: "tree/", typ: tar.TypeDir}, entry{name: "tree/fifo", typ: tar.TypeFifo})), dest, ExtractOptions{Base: "tree", Archive: true})
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(filepath.Join(dest, "tree", "fifo"))
	if err != nil || fi.Mode()&fs.ModeNamedPipe == 0 {
		t.Errorf("fifo: %v %v", fi, err)
	}
}

func TestExtractReplacesExistingFiles(t *testing.T) {
	dest := t.TempDir()
	os.MkdirAll(filepath.Join(dest, "tree"), 0o750)
	os.WriteFile(filepath.Join(dest, "tree", "f"), []byte("old"), 0o644)
	os.WriteFile(filepath.Join(dest, "tree", "keep"), []byte("keep"), 0o644)
	err := Extract(bytes.NewReader(tarOf(t,
		entry{name: "tree/", typ: tar.TypeDir},
		entry{name: "tree/f", body: "new"},
		entry{name: "tree/s", typ: tar.TypeSymlink, link: "/etc/passwd"},
		entry{name: "tree/s", body: "over the symlink"},
		entry{name: "tree/h", typ: tar.TypeLink, link: "tree/f"},
	)), dest, ExtractOptions{Base: "tree"})
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"f": "new", "keep": "keep", "s": "over the symlink", "h": "new"} {
		if b, err := os.ReadFile(filepath.Join(dest, "tree", name)); err != nil || string(b) != want {
			t.Errorf("%s: %q %v, want %q", name, b, err, want)
		}
	}
	// The existing directory was merged into and kept its mode (the
	// stream says 0755).
	if fi, err := os.Stat(filepath.Join(dest, "tree")); err != nil || fi.Mode() != fs.ModeDir|0o750 {
		t.Errorf("existing directory: %v %v, want its mode kept", fi.Mode(), err)
	}
	ents, _ := os.ReadDir(filepath.Join(dest, "tree"))
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".banger-cp-") {
			t.Errorf("temporary file %s left", e.Name())
		}
	}
}

// makeSparse creates a file of size bytes with a little data at the given
// offsets and holes elsewhere.
func makeSparse(t *testing.T, p string, size int64, offsets ...int64) {
	t.Helper()
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for _, off := range offsets {
		if _, err := f.WriteAt([]byte("data at "+strconv.FormatInt(off, 10)), off); err != nil {
			t.Fatal(err)
		}
	}
}

func allocated(t *testing.T, p string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestSparseRoundTrip(t *testing.T) {
	src := filepath.Join(t.TempDir(), "tree")
	os.Mkdir(src, 0o755)
	const size = 256 << 20
	makeSparse(t, filepath.Join(src, "sparse"), size, 1<<20, 100<<20+7)
	makeSparse(t, filepath.Join(src, "data-at-end"), 64<<20, 64<<20-3)
	makeSparse(t, filepath.Join(src, "all-hole"), 32<<20)
	os.WriteFile(filepath.Join(src, "dense"), bytes.Repeat([]byte("dense"), 1000), 0o644)
	// Zero runs inside a dense file, not on block boundaries.
	var mixed []byte
	for i, n := range []int{10000, 20000, 5000, 3000, 4096, 8192, 1} {
		mixed = append(mixed, bytes.Repeat([]byte{byte(i % 2 * 'm')}, n)...)
	}
	os.WriteFile(filepath.Join(src, "mixed"), mixed, 0o644)
	if a := allocated(t, filepath.Join(src, "sparse")); a > 1<<20 {
		t.Skipf("the test filesystem doesn't keep holes (%d bytes allocated)", a)
	}

	mtime := time.Date(2021, 2, 3, 4, 5, 6, 789_000_000, time.UTC)
	os.Chtimes(filepath.Join(src, "sparse"), mtime, mtime)
	var stream bytes.Buffer
	var announced, entries int64
	err := Write(&stream, src, WriteOptions{Announce: func(s, e int64) error { announced, entries = s, e; return nil }})
	if err != nil {
		t.Fatal(err)
	}
	if int64(stream.Len()) != announced || entries != 6 {
		t.Errorf("stream of %d bytes, %d entries announced as %d bytes", stream.Len(), entries, announced)
	}
	if stream.Len() > 128<<10 {
		t.Errorf("stream of %d bytes for %d bytes of data: holes were sent", stream.Len(), 3*20+5000)
	}
	if tarBin, err := exec.LookPath("tar"); err == nil {
		// GNU tar reads the sparse entries too.
		cmd := exec.Command(tarBin, "-tvf", "-")
		cmd.Stdin = bytes.NewReader(stream.Bytes())
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "tree/sparse") || !strings.Contains(string(out), strconv.Itoa(size)) {
			t.Errorf("tar -tv: %v\n%s", err, out)
		}
	}

	dest := t.TempDir()
	if err := Extract(bytes.NewReader(stream.Bytes()), dest, ExtractOptions{Base: "tree"}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"sparse", "data-at-end", "all-hole", "dense", "mixed"} {
		want, _ := os.ReadFile(filepath.Join(src, name))
		got, err := os.ReadFile(filepath.Join(dest, "tree", name))
		if err != nil || !bytes.Equal(want, got) {
			t.Errorf("%s: content differs (%d bytes, want %d): %v", name, len(got), len(want), err)
		}
	}
	for _, name := range []string{"sparse", "data-at-end", "all-hole"} {
		if a := allocated(t, filepath.Join(dest, "tree", name)); a > 64<<10 {
			t.Errorf("%s: %d bytes allocated on the host, want about its data size", name, a)
		}
	}
	if fi, _ := os.Stat(filepath.Join(dest, "tree", "sparse")); fi == nil || fi.Size() != size || !fi.ModTime().Equal(mtime) {
		t.Errorf("sparse: %v, want size %d and mtime %v", fi, size, mtime)
	}
}

func TestWriteStopsWhenSourceGrows(t *testing.T) {
	src := filepath.Join(t.TempDir(), "f")
	os.WriteFile(src, []byte("short"), 0o644)
	err := Write(io.Discard, src, WriteOptions{Announce: func(int64, int64) error {
		return os.WriteFile(src, bytes.Repeat([]byte("longer"), 1000), 0o644)
	}})
	if !errors.Is(err, ErrSourceChanged) {
		t.Errorf("write: %v, want ErrSourceChanged", err)
	}
}

func TestWriteAnnouncesItsExactSize(t *testing.T) {
	src := filepath.Join(t.TempDir(), "tree")
	long := filepath.Join(src, strings.Repeat("long-name-", 15))
	os.MkdirAll(long, 0o755)
	os.WriteFile(filepath.Join(long, "f"), bytes.Repeat([]byte("x"), 300_001), 0o644)
	os.WriteFile(filepath.Join(src, "empty"), nil, 0o600)
	os.Symlink("empty", filepath.Join(src, "link"))
	os.Link(filepath.Join(src, "empty"), filepath.Join(src, "hard"))
	makeSparse(t, filepath.Join(src, "sparse"), 10<<20, 5<<20)
	var stream bytes.Buffer
	var announced, entries int64
	if err := Write(&stream, src, WriteOptions{Announce: func(s, e int64) error { announced, entries = s, e; return nil }}); err != nil {
		t.Fatal(err)
	}
	if int64(stream.Len()) != announced || entries != 7 {
		t.Errorf("stream of %d bytes announced as %d bytes, %d entries (want 7)", stream.Len(), announced, entries)
	}
	dest := t.TempDir()
	if err := Extract(bytes.NewReader(stream.Bytes()), dest, ExtractOptions{Base: "tree"}); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dest, "tree", strings.Repeat("long-name-", 15), "f")); err != nil || len(b) != 300_001 {
		t.Errorf("long-named file: %d bytes, %v", len(b), err)
	}
}

// TestExtractFromRollsBackAfterTheEndMarker: a stream that fails after a
// complete tar (what vm cp gets when the daemon reports, after relaying
// the whole tar, that the guest sent more than it announced) removes the
// copy, and only the copy: what the destination held before stays, a
// file the copy replaced included.
func TestExtractFromRollsBackAfterTheEndMarker(t *testing.T) {
	stream := tarOf(t, entry{name: "tree/", typ: tar.TypeDir}, entry{name: "tree/f", body: "new"},
		entry{name: "tree/sub/", typ: tar.TypeDir}, entry{name: "tree/sub/g", body: "new"})
	errGuest := errors.New("the guest misbehaved")
	for name, tail := range map[string][]byte{
		"error after the end marker":    nil,
		"bytes and an error after it":   make([]byte, 10240),
		"error after a trailing record": bytes.Repeat([]byte{0xff}, 700),
	} {
		t.Run(name, func(t *testing.T) {
			dest := t.TempDir()
			// A tree/ directory is there already, with a file of its own.
			if err := os.MkdirAll(filepath.Join(dest, "tree"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dest, "tree", "mine"), []byte("mine"), 0o644); err != nil {
				t.Fatal(err)
			}
			// and tree/f, which the stream replaces: it comes back.
			if err := os.WriteFile(filepath.Join(dest, "tree", "f"), []byte("old"), 0o600); err != nil {
				t.Fatal(err)
			}
			before := snapshot(t, dest)
			err := ExtractFrom(func(w io.Writer) error {
				if _, err := w.Write(append(stream, tail...)); err != nil {
					return err
				}
				return errGuest
			}, dest, ExtractOptions{Base: "tree"})
			if !errors.Is(err, errGuest) || !strings.Contains(err.Error(), "partial copy was removed") {
				t.Fatalf("extract: %v, want the stream's error", err)
			}
			if after := snapshot(t, dest); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Errorf("destination after the failed copy:\n%v\nwant what was there before:\n%v", after, before)
			}
		})
	}
	t.Run("success reads past the end marker", func(t *testing.T) {
		dest := t.TempDir()
		err := ExtractFrom(func(w io.Writer) error {
			if _, err := w.Write(stream); err != nil {
				return err
			}
			_, err := w.Write(make([]byte, 10240)) // tar padding to a record
			return err
		}, dest, ExtractOptions{Base: "tree"})
		if err != nil {
			t.Fatalf("extract: %v", err)
		}
		if b, err := os.ReadFile(filepath.Join(dest, "tree", "sub", "g")); err != nil || string(b) != "new" {
			t.Errorf("tree/sub/g = %q, %v; want \"new\"", b, err)
		}
	})
}

func TestWriteStopsWhenSourceGainsEntries(t *testing.T) {
	// Fewer bytes but more entries than announced: a file of 4 KiB
	// becomes three empty files.
	src := filepath.Join(t.TempDir(), "tree")
	os.Mkdir(src, 0o755)
	os.WriteFile(filepath.Join(src, "a"), make([]byte, 4096), 0o644)
	var announced int64
	var out bytes.Buffer
	err := Write(&out, src, WriteOptions{Announce: func(size, entries int64) error {
		announced = size
		os.Remove(filepath.Join(src, "a"))
		for _, n := range []string{"b", "c", "d"} {
			if err := os.WriteFile(filepath.Join(src, n), nil, 0o644); err != nil {
				return err
			}
		}
		return nil
	}})
	if !errors.Is(err, ErrSourceChanged) {
		t.Errorf("write: %v, want ErrSourceChanged", err)
	}
	if int64(out.Len()) > announced {
		t.Errorf("wrote %d bytes, more than the %d announced", out.Len(), announced)
	}
}

// TestExtractRollsBackAReplacedNewEntry: an entry this copy created and
// then replaced is removed, with what it replaced, on error.
func TestExtractRollsBackAReplacedNewEntry(t *testing.T) {
	dest := t.TempDir()
	err := Extract(bytes.NewReader(tarOf(t,
		entry{name: "tree/", typ: tar.TypeDir},
		entry{name: "tree/x", body: "first"},
		entry{name: "tree/x", body: "second"},
		entry{name: "tree/../escape", body: "no"},
	)), dest, ExtractOptions{Base: "tree"})
	if !errors.Is(err, ErrUnsafePath) {
		t.Fatalf("extract: %v, want ErrUnsafePath", err)
	}
	if ents, _ := os.ReadDir(dest); len(ents) != 0 {
		t.Errorf("%d entries left in the destination: %v", len(ents), ents)
	}
}

// TestExtractModesWithoutChmod: files are created with their final
// permission bits when the umask keeps them (no chmod then), and get the
// stream's mode whatever the umask strips.
func TestExtractModesWithoutChmod(t *testing.T) {
	modes := []int64{0o644, 0o640, 0o600, 0o444, 0o666, 0o777, 0o700, 0o000}
	var ents []entry
	for _, m := range modes {
		ents = append(ents, entry{name: fmt.Sprintf("tree/f%o", m), body: "x", mode: m})
		if m == 0 {
			ents[len(ents)-1].mode = 0o1000 // tarOf's 0 means default; the sticky bit is dropped
		}
	}
	dest := t.TempDir()
	old := syscall.Umask(0o027)
	defer syscall.Umask(old)
	err := Extract(bytes.NewReader(tarOf(t, append([]entry{{name: "tree/", typ: tar.TypeDir}}, ents...)...)), dest, ExtractOptions{Base: "tree"})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range modes {
		fi, err := os.Lstat(filepath.Join(dest, "tree", fmt.Sprintf("f%o", m)))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != fs.FileMode(m) {
			t.Errorf("f%o: mode %v, want %v", m, fi.Mode(), fs.FileMode(m))
		}
	}
}

// TestExtractFailedCreateKeepsExistingEntry: an entry whose creation
// fails for another reason than an existing name (a symlink with an empty
// target) over an existing file leaves that file.
func TestExtractFailedCreateKeepsExistingEntry(t *testing.T) {
	dest := t.TempDir()
	os.MkdirAll(filepath.Join(dest, "tree"), 0o755)
	os.WriteFile(filepath.Join(dest, "tree", "f"), []byte("mine"), 0o644)
	err := Extract(bytes.NewReader(tarOf(t,
		entry{name: "tree/", typ: tar.TypeDir},
		entry{name: "tree/f", typ: tar.TypeSymlink, link: ""},
	)), dest, ExtractOptions{Base: "tree"})
	if err == nil {
		t.Fatal("extract of a symlink with an empty target succeeded")
	}
	if b, err := os.ReadFile(filepath.Join(dest, "tree", "f")); err != nil || string(b) != "mine" {
		t.Errorf("tree/f = %q, %v after the failed copy; want it kept", b, err)
	}
}

// TestExtractDeepTree: parents deeper than the descriptor cache keeps,
// and moves between branches of the tree.
func TestExtractDeepTree(t *testing.T) {
	var ents []entry
	dir := "tree"
	ents = append(ents, entry{name: dir + "/", typ: tar.TypeDir})
	for i := range maxCachedDepth + 5 {
		dir += fmt.Sprintf("/d%d", i)
		ents = append(ents, entry{name: dir + "/", typ: tar.TypeDir}, entry{name: dir + "/f", body: dir})
	}
	ents = append(ents, entry{name: "tree/d0/g", body: "g"}, entry{name: "tree/other/", typ: tar.TypeDir},
		entry{name: "tree/other/h", body: "h"}, entry{name: dir + "/last", body: "last"})
	dest := t.TempDir()
	if err := Extract(bytes.NewReader(tarOf(t, ents...)), dest, ExtractOptions{Base: "tree"}); err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.typ == tar.TypeDir {
			continue
		}
		if b, err := os.ReadFile(filepath.Join(dest, e.name)); err != nil || string(b) != e.body {
			t.Errorf("%s = %q, %v; want %q", e.name, b, err, e.body)
		}
	}
}

// TestWriteLooksForHolesOnlyInSparseFiles: files whose blocks cover their
// size are neither searched for holes nor opened by the counting walk,
// and a file with holes is still found and sent sparse.
func TestWriteLooksForHolesOnlyInSparseFiles(t *testing.T) {
	src := filepath.Join(t.TempDir(), "tree")
	os.MkdirAll(filepath.Join(src, "sub"), 0o755)
	for i := range 10 {
		os.WriteFile(filepath.Join(src, "sub", fmt.Sprint(i)), bytes.Repeat([]byte{'d'}, 1000), 0o644)
	}
	os.WriteFile(filepath.Join(src, "big"), bytes.Repeat([]byte{'b'}, 3<<20), 0o644)
	os.WriteFile(filepath.Join(src, "empty"), nil, 0o644)
	makeSparse(t, filepath.Join(src, "sparse"), 64<<20, 1<<20)
	if a := allocated(t, filepath.Join(src, "sparse")); a > 1<<20 {
		t.Skipf("the test filesystem doesn't keep holes (%d bytes allocated)", a)
	}
	for _, sizeOnly := range []bool{true, false} {
		var out io.Writer = new(bytes.Buffer)
		if sizeOnly {
			out = new(counter)
		}
		wk := &walker{w: out, sizeOnly: sizeOnly, maxEntries: -1, names: &ownerNames{users: map[int]string{}, groups: map[int]string{}}, log: logger(nil)}
		if _, err := wk.run(src, nil); err != nil {
			t.Fatal(err)
		}
		if wk.holeScans != 1 || wk.entries != 15 {
			t.Errorf("sizeOnly=%v: %d files searched for holes, %d entries; want 1 and 15", sizeOnly, wk.holeScans, wk.entries)
		}
		if sizeOnly {
			continue
		}
		stream := out.(*bytes.Buffer)
		if stream.Len() > 4<<20 {
			t.Errorf("stream of %d bytes: the holes were sent", stream.Len())
		}
		dest := t.TempDir()
		if err := Extract(stream, dest, ExtractOptions{Base: "tree"}); err != nil {
			t.Fatal(err)
		}
		if a := allocated(t, filepath.Join(dest, "tree", "sparse")); a > 1<<20 {
			t.Errorf("sparse: %d bytes allocated", a)
		}
		got, err := os.ReadFile(filepath.Join(dest, "tree", "sub", "9"))
		if err != nil || !bytes.Equal(got, bytes.Repeat([]byte{'d'}, 1000)) {
			t.Errorf("sub/9: %d bytes, %v", len(got), err)
		}
	}
}

// TestWriteSingleEntries: the entry of a copy of a single file and of
// a symlink given as the source.
func TestWriteSingleEntries(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o600)
	os.Symlink("f", filepath.Join(dir, "l"))
	for src, want := range map[string]string{"f": "f 0 1", "l": "l 2 0"} {
		var b bytes.Buffer
		if err := Write(&b, filepath.Join(dir, src), WriteOptions{}); err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(&b)
		hdr, err := tr.Next()
		if err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprintf("%s %c %d", hdr.Name, hdr.Typeflag, hdr.Size); got != want {
			t.Errorf("%s: entry %q, want %q", src, got, want)
		}
		if _, err := tr.Next(); !errors.Is(err, io.EOF) {
			t.Errorf("%s: more than one entry: %v", src, err)
		}
	}
}

// TestWriteFromRecords: the writing walk after Announce's counting walk
// takes the entries it recorded (or, past maxRecords, looks again) and
// writes the stream a single walk writes; a file that shrank or went
// since fails it.
func TestWriteFromRecords(t *testing.T) {
	src := filepath.Join(t.TempDir(), "tree")
	os.MkdirAll(filepath.Join(src, "a", "b"), 0o755)
	os.WriteFile(filepath.Join(src, "a", "b", "f"), []byte("f"), 0o644)
	os.WriteFile(filepath.Join(src, "a", "g"), bytes.Repeat([]byte("g"), 200_000), 0o644)
	os.Symlink("a/g", filepath.Join(src, "l"))
	os.Link(filepath.Join(src, "a", "g"), filepath.Join(src, "h"))
	os.WriteFile(filepath.Join(src, "z"), nil, 0o644)
	var single bytes.Buffer
	if err := Write(&single, src, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	names := func() *ownerNames { return &ownerNames{users: map[int]string{}, groups: map[int]string{}} }
	for _, max := range []int{1 << 16, 7, 3} {
		var c counter
		count := &walker{w: &c, sizeOnly: true, maxEntries: -1, maxRecords: max, names: names(), log: logger(nil)}
		seen, err := count.run(src, nil)
		if err != nil {
			t.Fatal(err)
		}
		if (seen != nil) != (max >= 7) {
			t.Errorf("maxRecords %d: recorded %v for 8 entries", max, seen != nil)
		}
		var out bytes.Buffer
		write := &walker{w: &out, maxEntries: count.entries, names: names(), log: logger(nil)}
		if _, err := write.run(src, seen); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), single.Bytes()) || int64(out.Len()) != c.n {
			t.Errorf("maxRecords %d: stream of %d bytes (counted %d) differs from a single walk's (%d bytes)", max, out.Len(), c.n, single.Len())
		}
	}
	for name, change := range map[string]func() error{
		"shrank":      func() error { return os.Truncate(filepath.Join(src, "a", "g"), 100) },
		"went":        func() error { return os.Remove(filepath.Join(src, "a", "b", "f")) },
		"dir went":    func() error { return os.RemoveAll(filepath.Join(src, "a", "b")) },
		"now symlink": func() error { os.Remove(filepath.Join(src, "z")); return os.Symlink("a", filepath.Join(src, "z")) },
	} {
		t.Run(name, func(t *testing.T) {
			var c counter
			count := &walker{w: &c, sizeOnly: true, maxEntries: -1, maxRecords: 1 << 16, names: names(), log: logger(nil)}
			seen, err := count.run(src, nil)
			if err != nil || seen == nil {
				t.Fatal(err)
			}
			if err := change(); err != nil {
				t.Fatal(err)
			}
			defer func() { // put the tree back
				os.RemoveAll(src)
				os.MkdirAll(filepath.Join(src, "a", "b"), 0o755)
				os.WriteFile(filepath.Join(src, "a", "b", "f"), []byte("f"), 0o644)
				os.WriteFile(filepath.Join(src, "a", "g"), bytes.Repeat([]byte("g"), 200_000), 0o644)
				os.Symlink("a/g", filepath.Join(src, "l"))
				os.Link(filepath.Join(src, "a", "g"), filepath.Join(src, "h"))
				os.WriteFile(filepath.Join(src, "z"), nil, 0o644)
			}()
			write := &walker{w: io.Discard, maxEntries: count.entries, names: names(), log: logger(nil)}
			if _, err := write.run(src, seen); !errors.Is(err, ErrSourceChanged) {
				t.Errorf("write after the tree changed: %v, want ErrSourceChanged", err)
			}
		})
	}
}

// TestExtractNeedsTheEndMarker cuts a stream where one entry ends and the
// next begins, and inside the end marker: archive/tar takes such a
// stream for a whole one, Extract must not (a copy cut there would pass
// for complete, its last entries missing).
func TestExtractNeedsTheEndMarker(t *testing.T) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	var cuts []int                             // where each entry begins, then where the marker does
	long := "tree/" + strings.Repeat("n", 150) // a PAX header before it
	for _, e := range []struct {
		name string
		typ  byte
		body []byte
	}{
		{"tree/", tar.TypeDir, nil},
		{"tree/zeros", tar.TypeReg, make([]byte, 1500)}, // ends with zeros, then padding
		{long, tar.TypeReg, []byte("long")},
		{"tree/empty", tar.TypeReg, nil},
		{"tree/last", tar.TypeReg, make([]byte, 512)},
	} {
		if err := tw.Flush(); err != nil {
			t.Fatal(err)
		}
		cuts = append(cuts, b.Len())
		hdr := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: 0o644, Size: int64(len(e.body)), ModTime: time.Unix(1600000000, 0)}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		tw.Write(e.body)
	}
	tw.Flush()
	marker := b.Len()
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	stream := b.Bytes()
	if len(stream) != marker+1024 {
		t.Fatalf("stream of %d bytes, the marker at %d", len(stream), marker)
	}
	cuts = append(cuts[1:], marker, marker+512)

	for _, cut := range cuts {
		t.Run(fmt.Sprint("cut at ", cut), func(t *testing.T) {
			dest := t.TempDir()
			os.WriteFile(filepath.Join(dest, "mine"), []byte("mine"), 0o644)
			before := snapshot(t, dest)
			err := Extract(bytes.NewReader(stream[:cut]), dest, ExtractOptions{})
			if !errors.Is(err, io.ErrUnexpectedEOF) || !strings.Contains(err.Error(), "end marker") {
				t.Fatalf("extract of the stream cut at %d of %d bytes: %v, want a missing end marker", cut, len(stream), err)
			}
			if after := snapshot(t, dest); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Errorf("destination after the cut copy:\n%v\nwant what was there before:\n%v", after, before)
			}
		})
	}
	for name, s := range map[string][]byte{
		"whole":            stream,
		"record padding":   append(slices.Clone(stream), make([]byte, 10240-len(stream)%10240)...),
		"only the marker":  make([]byte, 1024),
		"no entries, tail": append(make([]byte, 1024), "after the marker"...),
	} {
		t.Run(name, func(t *testing.T) {
			if err := Extract(bytes.NewReader(s), t.TempDir(), ExtractOptions{}); err != nil {
				t.Fatalf("extract: %v", err)
			}
		})
	}
}
