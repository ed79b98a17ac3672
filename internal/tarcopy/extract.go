package tarcopy

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Errors of Extract; every refusal wraps one of them and names the entry.
var (
	// ErrUnsafePath is returned for entries that would land outside the
	// destination or outside the requested tree: absolute names, ".."
	// components, names not under ExtractOptions.Base, entries whose parent
	// is a symlink or missing, hard links to files this copy did not
	// create, names longer than PATH_MAX.
	ErrUnsafePath = errors.New("unsafe tar entry")
	// ErrSpecialFile is returned for device nodes and FIFOs, which are only
	// created with ExtractOptions.Archive by root.
	ErrSpecialFile = errors.New("special file refused")
	// ErrTooLarge is returned for a file larger than
	// ExtractOptions.MaxFileSize.
	ErrTooLarge = errors.New("file larger than the limit")
)

// DefaultMaxFileSize is the largest file Extract writes when
// ExtractOptions.MaxFileSize is 0: a sparse entry can claim any size for a
// few bytes of stream.
const DefaultMaxFileSize = 64 << 30

// maxNameLen bounds entry names and link targets: an agent reads its files
// by paths shorter than PATH_MAX.
const maxNameLen = 4096

// Owner is a numeric owner for extracted entries.
type Owner struct{ UID, GID int }

// ExtractOptions tune Extract.
type ExtractOptions struct {
	// Base, when set, is the only top-level name allowed: every entry must
	// be Base or under Base/. "." allows every name.
	Base string
	// Archive keeps the stream's setuid, setgid and sticky bits and, when
	// running as root, its numeric ownership, and lets root create device
	// nodes and FIFOs. Without it those bits are dropped and special files
	// are refused.
	Archive bool
	// Owner, when set and Archive is not, is given every created entry
	// (root extracting on behalf of a sudo user).
	Owner *Owner
	// MaxFileSize bounds the size of each regular file (its apparent size,
	// holes included); 0 means DefaultMaxFileSize.
	MaxFileSize int64
	// Sync makes the copy durable before Extract returns: the
	// destination's file system is synced (syncfs) once the copy stands.
	// A guest's copy in needs it: the guest's page cache dies with the VM
	// (a VM killed after a copy lost the file's tail, the copy having been
	// reported whole). Entries on other file systems mounted under the
	// destination are not covered.
	Sync bool
	// DirectIO writes the data of large files (DirectMin and more, not
	// sparse) with O_DIRECT, past the page cache. A guest under TCG needs
	// it: there the page cache's work for each 4 KiB page costs several
	// times the copy itself (200 MiB written through the page cache took
	// 1.4–1.9 s of guest CPU, written direct 0.5 s). The files are then
	// not in the page cache. A file system that refuses O_DIRECT, and a
	// file's unaligned tail, are written through the page cache.
	DirectIO bool
	// Log receives warnings about skipped entries; nil discards them.
	Log *slog.Logger
	// UmaskMayChange tells that the process may change its umask (which
	// every goroutine shares) while Extract runs, as a daemon might:
	// every file is then created 0600 and given its mode afterwards (one
	// more system call per file). Without it, a file is created with its
	// final mode when the umask read at the start allows it.
	UmaskMayChange bool
}

// Extract unpacks the tar stream r under the absolute directory dest,
// creating dest and its missing parents, and treats the stream as hostile:
//
//   - every entry is created relative to a directory descriptor, and each
//     parent directory is opened with O_NOFOLLOW, so neither "..", absolute
//     names nor symlinks (made by the stream or already there) can make an
//     entry land outside dest: such entries are refused, not skipped;
//   - names outside opts.Base and hard links to anything this copy did not
//     create are refused;
//   - setuid/setgid/sticky bits, ownership and special files follow
//     opts.Archive;
//   - files larger than opts.MaxFileSize are refused before anything is
//     written, and runs of zeros are written as holes, so sparse files stay
//     sparse.
//
// Existing directories are merged into; an existing non-directory is
// replaced atomically (the new entry is written under a temporary name and
// exchanged with it; the old one is removed once the copy succeeded).
// Extract reads r to its end, past the tar's end marker; a stream without
// the marker (cut short, even between two entries) fails. On error, every
// entry this call created (and the parts of dest it created) is removed,
// the entries it replaced are put back, and the error names the offending
// entry.
func Extract(r io.Reader, dest string, opts ExtractOptions) (err error) {
	if !filepath.IsAbs(dest) {
		return fmt.Errorf("destination %s: not an absolute path", quote(dest))
	}
	if opts.MaxFileSize <= 0 {
		opts.MaxFileSize = DefaultMaxFileSize
	}
	opts.Log = logger(opts.Log)
	x := &extractor{opts: opts, files: map[string]bool{}, deepFD: -1, umask: -1}
	if !opts.UmaskMayChange {
		x.umask = processUmask()
	}
	firstNew, err := mkdirAllNew(filepath.Clean(dest))
	if err != nil {
		return err
	}
	x.root, err = unix.Open(dest, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		if firstNew != "" {
			removeEmptyChain(firstNew, filepath.Clean(dest))
		}
		return fmt.Errorf("open destination %s: %w", quote(dest), err)
	}
	defer func() {
		if err != nil {
			x.rollback()
		}
		x.dropParent()
		unix.Close(x.root)
		if err != nil && firstNew != "" {
			removeEmptyChain(firstNew, filepath.Clean(dest))
		}
	}()

	src := newTarSource(r)
	end := &endMarker{r: src}
	tr := tar.NewReader(end)
	for {
		// Skip what is left of the entry (one that was skipped), so src
		// finds the next header where it expects it.
		if _, err := io.Copy(io.Discard, tr); err != nil {
			return fmt.Errorf("read tar: %w", err)
		}
		src.beginHeaders()
		end.begin()
		hdr, err := tr.Next()
		src.endHeaders()
		end.watch = false
		if errors.Is(err, io.EOF) {
			if !end.seen() {
				// archive/tar takes a stream that stops between two
				// entries for a whole one.
				return fmt.Errorf("read tar: the stream ends without the tar's end marker (it was cut short): %w", io.ErrUnexpectedEOF)
			}
			break
		}
		if err != nil {
			return fmt.Errorf("read tar: %w", err)
		}
		sparse, err := sparse1x0(hdr)
		if err != nil {
			return err
		}
		if err := x.entry(hdr, tr, sparse); err != nil {
			return err
		}
	}
	// Read r to its end: what follows the end marker is discarded, but
	// an error there (a copy out of a VM that failed after a complete
	// tar) fails the extraction and removes the partial copy.
	if _, err := io.Copy(io.Discard, src); err != nil {
		return fmt.Errorf("read tar: %w", err)
	}
	// Past this point the copy stands: what it replaced goes (before
	// finishDirs makes a directory read-only).
	x.dropBackups()
	if err := x.finishDirs(); err != nil {
		return err
	}
	if opts.Sync {
		if err := ignoringEINTR(func() error { return unix.Syncfs(x.root) }); err != nil {
			return fmt.Errorf("sync the copy to disk under %s: %w", quote(dest), err)
		}
	}
	return nil
}

// endMarker watches what tar.Reader reads while it looks for the next
// header: archive/tar's Next returns io.EOF alike for the end-of-archive
// marker (two zero blocks) and for a stream that simply stops where a
// header should be (or after a single zero block), so a stream cut
// between two entries would pass for a whole one. Next reads, from the
// start of its call, the previous entry's padding (less than a block of
// zeros), the entry's headers (each with non-zero bytes) and, at the end,
// the marker: only a marker leaves two blocks of zeros at the end of what
// it read.
type endMarker struct {
	r     io.Reader
	watch bool
	// zeros counts the zero bytes at the end of what was read while
	// watching.
	zeros int
}

func (m *endMarker) begin() { m.watch, m.zeros = true, 0 }

// seen reports whether the last read ended with the end marker.
func (m *endMarker) seen() bool { return m.zeros >= 2*512 }

func (m *endMarker) Read(p []byte) (int, error) {
	n, err := m.r.Read(p)
	if m.watch && n > 0 {
		i := n - 1
		for i >= 0 && p[i] == 0 {
			i--
		}
		if i < 0 {
			m.zeros += n
		} else {
			m.zeros = n - 1 - i
		}
	}
	return n, err
}

type dirMeta struct {
	name string
	hdr  *tar.Header // only what meta uses (see dirHeader)
}

// dirHeader keeps what meta needs of a directory's header, not its PAX
// records, which a hostile stream could make large.
func dirHeader(h *tar.Header) *tar.Header {
	return &tar.Header{Mode: h.Mode, Uid: h.Uid, Gid: h.Gid, ModTime: h.ModTime, AccessTime: h.AccessTime}
}

// change is one step of an extraction: name (relative to the
// destination) was created, or, with backup, replaced, the entry it held
// now being at backup (in the same directory) until the copy succeeds.
type change struct{ name, backup string }

type extractor struct {
	opts ExtractOptions
	root int
	// journal lists what this copy changed, in order, for rollback.
	journal []change
	// files holds the regular files this copy wrote (hard link targets).
	files map[string]bool
	dirs  []dirMeta
	// cache holds descriptors of the directories on the path of the
	// previous entry; deepFD is a parent deeper than the cache keeps.
	cache  dirCache
	deepFD int
	// buf is the copy buffer of every file; dbuf, aligned, that of
	// files written with O_DIRECT.
	buf, dbuf []byte
	// umask is the process's file mode creation mask, -1 if unknown.
	umask int
}

// entry extracts one entry; with sparse, a regular file's content is a
// PAX GNU sparse 1.0 map and its data regions (see sparse1x0).
func (x *extractor) entry(hdr *tar.Header, tr io.Reader, sparse bool) error {
	if len(hdr.Name) > maxNameLen || len(hdr.Linkname) > maxNameLen {
		return fmt.Errorf("tar entry %s: name or link target longer than %d bytes: %w", quote(hdr.Name), maxNameLen, ErrUnsafePath)
	}
	name, err := entryName(hdr.Name)
	if err != nil {
		return err
	}
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil
	}
	if err := x.underBase(name); err != nil {
		return err
	}
	if name == "." {
		// The destination itself ("/" copied): leave its metadata alone.
		if hdr.Typeflag == tar.TypeDir {
			return nil
		}
		return fmt.Errorf("tar entry %s: not a directory: %w", quote(hdr.Name), ErrUnsafePath)
	}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeDir, tar.TypeSymlink, tar.TypeLink:
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		if !x.opts.Archive || os.Geteuid() != 0 {
			return fmt.Errorf("tar entry %s: device node or FIFO (copy as root with --archive to keep it): %w",
				quote(name), ErrSpecialFile)
		}
	default:
		x.opts.Log.Warn("copy: skipping unsupported entry", "name", name, "type", string(hdr.Typeflag))
		return nil
	}
	dir, leaf := path.Split(name)
	parent, err := x.parent(strings.TrimSuffix(dir, "/"))
	if err != nil {
		return fmt.Errorf("tar entry %s: %w", quote(name), err)
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		return x.mkdir(parent, name, leaf, hdr)
	case tar.TypeReg:
		if hdr.Size > x.opts.MaxFileSize {
			return fmt.Errorf("tar entry %s: %d bytes, more than the %d allowed (raise the limit with --max-file-size): %w",
				quote(name), hdr.Size, x.opts.MaxFileSize, ErrTooLarge)
		}
		return x.create(parent, name, leaf, func(tmp string) error { return x.writeFile(parent, tmp, name, hdr, tr, sparse) })
	case tar.TypeSymlink:
		return x.create(parent, name, leaf, func(tmp string) error {
			if err := unix.Symlinkat(hdr.Linkname, parent, tmp); err != nil {
				return notCreated{fmt.Errorf("create symlink: %w", err)}
			}
			return x.meta(parent, tmp, -1, hdr, true, false)
		})
	case tar.TypeLink:
		target, err := entryName(hdr.Linkname)
		if err != nil {
			return fmt.Errorf("tar entry %s: hard link: %w", quote(name), err)
		}
		if !x.files[target] {
			return fmt.Errorf("tar entry %s: hard link to %s, which this copy did not create: %w",
				quote(name), quote(target), ErrUnsafePath)
		}
		tdir, tleaf := path.Split(target)
		tparent, err := x.openDir(strings.TrimSuffix(tdir, "/"))
		if err != nil {
			return fmt.Errorf("tar entry %s: hard link target: %w", quote(name), err)
		}
		defer unix.Close(tparent)
		return x.create(parent, name, leaf, func(tmp string) error {
			if err := unix.Linkat(tparent, tleaf, parent, tmp, 0); err != nil {
				return notCreated{fmt.Errorf("create hard link: %w", err)}
			}
			return nil
		})
	default: // special files, root with Archive only
		mode, dev := NodeMode(hdr)
		return x.create(parent, name, leaf, func(tmp string) error {
			if err := unix.Mknodat(parent, tmp, mode, int(dev)); err != nil {
				return notCreated{fmt.Errorf("create special file: %w", err)}
			}
			return x.meta(parent, tmp, -1, hdr, false, true)
		})
	}
}

// underBase refuses names outside opts.Base.
func (x *extractor) underBase(name string) error {
	b := x.opts.Base
	if b == "" || b == "." || name == b || strings.HasPrefix(name, b+"/") {
		return nil
	}
	return fmt.Errorf("tar entry %s: not under %s, the name asked for: %w", quote(name), quote(b), ErrUnsafePath)
}

// maxCachedDepth bounds the directory descriptors an extraction keeps
// open: a path's first maxCachedDepth directories.
const maxCachedDepth = 32

// dirCache keeps the descriptors of a chain of directories below the
// destination (comps[i] is the name of fds[i] in fds[i-1], the
// destination's descriptor not included), each opened with O_NOFOLLOW.
// Keeping them across entries is safe: a stream can't turn a directory
// into anything else (an entry whose name is an existing directory is
// merged into or refused, never replaces it), so a cached descriptor is
// the directory a fresh walk would reach.
type dirCache struct {
	comps []string
	fds   []int
}

// cut closes the cached directories from depth n on.
func (c *dirCache) cut(n int) {
	for _, fd := range c.fds[n:] {
		unix.Close(fd)
	}
	c.fds, c.comps = c.fds[:n], c.comps[:n]
}

func (c *dirCache) close() { c.cut(0) }

// parent returns a descriptor of directory dir (relative to the
// destination; "" for the destination), owned by the extractor: valid
// until the next call. The directories on the way are walked from the
// deepest cached ancestor, never following a symlink.
func (x *extractor) parent(dir string) (int, error) {
	x.dropDeep()
	if dir == "" || dir == "." {
		return x.root, nil
	}
	depth := strings.Count(dir, "/") + 1
	if depth > maxCachedDepth {
		fd, err := x.openDir(dir)
		if err != nil {
			return -1, err
		}
		x.deepFD = fd
		return fd, nil
	}
	c := &x.cache
	n, i := 0, 0
	for n < len(c.comps) && i <= len(dir) {
		j := strings.IndexByte(dir[i:], '/')
		if j < 0 {
			j = len(dir) - i
		}
		if dir[i:i+j] != c.comps[n] {
			break
		}
		n++
		i += j + 1
	}
	c.cut(n)
	fd := x.root
	if n > 0 {
		fd = c.fds[n-1]
	}
	for i < len(dir) {
		j := strings.IndexByte(dir[i:], '/')
		if j < 0 {
			j = len(dir) - i
		}
		comp := dir[i : i+j]
		next, err := openDirAt(fd, comp, dir[:i+j])
		if err != nil {
			return -1, err
		}
		c.comps, c.fds = append(c.comps, comp), append(c.fds, next)
		fd = next
		i += j + 1
	}
	return fd, nil
}

// dropParent closes the descriptors parent keeps.
func (x *extractor) dropParent() {
	x.dropDeep()
	x.cache.close()
}

func (x *extractor) dropDeep() {
	if x.deepFD >= 0 {
		unix.Close(x.deepFD)
		x.deepFD = -1
	}
}

// openDirAt opens directory comp in fd without following a symlink;
// walked names it in errors.
func openDirAt(fd int, comp, walked string) (int, error) {
	next, err := unix.Openat(fd, comp, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ELOOP), errors.Is(err, unix.ENOTDIR):
		return -1, fmt.Errorf("parent %s is a symlink or not a directory: %w", quote(walked), ErrUnsafePath)
	case errors.Is(err, unix.ENOENT):
		return -1, fmt.Errorf("parent directory %s is not in the stream before it: %w", quote(walked), ErrUnsafePath)
	case err != nil:
		return -1, fmt.Errorf("open %s: %w", quote(walked), err)
	}
	return next, nil
}

// openDir walks dir one component at a time from the destination, never
// following a symlink. Missing directories are an error: a stream lists
// directories before their contents, and creating parents on the fly would
// let a short stream make the extractor create (and remember) a great many.
func (x *extractor) openDir(dir string) (int, error) {
	fd, err := unix.Dup(x.root)
	if err != nil {
		return -1, err
	}
	if dir == "" || dir == "." {
		return fd, nil
	}
	walked := ""
	for comp := range strings.SplitSeq(dir, "/") {
		walked = path.Join(walked, comp)
		next, err := openDirAt(fd, comp, walked)
		unix.Close(fd)
		if err != nil {
			return -1, err
		}
		fd = next
	}
	return fd, nil
}

func (x *extractor) mkdir(parent int, name, leaf string, hdr *tar.Header) error {
	err := unix.Mkdirat(parent, leaf, 0o700)
	if errors.Is(err, unix.EEXIST) {
		var st unix.Stat_t
		if err := unix.Fstatat(parent, leaf, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("tar entry %s: %w", quote(name), err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return fmt.Errorf("tar entry %s: exists and is not a directory: %w", quote(name), fs.ErrExist)
		}
		// An existing directory is merged into. It gets the entry's
		// metadata only with Archive (as cp -a does); otherwise its owner
		// and mode stay (as cp -r leaves them).
		if x.opts.Archive {
			x.dirs = append(x.dirs, dirMeta{name, dirHeader(hdr)})
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("tar entry %s: create directory: %w", quote(name), err)
	}
	x.journal = append(x.journal, change{name: name})
	x.dirs = append(x.dirs, dirMeta{name, dirHeader(hdr)})
	return nil
}

// notCreated is the error of a make function of create whose entry was
// not created (the system call that creates it failed): nothing to undo.
type notCreated struct{ err error }

func (e notCreated) Error() string { return e.err.Error() }
func (e notCreated) Unwrap() error { return e.err }

// create makes a non-directory entry through make, which creates it under
// the name it is given in parent, and returns a notCreated error when it
// created nothing. A new name is created in place; an existing
// non-directory is replaced by exchanging a temporary entry with it (the
// old entry stays under the temporary name until the copy ends).
func (x *extractor) create(parent int, name, leaf string, make func(string) error) error {
	// Most names are new: try to create the entry, and look at what is
	// there only when that fails because the name exists.
	x.journal = append(x.journal, change{name: name})
	err := make(leaf)
	if err == nil {
		return nil
	}
	var nc notCreated
	if !errors.As(err, &nc) {
		return fmt.Errorf("tar entry %s: %w", quote(name), err)
	}
	x.journal = x.journal[:len(x.journal)-1] // the name holds what it held
	if !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("tar entry %s: %w", quote(name), err)
	}
	var st unix.Stat_t
	if err := unix.Fstatat(parent, leaf, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("tar entry %s: %w", quote(name), err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return fmt.Errorf("tar entry %s: a directory is in the way: %w", quote(name), fs.ErrExist)
	}
	tmp := tempName()
	if err := make(tmp); err != nil {
		_ = unix.Unlinkat(parent, tmp, 0)
		return fmt.Errorf("tar entry %s: %w", quote(name), err)
	}
	// Swap the new entry in; the old one stays under the temporary name
	// until the copy succeeds, and comes back if it fails.
	err = unix.Renameat2(parent, tmp, parent, leaf, unix.RENAME_EXCHANGE)
	if err == nil {
		x.journal = append(x.journal, change{name: name, backup: path.Join(path.Dir(name), tmp)})
		return nil
	}
	if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EOPNOTSUPP) {
		_ = unix.Unlinkat(parent, tmp, 0)
		return fmt.Errorf("tar entry %s: replace: %w", quote(name), err)
	}
	// A file system without RENAME_EXCHANGE: replace for good.
	if err := unix.Renameat(parent, tmp, parent, leaf); err != nil {
		_ = unix.Unlinkat(parent, tmp, 0)
		return fmt.Errorf("tar entry %s: replace: %w", quote(name), err)
	}
	return nil
}

func tempName() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return ".banger-cp-" + hex.EncodeToString(b[:])
}

// holeBlock is the granularity at which zeros become holes.
const holeBlock = 4096

// copyBufSize is the size of the buffer files are copied through.
const copyBufSize = 32 * holeBlock

var zeros [holeBlock]byte

// owner is the owner to give created entries, -1 to leave it.
func (x *extractor) owner(hdr *tar.Header) (uid, gid int) {
	switch {
	case x.opts.Archive && os.Geteuid() == 0:
		return hdr.Uid, hdr.Gid
	case !x.opts.Archive && x.opts.Owner != nil:
		return x.opts.Owner.UID, x.opts.Owner.GID
	}
	return -1, -1
}

// writeFile creates file leaf in parent with hdr's content from tr (with
// sparse, a sparse map and the data regions it places), leaving holes
// where the content is zero. It makes as few system calls as it can (a
// guest pays dearly for each): open, write, set times, close; chown only
// to change the owner, chmod only when the mode isn't the one the file
// was created with.
func (x *extractor) writeFile(parent int, leaf, name string, hdr *tar.Header, tr io.Reader, sparse bool) error {
	mode := x.mode(hdr)
	uid, _ := x.owner(hdr)
	// The file is created with its final permission bits when the umask
	// keeps them (no chmod then); set-id bits come last, after chown.
	createMode := mode & 0o777
	needChmod := x.umask < 0 || createMode&^uint32(x.umask) != mode
	if needChmod {
		createMode = 0o600
	}
	fd, err := unix.Openat(parent, leaf, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, createMode)
	if err != nil {
		return notCreated{fmt.Errorf("create: %w", err)}
	}
	defer unix.Close(fd)
	var end int64 // the end of the last write
	if sparse {
		segs, err := readSparseMap(tr, hdr.Size)
		if err != nil {
			return fmt.Errorf("read tar: sparse map: %w", err)
		}
		for _, s := range segs {
			e, err := x.copyData(fd, tr, s.off, s.len)
			if err != nil {
				return err
			}
			end = max(end, e)
		}
		var one [1]byte
		if n, _ := tr.Read(one[:]); n > 0 {
			return fmt.Errorf("read tar: more data than the sparse map places: %w", tar.ErrHeader)
		}
	} else {
		if x.opts.DirectIO && hdr.Size >= DirectMin && setDirect(fd, true) == nil {
			end, err = x.copyDirect(fd, tr, hdr.Size)
		} else {
			end, err = x.copyData(fd, tr, 0, hdr.Size)
		}
		if err != nil {
			return err
		}
	}
	if end < hdr.Size {
		// The file ends with a hole.
		if err := ignoringEINTR(func() error { return unix.Ftruncate(fd, hdr.Size) }); err != nil {
			return fmt.Errorf("write: %w", err)
		}
	}
	if err := x.meta(parent, leaf, fd, hdr, false, uid >= 0 || needChmod); err != nil {
		return err
	}
	x.files[name] = true
	return nil
}

// copyData writes size bytes of tr at offset start of fd, leaving holes
// where whole blocks are zero, and returns the end of the last write (0
// when all was zero).
func (x *extractor) copyData(fd int, tr io.Reader, start, size int64) (int64, error) {
	if x.buf == nil {
		x.buf = make([]byte, copyBufSize)
	}
	return copyRuns(tr, x.buf, start, size, func(b []byte, off int64) error {
		return pwriteAll(fd, b, off)
	})
}

// copyRuns reads size bytes of tr through buf and hands each run of
// non-zero blocks to write with its offset (start plus its place in the
// stream), skipping zero blocks; it returns the end of the last run (0
// when all was zero).
func copyRuns(tr io.Reader, buf []byte, start, size int64, write func(b []byte, off int64) error) (int64, error) {
	var end int64
	for done := int64(0); done < size; {
		n, rerr := io.ReadFull(tr, buf[:min(int64(len(buf)), size-done)])
		off := start + done
		// Write each run of non-zero blocks at once; skip zero blocks.
		run := -1
		for i := 0; i < n; i += holeBlock {
			e := min(i+holeBlock, n)
			zero := bytes.Equal(buf[i:e], zeros[:e-i])
			if !zero && run < 0 {
				run = i
			}
			if zero && run >= 0 {
				if err := write(buf[run:i], off+int64(run)); err != nil {
					return 0, fmt.Errorf("write: %w", err)
				}
				end = off + int64(i)
				run = -1
			}
		}
		if run >= 0 {
			if err := write(buf[run:n], off+int64(run)); err != nil {
				return 0, fmt.Errorf("write: %w", err)
			}
			end = off + int64(n)
		}
		done += int64(n)
		if rerr != nil {
			return 0, fmt.Errorf("read tar: %w", rerr)
		}
	}
	return end, nil
}

// pwriteAll writes b at off in fd.
func pwriteAll(fd int, b []byte, off int64) error {
	_, err := pwriteN(fd, b, off)
	return err
}

// pwriteN writes b at off in fd and returns how much it wrote.
func pwriteN(fd int, b []byte, off int64) (int, error) {
	done := 0
	for done < len(b) {
		n, err := unix.Pwrite(fd, b[done:], off+int64(done))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// DirectMin is the size from which ExtractOptions.DirectIO writes a file
// with O_DIRECT.
const DirectMin = 8 << 20

// directAlign is the alignment of O_DIRECT buffers, offsets and lengths:
// a page, a multiple of every logical block size a disk has.
const directAlign = 4096

// directBufSize is the size of the O_DIRECT copy buffer (one write each).
const directBufSize = 1 << 20

// setDirect sets or clears O_DIRECT on fd; the file system may refuse to
// set it (EINVAL).
func setDirect(fd int, on bool) error {
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	if on {
		flags |= unix.O_DIRECT
	} else {
		flags &^= unix.O_DIRECT
	}
	_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags)
	return err
}

// copyDirect writes a file's size bytes of tr from offset 0 of fd, which
// has O_DIRECT set, leaving holes where whole blocks are zero, and returns
// the end of the last write. Writes are aligned but for the file's tail,
// which goes through the page cache (O_DIRECT cleared), as does all that
// follows a write the file system refuses (EINVAL).
func (x *extractor) copyDirect(fd int, tr io.Reader, size int64) (int64, error) {
	if x.dbuf == nil {
		b := make([]byte, directBufSize+directAlign)
		if o := int(uintptr(unsafe.Pointer(&b[0])) % directAlign); o != 0 {
			b = b[directAlign-o:]
		}
		x.dbuf = b[:directBufSize:directBufSize]
	}
	direct := true
	write := func(b []byte, off int64) error {
		if direct {
			// Offsets are aligned (runs start at block boundaries of
			// an aligned buffer); only the file's last run can end
			// unaligned.
			n := len(b) &^ (directAlign - 1)
			w, err := pwriteN(fd, b[:n], off)
			switch {
			case err == nil:
			case errors.Is(err, unix.EINVAL):
				// Refused (an odd alignment rule): what is left goes
				// through the page cache.
			default:
				return err
			}
			b, off = b[w:], off+int64(w)
			if len(b) == 0 {
				return nil
			}
			if err := setDirect(fd, false); err != nil {
				return err
			}
			direct = false
		}
		return pwriteAll(fd, b, off)
	}
	return copyRuns(tr, x.dbuf, 0, size, write)
}

func ignoringEINTR(f func() error) error {
	for {
		if err := f(); !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// meta sets ownership, mode (when chmod is set) and times of leaf in
// parent (through fd when it is open, >= 0). Ownership comes first:
// chown clears setuid bits.
func (x *extractor) meta(parent int, leaf string, fd int, hdr *tar.Header, symlink, chmod bool) error {
	if uid, gid := x.owner(hdr); uid >= 0 {
		var err error
		if fd >= 0 {
			err = unix.Fchown(fd, uid, gid)
		} else {
			err = unix.Fchownat(parent, leaf, uid, gid, unix.AT_SYMLINK_NOFOLLOW)
		}
		if err != nil {
			return fmt.Errorf("chown: %w", err)
		}
	}
	if !symlink && chmod {
		mode := x.mode(hdr)
		var err error
		if fd >= 0 {
			err = unix.Fchmod(fd, mode)
		} else {
			err = unix.Fchmodat(parent, leaf, mode, 0)
		}
		if err != nil {
			return fmt.Errorf("chmod: %w", err)
		}
	}
	atime := hdr.AccessTime
	if atime.IsZero() {
		atime = hdr.ModTime
	}
	ts := [2]unix.Timespec{unix.NsecToTimespec(atime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
	var err error
	if fd >= 0 {
		err = futimens(fd, &ts)
	} else {
		err = unix.UtimesNanoAt(parent, leaf, ts[:], unix.AT_SYMLINK_NOFOLLOW)
	}
	if err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

// futimens sets the times of fd (utimensat with a NULL path; x/sys has no
// wrapper, and its Futimes goes through /proc).
func futimens(fd int, ts *[2]unix.Timespec) error {
	_, _, errno := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(ts)), 0, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// processUmask reads the process's umask from /proc (reading it with
// umask(2) would change it for a moment under the other goroutines); -1
// when it can't.
func processUmask() int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "Umask:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
			if err != nil {
				return -1
			}
			return int(m)
		}
	}
	return -1
}

// mode is hdr's permission bits, with setuid/setgid/sticky only under
// Archive.
func (x *extractor) mode(hdr *tar.Header) uint32 {
	if x.opts.Archive {
		return uint32(hdr.Mode & 0o7777)
	}
	return uint32(hdr.Mode & 0o777)
}

// dropBackups removes the entries this copy replaced, once it succeeded,
// and forgets the replacements: a later rollback leaves them.
func (x *extractor) dropBackups() {
	x.dropParent()
	kept := x.journal[:0]
	for _, c := range x.journal {
		if c.backup == "" {
			kept = append(kept, c)
			continue
		}
		dir, leaf := path.Split(c.backup)
		parent, err := x.openDir(strings.TrimSuffix(dir, "/"))
		if err == nil {
			err = unix.Unlinkat(parent, leaf, 0)
			unix.Close(parent)
		}
		if err != nil {
			x.opts.Log.Warn("copy: remove the replaced entry", "name", c.name, "path", c.backup, "err", err)
		}
	}
	x.journal = kept
}

// finishDirs sets the metadata of the directories this copy created,
// deepest first: creating entries changes a directory's mtime, and a
// read-only mode must not be set before its children are written.
func (x *extractor) finishDirs() error {
	x.dropParent()
	slices.Reverse(x.dirs)
	for _, d := range x.dirs {
		dir, leaf := path.Split(d.name)
		parent, err := x.parent(strings.TrimSuffix(dir, "/"))
		if err != nil {
			return fmt.Errorf("tar entry %s: %w", quote(d.name), err)
		}
		fd, err := unix.Openat(parent, leaf, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("tar entry %s: %w", quote(d.name), err)
		}
		err = x.meta(-1, "", fd, d.hdr, false, true)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("tar entry %s: %w", quote(d.name), err)
		}
	}
	return nil
}

// rollback undoes what this copy did, newest first: it puts back the
// entries it replaced and removes the ones it created. Directories that
// are not empty (something else wrote there) are left.
func (x *extractor) rollback() {
	x.dropParent()
	for _, c := range slices.Backward(x.journal) {
		name := c.name
		dir, leaf := path.Split(name)
		parent, err := x.openDir(strings.TrimSuffix(dir, "/"))
		if err != nil {
			continue
		}
		if c.backup != "" {
			if err := unix.Renameat(parent, path.Base(c.backup), parent, leaf); err != nil {
				x.opts.Log.Warn("copy: put back the replaced entry", "name", name, "path", c.backup, "err", err)
			}
			unix.Close(parent)
			continue
		}
		var st unix.Stat_t
		if unix.Fstatat(parent, leaf, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
			flags := 0
			if st.Mode&unix.S_IFMT == unix.S_IFDIR {
				flags = unix.AT_REMOVEDIR
				// A read-only directory mode is only set at the end; make
				// sure the directory can be emptied.
				_ = unix.Fchmodat(parent, leaf, 0o700, 0)
			}
			if err := unix.Unlinkat(parent, leaf, flags); err != nil {
				x.opts.Log.Warn("copy: remove partial copy", "name", name, "err", err)
			}
		}
		unix.Close(parent)
	}
}

// mkdirAllNew creates dir and its parents and returns the topmost directory
// it created ("" if dir existed).
func mkdirAllNew(dir string) (string, error) {
	first := ""
	for p := dir; ; p = filepath.Dir(p) {
		if _, err := os.Lstat(p); err == nil {
			break
		} else if !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("destination %s: %w", quote(dir), err)
		}
		first = p
		if p == filepath.Dir(p) {
			break
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create destination: %w", err)
	}
	return first, nil
}

// removeEmptyChain removes dest and its parents up to first, deepest
// first, while they are empty (the part of the destination path this copy
// created).
func removeEmptyChain(first, dest string) {
	for p := dest; ; p = filepath.Dir(p) {
		if os.Remove(p) != nil || p == first || p == filepath.Dir(p) {
			return
		}
	}
}

// quote quotes at most a short prefix of a name that came from the stream.
func quote(s string) string {
	const maxLen = 64
	if len(s) > maxLen {
		return fmt.Sprintf("%q…", s[:maxLen])
	}
	return fmt.Sprintf("%q", s)
}

// ExtractFrom extracts under dest, as Extract does, the stream that
// stream writes (a copy out of a VM). Extraction waits for stream to
// return: when stream fails, even after a complete tar, the partial copy is
// removed too and stream's error is returned.
func ExtractFrom(stream func(io.Writer) error, dest string, opts ExtractOptions) error {
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := Extract(pr, dest, opts)
		pr.CloseWithError(err)
		done <- err
	}()
	err := stream(pw)
	// Extract reads the pipe to its end, so it sees stream's error (and
	// rolls back) however far it got.
	pw.CloseWithError(err)
	xerr := <-done
	switch {
	case err != nil && errors.Is(xerr, err):
		// The stream broke off; Extract removed the partial copy.
		return fmt.Errorf("%w (the partial copy was removed)", err)
	case xerr != nil:
		return fmt.Errorf("%w (the partial copy was removed)", xerr)
	case err != nil:
		// Not reached: Extract returns nil only after reading the pipe's
		// end without error, which stream's error would have replaced.
		return fmt.Errorf("%w (the copy may be incomplete)", err)
	}
	return nil
}

// NodeMode is the mknod mode (permission bits and file type) and device
// number of a tar header for a character or block device or a FIFO (any
// other type flag is taken as a FIFO).
func NodeMode(hdr *tar.Header) (mode uint32, dev uint64) {
	mode = uint32(hdr.Mode & 0o7777)
	switch hdr.Typeflag {
	case tar.TypeChar:
		mode |= unix.S_IFCHR
	case tar.TypeBlock:
		mode |= unix.S_IFBLK
	default:
		mode |= unix.S_IFIFO
	}
	return mode, unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
}
