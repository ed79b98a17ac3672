package ociimport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
)

// Ext4Options tune MakeExt4.
type Ext4Options struct {
	// HeadroomMiB is free space added to the content's size (the VM's
	// disk may be larger still: the guest grows the file system to it).
	HeadroomMiB int64
	// Label is the file system's label (at most 16 bytes); "" for none.
	Label string
	// Progress receives PhaseMkfs frames; nil discards them.
	Progress func(api.Progress)
}

// TreeUsage is what a directory tree needs on ext4: the bytes of its
// blocks (4 KiB each) and its inodes.
type TreeUsage struct {
	Bytes  int64
	Inodes int64
}

const blockSize = 4096

// MeasureTree walks root (not following symlinks; hard links counted
// once) and estimates its ext4 usage.
func MeasureTree(root string) (TreeUsage, error) {
	var u TreeUsage
	type ino struct{ dev, ino uint64 }
	seen := map[ino]bool{}
	roundUp := func(n int64) int64 { return (n + blockSize - 1) / blockSize * blockSize }
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		st, _ := info.Sys().(*syscall.Stat_t)
		if st != nil && st.Nlink > 1 && !info.IsDir() {
			k := ino{uint64(st.Dev), st.Ino}
			if seen[k] {
				return nil
			}
			seen[k] = true
		}
		u.Inodes++
		switch {
		case info.Mode().IsRegular():
			// Data blocks (sparse files: what they use) plus ~1/256 for
			// extent blocks of large files.
			size := info.Size()
			if st != nil && st.Blocks*512 < size {
				size = st.Blocks * 512
			}
			u.Bytes += roundUp(size) + size/256
		case info.IsDir():
			u.Bytes += max(blockSize, roundUp(info.Size()))
		case info.Mode()&fs.ModeSymlink != 0:
			if info.Size() >= 60 { // longer targets don't fit in the inode
				u.Bytes += blockSize
			}
		}
		return nil
	})
	if err != nil {
		return u, fmt.Errorf("measure %s: %w", root, err)
	}
	return u, nil
}

// journalBytes is mke2fs's default journal size for a file system of
// that many bytes (e2fsprogs 1.47, 4 KiB blocks).
func journalBytes(fsBytes int64) int64 {
	blocks := fsBytes / blockSize
	var jb int64
	switch {
	case blocks < 32768:
		jb = 1024
	case blocks < 256*1024:
		jb = 4096
	case blocks < 512*1024:
		jb = 8192
	case blocks < 4096*1024:
		jb = 16384
	case blocks < 8192*1024:
		jb = 32768
	case blocks < 16384*1024:
		jb = 65536
	case blocks < 32768*1024:
		jb = 131072
	default:
		jb = 262144
	}
	return jb * blockSize
}

// ext4Geometry sizes a file system for u plus headroom: the content, its
// inode tables (256 bytes an inode, with a margin of inodes for what the
// user adds), the journal, ~2% for bitmaps and group descriptors.
func ext4Geometry(u TreeUsage, headroomMiB int64) (size, inodes int64) {
	headroom := headroomMiB << 20
	base := u.Bytes + u.Bytes/50 + headroom + 8<<20
	// As many inodes as mke2fs would give (one per 16 KiB), and at least
	// the tree's plus a tenth and 1024.
	inodes = max(base/16384, u.Inodes+u.Inodes/10+1024)
	size = base + inodes*256
	size += journalBytes(size)
	size = (size + 1<<20 - 1) >> 20 << 20
	return size, inodes
}

// MakeExt4 makes out, an ext4 file system holding the tree at root
// (`mkfs.ext4 -d`, no mount: owners, modes, times, xattrs, device nodes
// and hard links are copied by mke2fs), sized to the content plus
// opts.HeadroomMiB. It returns the tree's measured usage. out must not
// exist; it is removed on failure.
func MakeExt4(ctx context.Context, root, out string, opts Ext4Options) (TreeUsage, error) {
	progress := opts.Progress
	if progress == nil {
		progress = func(api.Progress) {}
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		return TreeUsage{}, fmt.Errorf("mkfs.ext4 is not installed (Debian: apt-get install e2fsprogs): %w", errdefs.ErrFailedPrecondition)
	}
	u, err := MeasureTree(root)
	if err != nil {
		return u, err
	}
	size, inodes := ext4Geometry(u, opts.HeadroomMiB)
	progress(api.Progress{Phase: PhaseMkfs, Done: 0, Total: u.Bytes, Unit: "bytes"})
	// The estimate is generous; should mke2fs still run out of room, it
	// gets a quarter more, twice.
	for attempt := 0; ; attempt++ {
		err = runMkfs(ctx, mkfs, root, out, size, inodes, opts.Label)
		if err == nil {
			break
		}
		os.Remove(out)
		if attempt == 2 || !errors.Is(err, errNoSpace) {
			return u, err
		}
		size = (size + size/4 + 1<<20 - 1) >> 20 << 20
		inodes += inodes / 4
	}
	progress(api.Progress{Phase: PhaseMkfs, Done: u.Bytes, Total: u.Bytes, Unit: "bytes"})
	return u, nil
}

var errNoSpace = errors.New("file system too small")

func runMkfs(ctx context.Context, mkfs, root, out string, size, inodes int64, label string) error {
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", out, err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("size %s: %w", out, err)
	}
	args := []string{"-q", "-F", "-t", "ext4", "-b", strconv.Itoa(blockSize), "-m", "0",
		"-N", strconv.FormatInt(inodes, 10), "-E", "root_owner=0:0", "-d", root}
	if label != "" {
		args = append(args, "-L", label)
	}
	args = append(args, out)
	cmd := exec.CommandContext(ctx, mkfs, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Stdout = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if ctx.Err() != nil {
			return fmt.Errorf("mkfs.ext4: %w", context.Cause(ctx))
		}
		if strings.Contains(msg, "Could not allocate") || strings.Contains(msg, "No space left") || strings.Contains(msg, "inodes") {
			return fmt.Errorf("mkfs.ext4 -d %s (%d MiB, %d inodes): %s: %w", root, size>>20, inodes, msg, errNoSpace)
		}
		return fmt.Errorf("mkfs.ext4 -d %s: %w: %s", root, err, msg)
	}
	return nil
}
