package daemon

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// consoleCheckInterval is how often a running VM's console log size is
// checked.
var consoleCheckInterval = 5 * time.Second

// truncatedNote marks where a capped console log lost its older output.
const truncatedNote = "\n[banger: older console output dropped: the log reached its size cap]\n"

// capConsole keeps path under max bytes while the VM runs: the guest is not
// trusted not to flood its serial console. The VMM writes the file in append
// mode, so it can be cut in place; the newest quarter is kept.
func (d *Daemon) capConsole(name, path string, max int64, exited <-chan struct{}) {
	t := time.NewTicker(consoleCheckInterval)
	defer t.Stop()
	for {
		select {
		case <-exited:
			return
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
		dropped, err := trimFile(path, max, max/4)
		if err != nil {
			d.log.Warn("cap console log", "vm", name, "err", err)
		} else if dropped > 0 {
			d.log.Info("console log capped", "vm", name, "dropped_bytes", dropped)
		}
	}
}

// trimFile cuts the file at path down to about its last keep bytes when it
// is larger than max, and returns how many bytes were dropped.
//
// The VMM keeps appending while this runs. Where the filesystem can collapse
// a range (ext4, xfs), the head is removed in place, atomically with respect
// to those appends: nothing written during the cut is lost and a reader never
// sees the file empty. The note then overwrites the start of the kept tail.
// Elsewhere the tail is rewritten at the start and the rest cut off, and
// output written in between is lost.
func trimFile(path string, max, keep int64) (int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	size := st.Size()
	if size <= max {
		return 0, nil
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &fs); err == nil && fs.Bsize > 0 {
		// Collapse whole blocks only, keeping at least keep bytes.
		cut := (size - keep) / fs.Bsize * fs.Bsize
		if cut > 0 {
			err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_COLLAPSE_RANGE, 0, cut)
			if err == nil {
				if _, err := f.WriteAt([]byte(truncatedNote), 0); err != nil {
					return cut, fmt.Errorf("write the cut note in %s: %w", path, err)
				}
				return cut, nil
			}
			if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) {
				return 0, fmt.Errorf("collapse %s: %w", path, err)
			}
		}
	}
	tail := make([]byte, keep)
	n, err := f.ReadAt(tail, size-keep)
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, fmt.Errorf("read %s: %w", path, err)
	}
	// Rewrite the head, then cut the rest: a reader never finds the file
	// empty, only shorter.
	kept := append([]byte(truncatedNote), tail[:n]...)
	if _, err := f.WriteAt(kept, 0); err != nil {
		return 0, fmt.Errorf("rewrite %s: %w", path, err)
	}
	if err := f.Truncate(int64(len(kept))); err != nil {
		return 0, fmt.Errorf("truncate %s: %w", path, err)
	}
	return size - int64(n), nil
}
