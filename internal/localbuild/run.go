// Package localbuild builds banger's catalog images and kernels on the host
// from Debian's archive, for when a catalog's prebuilt bundle can't be
// fetched (docs/golden-image.md):
//
//   - BuildGolden: the golden image (recipe "golden"): mmdebstrap (minbase)
//     with the embedded images/golden/provision.sh run in the chroot, a
//     kernel's modules tree copied in, then mkfs.ext4 -d.
//   - FetchDebianKernel: the Debian kernel package (recipe "debian-cloud"):
//     linux-image-cloud-amd64's versioned package from Debian's archive,
//     verified through the archive's signed InRelease (gpgv with
//     debian-archive-keyring), Packages and the package's SHA256.
//
// Every child process runs in a process group of its own: cancelling the
// context kills the group (mmdebstrap, apt, dpkg, npm and whatever the
// provisioning started), and RemoveAll unmounts what a killed mmdebstrap
// left mounted in its chroot before anything is removed.
package localbuild

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/api"
)

// Progress receives progress frames; nil drops them.
type Progress func(api.Progress)

func (p Progress) send(phase string, done, total int64, unit string) {
	if p != nil {
		p(api.Progress{Phase: phase, Done: done, Total: total, Unit: unit})
	}
}

// tailLines is how much of a failed command's output an error quotes.
const tailLines = 15

// command runs name with args, in a process group of its own, its
// combined output read line by line (onLine, then the log file when not
// nil). Cancelling ctx sends SIGTERM to the group, then SIGKILL after
// grace. A failure's error quotes the output's last lines.
type command struct {
	name  string
	args  []string
	env   []string // added to os.Environ()
	dir   string
	log   io.Writer
	grace time.Duration
	// onLine sees every line of output (stdout and stderr).
	onLine func(string)
}

func (c command) run(ctx context.Context) error {
	cmd := exec.Command(c.name, c.args...)
	cmd.Env = append(os.Environ(), c.env...)
	cmd.Dir = c.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	pr, pw, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("%s: %w", c.name, err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("%s is not installed: %w", c.name, err)
		}
		return fmt.Errorf("start %s: %w", c.name, err)
	}
	pw.Close()
	pgid := cmd.Process.Pid

	var tail []string
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		sc.Split(scanLinesCR)
		for sc.Scan() {
			line := sc.Text()
			if c.log != nil {
				_, _ = io.WriteString(c.log, line+"\n")
			}
			if strings.TrimSpace(line) == "" {
				continue
			}
			tail = append(tail, line)
			if len(tail) > tailLines {
				tail = tail[1:]
			}
			if c.onLine != nil {
				c.onLine(line)
			}
		}
		// The group may keep the pipe open after the leader exits; drain.
		_, _ = io.Copy(io.Discard, pr)
	}()

	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	var werr error
	select {
	case werr = <-waited:
	case <-ctx.Done():
		_ = unix.Kill(-pgid, unix.SIGTERM)
		grace := c.grace
		if grace == 0 {
			grace = 10 * time.Second
		}
		t := time.NewTimer(grace)
		select {
		case werr = <-waited:
			t.Stop()
		case <-t.C:
			_ = unix.Kill(-pgid, unix.SIGKILL)
			werr = <-waited
		}
	}
	// Whatever the leader left behind in its group goes with it.
	_ = unix.Kill(-pgid, unix.SIGKILL)
	pr.SetReadDeadline(time.Now().Add(2 * time.Second))
	wg.Wait()
	pr.Close()
	if ctx.Err() != nil {
		return fmt.Errorf("%s: %w", c.name, context.Cause(ctx))
	}
	if werr != nil {
		return fmt.Errorf("%s failed (%w); its last output:\n  %s", c.name, werr, strings.Join(tail, "\n  "))
	}
	return nil
}

// scanLinesCR splits on \n and \r (progress meters redraw with \r).
func scanLinesCR(data []byte, atEOF bool) (int, []byte, error) {
	if i := bytes.IndexAny(data, "\r\n"); i >= 0 {
		return i + 1, data[:i], nil
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// RemoveAll removes dir, a build's staging directory, after unmounting
// whatever is mounted under it (an mmdebstrap killed in the middle of its
// work leaves /proc, /sys and /dev bind mounts in its chroot: removing
// through those would delete the host's files). If a mount can't be
// undone, nothing is removed and the error says so.
func RemoveAll(dir string, log *slog.Logger) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		dir = real
	} else if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	for attempt := 0; ; attempt++ {
		mounts, err := mountsUnder(dir)
		if err != nil {
			return err
		}
		if len(mounts) == 0 {
			break
		}
		if attempt == 3 {
			return fmt.Errorf("remove %s: still mounted under it: %s (unmount them by hand)", dir, strings.Join(mounts, ", "))
		}
		// Deepest first.
		sort.Slice(mounts, func(i, j int) bool { return len(mounts[i]) > len(mounts[j]) })
		for _, m := range mounts {
			if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && log != nil {
				log.Warn("unmount under a build's staging directory", "path", m, "err", err)
			}
		}
	}
	return removeSameFS(dir)
}

// mountsUnder lists the mount points at or under dir (/proc/self/mountinfo).
func mountsUnder(dir string) ([]string, error) {
	data, err := os.ReadFile("/proc/thread-self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountinfo(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out, nil
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// removeSameFS removes dir's tree without crossing into another file
// system (a last guard should a mount appear after the check).
func removeSameFS(dir string) error {
	var root unix.Stat_t
	if err := unix.Lstat(dir, &root); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	var firstErr error
	var walk func(p string) bool
	walk = func(p string) bool { // reports whether p was removed
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return errors.Is(err, unix.ENOENT)
		}
		if st.Dev != root.Dev {
			if firstErr == nil {
				firstErr = fmt.Errorf("remove %s: %s is another file system (still mounted?); left in place", dir, p)
			}
			return false
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			ents, err := os.ReadDir(p)
			if err != nil && firstErr == nil {
				firstErr = fmt.Errorf("remove %s: %w", dir, err)
			}
			ok := true
			for _, e := range ents {
				if !walk(filepath.Join(p, e.Name())) {
					ok = false
				}
			}
			if !ok {
				return false
			}
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			// An immutable or append-only file (chattr) in a chroot.
			_ = unix.Chmod(p, 0o700)
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				if firstErr == nil {
					firstErr = fmt.Errorf("remove %s: %w", dir, err)
				}
				return false
			}
		}
		return true
	}
	walk(dir)
	return firstErr
}
