// Package kernelimage reads what a Linux kernel image says about itself:
// its release (the `uname -r` string), which names the directory its
// modules must be in (/lib/modules/<release>).
//
// It understands an x86 bzImage (the setup header's kernel_version
// string), an ELF vmlinux (the linux_banner symbol, or the banner found in
// its read-only data) and an uncompressed image such as arm64's Image (the
// banner found in the file).
package kernelimage

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// ErrNoRelease means the image holds no readable kernel release.
var ErrNoRelease = errors.New("no kernel release found in the image")

// x86 boot protocol (Documentation/arch/x86/boot.rst): the setup header
// starts at 0x1f1; "HdrS" at 0x202, the protocol version at 0x206 and the
// kernel_version pointer at 0x20e. The pointer is relative to the start of
// the setup code, 0x200 bytes into the file.
const (
	bzMagicOff      = 0x202
	bzVersionOff    = 0x206
	bzKernelVerOff  = 0x20e
	bzSetupSectsOff = 0x1f1
	bzSetupBase     = 0x200
	maxVersionLen   = 512
)

var (
	bzMagic  = []byte("HdrS")
	elfMagic = []byte("\x7fELF")
	// banner is how linux_banner starts: "Linux version <release> (...".
	banner = []byte("Linux version ")
)

// maxScan bounds the scan of an uncompressed image for the banner.
const maxScan = 256 << 20

// Release returns the kernel release of the image r holds, e.g.
// "6.1.0-28-cloud-amd64". size is the image's size in bytes (it bounds the
// scan of images without a header that names the release); pass an
// *os.File's size, or -1 when unknown.
func Release(r io.ReaderAt, size int64) (string, error) {
	head := make([]byte, bzKernelVerOff+2)
	n, err := r.ReadAt(head, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("read kernel header: %w", err)
	}
	head = head[:n]
	switch {
	case len(head) >= len(elfMagic) && bytes.Equal(head[:len(elfMagic)], elfMagic):
		return elfRelease(r)
	case len(head) >= bzKernelVerOff+2 && bytes.Equal(head[bzMagicOff:bzMagicOff+4], bzMagic):
		return bzImageRelease(r, head)
	}
	return scanRelease(r, size)
}

// bzImageRelease reads the release from the setup header's kernel_version
// string ("6.1.0-28-cloud-amd64 (debian-kernel@...) #1 SMP ...").
func bzImageRelease(r io.ReaderAt, head []byte) (string, error) {
	le := binary.LittleEndian
	if proto := le.Uint16(head[bzVersionOff:]); proto < 0x0200 {
		return "", fmt.Errorf("bzImage boot protocol %#x has no kernel_version: %w", proto, ErrNoRelease)
	}
	ptr := int64(le.Uint16(head[bzKernelVerOff:]))
	if ptr == 0 {
		return "", fmt.Errorf("bzImage kernel_version pointer is 0: %w", ErrNoRelease)
	}
	// The string lies in the setup code: setup_sects 512-byte sectors after
	// the boot sector (0 means 4).
	setupSects := int64(head[bzSetupSectsOff])
	if setupSects == 0 {
		setupSects = 4
	}
	off := ptr + bzSetupBase
	if off >= (setupSects+1)*512 {
		return "", fmt.Errorf("bzImage kernel_version %#x points past the setup code: %w", ptr, ErrNoRelease)
	}
	buf := make([]byte, maxVersionLen)
	n, err := r.ReadAt(buf, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("read bzImage kernel_version: %w", err)
	}
	buf = buf[:n]
	if i := bytes.IndexByte(buf, 0); i >= 0 {
		buf = buf[:i]
	}
	return releaseWord(string(buf))
}

// elfRelease reads linux_banner from an ELF vmlinux, or, when the image has
// no symbol table, finds the banner in its sections.
func elfRelease(r io.ReaderAt) (string, error) {
	f, err := elf.NewFile(r)
	if err != nil {
		return "", fmt.Errorf("read ELF kernel: %w: %w", err, ErrNoRelease)
	}
	defer f.Close()
	syms, _ := f.Symbols() // a stripped vmlinux has none: scan below
	for _, s := range syms {
		if s.Name != "linux_banner" || s.Section == elf.SHN_UNDEF || int(s.Section) >= len(f.Sections) {
			continue
		}
		sec := f.Sections[s.Section]
		if s.Value < sec.Addr || s.Value >= sec.Addr+sec.Size || sec.Type == elf.SHT_NOBITS {
			continue
		}
		size := s.Size
		if size == 0 || size > maxVersionLen {
			size = maxVersionLen
		}
		size = min(size, sec.Addr+sec.Size-s.Value)
		buf := make([]byte, size)
		n, err := sec.ReadAt(buf, int64(s.Value-sec.Addr))
		if err != nil && !errors.Is(err, io.EOF) {
			return "", fmt.Errorf("read linux_banner: %w", err)
		}
		rel, err := bannerRelease(buf[:n])
		if err == nil {
			return rel, nil
		}
	}
	for _, sec := range f.Sections {
		if sec.Type != elf.SHT_PROGBITS || sec.Flags&elf.SHF_ALLOC == 0 || sec.Size > maxScan {
			continue
		}
		if rel, err := scanRelease(sec, int64(sec.Size)); err == nil {
			return rel, nil
		}
	}
	return "", fmt.Errorf("ELF kernel has no linux_banner: %w", ErrNoRelease)
}

// scanRelease finds the first "Linux version <release> (" in r.
func scanRelease(r io.ReaderAt, size int64) (string, error) {
	if size < 0 || size > maxScan {
		size = maxScan
	}
	const chunk = 1 << 20
	overlap := int64(len(banner) + maxVersionLen)
	buf := make([]byte, chunk+overlap)
	for off := int64(0); off < size; off += chunk {
		n, err := r.ReadAt(buf, off)
		if err != nil && !errors.Is(err, io.EOF) {
			return "", fmt.Errorf("read kernel: %w", err)
		}
		b := buf[:n]
		for len(b) > 0 {
			i := bytes.Index(b, banner)
			if i < 0 {
				break
			}
			if rel, err := bannerRelease(b[i:]); err == nil {
				return rel, nil
			}
			b = b[i+len(banner):]
		}
		if n < len(buf) {
			break
		}
	}
	return "", ErrNoRelease
}

// bannerRelease parses "Linux version <release> (<builder>) ...". Format
// strings such as "Linux version %s" are rejected.
func bannerRelease(b []byte) (string, error) {
	if !bytes.HasPrefix(b, banner) {
		return "", ErrNoRelease
	}
	b = b[len(banner):]
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	rest := string(b)
	rel, after, ok := strings.Cut(rest, " ")
	if !ok || !strings.HasPrefix(after, "(") {
		return "", ErrNoRelease
	}
	return releaseWord(rel)
}

// releaseWord returns the first word of s, if it is a plausible release:
// it names a directory, so it must be a single, printable path element.
func releaseWord(s string) (string, error) {
	fields := strings.Fields(s)
	if len(fields) == 0 {
		return "", ErrNoRelease
	}
	rel := fields[0]
	if err := ValidRelease(rel); err != nil {
		return "", err
	}
	return rel, nil
}

// ValidRelease checks that rel can be a kernel release: a single path
// element of printable ASCII, not "." or "..", at most 64 bytes (the size
// of utsname.release).
func ValidRelease(rel string) error {
	if rel == "" || rel == "." || rel == ".." || len(rel) > 64 {
		return fmt.Errorf("kernel release %q: %w", short(rel), ErrNoRelease)
	}
	for i := 0; i < len(rel); i++ {
		if c := rel[i]; c <= ' ' || c >= 0x7f || c == '/' || c == '%' {
			return fmt.Errorf("kernel release %q: %w", short(rel), ErrNoRelease)
		}
	}
	return nil
}

// short cuts s for quoting in an error.
func short(s string) string {
	if len(s) > 32 {
		return s[:32] + "..."
	}
	return s
}
