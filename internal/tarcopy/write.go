package tarcopy

import (
	"archive/tar"
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/user"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrSourceChanged is returned by Write when the stream would differ
// from what it announced: more bytes or entries (a file grew or was
// created during the copy), or a file it counted that shrank, went or was
// replaced (another file, a FIFO).
var ErrSourceChanged = errors.New("source changed during the copy")

// WriteOptions tune Write.
type WriteOptions struct {
	// Announce, when set, is called before the first byte of the stream
	// with its exact size in bytes and its number of entries. Write then
	// walks the tree twice, and fails with ErrSourceChanged rather than
	// write more bytes or entries than it announced.
	Announce func(size, entries int64) error
	// WriteSize is the size of Write's writes to w (it buffers the
	// stream): a writer that frames its writes gives its payload size.
	// 0 means 32 KiB.
	WriteSize int
	// Log receives debug messages; nil discards them.
	Log *slog.Logger
}

// defaultWriteSize is WriteOptions.WriteSize's default.
const defaultWriteSize = 32 << 10

// Write writes a tar stream of the file or directory at src (absolute)
// to w. The top entry is named after the base name of src ("." for "/").
// Symlinks are stored as links, hard links within the tree as TypeLink
// entries; sockets are skipped. Files with holes (found with
// SEEK_DATA/SEEK_HOLE) are stored as PAX GNU sparse 1.0 entries, which
// carry only their data.
//
// Each entry costs few system calls (a guest pays dearly for each):
// directories are walked by descriptor, an entry is a stat relative to
// its directory, a regular file an open, its reads and a close; holes
// are looked for only in files with fewer blocks than their size; the
// counting walk of Announce opens only those.
func Write(w io.Writer, src string, opts WriteOptions) error {
	opts.Log = logger(opts.Log)
	if !filepath.IsAbs(src) {
		return fmt.Errorf("source %q: not an absolute path", src)
	}
	src = filepath.Clean(src)
	if _, err := os.Lstat(src); err != nil {
		return fmt.Errorf("stat source: %w", err)
	}
	if opts.WriteSize <= 0 {
		opts.WriteSize = defaultWriteSize
	}
	names := &ownerNames{users: map[int]string{}, groups: map[int]string{}}
	maxEntries := int64(-1)
	var seen *record
	if opts.Announce != nil {
		var c counter
		wk := &walker{w: &c, sizeOnly: true, maxEntries: -1, names: names, log: opts.Log, maxRecords: maxRecords}
		var err error
		if seen, err = wk.run(src, nil); err != nil {
			return fmt.Errorf("write tar of %s: %w", src, err)
		}
		if err := opts.Announce(c.n, wk.entries); err != nil {
			return err
		}
		w = &capWriter{w: w, left: c.n}
		maxEntries = wk.entries
	}
	bw := bufio.NewWriterSize(w, opts.WriteSize)
	wk := &walker{w: bw, maxEntries: maxEntries, names: names, log: opts.Log}
	_, err := wk.run(src, seen)
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
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

// maxRecords bounds the entries the counting walk of Announce records
// for the writing walk (about 200 bytes each): past it, the writing walk
// looks at the tree again.
const maxRecords = 1 << 16

// record is what the counting walk saw of an entry: the writing walk
// takes the entry's metadata (and a directory's list) from it instead of
// asking again, and fails with ErrSourceChanged when a file grew, shrank
// or went.
type record struct {
	leaf     string
	st       unix.Stat_t
	link     string
	children []record
}

// walker writes the tar stream of a tree to w, or, with sizeOnly (w is
// then a *counter), counts it without reading file contents.
type walker struct {
	// maxRecords, when > 0, has run record the tree, up to that many
	// entries; recorded counts them.
	maxRecords, recorded int
	w                    io.Writer
	tw                   *tar.Writer
	sizeOnly             bool
	maxEntries           int64 // fail with ErrSourceChanged past it, when >= 0
	entries              int64
	links                map[inode]string
	names                *ownerNames
	buf                  []byte
	dirBuf               []byte
	log                  *slog.Logger
	// holeScans counts the files searched for holes (tests).
	holeScans int
}

type inode struct{ dev, ino uint64 }

// run walks src; seen is what a previous walk recorded of it (nil:
// nothing). It returns what it recorded, nil if the tree had more than
// wk.maxRecords entries.
func (wk *walker) run(src string, seen *record) (*record, error) {
	top := filepath.Base(src)
	if top == "/" {
		top = "."
	}
	wk.tw = tar.NewWriter(wk.w)
	wk.links = map[inode]string{}
	dir, leaf := filepath.Split(src)
	if leaf == "" { // "/"
		dir, leaf = "/", "."
	}
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	defer unix.Close(dfd)
	var out *record
	if wk.maxRecords > 0 {
		out = new(record)
	}
	if err := wk.entry(dfd, leaf, top, src, seen, out); err != nil {
		return nil, err
	}
	if wk.recorded > wk.maxRecords {
		out = nil
	}
	return out, wk.tw.Close()
}

// entry writes the entry leaf of directory dfd, named name in the stream
// (p in errors), and, for a directory, what it holds. seen, when not nil,
// is what a previous walk saw of it; out, when not nil, receives what
// this walk sees.
func (wk *walker) entry(dfd int, leaf, name, p string, seen, out *record) error {
	var st unix.Stat_t
	var link string
	if seen != nil {
		st, link = seen.st, seen.link
	} else {
		if err := unix.Fstatat(dfd, leaf, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			var err error
			if link, err = readlinkat(dfd, leaf); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
		}
	}
	if out != nil {
		out.leaf, out.st, out.link = leaf, st, link
	}
	hdr := &tar.Header{
		Name:       name,
		Mode:       int64(st.Mode & 0o7777),
		Uid:        int(st.Uid),
		Gid:        int(st.Gid),
		Uname:      wk.names.user(int(st.Uid)),
		Gname:      wk.names.group(int(st.Gid)),
		ModTime:    time.Unix(st.Mtim.Unix()),
		AccessTime: time.Unix(st.Atim.Unix()),
		ChangeTime: time.Unix(st.Ctim.Unix()),
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		hdr.Typeflag, hdr.Size = tar.TypeReg, st.Size
	case unix.S_IFDIR:
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"
	case unix.S_IFLNK:
		hdr.Typeflag = tar.TypeSymlink
		hdr.Linkname = link
	case unix.S_IFCHR, unix.S_IFBLK:
		hdr.Typeflag = tar.TypeChar
		if st.Mode&unix.S_IFMT == unix.S_IFBLK {
			hdr.Typeflag = tar.TypeBlock
		}
		hdr.Devmajor, hdr.Devminor = int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
	case unix.S_IFIFO:
		hdr.Typeflag = tar.TypeFifo
	case unix.S_IFSOCK:
		wk.log.Debug("copy: skipping socket", "path", p)
		return nil
	default:
		return fmt.Errorf("%s: unknown file type %#o", p, st.Mode&unix.S_IFMT)
	}
	if hdr.Typeflag == tar.TypeReg && st.Nlink > 1 {
		key := inode{uint64(st.Dev), st.Ino}
		if first, seen := wk.links[key]; seen {
			hdr.Typeflag = tar.TypeLink
			hdr.Linkname = first
			hdr.Size = 0
		} else {
			wk.links[key] = name
		}
	}
	wk.entries++
	if wk.maxEntries >= 0 && wk.entries > wk.maxEntries {
		return ErrSourceChanged
	}
	switch hdr.Typeflag {
	case tar.TypeReg:
		return wk.file(dfd, leaf, p, hdr, &st, seen != nil)
	case tar.TypeDir:
		if err := wk.tw.WriteHeader(hdr); err != nil {
			return err
		}
		return wk.dir(dfd, leaf, name, p, seen, out)
	}
	return wk.tw.WriteHeader(hdr)
}

// dir writes the entries of directory leaf of dfd, in name order (those
// seen lists, when not nil), and records them in out when not nil.
func (wk *walker) dir(dfd int, leaf, name, p string, seen, out *record) error {
	fd, err := unix.Openat(dfd, leaf, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return changed(fmt.Errorf("open %s: %w", p, err), seen != nil)
	}
	defer unix.Close(fd)
	var leaves []string
	if seen != nil {
		for _, c := range seen.children {
			leaves = append(leaves, c.leaf)
		}
	} else {
		leaves, err = wk.readDir(fd)
		if err != nil {
			return fmt.Errorf("read directory %s: %w", p, err)
		}
		slices.Sort(leaves)
	}
	if out != nil {
		wk.recorded += len(leaves)
		if wk.recorded <= wk.maxRecords {
			out.children = make([]record, len(leaves))
		}
	}
	for i, c := range leaves {
		child := name + "/" + c
		if name == "." {
			child = c
		}
		var cseen, cout *record
		if seen != nil {
			cseen = &seen.children[i]
		}
		if out != nil && out.children != nil {
			cout = &out.children[i]
		}
		if err := wk.entry(fd, c, child, filepath.Join(p, c), cseen, cout); err != nil {
			return err
		}
	}
	return nil
}

// readDir lists the names in directory fd.
func (wk *walker) readDir(fd int) ([]string, error) {
	if wk.dirBuf == nil {
		wk.dirBuf = make([]byte, 32<<10)
	}
	var names []string
	for {
		n, err := unix.Getdents(fd, wk.dirBuf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			return names, nil
		}
		_, _, names = unix.ParseDirent(wk.dirBuf[:n], -1, names)
	}
}

// changed makes err an ErrSourceChanged when the entry was seen by the
// counting walk and is no longer there as it was.
func changed(err error, seen bool) error {
	if seen && (errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP)) {
		return fmt.Errorf("%w: %w", ErrSourceChanged, err)
	}
	return err
}

// file writes regular file leaf of dfd: a dense file as it is, one with
// holes as a sparse entry. Only a file with fewer blocks than its size
// can have holes: the others are neither searched for holes nor, when
// counting, opened.
//
// With seen (st is the counting walk's), a file that grew, shrank, went
// or is no longer the same regular file (another inode, a FIFO put in its
// place) fails the walk with ErrSourceChanged. The open never blocks
// (O_NONBLOCK: a FIFO put in the file's place would wait for a writer;
// a regular file ignores the flag).
func (wk *walker) file(dfd int, leaf, p string, hdr *tar.Header, st *unix.Stat_t, seen bool) error {
	mayHaveHoles := st.Blocks*512 < st.Size
	if wk.sizeOnly && !mayHaveHoles {
		// The header as tw would write it, then the padded content,
		// without reading the file.
		if err := tar.NewWriter(wk.w).WriteHeader(hdr); err != nil {
			return err
		}
		wk.w.(*counter).n += hdr.Size + pad(hdr.Size)
		return nil
	}
	fd, err := unix.Openat(dfd, leaf, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return changed(fmt.Errorf("open %s: %w", p, err), seen)
	}
	defer unix.Close(fd)
	if seen {
		// The stat is the counting walk's: check that the name still
		// leads to that file (one more system call per file).
		var now unix.Stat_t
		if err := unix.Fstat(fd, &now); err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		if now.Mode&unix.S_IFMT != unix.S_IFREG || now.Dev != st.Dev || now.Ino != st.Ino {
			return fmt.Errorf("%s: no longer the file it was: %w", p, ErrSourceChanged)
		}
	}
	if mayHaveHoles {
		wk.holeScans++
		segs, err := dataSegments(fd, hdr.Size)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if isSparse(segs, hdr.Size) {
			return wk.writeSparse(hdr, segs, fd, p)
		}
		if wk.sizeOnly {
			if err := tar.NewWriter(wk.w).WriteHeader(hdr); err != nil {
				return err
			}
			wk.w.(*counter).n += hdr.Size + pad(hdr.Size)
			return nil
		}
	}
	if err := wk.tw.WriteHeader(hdr); err != nil {
		return err
	}
	return wk.copyRange(fd, 0, hdr.Size, wk.tw, p, seen)
}

// copyRange copies n bytes at off of fd to w. With toEnd, they must be
// the last bytes of the file (read with one more byte asked for, which
// costs no system call).
func (wk *walker) copyRange(fd int, off, n int64, w io.Writer, p string, toEnd bool) error {
	if wk.buf == nil {
		wk.buf = make([]byte, 128<<10)
	}
	extra := int64(0)
	if toEnd {
		extra = 1
	}
	for n+extra > 0 {
		want := min(int64(len(wk.buf)), n+extra)
		m, err := unix.Pread(fd, wk.buf[:want], off)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", p, err)
		}
		if m == 0 {
			if n == 0 {
				return nil // the end, where it was
			}
			return fmt.Errorf("%s: at %d: file shrank: %w", p, off, ErrSourceChanged)
		}
		if int64(m) > n {
			return fmt.Errorf("%s: file grew: %w", p, ErrSourceChanged)
		}
		if _, err := w.Write(wk.buf[:m]); err != nil {
			return err
		}
		off, n = off+int64(m), n-int64(m)
		if n == 0 && int64(m) < want {
			return nil // a short read: the end of the file, where it was
		}
	}
	return nil
}

func readlinkat(dfd int, leaf string) (string, error) {
	for size := 256; ; size *= 2 {
		b := make([]byte, size)
		n, err := unix.Readlinkat(dfd, leaf, b)
		if err != nil {
			return "", fmt.Errorf("readlink: %w", err)
		}
		if n < size {
			return string(b[:n]), nil
		}
	}
}

// ownerNames looks up user and group names once per id (archive/tar's
// FileInfoHeader looks again, reading /etc/passwd, for each file of an id
// without a name).
type ownerNames struct {
	users, groups map[int]string
}

func (o *ownerNames) user(id int) string {
	name, ok := o.users[id]
	if !ok {
		if u, err := user.LookupId(strconv.Itoa(id)); err == nil {
			name = u.Username
		}
		o.users[id] = name
	}
	return name
}

func (o *ownerNames) group(id int) string {
	name, ok := o.groups[id]
	if !ok {
		if g, err := user.LookupGroupId(strconv.Itoa(id)); err == nil {
			name = g.Name
		}
		o.groups[id] = name
	}
	return name
}

// segment is a data region of a file.
type segment struct{ off, len int64 }

// dataSegments returns the data regions of the first size bytes of fd,
// from SEEK_DATA/SEEK_HOLE; where the filesystem can't tell, the whole
// file is data.
func dataSegments(fd int, size int64) ([]segment, error) {
	whole := []segment{{0, size}}
	if size == 0 {
		return nil, nil
	}
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
func (wk *walker) writeSparse(hdr *tar.Header, segs []segment, fd int, p string) error {
	w := wk.w
	if err := wk.tw.Flush(); err != nil {
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
		if wk.sizeOnly {
			w.(*counter).n += s.len
			continue
		}
		if err := wk.copyRange(fd, s.off, s.len, w, p, false); err != nil {
			return err
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
