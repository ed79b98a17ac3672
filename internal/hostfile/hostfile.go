// Package hostfile opens the host files an image is made of without
// letting a symlink lead elsewhere: bangerd runs as root, and a file it
// packs into a guest's initramfs or hands to a VMM must be the file its
// image names, never /etc/shadow reached through a link.
//
// OpenBeneath resolves a path inside a directory with openat2(2) and
// RESOLVE_BENEATH: symlinks are followed only while they stay inside the
// directory (an absolute symlink, or one climbing out with "..", is
// refused), and /proc magic links never. On kernels without openat2
// (before 5.6) it walks the path one component at a time with O_NOFOLLOW,
// refusing every symlink. Only regular files are opened; opening never
// blocks on a FIFO.
package hostfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrOutside is matched by errors for a path that leads out of its
// directory through a symlink (or, without openat2, through any symlink).
var ErrOutside = errors.New("symlink leads outside its directory")

// ErrNotRegular is matched by errors for a path that is not a regular file.
var ErrNotRegular = errors.New("not a regular file")

// Open opens the regular file at path for reading. Symlinks in path's
// directory part are followed (the directory is trusted); the file itself
// may be a symlink, absolute or relative, only to a file in the same
// directory or below it.
func Open(path string) (*os.File, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	dir, err := filepath.EvalSymlinks(filepath.Dir(abs))
	if err != nil {
		return nil, err
	}
	target, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return nil, err
	}
	// The open below resolves rel again, beneath dir: if the link changed
	// since, it still can't lead out.
	rel, err := filepath.Rel(dir, target)
	if err != nil || !filepath.IsLocal(rel) {
		return nil, &fs.PathError{Op: "open", Path: abs, Err: ErrOutside}
	}
	return OpenBeneath(dir, rel)
}

// OpenBeneath opens the regular file rel (a relative path) inside dir for
// reading, following symlinks only while they stay inside dir. dir itself
// is opened normally (following symlinks): it is the trusted root.
func OpenBeneath(dir, rel string) (*os.File, error) {
	full := filepath.Join(dir, rel)
	if filepath.IsAbs(rel) || !filepath.IsLocal(rel) {
		return nil, &fs.PathError{Op: "open", Path: full, Err: ErrOutside}
	}
	d, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(d)
	fd, err := openat2(d, rel)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) && !canOpenat2() {
		fd, err = walkNoFollow(d, rel)
	}
	switch {
	case errors.Is(err, unix.EXDEV), errors.Is(err, unix.ELOOP):
		return nil, &fs.PathError{Op: "open", Path: full, Err: ErrOutside}
	case err != nil:
		return nil, &fs.PathError{Op: "open", Path: full, Err: err}
	}
	f := os.NewFile(uintptr(fd), full)
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, &fs.PathError{Op: "open", Path: full, Err: ErrNotRegular}
	}
	// O_NONBLOCK only kept a FIFO from blocking the open; clear it.
	if err := unix.SetNonblock(fd, false); err != nil {
		f.Close()
		return nil, &fs.PathError{Op: "open", Path: full, Err: err}
	}
	return f, nil
}

const openFlags = unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOCTTY | unix.O_NONBLOCK

func openat2(dirfd int, rel string) (int, error) {
	for {
		fd, err := unix.Openat2(dirfd, rel, &unix.OpenHow{
			Flags:   openFlags,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS,
		})
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue // a concurrent rename raced the lookup: retry
		}
		return fd, err
	}
}

// canOpenat2 tells a seccomp filter that denies openat2 with EPERM (some
// container runtimes) from a real permission error.
func canOpenat2() bool {
	fd, err := unix.Openat2(unix.AT_FDCWD, "/", &unix.OpenHow{Flags: unix.O_RDONLY | unix.O_DIRECTORY | unix.O_CLOEXEC})
	if err != nil {
		return false
	}
	unix.Close(fd)
	return true
}

// walkNoFollow opens rel under dirfd one component at a time, refusing
// every symlink (ELOOP from O_NOFOLLOW).
func walkNoFollow(dirfd int, rel string) (int, error) {
	parts := strings.Split(filepath.ToSlash(rel), "/")
	cur := dirfd
	for i, p := range parts {
		last := i == len(parts)-1
		flags := unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOFOLLOW | unix.O_DIRECTORY
		if last {
			flags = openFlags | unix.O_NOFOLLOW
		}
		fd, err := unix.Openat(cur, p, flags, 0)
		if err != nil && errors.Is(err, unix.ENOTDIR) && !last {
			// O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR.
			var st unix.Stat_t
			if unix.Fstatat(cur, p, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
				err = unix.ELOOP
			}
		}
		if cur != dirfd {
			unix.Close(cur)
		}
		if err != nil {
			return -1, err
		}
		cur = fd
	}
	return cur, nil
}
