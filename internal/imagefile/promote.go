package imagefile

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/disk"
)

// Names of the artifacts inside a promoted image directory.
const (
	RootfsName  = "rootfs.img"
	KernelName  = "kernel"
	InitrdName  = "initrd"
	ModulesName = "modules"
)

// partialMarker is part of the name of the temporary directory Promote
// fills before renaming it into place: ".<name>.promote-<random>".
const partialMarker = ".promote-"

// progressEvery is the minimum interval between two progress reports
// within a phase.
const progressEvery = 100 * time.Millisecond

// Progress reports how far Promote got in one phase.
type Progress struct {
	Phase string // FieldRootfs, FieldKernel, FieldInitrd or FieldModules
	Done  int64  // bytes copied so far in this phase (holes count as copied)
	Total int64  // bytes to copy in this phase
}

// Promote copies the artifacts src into the new directory destDir and
// returns their new paths (RootfsName, KernelName, InitrdName and
// ModulesName inside destDir; optional artifacts not given stay empty).
//
// destDir must be absolute and must not exist; its parent must. Promote
// fills a temporary directory next to destDir and renames it into place
// at the end, so a failure or a cancelled ctx leaves nothing at destDir
// (a crash may leave the temporary directory: see RemovePartial).
//
// Files are cloned by reflink where the filesystem allows and otherwise
// copied sparse (holes stay holes); the modules directory is copied
// recursively, keeping symlinks and permission bits. progress, if not nil,
// is called from Promote's goroutine at most every ~100 ms per phase and at
// the end of each phase with Done == Total; Done never decreases within a
// phase.
func Promote(ctx context.Context, src Artifacts, destDir string, progress func(Progress)) (_ Artifacts, err error) {
	if err := ValidateParts(src); err != nil {
		return Artifacts{}, fmt.Errorf("promote image to %s: %w", destDir, err)
	}
	if !filepath.IsAbs(destDir) {
		return Artifacts{}, fmt.Errorf("promote image to %q: destination must be an absolute path", destDir)
	}
	destDir = filepath.Clean(destDir)
	if _, err := os.Lstat(destDir); err == nil {
		return Artifacts{}, fmt.Errorf("promote image to %s: destination already exists: %w", destDir, fs.ErrExist)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return Artifacts{}, fmt.Errorf("promote image to %s: %w", destDir, err)
	}
	parent := filepath.Dir(destDir)
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(destDir)+partialMarker+"*")
	if err != nil {
		return Artifacts{}, fmt.Errorf("promote image to %s: create temporary directory: %w", destDir, err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o755); err != nil {
		return Artifacts{}, fmt.Errorf("promote image to %s: %w", destDir, err)
	}

	rep := &reporter{fn: progress, now: time.Now}
	out := Artifacts{}
	files := []struct {
		phase, src, name string
		dst              *string
	}{
		{FieldRootfs, src.Rootfs, RootfsName, &out.Rootfs},
		{FieldKernel, src.Kernel, KernelName, &out.Kernel},
		{FieldInitrd, src.Initrd, InitrdName, &out.Initrd},
	}
	for _, f := range files {
		if f.src == "" {
			continue
		}
		if err := copyArtifact(ctx, rep, f.phase, filepath.Clean(f.src), filepath.Join(tmp, f.name)); err != nil {
			return Artifacts{}, fmt.Errorf("promote image to %s: %w", destDir, err)
		}
		*f.dst = filepath.Join(destDir, f.name)
	}
	if src.ModulesDir != "" {
		if err := copyModules(ctx, rep, filepath.Clean(src.ModulesDir), filepath.Join(tmp, ModulesName)); err != nil {
			return Artifacts{}, fmt.Errorf("promote image to %s: %w", destDir, err)
		}
		out.ModulesDir = filepath.Join(destDir, ModulesName)
	}

	if err := ctx.Err(); err != nil {
		return Artifacts{}, fmt.Errorf("promote image to %s: %w", destDir, err)
	}
	if err := syncDir(tmp); err != nil {
		return Artifacts{}, fmt.Errorf("promote image to %s: %w", destDir, err)
	}
	if err := renameNoReplace(tmp, destDir); err != nil {
		return Artifacts{}, fmt.Errorf("promote image to %s: %w", destDir, err)
	}
	if err := syncDir(parent); err != nil {
		// The image is in place; only its durability is in doubt. Undo it
		// so that the caller's view (an error means no image) holds.
		os.RemoveAll(destDir)
		return Artifacts{}, fmt.Errorf("promote image to %s: %w", destDir, err)
	}
	return out, nil
}

// copyArtifact copies one file artifact, reporting progress for phase.
func copyArtifact(ctx context.Context, rep *reporter, phase, src, dst string) error {
	st, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("%s: %w", phase, err)
	}
	total := st.Size()
	if _, err := disk.CopyFile(ctx, src, dst, disk.CopyOptions{
		Mode:     0o644,
		Progress: func(done, _ int64) { rep.update(phase, done, total) },
	}); err != nil {
		return fmt.Errorf("copy %s: %w", phase, err)
	}
	rep.end(phase, total)
	return nil
}

// copyModules copies the directory tree src to dst (which must not exist),
// keeping symlinks as symlinks and permission bits.
func copyModules(ctx context.Context, rep *reporter, src, dst string) error {
	root, err := filepath.EvalSymlinks(src)
	if err != nil {
		return fmt.Errorf("%s: %w", FieldModules, err)
	}
	total, err := DirSize(root)
	if err != nil {
		return fmt.Errorf("%s: %w", FieldModules, err)
	}
	if err := CopyTree(ctx, root, dst, func(done int64) { rep.update(FieldModules, done, total) }); err != nil {
		return fmt.Errorf("copy %s: %w", FieldModules, err)
	}
	rep.end(FieldModules, total)
	return nil
}

// CopyTree copies the directory tree src to dst, which must not exist:
// directories and regular files with their permission bits (files cloned or
// copied sparse, see disk.CopyFile), symlinks as symlinks. Other file types
// are an error. progress, if not nil, is called with the bytes of regular
// files copied so far. On failure the caller removes dst.
func CopyTree(ctx context.Context, src, dst string, progress func(done int64)) error {
	if progress == nil {
		progress = func(int64) {}
	}
	type dirMode struct {
		path string
		mode fs.FileMode
	}
	var dirs []dirMode
	var done int64
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		mode := info.Mode()
		switch {
		case mode.IsDir():
			// Writable until the copy is done; the real mode is set at the end.
			if err := os.Mkdir(target, 0o700); err != nil {
				return err
			}
			dirs = append(dirs, dirMode{target, mode.Perm() | mode&(fs.ModeSetgid|fs.ModeSticky)})
		case mode&fs.ModeSymlink != 0:
			link, err := os.Readlink(path)
			if err != nil {
				return err
			}
			if err := os.Symlink(link, target); err != nil {
				return err
			}
		case mode.IsRegular():
			base := done
			if _, err := disk.CopyFile(ctx, path, target, disk.CopyOptions{
				Mode:     0o600,
				Progress: func(n, _ int64) { progress(base + n) },
			}); err != nil {
				return err
			}
			if err := os.Chmod(target, mode.Perm()|mode&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky)); err != nil {
				return err
			}
			done += info.Size()
			progress(done)
		default:
			return fmt.Errorf("%s: unsupported file type (%s)", path, describeType(mode))
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, d := range slices.Backward(dirs) {
		if err := os.Chmod(d.path, d.mode); err != nil {
			return err
		}
	}
	return nil
}

// RemovePartial removes the temporary directories that Promote calls
// interrupted by a crash left in dir, and returns their paths. Call it at
// daemon start, before any Promote into dir runs.
func RemovePartial(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("remove partial images in %s: %w", dir, err)
	}
	var removed []string
	for _, e := range entries {
		name := e.Name()
		if !e.IsDir() || !strings.HasPrefix(name, ".") || !strings.Contains(name, partialMarker) {
			continue
		}
		p := filepath.Join(dir, name)
		if err := os.RemoveAll(p); err != nil {
			return removed, fmt.Errorf("remove partial image %s: %w", p, err)
		}
		removed = append(removed, p)
	}
	return removed, nil
}

// renameNoReplace renames the directory from to to, failing with an
// fs.ErrExist error if to exists (even as an empty directory).
func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EEXIST):
		return fmt.Errorf("rename into place: destination already exists: %w", fs.ErrExist)
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOSYS):
		// The filesystem doesn't know RENAME_NOREPLACE: check, then rename.
		if _, err := os.Lstat(to); err == nil {
			return fmt.Errorf("rename into place: destination already exists: %w", fs.ErrExist)
		}
		if err := os.Rename(from, to); err != nil {
			return fmt.Errorf("rename into place: %w", err)
		}
		return nil
	default:
		return fmt.Errorf("rename %s to %s: %w", from, to, err)
	}
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// reporter throttles progress reports.
type reporter struct {
	fn   func(Progress)
	now  func() time.Time
	last time.Time
	done int64 // last Done reported in the current phase
	cur  string
}

func (r *reporter) update(phase string, done, total int64) {
	if r.fn == nil {
		return
	}
	if phase != r.cur {
		r.cur, r.done = phase, 0
	}
	done = min(max(done, r.done), total)
	now := r.now()
	if now.Sub(r.last) < progressEvery {
		return
	}
	r.last, r.done = now, done
	r.fn(Progress{Phase: phase, Done: done, Total: total})
}

func (r *reporter) end(phase string, total int64) {
	if r.fn == nil {
		return
	}
	r.last, r.cur, r.done = r.now(), phase, total
	r.fn(Progress{Phase: phase, Done: total, Total: total})
}
