package tarcopy

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrSourceChanged is returned by Write when the stream would be larger,
// or hold more entries, than it announced (a file grew or was created
// during the copy).
var ErrSourceChanged = errors.New("source changed during the copy")

// WriteOptions tune Write.
type WriteOptions struct {
	// Announce, when set, is called before the first byte of the stream
	// with its exact size in bytes and its number of entries. Write then
	// walks the tree twice, and fails with ErrSourceChanged rather than
	// write more bytes or entries than it announced.
	Announce func(size, entries int64) error
	// Log receives debug messages; nil discards them.
	Log *slog.Logger
}

// Write writes a tar stream of the file or directory at src (absolute)
// to w. The top entry is named after the base name of src ("." for "/").
// Symlinks are stored as links, hard links within the tree as TypeLink
// entries; sockets are skipped. Files with holes (found with
// SEEK_DATA/SEEK_HOLE) are stored as PAX GNU sparse 1.0 entries, which
// carry only their data.
func Write(w io.Writer, src string, opts WriteOptions) error {
	opts.Log = logger(opts.Log)
	if !filepath.IsAbs(src) {
		return fmt.Errorf("source %q: not an absolute path", src)
	}
	src = filepath.Clean(src)
	if _, err := os.Lstat(src); err != nil {
		return fmt.Errorf("stat source: %w", err)
	}
	maxEntries := int64(-1)
	if opts.Announce != nil {
		var c counter
		entries, err := walkTree(&c, src, true, -1, opts.Log)
		if err != nil {
			return fmt.Errorf("write tar of %s: %w", src, err)
		}
		if err := opts.Announce(c.n, entries); err != nil {
			return err
		}
		w = &capWriter{w: w, left: c.n}
		maxEntries = entries
	}
	if _, err := walkTree(w, src, false, maxEntries, opts.Log); err != nil {
		return fmt.Errorf("write tar of %s: %w", src, err)
	}
	return nil
}

// counter counts and discards what is written to it.
type counter struct{ n int64 }

func (c *counter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// capWriter refuses to write more than left bytes.
type capWriter struct {
	w    io.Writer
	left int64
}

func (c *capWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > c.left {
		return 0, ErrSourceChanged
	}
	n, err := c.w.Write(p)
	c.left -= int64(n)
	return n, err
}

// walkTree writes the tar stream of src to w and returns its number of
// entries, failing with ErrSourceChanged past maxEntries (when >= 0). With sizeOnly, w is a *counter and file contents are not read:
// the counter receives the headers and counts the contents.
func walkTree(w io.Writer, src string, sizeOnly bool, maxEntries int64, log *slog.Logger) (int64, error) {
	top := filepath.Base(src)
	if top == "/" {
		top = "."
	}
	type inode struct{ dev, ino uint64 }
	links := map[inode]string{}
	tw := tar.NewWriter(w)
	var entries int64
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		name := top
		if rel != "." {
			name = path.Join(top, filepath.ToSlash(rel))
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if fi.Mode()&fs.ModeSocket != 0 {
			log.Debug("copy: skipping socket", "path", p)
			return nil
		}
		var link string
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		hdr.Name = name
		if fi.IsDir() {
			hdr.Name += "/"
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && fi.Mode().IsRegular() && st.Nlink > 1 {
			key := inode{uint64(st.Dev), st.Ino}
			if first, seen := links[key]; seen {
				hdr.Typeflag = tar.TypeLink
				hdr.Linkname = first
				hdr.Size = 0
			} else {
				links[key] = name
			}
		}
		entries++
		if maxEntries >= 0 && entries > maxEntries {
			return ErrSourceChanged
		}
		if hdr.Typeflag != tar.TypeReg {
			return tw.WriteHeader(hdr)
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		segs, err := dataSegments(f, hdr.Size)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if isSparse(segs, hdr.Size) {
			return writeSparse(w, tw, hdr, segs, f, sizeOnly)
		}
		if sizeOnly {
			// The header as tw would write it, then the padded content,
			// without reading (or copying zeros for) the file.
			if err := tar.NewWriter(w).WriteHeader(hdr); err != nil {
				return err
			}
			w.(*counter).n += hdr.Size + pad(hdr.Size)
			return nil
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if _, err := io.CopyN(tw, f, hdr.Size); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return entries, tw.Close()
}

// segment is a data region of a file.
type segment struct{ off, len int64 }

// dataSegments returns the data regions of the first size bytes of f, from
// SEEK_DATA/SEEK_HOLE; where the filesystem can't tell, the whole file is
// data.
func dataSegments(f *os.File, size int64) ([]segment, error) {
	whole := []segment{{0, size}}
	if size == 0 {
		return nil, nil
	}
	fd := int(f.Fd())
	var segs []segment
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole up to the end
		}
		if err != nil {
			return whole, nil //nolint:nilerr // no SEEK_DATA support: all data
		}
		if data >= size {
			break
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return whole, nil //nolint:nilerr // as above
		}
		hole = min(hole, size)
		segs = append(segs, segment{data, hole - data})
		off = hole
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	return segs, nil
}

func isSparse(segs []segment, size int64) bool {
	var n int64
	for _, s := range segs {
		n += s.len
	}
	return n < size
}

// writeSparse writes a regular file with holes as a PAX GNU sparse 1.0
// entry: a PAX header (GNU.sparse.major/minor/name/realsize, and what
// ustar can't hold), a ustar header named GNUSparseFile.0/..., then the
// data map (count, then offset and length per line, padded to a block) and
// the data regions. Go's archive/tar reads this format but can't write it,
// so the entry is written here, straight to w, between two entries of tw.
func writeSparse(w io.Writer, tw *tar.Writer, hdr *tar.Header, segs []segment, f *os.File, sizeOnly bool) error {
	if err := tw.Flush(); err != nil {
		return err
	}
	var sparseMap strings.Builder
	fmt.Fprintf(&sparseMap, "%d\n", len(segs))
	var dataLen int64
	for _, s := range segs {
		fmt.Fprintf(&sparseMap, "%d\n%d\n", s.off, s.len)
		dataLen += s.len
	}
	mapBytes := []byte(sparseMap.String())
	mapBytes = append(mapBytes, make([]byte, pad(int64(len(mapBytes))))...)

	u := ustar{
		name:  "GNUSparseFile.0/" + shortASCII(path.Base(hdr.Name)),
		typ:   tar.TypeReg,
		mode:  hdr.Mode & 0o7777,
		uid:   int64(hdr.Uid),
		gid:   int64(hdr.Gid),
		size:  int64(len(mapBytes)) + dataLen,
		mtime: hdr.ModTime.Unix(),
	}
	records := map[string]string{
		"GNU.sparse.major":    "1",
		"GNU.sparse.minor":    "0",
		"GNU.sparse.name":     hdr.Name,
		"GNU.sparse.realsize": strconv.FormatInt(hdr.Size, 10),
		"mtime":               strconv.FormatInt(hdr.ModTime.Unix(), 10) + "." + fmt.Sprintf("%09d", hdr.ModTime.Nanosecond()),
	}
	if hdr.Uname != "" {
		records["uname"] = hdr.Uname
	}
	if hdr.Gname != "" {
		records["gname"] = hdr.Gname
	}
	// Numbers ustar can't hold go to PAX records (0 in the header).
	for k, v := range map[string]*int64{"uid": &u.uid, "gid": &u.gid, "size": &u.size} {
		if *v < 0 || *v > 0o7777777 && k != "size" || *v > 0o77777777777 {
			records[k] = strconv.FormatInt(*v, 10)
			*v = 0
		}
	}
	if u.mtime < 0 || u.mtime > 0o77777777777 {
		u.mtime = 0
	}
	size := int64(len(mapBytes)) + dataLen
	var body strings.Builder
	for _, k := range slices.Sorted(maps.Keys(records)) {
		body.WriteString(paxRecord(k, records[k]))
	}
	pax := ustar{name: "PaxHeaders.0/sparse", typ: tar.TypeXHeader, mode: 0o644, size: int64(body.Len())}
	out := pax.block()
	out = append(out, body.String()...)
	out = append(out, make([]byte, pad(int64(body.Len())))...)
	out = append(out, u.block()...)
	out = append(out, mapBytes...)
	if _, err := w.Write(out); err != nil {
		return err
	}
	for _, s := range segs {
		if sizeOnly {
			w.(*counter).n += s.len
			continue
		}
		if n, err := io.CopyN(w, io.NewSectionReader(f, s.off, s.len), s.len); err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("file shrank: %w", ErrSourceChanged)
			}
			return fmt.Errorf("%s: at %d: %w", hdr.Name, s.off+n, err)
		}
	}
	_, err := w.Write(make([]byte, pad(size)))
	return err
}

func pad(n int64) int64 { return (512 - n%512) % 512 }

// shortASCII keeps a name usable in a ustar name field.
func shortASCII(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c < 0x20 || c > 0x7e {
			b[i] = '_'
		}
	}
	if len(b) > 80 {
		b = b[:80]
	}
	return string(b)
}

// ustar is the content of a ustar header block; numbers must fit.
type ustar struct {
	name                        string
	typ                         byte
	mode, uid, gid, size, mtime int64
}

func (u ustar) block() []byte {
	blk := make([]byte, 512)
	copy(blk[0:100], u.name)
	copy(blk[100:108], fmt.Sprintf("%07o\x00", u.mode))
	copy(blk[108:116], fmt.Sprintf("%07o\x00", u.uid))
	copy(blk[116:124], fmt.Sprintf("%07o\x00", u.gid))
	copy(blk[124:136], fmt.Sprintf("%011o\x00", u.size))
	copy(blk[136:148], fmt.Sprintf("%011o\x00", u.mtime))
	blk[156] = u.typ
	copy(blk[257:263], "ustar\x00")
	copy(blk[263:265], "00")
	copy(blk[148:156], "        ")
	var sum int64
	for _, c := range blk {
		sum += int64(c)
	}
	copy(blk[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return blk
}

// paxRecord formats "LEN key=value\n", LEN counting itself.
func paxRecord(k, v string) string {
	rest := " " + k + "=" + v + "\n"
	n := len(rest) + 1
	for n < len(strconv.Itoa(n))+len(rest) {
		n++
	}
	return strconv.Itoa(n) + rest
}
