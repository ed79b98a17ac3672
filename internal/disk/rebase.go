package disk

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"

	"github.com/bangerdev/banger/internal/vmm"
)

// qcow2 header fields (all big-endian): magic at 0, backing file name
// offset (u64) at 8 and length (u32) at 16.
var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

// maxBackingName is the longest backing file name qemu accepts (1023
// bytes).
const maxBackingName = 1023

// BackingFile returns the backing file named in the header of the qcow2
// disk at path, or "" when it has none. It reads the header itself, so it
// works while a VMM has the disk open and without qemu-img.
func BackingFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("read qcow2 header: %w", err)
	}
	defer f.Close()
	hdr := make([]byte, 20)
	if _, err := io.ReadFull(f, hdr); err != nil {
		return "", fmt.Errorf("read qcow2 header of %s: %w", path, err)
	}
	if !bytes.Equal(hdr[:4], qcow2Magic) {
		return "", fmt.Errorf("%s is not a qcow2 disk", path)
	}
	off, size := binary.BigEndian.Uint64(hdr[8:16]), binary.BigEndian.Uint32(hdr[16:20])
	if off == 0 || size == 0 {
		return "", nil
	}
	if size > maxBackingName || off > 1<<20 {
		return "", fmt.Errorf("%s: implausible backing file name (offset %d, %d bytes)", path, off, size)
	}
	name := make([]byte, size)
	if _, err := f.ReadAt(name, int64(off)); err != nil {
		return "", fmt.Errorf("read backing file name of %s: %w", path, err)
	}
	return string(name), nil
}

// Rebase makes the qcow2 disk at overlay name base (a raw image) as its
// backing file, without reading or comparing either: `qemu-img rebase -u`.
// It is only correct when base holds the very content of the old backing
// file (the caller checked it, e.g. by hash), and only while no VMM has
// overlay open.
func (c *Cloner) Rebase(ctx context.Context, overlay, base string) error {
	args := []string{"rebase", "-u", "-f", vmm.FormatQcow2, "-b", base, "-F", vmm.FormatRaw, overlay}
	if out, err := runQemuImg(ctx, c.qemuImg, args...); err != nil {
		return fmt.Errorf("rebase %s onto %s: %w%s", overlay, base, err, outputSuffix(out))
	}
	if err := syncPath(overlay); err != nil {
		return fmt.Errorf("rebase %s: %w", overlay, err)
	}
	c.log.InfoContext(ctx, "moved a disk onto another backing file", "disk", overlay, "base", base)
	return nil
}
