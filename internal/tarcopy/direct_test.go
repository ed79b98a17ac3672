package tarcopy

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestExtractDirectIO: with DirectIO a large file's data is written past
// the page cache (none of its pages are cached after the copy but the
// tail's, written through it), its zero blocks stay holes, and its bytes
// are the stream's; without DirectIO the same file is cached. A file
// below DirectMin is written through the page cache.
func TestExtractDirectIO(t *testing.T) {
	big := make([]byte, DirectMin+1<<20+2*4096+123)
	rand.Read(big)
	clear(big[4<<20 : 5<<20]) // a hole in the middle
	small := make([]byte, 1<<20)
	rand.Read(small)
	stream := tarOf(t, entry{name: "big", body: string(big)}, entry{name: "small", body: string(small)})

	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	// Residency tells only where O_DIRECT bypasses the page cache: not
	// on tmpfs (its files are page cache), not where it is refused.
	checkCache := st.Type != unix.TMPFS_MAGIC && directWorks(t, dir)

	for _, direct := range []bool{true, false} {
		dest := filepath.Join(dir, map[bool]string{true: "direct", false: "buffered"}[direct])
		if err := Extract(bytes.NewReader(stream), dest, ExtractOptions{DirectIO: direct}); err != nil {
			t.Fatalf("direct=%v: %v", direct, err)
		}
		bigPath := filepath.Join(dest, "big")
		if checkCache {
			res := resident(t, bigPath)
			last := len(res) - 1
			cachedData := 0
			for i, r := range res[:last] {
				if r && (i < 4<<20/4096 || i >= 5<<20/4096) {
					cachedData++
				}
			}
			if direct && (cachedData != 0 || !res[last]) {
				t.Errorf("DirectIO: %d data pages of %s cached (want 0), tail cached %v (want true)", cachedData, bigPath, res[last])
			}
			if !direct && cachedData == 0 {
				t.Errorf("without DirectIO no page of %s is cached", bigPath)
			}
			if sres := resident(t, filepath.Join(dest, "small")); !sres[0] {
				t.Errorf("direct=%v: the small file was not written through the page cache", direct)
			}
		}
		fi, err := os.Stat(bigPath)
		if err != nil {
			t.Fatal(err)
		}
		if alloc := fi.Sys().(*syscall.Stat_t).Blocks * 512; alloc > int64(len(big))-1<<20+64<<10 {
			t.Errorf("direct=%v: %d bytes allocated for %d with a 1 MiB hole", direct, alloc, len(big))
		}
		for name, want := range map[string][]byte{"big": big, "small": small} {
			got, err := os.ReadFile(filepath.Join(dest, name))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("direct=%v: %s differs from the stream's", direct, name)
			}
		}
	}
}

// directWorks tells whether O_DIRECT writes in dir bypass the page cache:
// one aligned page written with it is not cached (tmpfs takes the flag
// and caches; some file systems refuse it at fcntl, others at write).
func directWorks(t *testing.T, dir string) bool {
	t.Helper()
	f, err := os.CreateTemp(dir, "direct")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if setDirect(int(f.Fd()), true) != nil {
		return false
	}
	page := alignedBuf(directAlign, 0)
	page[0] = 1
	if _, err := f.WriteAt(page, 0); err != nil {
		return false
	}
	return !resident(t, f.Name())[0]
}

// alignedBuf returns n bytes starting skew bytes past a directAlign
// boundary.
func alignedBuf(n, skew int) []byte {
	b := make([]byte, n+2*directAlign)
	o := int(uintptr(unsafe.Pointer(&b[0])) % directAlign)
	start := (directAlign-o)%directAlign + skew
	return b[start : start+n : start+n]
}

// TestCopyDirectFallsBack: writes the file system refuses (EINVAL: here
// the buffer is one byte off its alignment) go through the page cache, and
// the file is still the stream's, holes and tail included.
func TestCopyDirectFallsBack(t *testing.T) {
	dir := t.TempDir()
	if !directWorks(t, dir) {
		t.Skip("O_DIRECT doesn't bypass the page cache in", dir)
	}
	data := make([]byte, 3<<20+100)
	rand.Read(data)
	clear(data[1<<20 : 2<<20])
	f, err := os.Create(filepath.Join(dir, "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	if err := setDirect(fd, true); err != nil {
		t.Fatal(err)
	}
	x := &extractor{dbuf: alignedBuf(directBufSize, 1)}
	end, err := x.copyDirect(fd, bytes.NewReader(data), int64(len(data)))
	if err != nil || end != int64(len(data)) {
		t.Fatalf("copyDirect: end %d, %v; want %d", end, err, len(data))
	}
	if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err != nil || flags&unix.O_DIRECT != 0 {
		t.Fatalf("O_DIRECT still set after a refused write (flags %#x, %v)", flags, err)
	}
	got, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the file differs from the stream")
	}
}

// resident tells, per page of the file at path, whether it is in the page
// cache.
func resident(t *testing.T, path string) []bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+4095)/4096)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal("mincore:", errno)
	}
	res := make([]bool, len(vec))
	for i, v := range vec {
		res[i] = v&1 != 0
	}
	return res
}
