// Package tarcopy moves files and directory trees as tar streams: Write
// packs a path, Extract unpacks a stream under a directory without letting
// any entry escape it. The guest agent and the CLI's vm cp share it.
package tarcopy

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// ErrUnsafePath is returned for tar entries that would land outside the
// destination directory.
var ErrUnsafePath = errors.New("path escapes the destination")

func logger(log *slog.Logger) *slog.Logger {
	if log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return log
}

// Extract extracts the tar stream r under the absolute directory dest (log
// may be nil),
// creating dest and its parents. Every file operation goes through an
// os.Root opened on dest, so neither ".." names, absolute names nor symlinks
// (created by the archive or already there) can make a write land outside
// dest. Modes (including setuid/setgid/sticky) and modification times are
// kept; ownership is not (files belong to the agent's user, root). Device
// nodes, FIFOs and sockets are skipped.
func Extract(r io.Reader, dest string, log *slog.Logger) error {
	log = logger(log)
	if !filepath.IsAbs(dest) {
		return fmt.Errorf("destination %q: not an absolute path", dest)
	}
	if err := os.MkdirAll(dest, 0o755); err != nil {
		return fmt.Errorf("create destination: %w", err)
	}
	root, err := os.OpenRoot(dest)
	if err != nil {
		return fmt.Errorf("open destination: %w", err)
	}
	defer root.Close()

	type dirMeta struct {
		name  string
		mode  fs.FileMode
		mtime time.Time
		atime time.Time
	}
	var dirs []dirMeta
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read tar: %w", err)
		}
		name, err := entryName(hdr.Name)
		if err != nil {
			return err
		}
		mode := hdr.FileInfo().Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
		atime := hdr.AccessTime
		if atime.IsZero() {
			atime = hdr.ModTime
		}
		if dir := path.Dir(name); dir != "." {
			if err := root.MkdirAll(dir, 0o755); err != nil {
				return fmt.Errorf("create %s: %w", dir, err)
			}
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := mkdirEntry(root, name); err != nil {
				return err
			}
			dirs = append(dirs, dirMeta{name, mode, hdr.ModTime, atime})
		case tar.TypeReg:
			if err := removeExisting(root, name); err != nil {
				return err
			}
			f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return fmt.Errorf("create %s: %w", name, err)
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("write %s: %w", name, err)
			}
			if err := root.Chmod(name, mode); err != nil {
				return fmt.Errorf("chmod %s: %w", name, err)
			}
			if err := root.Chtimes(name, atime, hdr.ModTime); err != nil {
				return fmt.Errorf("set times of %s: %w", name, err)
			}
		case tar.TypeSymlink:
			// The target is stored as is: os.Root refuses to follow it
			// out of dest for later entries.
			if err := removeExisting(root, name); err != nil {
				return err
			}
			if err := root.Symlink(hdr.Linkname, name); err != nil {
				return fmt.Errorf("create symlink %s: %w", name, err)
			}
		case tar.TypeLink:
			target, err := entryName(hdr.Linkname)
			if err != nil {
				return err
			}
			if err := removeExisting(root, name); err != nil {
				return err
			}
			if err := root.Link(target, name); err != nil {
				return fmt.Errorf("create hard link %s: %w", name, err)
			}
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			log.Warn("copy in: skipping special file", "name", name, "type", string(hdr.Typeflag))
		case tar.TypeXGlobalHeader:
			// Global PAX header: nothing to create.
		default:
			log.Warn("copy in: skipping unsupported entry", "name", name, "type", string(hdr.Typeflag))
		}
	}
	// Directory modes and times last, deepest first: creating entries
	// changes a directory's mtime, and a read-only mode must not be set
	// before its children are written.
	slices.Reverse(dirs)
	for _, d := range dirs {
		if err := root.Chmod(d.name, d.mode); err != nil {
			return fmt.Errorf("chmod %s: %w", d.name, err)
		}
		if err := root.Chtimes(d.name, d.atime, d.mtime); err != nil {
			return fmt.Errorf("set times of %s: %w", d.name, err)
		}
	}
	return nil
}

// entryName validates a tar entry name and returns it cleaned and relative
// ("." for the destination itself). Absolute names and names with a ".."
// component are refused.
func entryName(name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("tar entry with empty name: %w", ErrUnsafePath)
	}
	if strings.HasPrefix(name, "/") || strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("tar entry %q: %w", name, ErrUnsafePath)
	}
	if slices.Contains(strings.Split(name, "/"), "..") {
		return "", fmt.Errorf("tar entry %q: %w", name, ErrUnsafePath)
	}
	return path.Clean(name), nil
}

// mkdirEntry makes sure name is a directory, replacing a non-directory.
func mkdirEntry(root *os.Root, name string) error {
	fi, err := root.Lstat(name)
	switch {
	case err == nil && fi.IsDir():
		return nil
	case err == nil:
		if err := root.Remove(name); err != nil {
			return fmt.Errorf("replace %s: %w", name, err)
		}
	case !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("stat %s: %w", name, err)
	}
	if err := root.Mkdir(name, 0o700); err != nil {
		return fmt.Errorf("create directory %s: %w", name, err)
	}
	return nil
}

// removeExisting removes a non-directory at name, as tar does before
// extracting a file over it. A directory is an error.
func removeExisting(root *os.Root, name string) error {
	fi, err := root.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stat %s: %w", name, err)
	}
	if fi.IsDir() {
		return fmt.Errorf("replace %s: is a directory", name)
	}
	if err := root.Remove(name); err != nil {
		return fmt.Errorf("replace %s: %w", name, err)
	}
	return nil
}

// Write writes a tar stream of the file or directory at src (absolute)
// to w. The top entry is named after the base name of src ("." for "/").
// Symlinks are stored as links, hard links within the tree as TypeLink
// entries; sockets are skipped.
func Write(w io.Writer, src string, log *slog.Logger) error {
	log = logger(log)
	if !filepath.IsAbs(src) {
		return fmt.Errorf("source %q: not an absolute path", src)
	}
	src = filepath.Clean(src)
	if _, err := os.Lstat(src); err != nil {
		return fmt.Errorf("stat source: %w", err)
	}
	top := filepath.Base(src)
	if top == "/" {
		top = "."
	}
	type inode struct{ dev, ino uint64 }
	links := map[inode]string{}
	tw := tar.NewWriter(w)
	walkErr := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		name := top
		if rel != "." {
			name = path.Join(top, filepath.ToSlash(rel))
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if fi.Mode()&fs.ModeSocket != 0 {
			log.Debug("copy out: skipping socket", "path", p)
			return nil
		}
		var link string
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		hdr.Name = name
		if fi.IsDir() {
			hdr.Name += "/"
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && fi.Mode().IsRegular() && st.Nlink > 1 {
			key := inode{uint64(st.Dev), st.Ino}
			if first, seen := links[key]; seen {
				hdr.Typeflag = tar.TypeLink
				hdr.Linkname = first
				hdr.Size = 0
			} else {
				links[key] = name
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag != tar.TypeReg {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := io.CopyN(tw, f, hdr.Size); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		return nil
	})
	if walkErr != nil {
		return fmt.Errorf("write tar of %s: %w", src, walkErr)
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("write tar of %s: %w", src, err)
	}
	return nil
}
