package ociimport

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/tarcopy"
)

// Whiteout names of the OCI image spec (and AUFS before it).
const (
	whiteoutPrefix = ".wh."
	opaqueWhiteout = ".wh..wh..opq"
)

// ErrUnsafeEntry is matched by errors for a layer entry that tries to reach
// outside the image's root ("../" names, hard links climbing out) or that
// can't be placed (a parent that is not a directory).
var ErrUnsafeEntry = errors.New("unsafe layer entry")

// resolveInRoot makes every path lookup treat the root directory as "/":
// "..", absolute symlinks and symlinked parents all stay inside it, as
// they will when the guest boots from it. /proc magic links and mount
// crossings are refused outright.
const resolveInRoot = unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV

// applier applies layers, in order, onto a root directory. Every path
// operation is relative to a directory descriptor obtained with openat2
// RESOLVE_IN_ROOT, and the last component of a name is always handled
// with the *at calls that don't follow it (O_NOFOLLOW, AT_SYMLINK_NOFOLLOW),
// so nothing in a layer (names, symlinks, hard links, symlinked parents)
// can make it write outside the root.
type applier struct {
	root  int // O_DIRECTORY descriptor of the root
	log   *slog.Logger
	buf   []byte
	stats FlattenStats
	// layer holds the paths the current layer created: whiteouts and
	// opaque markers only hide what lower layers made.
	layer map[string]bool
	// dirTimes are the directories' times, set once every layer is
	// applied (creating entries in a directory changes its mtime).
	dirTimes map[string]time.Time
}

// FlattenStats counts what a flatten wrote.
type FlattenStats struct {
	Entries        int64 // entries created (files, dirs, links, nodes)
	Bytes          int64 // regular file content written
	Whiteouts      int64 // whiteouts and opaque markers applied
	XattrsSkipped  int64 // extended attributes that couldn't be set (logged)
	CompressedRead int64 // layer bytes read (as stored)
}

func newApplier(root string, log *slog.Logger) (*applier, error) {
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open root %s: %w", root, err)
	}
	a := &applier{root: fd, log: log, buf: make([]byte, 1<<20), dirTimes: map[string]time.Time{}}
	// Probe openat2 once: without it (Linux < 5.6) nothing is safe.
	probe, err := unix.Openat2(fd, ".", &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: resolveInRoot})
	if err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.ENOSYS) {
			return nil, fmt.Errorf("openat2 is not available (Linux 5.6 or later is needed to extract images safely): %w", errdefs.ErrFailedPrecondition)
		}
		return nil, fmt.Errorf("openat2 %s: %w", root, err)
	}
	unix.Close(probe)
	return a, nil
}

func (a *applier) close() { unix.Close(a.root) }

// cleanName turns a tar name into a path relative to the root ("." for
// the root itself). Absolute names are taken as inside the root, as Docker
// does; names climbing above it are refused.
func cleanName(name string) (string, error) {
	p := path.Clean("/" + name)
	if strings.HasPrefix(path.Clean(name), "../") || path.Clean(name) == ".." {
		return "", fmt.Errorf("%w: %q climbs out of the image root", ErrUnsafeEntry, name)
	}
	if p == "/" {
		return ".", nil
	}
	return p[1:], nil
}

// openDir resolves dir (relative to the root, "." for the root) inside the
// root and returns an O_PATH descriptor of it, creating missing
// directories (0755, root-owned) on the way when create is set.
func (a *applier) openDir(dir string, create bool) (int, error) {
	how := &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: resolveInRoot}
	fd, err := unix.Openat2(a.root, dir, how)
	if err == nil {
		return fd, nil
	}
	if !create || !errors.Is(err, unix.ENOENT) {
		return -1, fmt.Errorf("resolve %s: %w", dir, err)
	}
	// Walk down from the root, making what is missing. Each prefix is
	// resolved in the root again, so a symlink met on the way still
	// lands inside it.
	parts := strings.Split(dir, "/")
	cur, err := unix.Openat2(a.root, ".", how)
	if err != nil {
		return -1, fmt.Errorf("resolve root: %w", err)
	}
	for i := range parts {
		prefix := strings.Join(parts[:i+1], "/")
		next, err := unix.Openat2(a.root, prefix, how)
		if errors.Is(err, unix.ENOENT) {
			if err := unix.Mkdirat(cur, parts[i], 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
				unix.Close(cur)
				return -1, fmt.Errorf("make parent %s: %w", prefix, err)
			}
			a.layer[prefix] = true
			a.stats.Entries++
			next, err = unix.Openat2(a.root, prefix, how)
		}
		unix.Close(cur)
		if err != nil {
			// A dangling symlink, or a non-directory, on the way.
			return -1, fmt.Errorf("%w: parent %s: %w", ErrUnsafeEntry, prefix, err)
		}
		cur = next
	}
	return cur, nil
}

// applyLayer extracts one layer's tar stream onto the root.
func (a *applier) applyLayer(r io.Reader) error {
	a.layer = map[string]bool{}
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read layer tar: %w", err)
		}
		if err := a.entry(hdr, tr); err != nil {
			return fmt.Errorf("entry %q: %w", hdr.Name, err)
		}
	}
}

func (a *applier) entry(hdr *tar.Header, r io.Reader) error {
	name, err := cleanName(hdr.Name)
	if err != nil {
		return err
	}
	dir, base := path.Split(name)
	dir = strings.TrimSuffix(dir, "/")
	if dir == "" {
		dir = "."
	}
	if name == "." {
		if hdr.Typeflag != tar.TypeDir {
			return nil // a non-directory for the root: ignore
		}
		a.dirTimes["."] = hdr.ModTime
		return a.dirMeta(a.root, hdr)
	}

	if strings.HasPrefix(base, whiteoutPrefix) {
		a.stats.Whiteouts++
		pfd, err := a.openDir(dir, false)
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
			return nil // nothing to hide
		}
		if err != nil {
			return err
		}
		defer unix.Close(pfd)
		if base == opaqueWhiteout {
			return a.opaque(pfd, dir)
		}
		target := base[len(whiteoutPrefix):]
		if target == "" || target == "." || target == ".." {
			return nil
		}
		if a.layer[path.Join(dir, target)] {
			return nil // whiteouts hide lower layers only
		}
		return removeAllAt(pfd, target)
	}

	pfd, err := a.openDir(dir, true)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)

	// What is already there: a directory stays (and gets the new
	// metadata) when a directory comes; anything else is replaced.
	var st unix.Stat_t
	exists := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW) == nil
	if exists {
		if hdr.Typeflag == tar.TypeDir && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			a.layer[name] = true
			a.dirTimes[name] = hdr.ModTime
			return a.openAndDirMeta(pfd, base, hdr)
		}
		if hdr.Typeflag == tar.TypeLink {
			// A hard link to the entry it replaces: nothing to do.
			if t, err := cleanName(hdr.Linkname); err == nil && t == name {
				return nil
			}
		}
		if err := removeAllAt(pfd, base); err != nil {
			return err
		}
	}
	a.layer[name] = true
	a.stats.Entries++

	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := unix.Mkdirat(pfd, base, 0o700); err != nil {
			return fmt.Errorf("mkdir: %w", err)
		}
		a.dirTimes[name] = hdr.ModTime
		return a.openAndDirMeta(pfd, base, hdr)
	case tar.TypeReg: // archive/tar reports old TypeRegA entries as TypeReg
		return a.regular(pfd, base, hdr, r)
	case tar.TypeSymlink:
		if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
			return fmt.Errorf("symlink: %w", err)
		}
		if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("chown symlink: %w", err)
		}
		return a.times(pfd, base, hdr)
	case tar.TypeLink:
		return a.hardlink(pfd, base, hdr)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		mode, dev := tarcopy.NodeMode(hdr)
		if err := unix.Mknodat(pfd, base, mode, int(dev)); err != nil {
			return fmt.Errorf("mknod: %w", err)
		}
		fd, err := unix.Openat(pfd, base, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open node: %w", err)
		}
		defer unix.Close(fd)
		if err := a.pathMeta(fd, hdr); err != nil {
			return err
		}
		return a.times(pfd, base, hdr)
	default:
		a.stats.Entries--
		delete(a.layer, name)
		a.log.Debug("layer entry of an unsupported type skipped", "name", hdr.Name, "type", string(hdr.Typeflag))
		return nil
	}
}

func (a *applier) regular(pfd int, base string, hdr *tar.Header, r io.Reader) error {
	fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	f := os.NewFile(uintptr(fd), base)
	defer f.Close()
	w := &holeWriter{f: f}
	n, err := io.CopyBuffer(w, r, a.buf)
	a.stats.Bytes += n
	if err == nil {
		err = w.finish()
	}
	if err != nil {
		return fmt.Errorf("write: %w", err)
	}
	// chown before chmod: chown clears the setuid and setgid bits.
	if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
		return fmt.Errorf("chown: %w", err)
	}
	if err := unix.Fchmod(fd, uint32(hdr.Mode&0o7777)); err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	a.xattrs(hdr, func(k string, v []byte) error { return unix.Fsetxattr(fd, k, v, 0) })
	ts := timespecs(hdr)
	if err := unix.UtimesNanoAt(pfd, base, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

// holeWriter writes a file, leaving runs of zeros (whole 64 KiB blocks
// at 64 KiB offsets) as holes: a layer's sparse file (a huge
// /var/log/lastlog) stays sparse, and mkfs.ext4 -d copies it so.
type holeWriter struct {
	f   *os.File
	off int64
}

const holeBlock = 64 << 10

var zeroBlock [holeBlock]byte

func (w *holeWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		// Up to the next block boundary.
		k := min(len(p), holeBlock-int(w.off%holeBlock))
		if k == holeBlock && bytes.Equal(p[:k], zeroBlock[:]) {
			w.off += int64(k)
			p = p[k:]
			continue
		}
		// Write this piece and what follows until the next all-zero
		// block, in one call.
		end := k
		for end < len(p) {
			next := min(len(p), end+holeBlock)
			if next-end == holeBlock && bytes.Equal(p[end:next], zeroBlock[:]) {
				break
			}
			end = next
		}
		if _, err := w.f.WriteAt(p[:end], w.off); err != nil {
			return n - len(p), err
		}
		w.off += int64(end)
		p = p[end:]
	}
	return n, nil
}

// finish sets the file's size (a trailing hole has no write).
func (w *holeWriter) finish() error {
	return w.f.Truncate(w.off)
}

func (a *applier) hardlink(pfd int, base string, hdr *tar.Header) error {
	target, err := cleanName(hdr.Linkname)
	if err != nil || target == "." {
		return fmt.Errorf("%w: hard link to %q", ErrUnsafeEntry, hdr.Linkname)
	}
	tdir, tbase := path.Split(target)
	tdir = strings.TrimSuffix(tdir, "/")
	if tdir == "" {
		tdir = "."
	}
	tfd, err := a.openDir(tdir, false)
	if err != nil {
		return fmt.Errorf("hard link target %q: %w", hdr.Linkname, err)
	}
	defer unix.Close(tfd)
	// No AT_SYMLINK_FOLLOW: a symlink target is linked itself, never
	// followed. tbase is one component in a directory inside the root.
	if err := unix.Linkat(tfd, tbase, pfd, base, 0); err != nil {
		return fmt.Errorf("hard link to %q: %w", hdr.Linkname, err)
	}
	return nil
}

// openAndDirMeta applies a directory entry's owner, mode and xattrs.
func (a *applier) openAndDirMeta(pfd int, base string, hdr *tar.Header) error {
	fd, err := unix.Openat(pfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open directory: %w", err)
	}
	defer unix.Close(fd)
	return a.dirMeta(fd, hdr)
}

func (a *applier) dirMeta(fd int, hdr *tar.Header) error {
	if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
		return fmt.Errorf("chown: %w", err)
	}
	if err := unix.Fchmod(fd, uint32(hdr.Mode&0o7777)); err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	a.xattrs(hdr, func(k string, v []byte) error { return unix.Fsetxattr(fd, k, v, 0) })
	return nil
}

// pathMeta applies owner, mode and xattrs through an O_PATH descriptor
// (device nodes and FIFOs, which must not be opened): chmod and setxattr
// go through /proc/self/fd, which names exactly that inode.
func (a *applier) pathMeta(fd int, hdr *tar.Header) error {
	if err := unix.Fchownat(fd, "", hdr.Uid, hdr.Gid, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("chown: %w", err)
	}
	p := "/proc/self/fd/" + strconv.Itoa(fd)
	if err := unix.Chmod(p, uint32(hdr.Mode&0o7777)); err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	a.xattrs(hdr, func(k string, v []byte) error { return unix.Setxattr(p, k, v, 0) })
	return nil
}

// xattrs sets the entry's extended attributes (PAX SCHILY.xattr.*):
// security.capability among them. One that can't be set is logged and
// counted, not fatal (a host file system may lack a namespace).
func (a *applier) xattrs(hdr *tar.Header, set func(string, []byte) error) {
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok {
			continue
		}
		if err := set(name, []byte(v)); err != nil {
			a.stats.XattrsSkipped++
			a.log.Warn("extended attribute not set", "name", hdr.Name, "xattr", name, "err", err)
		}
	}
}

func timespecs(hdr *tar.Header) []unix.Timespec {
	at := hdr.AccessTime
	if at.IsZero() {
		at = hdr.ModTime
	}
	return []unix.Timespec{unix.NsecToTimespec(at.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
}

func (a *applier) times(pfd int, base string, hdr *tar.Header) error {
	if err := unix.UtimesNanoAt(pfd, base, timespecs(hdr), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

// opaque hides what lower layers put in dir: every entry the current layer
// didn't create is removed, and directories it did create (merged over a
// lower one) are cleaned the same way.
func (a *applier) opaque(pfd int, dir string) error {
	dfd, err := unix.Openat(pfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dir, err)
	}
	f := os.NewFile(uintptr(dfd), dir)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("read %s: %w", dir, err)
	}
	for _, n := range names {
		p := path.Join(dir, n)
		if !a.layer[p] {
			if err := removeAllAt(dfd, n); err != nil {
				return err
			}
			continue
		}
		var st unix.Stat_t
		if err := unix.Fstatat(dfd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			continue
		}
		cfd, err := unix.Openat(dfd, n, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open %s: %w", p, err)
		}
		err = a.opaque(cfd, p)
		unix.Close(cfd)
		if err != nil {
			return err
		}
	}
	return nil
}

// removeAllAt removes name in the directory dfd and, for a directory,
// everything below it, never following a symlink. A missing name is fine.
func removeAllAt(dfd int, name string) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("stat %s: %w", name, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		if err := unix.Unlinkat(dfd, name, 0); err != nil {
			return fmt.Errorf("remove %s: %w", name, err)
		}
		return nil
	}
	fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	names, err := f.Readdirnames(-1)
	if err != nil {
		f.Close()
		return fmt.Errorf("read %s: %w", name, err)
	}
	for _, n := range names {
		if err := removeAllAt(fd, n); err != nil {
			f.Close()
			return err
		}
	}
	f.Close()
	if err := unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR); err != nil {
		return fmt.Errorf("remove %s: %w", name, err)
	}
	return nil
}

// finish sets the directories' times, deepest first, once nothing will be
// created in them any more.
func (a *applier) finish() error {
	names := make([]string, 0, len(a.dirTimes))
	for n := range a.dirTimes {
		names = append(names, n)
	}
	slices.SortFunc(names, func(x, y string) int { return strings.Count(y, "/") - strings.Count(x, "/") })
	for _, n := range names {
		mt := unix.NsecToTimespec(a.dirTimes[n].UnixNano())
		ts := []unix.Timespec{mt, mt}
		if n == "." {
			if err := unix.UtimesNanoAt(a.root, ".", ts, 0); err != nil {
				return fmt.Errorf("set times of the root: %w", err)
			}
			continue
		}
		dir, base := path.Split(n)
		dir = strings.TrimSuffix(dir, "/")
		if dir == "" {
			dir = "."
		}
		pfd, err := a.openDir(dir, false)
		if err != nil {
			continue // removed by a later layer
		}
		var st unix.Stat_t
		if unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			err = unix.UtimesNanoAt(pfd, base, ts, unix.AT_SYMLINK_NOFOLLOW)
		}
		unix.Close(pfd)
		if err != nil {
			return fmt.Errorf("set times of %s: %w", n, err)
		}
	}
	return nil
}
