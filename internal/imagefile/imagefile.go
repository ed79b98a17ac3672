// Package imagefile checks and stores the host-side files an image is made
// of: a raw root filesystem, a kernel, and optionally an initrd and a
// kernel modules directory.
package imagefile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/bangerdev/banger/internal/hostfile"
)

// Artifacts names the files of an image. Paths are absolute.
type Artifacts struct {
	Rootfs     string // raw root filesystem image (required)
	Kernel     string // bzImage, or ELF vmlinux for Firecracker (required)
	Initrd     string // optional
	ModulesDir string // optional, e.g. .../lib/modules/6.1.0-28-cloud-amd64
}

// Field names used in errors and progress phases.
const (
	FieldRootfs  = "rootfs"
	FieldKernel  = "kernel"
	FieldInitrd  = "initrd"
	FieldModules = "modules"
)

// ErrInvalid is matched (errors.Is) by every validation error that is not
// about a missing file (those match fs.ErrNotExist).
var ErrInvalid = errors.New("invalid image artifact")

// ArtifactError reports a problem with one artifact. Its message reads like
// `kernel "/x/vmlinuz": no such file`.
type ArtifactError struct {
	Field  string // FieldRootfs, FieldKernel, FieldInitrd or FieldModules
	Path   string
	Reason string
	Err    error // the underlying cause, matched by errors.Is
}

func (e *ArtifactError) Error() string {
	if e.Path == "" {
		return fmt.Sprintf("%s: %s", e.Field, e.Reason)
	}
	return fmt.Sprintf("%s %q: %s", e.Field, e.Path, e.Reason)
}

func (e *ArtifactError) Unwrap() error { return e.Err }

func invalid(field, path, reason string) *ArtifactError {
	return &ArtifactError{Field: field, Path: path, Reason: reason, Err: ErrInvalid}
}

// ValidateArtifacts checks that the rootfs and kernel are given, that every
// given path is absolute and names an existing file of the right kind
// (symlinks are followed; regular files for rootfs, kernel and initrd, a
// directory for modules), that the kernel looks like a Linux kernel (bzImage
// header or ELF) and that the rootfs is not empty. It reports every problem
// found, joined.
func ValidateArtifacts(a Artifacts) error {
	return validate(a, true)
}

// ValidateParts is ValidateArtifacts for a part of an image's artifacts:
// a rootfs alone, or a kernel with its optional initrd and modules (an
// image and its kernel object). Only what is given is checked; at least
// the rootfs or the kernel must be.
func ValidateParts(a Artifacts) error {
	if a.Rootfs == "" && a.Kernel == "" {
		return invalid(FieldRootfs, "", "a rootfs or a kernel is required")
	}
	if a.Kernel == "" && (a.Initrd != "" || a.ModulesDir != "") {
		return invalid(FieldKernel, "", "required with an initrd or modules")
	}
	return validate(a, false)
}

func validate(a Artifacts, required bool) error {
	var errs []error
	if required || a.Rootfs != "" {
		if err := checkFile(FieldRootfs, a.Rootfs, true); err != nil {
			errs = append(errs, err)
		} else if err := checkRootfs(a.Rootfs); err != nil {
			errs = append(errs, err)
		}
	}
	if required || a.Kernel != "" {
		if err := checkFile(FieldKernel, a.Kernel, true); err != nil {
			errs = append(errs, err)
		} else if err := checkKernel(a.Kernel); err != nil {
			errs = append(errs, err)
		}
	}
	if err := checkFile(FieldInitrd, a.Initrd, false); err != nil {
		errs = append(errs, err)
	}
	if err := checkDir(FieldModules, a.ModulesDir); err != nil {
		errs = append(errs, err)
	} else if a.ModulesDir != "" && len(errs) == 0 {
		errs = append(errs, checkModules(a.Kernel, a.ModulesDir))
	}
	return errors.Join(errs...)
}

// checkPath checks that p is given (when required) and absolute, and stats
// it, following symlinks. It returns nil info when p is empty and optional.
func checkPath(field, p string, required bool) (fs.FileInfo, error) {
	if p == "" {
		if required {
			return nil, invalid(field, "", "required")
		}
		return nil, nil
	}
	if !filepath.IsAbs(p) {
		return nil, invalid(field, p, "path must be absolute")
	}
	p = filepath.Clean(p)
	st, err := os.Stat(p)
	switch {
	case err == nil:
		return st, nil
	case errors.Is(err, fs.ErrNotExist):
		if _, lerr := os.Lstat(p); lerr == nil {
			return nil, &ArtifactError{Field: field, Path: p, Reason: "dangling symlink", Err: err}
		}
		return nil, &ArtifactError{Field: field, Path: p, Reason: "no such file", Err: err}
	case errors.Is(err, fs.ErrPermission):
		return nil, &ArtifactError{Field: field, Path: p, Reason: "permission denied", Err: err}
	default:
		return nil, &ArtifactError{Field: field, Path: p, Reason: errReason(err), Err: err}
	}
}

func checkFile(field, p string, required bool) error {
	st, err := checkPath(field, p, required)
	if err != nil || st == nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return invalid(field, filepath.Clean(p), "not a regular file ("+describeType(st.Mode())+")")
	}
	// bangerd reads image files as root: a symlink may lead only to a file
	// in the same directory (package hostfile).
	f, err := hostfile.Open(p)
	if err != nil {
		return &ArtifactError{Field: field, Path: filepath.Clean(p), Reason: errReason(err), Err: err}
	}
	f.Close()
	return nil
}

func checkDir(field, p string) error {
	st, err := checkPath(field, p, false)
	if err != nil || st == nil {
		return err
	}
	if !st.IsDir() {
		return invalid(field, filepath.Clean(p), "not a directory ("+describeType(st.Mode())+")")
	}
	return nil
}

func describeType(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m.IsRegular():
		return "a regular file"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeDevice != 0:
		return "a block device"
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe"
	case m&fs.ModeSocket != 0:
		return "a socket"
	default:
		return "mode " + m.String()
	}
}

func checkRootfs(p string) error {
	p = filepath.Clean(p)
	st, err := os.Stat(p)
	if err != nil {
		return &ArtifactError{Field: FieldRootfs, Path: p, Reason: errReason(err), Err: err}
	}
	if st.Size() == 0 {
		return invalid(FieldRootfs, p, "empty file")
	}
	format, err := RootfsFormat(p)
	if err != nil {
		return &ArtifactError{Field: FieldRootfs, Path: p, Reason: errReason(err), Err: err}
	}
	if reason := rootfsFormatReason(format); reason != "" {
		return invalid(FieldRootfs, p, reason)
	}
	return nil
}

// Kernel image signatures.
var (
	bzImageMagic = []byte("HdrS") // x86 boot protocol header, at 0x202
	elfMagic     = []byte("\x7fELF")
	arm64Magic   = []byte("ARM\x64") // arm64 Image header, at 0x38
)

const (
	bzImageMagicOff = 0x202
	arm64MagicOff   = 0x38
)

// checkKernel checks that p starts like a Linux kernel: an x86 bzImage, an
// arm64 Image or an ELF vmlinux.
func checkKernel(p string) error {
	p = filepath.Clean(p)
	f, err := hostfile.Open(p)
	if err != nil {
		return &ArtifactError{Field: FieldKernel, Path: p, Reason: errReason(err), Err: err}
	}
	defer f.Close()
	head := make([]byte, bzImageMagicOff+len(bzImageMagic))
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return &ArtifactError{Field: FieldKernel, Path: p, Reason: "read: " + errReason(err), Err: err}
	}
	head = head[:n]
	has := func(off int, magic []byte) bool {
		return len(head) >= off+len(magic) && bytes.Equal(head[off:off+len(magic)], magic)
	}
	if has(0, elfMagic) || has(bzImageMagicOff, bzImageMagic) || has(arm64MagicOff, arm64Magic) {
		return nil
	}
	return invalid(FieldKernel, p, "not a Linux kernel image (no bzImage header, not ELF)")
}

// errReason is err's message without the operation and path that
// *PathError adds (the ArtifactError names the path already).
func errReason(err error) string {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

// DirSize returns the total size in bytes of the regular files under dir,
// not following symlinks.
func DirSize(dir string) (int64, error) {
	var total int64
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		total += info.Size()
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", dir, err)
	}
	return total, nil
}
