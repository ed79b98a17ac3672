// Package disk makes a VM's root disk: a copy-on-write child of its image's
// raw rootfs, created in constant time whatever the image's size.
//
// Clone picks the first strategy that applies:
//
//  1. a qcow2 overlay backed by the image, when the VMM accepts qcow2
//     (QEMU): what `qemu-img create -f qcow2 -F raw -b BASE DEST SIZE`
//     makes, written by this package (qcow2.go) without running qemu-img;
//     a base that is itself qcow2 is named with format qcow2, and qemu-img
//     makes the overlay only when the base's header holds what this
//     package doesn't read;
//  2. a raw reflink clone (FICLONE), when the VMM accepts raw and the
//     filesystem shares extents (XFS with reflink=1, btrfs, bcachefs);
//  3. a full sparse copy (data extents only, holes kept), as a last resort,
//     logged at WARN level because it costs time and space.
//
// The disk package only makes the block device bigger when a larger size is
// asked for; the guest agent grows the guest's filesystem at boot.
package disk

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/hostfile"
	"github.com/bangerdev/banger/internal/vmm"
)

// Strategies reported in CloneResult.Strategy and by CopyFile.
const (
	StrategyQcow2Overlay = "qcow2-overlay"
	StrategyReflink      = "reflink"
	StrategySparseCopy   = "sparse-copy"
)

// DefaultQemuImg is the qemu-img binary used when none is configured.
const DefaultQemuImg = "qemu-img"

// Cloner creates copy-on-write root disks. It is safe for concurrent use.
type Cloner struct {
	log     *slog.Logger
	qemuImg string

	// noReflink skips the reflink attempt so that tests can exercise the
	// sparse-copy fallback on any filesystem.
	noReflink bool
}

// NewCloner returns a Cloner that logs to log (nil discards) and runs
// qemuImg to make qcow2 overlays (empty means DefaultQemuImg, looked up in
// PATH).
func NewCloner(log *slog.Logger, qemuImg string) *Cloner {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if qemuImg == "" {
		qemuImg = DefaultQemuImg
	}
	return &Cloner{log: log, qemuImg: qemuImg}
}

// CloneRequest describes a root disk to create.
type CloneRequest struct {
	// Base is the image's raw rootfs file (absolute path). It is only read.
	Base string
	// Dest is the path of the disk to create. It must not exist; its
	// directory must.
	Dest string
	// Formats lists the disk formats the VMM accepts, preferred first
	// (vmm.FormatQcow2, vmm.FormatRaw). QEMU: [qcow2 raw]; Firecracker: [raw].
	Formats []string
	// Size is the virtual size of the new disk in bytes. 0 means the size of
	// Base; a size smaller than Base is an error.
	Size int64
}

// CloneResult describes the disk Clone made.
type CloneResult struct {
	Path     string
	Format   string // vmm.FormatQcow2 or vmm.FormatRaw
	Strategy string // StrategyQcow2Overlay, StrategyReflink or StrategySparseCopy
	Size     int64  // virtual size in bytes
}

// Clone creates req.Dest as a copy-on-write child of req.Base. On failure
// nothing is left at req.Dest.
func (c *Cloner) Clone(ctx context.Context, req CloneRequest) (CloneResult, error) {
	if err := ctx.Err(); err != nil {
		return CloneResult{}, fmt.Errorf("clone %s: %w", req.Dest, err)
	}
	base, dest, size, err := c.check(req)
	if err != nil {
		return CloneResult{}, err
	}

	switch {
	case slices.Contains(req.Formats, vmm.FormatQcow2):
		return c.overlay(ctx, base, dest, req.Size, size)
	case slices.Contains(req.Formats, vmm.FormatRaw):
		return c.rawClone(ctx, base, dest, size)
	}
	// check rejects this already; keep the compiler and readers honest.
	return CloneResult{}, fmt.Errorf("clone %s: no usable disk format in %v", dest, req.Formats)
}

// check validates req and returns the cleaned paths and the virtual size.
func (c *Cloner) check(req CloneRequest) (base, dest string, size int64, err error) {
	if !filepath.IsAbs(req.Base) {
		return "", "", 0, fmt.Errorf("clone: base image %q: path must be absolute", req.Base)
	}
	if req.Dest == "" {
		return "", "", 0, errors.New("clone: destination path is empty")
	}
	base, dest = filepath.Clean(req.Base), filepath.Clean(req.Dest)
	if len(req.Formats) == 0 {
		return "", "", 0, fmt.Errorf("clone %s: no disk formats given", dest)
	}
	usable := false
	for _, f := range req.Formats {
		switch f {
		case vmm.FormatQcow2, vmm.FormatRaw:
			usable = true
		default:
			return "", "", 0, fmt.Errorf("clone %s: unknown disk format %q", dest, f)
		}
	}
	if !usable {
		return "", "", 0, fmt.Errorf("clone %s: no usable disk format in %v", dest, req.Formats)
	}
	st, err := os.Stat(base)
	if err != nil {
		return "", "", 0, fmt.Errorf("clone %s: base image: %w", dest, err)
	}
	if !st.Mode().IsRegular() {
		return "", "", 0, fmt.Errorf("clone %s: base image %s is not a regular file", dest, base)
	}
	if base == dest {
		return "", "", 0, fmt.Errorf("clone %s: destination is the base image", dest)
	}
	size = req.Size
	switch {
	case size == 0:
		size = st.Size()
	case size < 0:
		return "", "", 0, fmt.Errorf("clone %s: negative size %d", dest, size)
	case size < st.Size():
		return "", "", 0, fmt.Errorf("clone %s: requested size %d bytes is smaller than the image (%d bytes); disks can only grow", dest, size, st.Size())
	}
	if size == 0 {
		return "", "", 0, fmt.Errorf("clone %s: base image %s is empty", dest, base)
	}
	return base, dest, size, nil
}

// claim creates dest exclusively, so that an existing file is never
// touched, and returns it open for writing.
func claim(dest string) (*os.File, error) {
	f, err := os.OpenFile(dest, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("clone %s: destination already exists: %w", dest, fs.ErrExist)
		}
		return nil, fmt.Errorf("clone %s: create destination: %w", dest, err)
	}
	return f, nil
}

// overlay makes a qcow2 overlay backed by the base image: written here
// (writeQcow2Overlay) for a raw base or a qcow2 base whose header this
// package reads, else by qemu-img. asked is the size the request asked for
// (0: the base's), size the size check made of it (the base's file size
// when 0).
func (c *Cloner) overlay(ctx context.Context, base, dest string, asked, size int64) (res CloneResult, err error) {
	backingFmt, qcow2Size, err := baseFormat(base)
	if err != nil {
		return CloneResult{}, fmt.Errorf("clone %s: base image: %w", dest, err)
	}
	if backingFmt == vmm.FormatQcow2 && qcow2Size >= 0 {
		// A qcow2 base's size is its virtual size, not its file's.
		switch {
		case asked == 0:
			size = qcow2Size
		case asked < qcow2Size:
			return CloneResult{}, fmt.Errorf("clone %s: requested size %d bytes is smaller than the image (%d bytes); disks can only grow", dest, asked, qcow2Size)
		}
	}
	f, err := claim(dest)
	if err != nil {
		return CloneResult{}, err
	}
	defer func() {
		if cerr := f.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("clone %s: close: %w", dest, cerr)
		}
		if err != nil {
			os.Remove(dest)
		}
	}()
	how := "qemu-img"
	if backingFmt == vmm.FormatRaw || qcow2Size >= 0 {
		how = "written"
		if size, err = writeQcow2Overlay(f, size, base, backingFmt); err != nil {
			return CloneResult{}, fmt.Errorf("clone %s: %w", dest, err)
		}
	} else if size, err = c.qemuImgOverlay(ctx, base, dest, asked); err != nil {
		return CloneResult{}, err
	}
	if err := f.Sync(); err != nil {
		return CloneResult{}, fmt.Errorf("clone %s: sync: %w", dest, err)
	}
	c.log.DebugContext(ctx, "made root disk", "strategy", StrategyQcow2Overlay, "base", base, "base_format", backingFmt, "by", how, "dest", dest, "size", size)
	return CloneResult{Path: dest, Format: vmm.FormatQcow2, Strategy: StrategyQcow2Overlay, Size: size}, nil
}

// baseFormat tells a qcow2 base from a raw one by its magic. For a qcow2
// base it also returns its virtual size, or -1 when its header holds what
// this package doesn't read (another version, encryption, incompatible
// features): qemu-img makes that overlay.
func baseFormat(base string) (format string, qcow2Size int64, err error) {
	src, err := hostfile.Open(base)
	if err != nil {
		return "", 0, err
	}
	defer src.Close()
	magic := make([]byte, len(qcow2Magic))
	if _, err := src.ReadAt(magic, 0); err != nil && !errors.Is(err, io.EOF) {
		return "", 0, fmt.Errorf("read %s: %w", base, err)
	}
	if !bytes.Equal(magic, qcow2Magic) {
		return vmm.FormatRaw, 0, nil
	}
	h, err := readQcow2Header(src, base)
	switch {
	case errors.Is(err, errQcow2Unsupported):
		return vmm.FormatQcow2, -1, nil
	case err != nil:
		return "", 0, err
	case h.incompat != 0 || h.cryptMethod != 0:
		return vmm.FormatQcow2, -1, nil
	}
	return vmm.FormatQcow2, h.size, nil
}

// qemuImgOverlay has qemu-img write the overlay at dest (which exists,
// empty) over the qcow2 base, of size asked or, when 0, the base's; it
// returns the overlay's virtual size.
func (c *Cloner) qemuImgOverlay(ctx context.Context, base, dest string, asked int64) (int64, error) {
	args := []string{"create", "-q", "-f", vmm.FormatQcow2, "-F", vmm.FormatQcow2, "-b", base, dest}
	if asked != 0 {
		args = append(args, strconv.FormatInt(asked, 10))
	}
	if out, err := runQemuImg(ctx, c.qemuImg, args...); err != nil {
		return 0, fmt.Errorf("clone %s: qemu-img create overlay: %w%s", dest, err, outputSuffix(out))
	}
	f, err := os.Open(dest)
	if err != nil {
		return 0, fmt.Errorf("clone %s: %w", dest, err)
	}
	defer f.Close()
	h, err := readQcow2Header(f, dest)
	if err != nil {
		return 0, fmt.Errorf("clone %s: %w", dest, err)
	}
	return h.size, nil
}

// rawClone makes a raw disk by reflink, or by a sparse copy when the
// filesystem can't share extents, then grows it to size.
func (c *Cloner) rawClone(ctx context.Context, base, dest string, size int64) (res CloneResult, err error) {
	src, err := hostfile.Open(base)
	if err != nil {
		return CloneResult{}, fmt.Errorf("clone %s: open base image: %w", dest, err)
	}
	defer src.Close()
	dst, err := claim(dest)
	if err != nil {
		return CloneResult{}, err
	}
	defer func() {
		if cerr := dst.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("clone %s: close: %w", dest, cerr)
		}
		if err != nil {
			os.Remove(dest)
		}
	}()

	strategy, reflinkErr, err := copyInto(ctx, dst, src, c.noReflink, nil)
	if err != nil {
		return CloneResult{}, fmt.Errorf("clone %s: %w", dest, err)
	}
	if strategy == StrategySparseCopy {
		where := fsName(filepath.Dir(dest))
		if errors.Is(reflinkErr, unix.EXDEV) {
			where += " (base image and disk on different filesystems)"
		}
		c.log.WarnContext(ctx, fmt.Sprintf("reflink unsupported on %s; made a full sparse copy", where),
			"base", base, "dest", dest, "reason", errString(reflinkErr))
	}
	if err := growFile(dst, size); err != nil {
		return CloneResult{}, fmt.Errorf("clone %s: %w", dest, err)
	}
	if err := dst.Sync(); err != nil {
		return CloneResult{}, fmt.Errorf("clone %s: sync: %w", dest, err)
	}
	c.log.DebugContext(ctx, "made root disk", "strategy", strategy, "base", base, "dest", dest, "size", size)
	return CloneResult{Path: dest, Format: vmm.FormatRaw, Strategy: strategy, Size: size}, nil
}

// growFile extends f to size bytes (a hole at the end); it never shrinks.
func growFile(f *os.File, size int64) error {
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat: %w", err)
	}
	if st.Size() >= size {
		return nil
	}
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("grow to %d bytes: %w", size, err)
	}
	return nil
}

// VirtualSize returns the size in bytes of the block device the guest sees
// for the disk at path in the given format (vmm.FormatRaw or
// vmm.FormatQcow2). It reads a qcow2 header itself (a disk in use by a
// running VM can be inspected), and asks qemu-img from PATH only about a
// header it doesn't read.
func VirtualSize(ctx context.Context, path, format string) (int64, error) {
	switch format {
	case vmm.FormatRaw:
		st, err := os.Stat(path)
		if err != nil {
			return 0, fmt.Errorf("virtual size of %s: %w", path, err)
		}
		if !st.Mode().IsRegular() {
			return 0, fmt.Errorf("virtual size of %s: not a regular file", path)
		}
		return st.Size(), nil
	case vmm.FormatQcow2:
		f, err := os.Open(path)
		if err != nil {
			return 0, fmt.Errorf("virtual size of %s: %w", path, err)
		}
		h, err := readQcow2Header(f, path)
		f.Close()
		if err == nil {
			return h.size, nil
		}
		if !errors.Is(err, errQcow2Unsupported) {
			return 0, fmt.Errorf("virtual size of %s: %w", path, err)
		}
		info, err := imageInfo(ctx, DefaultQemuImg, path, format)
		if err != nil {
			return 0, fmt.Errorf("virtual size of %s: %w", path, err)
		}
		return info.VirtualSize, nil
	default:
		return 0, fmt.Errorf("virtual size of %s: unknown disk format %q", path, format)
	}
}

// qemuImageInfo is the part of `qemu-img info --output=json` banger reads.
type qemuImageInfo struct {
	Filename            string `json:"filename"`
	Format              string `json:"format"`
	VirtualSize         int64  `json:"virtual-size"`
	ActualSize          int64  `json:"actual-size"`
	BackingFilename     string `json:"backing-filename"`
	FullBackingFilename string `json:"full-backing-filename"`
	BackingFormat       string `json:"backing-filename-format"`
}

func imageInfo(ctx context.Context, qemuImg, path, format string) (qemuImageInfo, error) {
	out, err := runQemuImg(ctx, qemuImg, "info", "-U", "--output=json", "-f", format, path)
	if err != nil {
		return qemuImageInfo{}, fmt.Errorf("qemu-img info: %w%s", err, outputSuffix(out))
	}
	var info qemuImageInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return qemuImageInfo{}, fmt.Errorf("parse qemu-img info: %w", err)
	}
	return info, nil
}

// runQemuImg runs qemu-img and returns its combined output.
func runQemuImg(ctx context.Context, qemuImg string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, qemuImg, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if err != nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	return out.Bytes(), err
}

func outputSuffix(out []byte) string {
	s := strings.TrimSpace(string(out))
	if s == "" {
		return ""
	}
	const max = 512
	if len(s) > max {
		s = s[:max] + "..."
	}
	return ": " + s
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// syncPath flushes the file at path to stable storage.
func syncPath(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open for sync: %w", err)
	}
	serr := f.Sync()
	cerr := f.Close()
	if serr != nil {
		return fmt.Errorf("sync: %w", serr)
	}
	if cerr != nil {
		return fmt.Errorf("close: %w", cerr)
	}
	return nil
}
