package imagefile

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/hostfile"
)

// Stamp is the fingerprint of one file an image uses: what stat says of
// it (size, modification and inode change times, inode and device), and, when banger copied
// it, a hash of its content. A file edited, truncated, touched or replaced
// since it was stamped no longer matches (see Verify).
type Stamp struct {
	Role    string // FieldRootfs, FieldKernel, FieldInitrd or FieldModules
	Path    string // absolute
	Rel     string // path inside the modules tree (FieldModules only)
	Link    bool   // a symlink inside the modules tree, stamped itself
	Size    int64
	MTimeNS int64
	CTimeNS int64 // inode change time; 0 when not known (not checked)
	Inode   uint64
	Dev     uint64
	SHA256  string // hex, when hashed; a symlink's is its target's text
}

// Fingerprint stamps every file of a: rootfs, kernel and initrd (symlinks
// followed, as the files are read), and every file and symlink in the
// modules tree (not followed; the tree's root itself is resolved). With
// hash, content is hashed too (sha256), which reads every byte.
func Fingerprint(ctx context.Context, a Artifacts, hash bool) ([]Stamp, error) {
	var out []Stamp
	for _, f := range []struct{ role, path string }{
		{FieldRootfs, a.Rootfs}, {FieldKernel, a.Kernel}, {FieldInitrd, a.Initrd},
	} {
		if f.path == "" {
			continue
		}
		st, err := os.Stat(f.path)
		if err != nil {
			return nil, fmt.Errorf("fingerprint %s: %w", f.role, err)
		}
		s := stampOf(f.role, filepath.Clean(f.path), "", st)
		if hash {
			if s.SHA256, err = hashFile(ctx, s.Path); err != nil {
				return nil, fmt.Errorf("fingerprint %s: %w", f.role, err)
			}
		}
		out = append(out, s)
	}
	if a.ModulesDir == "" {
		return out, nil
	}
	root, err := filepath.EvalSymlinks(a.ModulesDir)
	if err != nil {
		return nil, fmt.Errorf("fingerprint %s: %w", FieldModules, err)
	}
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		s := stampOf(FieldModules, p, rel, st)
		if hash {
			if s.Link {
				target, err := os.Readlink(p)
				if err != nil {
					return err
				}
				sum := sha256.Sum256([]byte(target))
				s.SHA256 = hex.EncodeToString(sum[:])
			} else if st.Mode().IsRegular() {
				if s.SHA256, err = hashFile(ctx, p); err != nil {
					return err
				}
			}
		}
		out = append(out, s)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("fingerprint %s: %w", FieldModules, err)
	}
	return out, nil
}

func stampOf(role, path, rel string, st fs.FileInfo) Stamp {
	s := Stamp{Role: role, Path: path, Rel: rel, Link: st.Mode()&fs.ModeSymlink != 0, Size: st.Size(), MTimeNS: st.ModTime().UnixNano()}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		s.Inode, s.Dev = sys.Ino, uint64(sys.Dev)
		s.CTimeNS = time.Unix(sys.Ctim.Unix()).UnixNano()
	}
	return s
}

func hashFile(ctx context.Context, path string) (string, error) {
	f, err := hostfile.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n, err := f.Read(buf)
		h.Write(buf[:n])
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return "", fmt.Errorf("hash %s: %w", path, err)
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// ErrChanged is matched by the errors of Verify.
var ErrChanged = errors.New("image file changed")

// ChangedError says how a file differs from its stamp.
type ChangedError struct {
	Stamp Stamp
	What  string // e.g. "size 1024 → 2048 bytes", "gone"
}

func (e *ChangedError) Error() string {
	return fmt.Sprintf("%s %s changed since it was recorded (%s)", e.Stamp.Role, e.Stamp.Path, e.What)
}

func (e *ChangedError) Unwrap() error { return ErrChanged }

// Verify checks that every stamped file is still what was stamped (stat
// only: size, modification time, inode, device; content is not read). It
// returns the first difference as a *ChangedError, or nil.
func Verify(stamps []Stamp) error {
	for _, s := range stamps {
		stat := os.Stat
		if s.Role == FieldModules {
			stat = os.Lstat
		}
		st, err := stat(s.Path)
		if errors.Is(err, fs.ErrNotExist) {
			return &ChangedError{Stamp: s, What: "gone"}
		}
		if err != nil {
			return fmt.Errorf("check %s %s: %w", s.Role, s.Path, err)
		}
		now := stampOf(s.Role, s.Path, s.Rel, st)
		if what := difference(s, now); what != "" {
			return &ChangedError{Stamp: s, What: what}
		}
	}
	return nil
}

func difference(was, now Stamp) string {
	switch {
	case was.Inode != now.Inode || was.Dev != now.Dev:
		return "replaced by another file"
	case was.Link != now.Link:
		return "replaced by a symlink or a file"
	case was.Size != now.Size:
		return fmt.Sprintf("size %d → %d bytes", was.Size, now.Size)
	case was.MTimeNS != now.MTimeNS:
		return fmt.Sprintf("modified at %s, recorded %s",
			time.Unix(0, now.MTimeNS).UTC().Format(time.RFC3339Nano), time.Unix(0, was.MTimeNS).UTC().Format(time.RFC3339Nano))
	case was.CTimeNS != 0 && was.CTimeNS != now.CTimeNS:
		return fmt.Sprintf("written to or its metadata changed at %s (inode change time), recorded %s",
			time.Unix(0, now.CTimeNS).UTC().Format(time.RFC3339Nano), time.Unix(0, was.CTimeNS).UTC().Format(time.RFC3339Nano))
	}
	return ""
}

// SameContent checks that two fingerprints, made with hashes, list the
// same files (by role and, in the modules tree, relative path) with the
// same content. Promote's copy is checked with it against its source.
func SameContent(src, dst []Stamp) error {
	key := func(s Stamp) string { return s.Role + "\x00" + s.Rel }
	want := map[string]Stamp{}
	for _, s := range src {
		want[key(s)] = s
	}
	if len(src) != len(dst) {
		return fmt.Errorf("copy has %d files, source %d: %w", len(dst), len(src), ErrChanged)
	}
	for _, d := range dst {
		s, ok := want[key(d)]
		switch {
		case !ok:
			return fmt.Errorf("copy has %s, which the source has not: %w", d.Path, ErrChanged)
		case s.SHA256 == "" || d.SHA256 == "":
			return fmt.Errorf("%s: no content hash to compare", d.Path)
		case s.SHA256 != d.SHA256 || s.Link != d.Link:
			return fmt.Errorf("copy %s differs from %s (sha256 %s, source %s): %w", d.Path, s.Path, d.SHA256, s.SHA256, ErrChanged)
		}
	}
	return nil
}
