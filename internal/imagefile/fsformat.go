package imagefile

import (
	"bytes"
	"fmt"
	"io"

	"github.com/bangerdev/banger/internal/hostfile"
)

// Root filesystem formats RootfsFormat tells apart.
const (
	FormatExt         = "ext4" // ext2, ext3 or ext4: what banger boots
	FormatXFS         = "xfs"
	FormatBtrfs       = "btrfs"
	FormatSquashfs    = "squashfs"
	FormatQcow2       = "qcow2"
	FormatPartitioned = "partitioned disk"
	FormatUnknown     = "unknown"
)

var signatures = []struct {
	format string
	off    int64
	magic  []byte
}{
	{FormatExt, 0x438, []byte{0x53, 0xef}}, // s_magic in the superblock at 1024
	{FormatQcow2, 0, []byte("QFI\xfb")},
	{FormatXFS, 0, []byte("XFSB")},
	{FormatSquashfs, 0, []byte("hsqs")},
	{FormatBtrfs, 0x10040, []byte("_BHRfS_M")},
	{FormatPartitioned, 0x1fe, []byte{0x55, 0xaa}}, // MBR (also the protective MBR of GPT)
}

// RootfsFormat reads the signatures at the start of a root filesystem image.
func RootfsFormat(path string) (string, error) {
	f, err := hostfile.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	buf := make([]byte, 8)
	for _, s := range signatures {
		n, err := f.ReadAt(buf[:len(s.magic)], s.off)
		if err != nil && err != io.EOF {
			return "", fmt.Errorf("read %s: %w", path, err)
		}
		if n == len(s.magic) && bytes.Equal(buf[:n], s.magic) {
			return s.format, nil
		}
	}
	return FormatUnknown, nil
}

// rootfsFormatReason explains why a format can't be booted, or is "".
func rootfsFormatReason(format string) string {
	switch format {
	case FormatExt:
		return ""
	case FormatQcow2:
		return "a qcow2 image; banger needs a raw ext4 filesystem image (qemu-img convert -O raw, then register the raw file)"
	case FormatPartitioned:
		return "a partitioned disk; banger needs the raw ext4 filesystem itself, not a disk with a partition table"
	case FormatUnknown:
		return "not an ext4 filesystem image (no ext2/3/4 superblock found)"
	}
	return "a " + format + " filesystem; banger boots ext4 root filesystems only (make one with mkfs.ext4 -d DIR FILE)"
}
