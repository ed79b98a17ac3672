package initramfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
)

// newc format constants (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst).
const (
	newcMagic     = "070701"
	newcHeaderLen = 110
	trailerName   = "TRAILER!!!"

	modeDir  = 0o040000
	modeReg  = 0o100000
	modeLnk  = 0o120000
	modeChr  = 0o020000
	modeSUID = 0o4000
	modeSGID = 0o2000
	modeSVTX = 0o1000
)

// ErrClosed is returned by Writer methods called after Close.
var ErrClosed = errors.New("cpio writer closed")

// Writer writes an uncompressed cpio archive in the "newc" format, the one
// the Linux kernel unpacks as an initramfs. Entries are owned by root with
// mtime 0, so the same input gives the same bytes.
//
// Parent directories of an entry are written automatically (mode 0755) when
// they have not been written before. Writer is not safe for concurrent use.
type Writer struct {
	w      io.Writer
	ino    uint32
	off    int64
	dirs   map[string]bool
	err    error
	closed bool
}

// NewWriter returns a Writer writing the archive to w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{w: w, ino: 1, dirs: map[string]bool{}}
}

// cleanName turns "/a/b", "./a/b" and "a//b" into "a/b". It rejects names
// that escape the archive root.
func cleanName(name string) (string, error) {
	n := path.Clean("/" + name)
	n = strings.TrimPrefix(n, "/")
	if n == "" {
		return "", fmt.Errorf("cpio: empty entry name %q", name)
	}
	return n, nil
}

// unixMode converts the permission, setuid, setgid and sticky bits of m.
// Raw Unix bits (0o1777 for a sticky directory) are accepted as well as
// fs.ModeSticky and friends.
func unixMode(m fs.FileMode) uint32 {
	u := uint32(m) & 0o7777
	if m&fs.ModeSetuid != 0 {
		u |= modeSUID
	}
	if m&fs.ModeSetgid != 0 {
		u |= modeSGID
	}
	if m&fs.ModeSticky != 0 {
		u |= modeSVTX
	}
	return u
}

// WriteDir writes a directory entry (and any missing parents).
func (w *Writer) WriteDir(name string, mode fs.FileMode) error {
	n, err := w.prepare(name)
	if err != nil {
		return err
	}
	w.dirs[n] = true
	return w.entry(n, modeDir|unixMode(mode), 2, 0, 0, nil, 0)
}

// WriteFile writes a regular file holding data.
func (w *Writer) WriteFile(name string, mode fs.FileMode, data []byte) error {
	return w.WriteFileFrom(name, mode, int64(len(data)), bytes.NewReader(data))
}

// WriteFileFrom writes a regular file of exactly size bytes read from r.
func (w *Writer) WriteFileFrom(name string, mode fs.FileMode, size int64, r io.Reader) error {
	n, err := w.prepare(name)
	if err != nil {
		return err
	}
	if size < 0 || size > 0xffffffff {
		return w.fail(fmt.Errorf("cpio: %s: size %d out of range", n, size))
	}
	return w.entry(n, modeReg|unixMode(mode), 1, 0, 0, r, size)
}

// WriteSymlink writes a symbolic link name pointing to target.
func (w *Writer) WriteSymlink(name, target string) error {
	n, err := w.prepare(name)
	if err != nil {
		return err
	}
	if target == "" {
		return w.fail(fmt.Errorf("cpio: %s: empty symlink target", n))
	}
	return w.entry(n, modeLnk|0o777, 1, 0, 0, strings.NewReader(target), int64(len(target)))
}

// WriteCharDevice writes a character device node (for example
// dev/console, 5:1, which the kernel opens as PID 1's stdio).
func (w *Writer) WriteCharDevice(name string, mode fs.FileMode, major, minor uint32) error {
	n, err := w.prepare(name)
	if err != nil {
		return err
	}
	return w.entry(n, modeChr|unixMode(mode), 1, major, minor, nil, 0)
}

// Close writes the trailer and pads the archive to a multiple of 512
// bytes. It does not close the underlying writer.
func (w *Writer) Close() error {
	if w.closed {
		return w.err
	}
	if w.err != nil {
		w.closed = true
		return w.err
	}
	// The trailer does not use prepare: it must not create parents.
	if err := w.entry(trailerName, 0, 1, 0, 0, nil, 0); err != nil {
		w.closed = true
		return err
	}
	w.closed = true
	if pad := (512 - w.off%512) % 512; pad > 0 {
		if err := w.write(make([]byte, pad)); err != nil {
			return err
		}
	}
	return nil
}

func (w *Writer) fail(err error) error {
	if w.err == nil {
		w.err = err
	}
	return err
}

// prepare validates the writer state and name, and writes missing parents.
func (w *Writer) prepare(name string) (string, error) {
	if w.closed {
		return "", ErrClosed
	}
	if w.err != nil {
		return "", w.err
	}
	n, err := cleanName(name)
	if err != nil {
		return "", err
	}
	if n == trailerName {
		return "", fmt.Errorf("cpio: reserved entry name %q", n)
	}
	var missing []string
	for d := path.Dir(n); d != "." && !w.dirs[d]; d = path.Dir(d) {
		missing = append(missing, d)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		w.dirs[missing[i]] = true
		if err := w.entry(missing[i], modeDir|0o755, 2, 0, 0, nil, 0); err != nil {
			return "", err
		}
	}
	return n, nil
}

func (w *Writer) write(b []byte) error {
	if w.err != nil {
		return w.err
	}
	n, err := w.w.Write(b)
	w.off += int64(n)
	if err != nil {
		return w.fail(fmt.Errorf("cpio: write: %w", err))
	}
	return nil
}

func (w *Writer) pad4() error {
	if p := (4 - w.off%4) % 4; p > 0 {
		return w.write(make([]byte, p))
	}
	return nil
}

func (w *Writer) entry(name string, mode, nlink, rmajor, rminor uint32, data io.Reader, size int64) error {
	ino := w.ino
	w.ino++
	if name == trailerName {
		ino = 0
	}
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		newcMagic,
		ino,
		mode,
		0, 0, // uid, gid
		nlink,
		0, // mtime
		uint32(size),
		0, 0, // devmajor, devminor
		rmajor, rminor,
		len(name)+1,
		0, // check
	)
	if len(hdr) != newcHeaderLen {
		return w.fail(fmt.Errorf("cpio: internal error: header length %d", len(hdr)))
	}
	if err := w.write([]byte(hdr + name + "\x00")); err != nil {
		return err
	}
	if err := w.pad4(); err != nil {
		return err
	}
	if size > 0 {
		if w.err != nil {
			return w.err
		}
		n, err := io.CopyN(w.w, data, size)
		w.off += n
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("cpio: %s: short data (%d of %d bytes)", name, n, size)
			} else {
				err = fmt.Errorf("cpio: %s: %w", name, err)
			}
			return w.fail(err)
		}
		if err := w.pad4(); err != nil {
			return err
		}
	}
	return nil
}
