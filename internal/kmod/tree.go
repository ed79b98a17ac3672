package kmod

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// This file finds, in a directory on the host, the modules of one kernel
// release, and checks them against that release with the modules' own
// vermagic rather than with directory names.

// ErrWrongRelease means a modules directory cannot serve a kernel: it has
// no modules.dep, or its modules were built for another release.
var ErrWrongRelease = errors.New("kernel modules do not match the kernel")

// ReleaseError says which release a kernel needs and what a modules
// directory offers. It matches ErrWrongRelease.
type ReleaseError struct {
	Dir   string  // the modules directory as given
	Want  string  // the kernel's release
	Found []Found // release directories found, none when there is no modules.dep
}

// Found is one release directory (one holding modules.dep).
type Found struct {
	Dir string
	// Release is what the modules' vermagic says, or the directory's name
	// when no module could be read (Verified false).
	Release  string
	Verified bool
	// Module is the module file Release was read from.
	Module string
}

func (e *ReleaseError) Error() string {
	if len(e.Found) == 0 {
		return fmt.Sprintf("no modules.dep for kernel release %s in %s: give a copy of /lib/modules/%s (depmod'ed) or a directory holding it",
			e.Want, e.Dir, e.Want)
	}
	var fs []string
	for _, f := range e.Found {
		s := f.Release
		switch {
		case f.Verified:
			s += " (vermagic of " + f.Module + ")"
		default:
			s += " (" + f.Dir + ", unverified: no readable .ko)"
		}
		fs = append(fs, s)
	}
	return fmt.Sprintf("the kernel is release %s but %s has modules for %s: give the modules of release %s",
		e.Want, e.Dir, strings.Join(fs, ", "), e.Want)
}

func (e *ReleaseError) Unwrap() error { return ErrWrongRelease }

// FindRelease returns the directory under modulesDir holding the modules
// of kernel release (the one with their modules.dep). modulesDir is either
// that directory itself, whatever its name (a copy of /lib/modules/<release>
// named build/modules), or a directory holding it: a /lib/modules-like
// tree, or a root with lib/modules/<release> or usr/lib/modules/<release>.
// Symlinks are followed.
//
// A release directory is checked with the vermagic of one of its modules:
// when it names another release, the directory is refused. A release
// directory whose modules can't be read (compressed with xz or zstd, which
// the standard library doesn't read) is accepted when it is modulesDir
// itself and not named after another release (a name like "5.10.0-9"), or
// is named release. A child named otherwise is accepted when its modules
// say release. Errors are *ReleaseError.
//
// open opens a file (a path relative to a release directory) for reading;
// the host passes one that refuses symlinks out of the directory. nil
// means os.Open.
func FindRelease(modulesDir, release string, open OpenFunc) (string, error) {
	if open == nil {
		open = func(dir, rel string) (*os.File, error) { return os.Open(filepath.Join(dir, rel)) }
	}
	if isFile(filepath.Join(modulesDir, "modules.dep")) {
		f := probe(open, modulesDir, filepath.Base(filepath.Clean(modulesDir)))
		// Unverified, the name is all there is: one that is another
		// release's (/lib/modules/5.10.0-9-amd64) is not this kernel's.
		if f.Release != release && (f.Verified || looksLikeRelease(f.Release)) {
			return "", &ReleaseError{Dir: modulesDir, Want: release, Found: []Found{f}}
		}
		return modulesDir, nil
	}
	var others []string // release directories not named release
	var found []Found
	for _, base := range []string{filepath.Join(modulesDir, "lib", "modules"), filepath.Join(modulesDir, "usr", "lib", "modules"), modulesDir} {
		ents, err := os.ReadDir(base)
		if err != nil {
			continue
		}
		for _, e := range ents {
			dir := filepath.Join(base, e.Name())
			if !isFile(filepath.Join(dir, "modules.dep")) { // follows a symlinked release dir
				continue
			}
			if e.Name() != release {
				others = append(others, dir)
				continue
			}
			f := probe(open, dir, e.Name())
			if f.Verified && f.Release != release {
				found = append(found, f)
				continue
			}
			return dir, nil
		}
	}
	sort.Strings(others)
	var match []string
	for _, dir := range others {
		f := probe(open, dir, filepath.Base(dir))
		if f.Verified && f.Release == release {
			match = append(match, dir)
			continue
		}
		found = append(found, f)
	}
	if len(match) == 1 {
		return match[0], nil
	}
	if len(match) > 1 {
		return "", fmt.Errorf("%s holds several directories with modules for %s (%s): give one of them: %w",
			modulesDir, release, strings.Join(match, ", "), ErrWrongRelease)
	}
	return "", &ReleaseError{Dir: modulesDir, Want: release, Found: found}
}

// looksLikeRelease tells a directory name that is a kernel release
// ("6.1.0-28-cloud-amd64", "5.10.0") from any other name ("modules").
func looksLikeRelease(name string) bool {
	return len(name) > 2 && name[0] >= '0' && name[0] <= '9' && strings.Contains(name, ".")
}

// OpenFunc opens the file rel (relative, slash-separated) of directory dir.
type OpenFunc func(dir, rel string) (*os.File, error)

// maxProbes bounds the module files read to learn a directory's release.
const maxProbes = 3

// probe learns which release the modules in dir were built for from the
// vermagic of the first readable module modules.dep lists. Without one, it
// returns name, unverified.
func probe(open OpenFunc, dir, name string) Found {
	out := Found{Dir: dir, Release: name}
	f, err := open(dir, "modules.dep")
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	tries := 0
	for sc.Scan() && tries < maxProbes {
		p, _, ok := strings.Cut(strings.TrimSpace(sc.Text()), ":")
		if !ok || !(strings.HasSuffix(p, ".ko") || strings.HasSuffix(p, ".ko.gz")) || path.IsAbs(p) {
			continue
		}
		tries++
		mf, err := open(dir, filepath.FromSlash(p))
		if err != nil {
			continue
		}
		rel, err := FileRelease(mf)
		mf.Close()
		if err != nil {
			continue
		}
		out.Release, out.Verified, out.Module = rel, true, filepath.Join(dir, filepath.FromSlash(p))
		return out
	}
	return out
}

// maxModuleBytes bounds what is read of one module file.
const maxModuleBytes = 256 << 20

// ModuleFileRelease returns the kernel release the module file p (".ko",
// or ".ko.gz") was built for: the first word of its vermagic.
func ModuleFileRelease(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return FileRelease(f)
}

// FileRelease is ModuleFileRelease of an open module file (its name tells
// whether it is gzip'ed).
func FileRelease(f *os.File) (string, error) {
	p := f.Name()
	var r io.Reader = f
	if strings.HasSuffix(p, ".gz") {
		zr, err := gzip.NewReader(f)
		if err != nil {
			return "", fmt.Errorf("%s: %w", p, err)
		}
		r = zr
	}
	rel, err := ModuleRelease(r)
	if err != nil {
		return "", fmt.Errorf("%s: %w", p, err)
	}
	return rel, nil
}

var (
	elfMagic = []byte("\x7fELF")
	vermagic = []byte("\x00vermagic=")
)

// ModuleRelease returns the kernel release an uncompressed module (an ELF
// relocatable file) was built for: the first word of the vermagic entry of
// its .modinfo section, whose entries are NUL-separated "key=value" strings.
// It scans the file's bytes rather than parsing ELF, so the guest agent,
// which reports the release of a module it failed to load, stays small.
func ModuleRelease(r io.Reader) (string, error) {
	b, err := io.ReadAll(io.LimitReader(r, maxModuleBytes))
	if err != nil {
		return "", fmt.Errorf("read kernel module: %w", err)
	}
	if !bytes.HasPrefix(b, elfMagic) {
		return "", errors.New("not a kernel module (not an ELF file)")
	}
	i := bytes.Index(b, vermagic)
	if i < 0 {
		return "", errors.New("kernel module without vermagic")
	}
	v := b[i+len(vermagic):]
	if j := bytes.IndexByte(v, 0); j >= 0 {
		v = v[:j]
	}
	fs := strings.Fields(string(v))
	if len(fs) == 0 {
		return "", errors.New("kernel module with an empty vermagic")
	}
	return fs[0], nil
}

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}
