package initramfs

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/bangerdev/banger/internal/hostfile"
	"github.com/bangerdev/banger/internal/kernelimage"
	"github.com/bangerdev/banger/internal/kmod"
)

// Module names and modules.dep parsing and ordering are in package kmod,
// shared with the guest agent.

// ReleaseDir finds the module directory of kernel release in modulesDir:
// the release directory itself (it holds modules.dep), whatever its name,
// or a directory holding it (a /lib/modules-like tree, or a root with
// lib/modules/<release>). The release comes from the kernel (package
// kernelimage), never from a directory name; the modules' vermagic is
// checked against it (see kmod.FindRelease). Errors match
// kmod.ErrWrongRelease.
func ReleaseDir(modulesDir, release string) (string, error) {
	if err := kernelimage.ValidRelease(release); err != nil {
		return "", fmt.Errorf("modules dir %s: %w", modulesDir, err)
	}
	return kmod.FindRelease(modulesDir, release, hostfile.OpenBeneath)
}

// ModuleSet is the result of resolving module names against a release
// directory on the host.
type ModuleSet struct {
	// ReleaseDir is the absolute directory holding modules.dep.
	ReleaseDir string
	// Release is the kernel release (uname -r).
	Release string
	// Files are module paths relative to ReleaseDir, dependencies first.
	Files []string
	// Deps maps each of Files to its dependencies (relative paths), for
	// writing a modules.dep that covers exactly Files.
	Deps map[string][]string
	// Builtin lists the wanted names found in modules.builtin.
	Builtin []string
	// Unknown lists wanted names found neither in modules.dep nor in
	// modules.builtin. They are assumed built in (the guest does the same,
	// except that it tries to load a module file path as given), so a
	// kernel without an optional driver still boots.
	Unknown []string
}

// ResolveModules resolves names against the modules of kernel release (see
// ReleaseDir for modulesDir and release) and checks that every module file
// exists.
func ResolveModules(modulesDir, release string, names []string) (*ModuleSet, error) {
	dir, err := ReleaseDir(modulesDir, release)
	rel := release
	if err != nil {
		return nil, err
	}
	f, err := hostfile.OpenBeneath(dir, "modules.dep")
	if err != nil {
		return nil, fmt.Errorf("open modules.dep: %w", err)
	}
	defer f.Close()
	deps, err := kmod.ParseModulesDep(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f.Name(), err)
	}
	var builtin map[string]bool
	if b, err := hostfile.OpenBeneath(dir, "modules.builtin"); err == nil {
		builtin, err = kmod.ParseModulesBuiltin(b)
		b.Close()
		if err != nil {
			return nil, err
		}
	}
	files, missing := hostModules(deps, names)
	set := &ModuleSet{ReleaseDir: dir, Release: rel, Deps: map[string][]string{}}
	for _, p := range files {
		rp, err := relModulePath(dir, rel, p)
		if err != nil {
			return nil, err
		}
		if !fileExists(filepath.Join(dir, filepath.FromSlash(rp))) {
			return nil, fmt.Errorf("module %s listed in modules.dep is missing from %s", rp, dir)
		}
		if err := checkModuleRelease(dir, rp, rel); err != nil {
			return nil, err
		}
		set.Files = append(set.Files, rp)
		var ds []string
		for _, d := range deps[kmod.ModuleName(p)].Deps {
			rd, err := relModulePath(dir, rel, d)
			if err != nil {
				return nil, err
			}
			ds = append(ds, rd)
		}
		set.Deps[rp] = ds
	}
	for _, m := range missing {
		if builtin[kmod.ModuleName(m)] {
			set.Builtin = append(set.Builtin, m)
		} else {
			set.Unknown = append(set.Unknown, m)
		}
	}
	return set, nil
}

// checkModuleRelease refuses the module file rp of dir when its vermagic
// names another release than the kernel's: the guest could not load it. A
// module whose release can't be read (compressed with xz or zstd) passes.
func checkModuleRelease(dir, rp, release string) error {
	if !strings.HasSuffix(rp, ".ko") && !strings.HasSuffix(rp, ".ko.gz") {
		return nil
	}
	f, err := hostfile.OpenBeneath(dir, filepath.FromSlash(rp))
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	defer f.Close()
	r, err := kmod.FileRelease(f)
	if err != nil || r == release {
		return nil
	}
	return fmt.Errorf("module %s in %s was built for kernel %s, not for the kernel's release %s: give the modules of release %s: %w",
		rp, dir, r, release, release, kmod.ErrWrongRelease)
}

// hostModules is deps.Resolve(names) for packing modules on the host: a
// module file path that modules.dep does not know, which Resolve returns in
// files for the guest to load as given, is reported in missing instead, at
// its place in names (like any name absent from modules.dep, it is then
// looked up in modules.builtin, or assumed built in).
func hostModules(deps kmod.ModulesDep, names []string) (files, missing []string) {
	resolved, absent := deps.Resolve(names)
	isDep := map[string]bool{}
	for _, p := range resolved {
		for _, d := range deps[kmod.ModuleName(p)].Deps {
			isDep[d] = true
		}
	}
	notFound := map[string]bool{}
	for _, m := range absent {
		notFound[m] = true
	}
	for _, p := range resolved {
		if _, ok := deps[kmod.ModuleName(p)]; !ok && !isDep[p] {
			notFound[p] = true // a file given as is
			continue
		}
		files = append(files, p)
	}
	for _, n := range names {
		if notFound[n] {
			delete(notFound, n)
			missing = append(missing, n)
		}
	}
	return files, missing
}

// relModulePath turns a modules.dep path into a path relative to the
// release directory. depmod normally writes relative paths; with an odd
// base directory it may write "/lib/modules/<rel>/kernel/..." or
// "some/prefix/lib/modules/<rel>/kernel/...".
func relModulePath(dir, rel, p string) (string, error) {
	p = filepath.ToSlash(p)
	marker := "lib/modules/" + rel + "/"
	if i := strings.Index(p, marker); i >= 0 {
		p = p[i+len(marker):]
	} else if ad := filepath.ToSlash(dir) + "/"; strings.HasPrefix(p, ad) {
		p = strings.TrimPrefix(p, ad)
	}
	clean := path.Clean(p)
	if path.IsAbs(clean) || clean == ".." || strings.HasPrefix(clean, "../") {
		return "", fmt.Errorf("modules.dep path %q is outside the release directory", p)
	}
	return clean, nil
}

// FormatModulesDep writes a modules.dep for files (in order) with deps.
func FormatModulesDep(files []string, deps map[string][]string) []byte {
	var b strings.Builder
	for _, f := range files {
		b.WriteString(f)
		b.WriteString(":")
		for _, d := range deps[f] {
			b.WriteString(" ")
			b.WriteString(d)
		}
		b.WriteString("\n")
	}
	return []byte(b.String())
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}
