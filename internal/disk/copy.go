package disk

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/hostfile"
)

// copyChunk bounds one copy step, so that cancellation and progress are
// noticed at least every copyChunk bytes.
const copyChunk = 8 << 20

// CopyOptions tune CopyFile.
type CopyOptions struct {
	// Mode is the permission bits of the new file; 0 means 0644. The umask
	// does not apply.
	Mode fs.FileMode
	// Progress, if not nil, is called after each step of the copy with the
	// offset reached in the source and the source's size. done only grows and
	// ends at total; holes count as copied. It is called often (every few
	// MiB): callers that report to users should throttle.
	Progress func(done, total int64)
	// NoReflink forces a full sparse copy even where the filesystem could
	// share extents (for copies that must own their blocks, and for tests).
	NoReflink bool
}

// CopyFile copies the regular file src to dst, which must not exist. It
// clones by reflink when src and dst are on a filesystem that shares
// extents, and otherwise copies only the data extents of src, keeping its
// holes. It returns the strategy used (StrategyReflink or
// StrategySparseCopy). On failure or cancellation dst is removed.
func CopyFile(ctx context.Context, src, dst string, opts CopyOptions) (strategy string, err error) {
	if err := ctx.Err(); err != nil {
		return "", fmt.Errorf("copy %s: %w", src, err)
	}
	in, err := hostfile.Open(src)
	if err != nil {
		return "", fmt.Errorf("copy %s: %w", src, err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return "", fmt.Errorf("copy %s: stat: %w", src, err)
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("copy %s: not a regular file", src)
	}
	mode := opts.Mode.Perm()
	if mode == 0 {
		mode = 0o644
	}
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return "", fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	defer func() {
		if cerr := out.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("copy %s to %s: close: %w", src, dst, cerr)
		}
		if err != nil {
			os.Remove(dst)
		}
	}()
	if err := out.Chmod(mode); err != nil {
		return "", fmt.Errorf("copy %s to %s: chmod: %w", src, dst, err)
	}
	strategy, _, err = copyInto(ctx, out, in, opts.NoReflink, opts.Progress)
	if err != nil {
		return "", fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	if err := out.Sync(); err != nil {
		return "", fmt.Errorf("copy %s to %s: sync: %w", src, dst, err)
	}
	return strategy, nil
}

// copyInto fills the empty file dst with the content of src: by reflink
// unless noReflink is set or the filesystem can't, else by a sparse copy.
// reflinkErr tells why a reflink wasn't made.
func copyInto(ctx context.Context, dst, src *os.File, noReflink bool, progress func(done, total int64)) (strategy string, reflinkErr, err error) {
	st, err := src.Stat()
	if err != nil {
		return "", nil, fmt.Errorf("stat %s: %w", src.Name(), err)
	}
	size := st.Size()
	if progress == nil {
		progress = func(int64, int64) {}
	}
	if noReflink {
		reflinkErr = errors.New("reflink disabled")
	} else {
		reflinkErr = reflink(dst, src)
		if reflinkErr == nil {
			progress(size, size)
			return StrategyReflink, nil, nil
		}
		if !reflinkUnsupported(reflinkErr) {
			return "", reflinkErr, reflinkErr
		}
	}
	if err := sparseCopy(ctx, dst, src, size, !noReflink, progress); err != nil {
		return "", reflinkErr, err
	}
	return StrategySparseCopy, reflinkErr, nil
}

// reflink makes dst share all of src's extents (FICLONE).
func reflink(dst, src *os.File) error {
	var ioctlErr error
	if err := rawControl2(src, dst, func(sfd, dfd int) {
		ioctlErr = unix.IoctlFileClone(dfd, sfd)
	}); err != nil {
		return fmt.Errorf("reflink %s to %s: %w", src.Name(), dst.Name(), err)
	}
	if ioctlErr != nil {
		return fmt.Errorf("reflink %s to %s: %w", src.Name(), dst.Name(), ioctlErr)
	}
	return nil
}

// reflinkUnsupported tells whether a FICLONE error means "this filesystem
// (or this pair of files) can't share extents", as opposed to a real I/O
// failure.
func reflinkUnsupported(err error) bool {
	for _, errno := range []unix.Errno{unix.EOPNOTSUPP, unix.ENOTSUP, unix.EXDEV, unix.EINVAL, unix.ENOTTY, unix.ENOSYS} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// sparseCopy copies the data extents of src (size bytes) into the empty
// file dst and leaves holes where src has them. With useCopyRange it lets
// the kernel move the bytes (copy_file_range), which on some filesystems
// may share extents; otherwise it reads and writes.
func sparseCopy(ctx context.Context, dst, src *os.File, size int64, useCopyRange bool, progress func(done, total int64)) error {
	buf := []byte(nil)
	var off int64
	for off < size {
		if err := ctx.Err(); err != nil {
			return err
		}
		data, err := src.Seek(off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) { // only a hole up to the end
				break
			}
			if !errors.Is(err, unix.EINVAL) {
				return fmt.Errorf("seek data in %s: %w", src.Name(), err)
			}
			data = off // no SEEK_DATA support: everything is data
		}
		hole, err := src.Seek(data, unix.SEEK_HOLE)
		if err != nil {
			if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENXIO) {
				return fmt.Errorf("seek hole in %s: %w", src.Name(), err)
			}
			hole = size
		}
		hole = min(hole, size)
		if data >= hole {
			break
		}
		progress(data, size)
		for pos := data; pos < hole; {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(int64(copyChunk), hole-pos)
			var copied int64
			if useCopyRange {
				copied, err = copyRange(dst, src, pos, n)
				if err != nil && copyRangeUnsupported(err) {
					useCopyRange = false
					continue
				}
			} else {
				if buf == nil {
					buf = make([]byte, copyChunk)
				}
				copied, err = readWrite(dst, src, pos, buf[:n])
			}
			if err != nil {
				return err
			}
			if copied == 0 {
				return fmt.Errorf("copy %s: unexpected end of file at %d", src.Name(), pos)
			}
			pos += copied
			progress(pos, size)
		}
		off = hole
	}
	// Keep the trailing hole: the file's size, not just its data.
	if err := dst.Truncate(size); err != nil {
		return fmt.Errorf("set size of %s: %w", dst.Name(), err)
	}
	progress(size, size)
	return nil
}

// copyRange copies up to n bytes at off from src to the same offset in dst
// with copy_file_range.
func copyRange(dst, src *os.File, off, n int64) (int64, error) {
	roff, woff := off, off
	var copied int
	var cerr error
	err := rawControl2(src, dst, func(sfd, dfd int) {
		for {
			copied, cerr = unix.CopyFileRange(sfd, &roff, dfd, &woff, int(n), 0)
			if cerr != unix.EINTR {
				return
			}
		}
	})
	if err != nil {
		return 0, fmt.Errorf("copy_file_range %s: %w", src.Name(), err)
	}
	if cerr != nil {
		return 0, fmt.Errorf("copy_file_range %s to %s: %w", src.Name(), dst.Name(), cerr)
	}
	return int64(copied), nil
}

func copyRangeUnsupported(err error) bool {
	for _, errno := range []unix.Errno{unix.EXDEV, unix.ENOSYS, unix.EOPNOTSUPP, unix.EINVAL} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// readWrite copies up to len(buf) bytes at off from src to the same
// offset in dst. It returns 0 at the end of src.
func readWrite(dst, src *os.File, off int64, buf []byte) (int64, error) {
	n, err := src.ReadAt(buf, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, fmt.Errorf("read %s: %w", src.Name(), err)
	}
	if n == 0 {
		return 0, nil
	}
	if _, err := dst.WriteAt(buf[:n], off); err != nil {
		return 0, fmt.Errorf("write %s: %w", dst.Name(), err)
	}
	return int64(n), nil
}

// rawControl2 runs fn with the descriptors of a and b.
func rawControl2(a, b *os.File, fn func(afd, bfd int)) error {
	ac, err := a.SyscallConn()
	if err != nil {
		return err
	}
	bc, err := b.SyscallConn()
	if err != nil {
		return err
	}
	var inner error
	err = ac.Control(func(afd uintptr) {
		inner = bc.Control(func(bfd uintptr) { fn(int(afd), int(bfd)) })
	})
	if err != nil {
		return err
	}
	return inner
}

// ReflinkSupported tells whether files in dir can be cloned by reflink
// (FICLONE). It clones a small temporary file and removes both files. An
// error means the probe itself failed (dir missing, not writable).
func ReflinkSupported(dir string) (bool, error) {
	src, err := os.CreateTemp(dir, ".banger-reflink-probe-*")
	if err != nil {
		return false, fmt.Errorf("reflink probe in %s: %w", dir, err)
	}
	defer func() {
		src.Close()
		os.Remove(src.Name())
	}()
	block := make([]byte, 4096)
	for i := range block {
		block[i] = 'b'
	}
	if _, err := src.Write(block); err != nil {
		return false, fmt.Errorf("reflink probe in %s: write: %w", dir, err)
	}
	dst, err := os.CreateTemp(dir, ".banger-reflink-probe-*")
	if err != nil {
		return false, fmt.Errorf("reflink probe in %s: %w", dir, err)
	}
	defer func() {
		dst.Close()
		os.Remove(dst.Name())
	}()
	if err := reflink(dst, src); err != nil {
		if reflinkUnsupported(err) {
			return false, nil
		}
		return false, fmt.Errorf("reflink probe in %s: %w", dir, err)
	}
	return true, nil
}

// Filesystem magic numbers (statfs f_type) for the names in log messages.
var fsMagic = map[uint32]string{
	unix.EXT4_SUPER_MAGIC:      "ext4",
	unix.XFS_SUPER_MAGIC:       "xfs",
	unix.BTRFS_SUPER_MAGIC:     "btrfs",
	unix.TMPFS_MAGIC:           "tmpfs",
	unix.OVERLAYFS_SUPER_MAGIC: "overlayfs",
	unix.NFS_SUPER_MAGIC:       "nfs",
	unix.F2FS_SUPER_MAGIC:      "f2fs",
	unix.FUSE_SUPER_MAGIC:      "fuse",
	unix.SMB2_SUPER_MAGIC:      "smb",
	0x2fc12fc1:                 "zfs",
	0xca451a4e:                 "bcachefs",
}

// fsName names the filesystem holding path, for messages.
func fsName(path string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return "an unknown filesystem"
	}
	if name, ok := fsMagic[uint32(st.Type)]; ok {
		return name
	}
	return fmt.Sprintf("filesystem type %#x", uint32(st.Type))
}
