package initramfs

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// ModuleName returns the canonical name of a kernel module given its name
// or the path of its file: the base name without ".ko" (and a compression
// suffix), with '-' replaced by '_' (the kernel treats both as equal).
func ModuleName(s string) string {
	s = path.Base(filepath.ToSlash(s))
	for _, suf := range []string{".ko.xz", ".ko.zst", ".ko.gz", ".ko"} {
		if strings.HasSuffix(s, suf) {
			s = strings.TrimSuffix(s, suf)
			break
		}
	}
	return strings.ReplaceAll(s, "-", "_")
}

// ModuleDep is one line of modules.dep.
type ModuleDep struct {
	// Path is the module file as written in modules.dep, usually relative
	// to the release directory (kernel/fs/ext4/ext4.ko).
	Path string
	// Deps are the paths of the modules it needs (depmod lists the full
	// transitive closure).
	Deps []string
}

// ModulesDep is a parsed modules.dep, keyed by canonical module name.
type ModulesDep map[string]ModuleDep

// ParseModulesDep parses the modules.dep format written by depmod:
// "path: dep1 dep2", one module per line.
func ParseModulesDep(r io.Reader) (ModulesDep, error) {
	deps := ModulesDep{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	line := 0
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		p, rest, ok := strings.Cut(s, ":")
		if !ok || strings.TrimSpace(p) == "" {
			return nil, fmt.Errorf("modules.dep line %d: missing ':'", line)
		}
		p = strings.TrimSpace(p)
		deps[ModuleName(p)] = ModuleDep{Path: p, Deps: strings.Fields(rest)}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read modules.dep: %w", err)
	}
	return deps, nil
}

// Resolve returns the module files to load for names, each after the
// modules it depends on, without duplicates. Names may be given with '-' or
// '_', or as paths of .ko files. Names absent from modules.dep are returned
// in missing (built into the kernel, or not available).
func (d ModulesDep) Resolve(names []string) (files []string, missing []string) {
	state := map[string]int{} // 1 = visiting, 2 = done
	var visit func(name string)
	visit = func(name string) {
		if state[name] != 0 {
			return // done, or a cycle (depmod never writes one)
		}
		state[name] = 1
		m := d[name]
		for _, dep := range m.Deps {
			dn := ModuleName(dep)
			if _, ok := d[dn]; ok {
				visit(dn)
			} else if state[dn] == 0 {
				// A dependency without its own line: load it by path.
				state[dn] = 2
				files = append(files, dep)
			}
		}
		state[name] = 2
		files = append(files, m.Path)
	}
	for _, n := range names {
		name := ModuleName(n)
		if _, ok := d[name]; !ok {
			if state[name] == 0 {
				state[name] = 2
				missing = append(missing, n)
			}
			continue
		}
		visit(name)
	}
	return files, missing
}

// ParseModulesBuiltin parses modules.builtin (one "kernel/.../x.ko" per
// line) into a set of canonical module names.
func ParseModulesBuiltin(r io.Reader) (map[string]bool, error) {
	set := map[string]bool{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		set[ModuleName(s)] = true
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read modules.builtin: %w", err)
	}
	return set, nil
}

// ErrNoKernelRelease means a modules directory holds no lib/modules/<release>.
var ErrNoKernelRelease = errors.New("no kernel release directory with modules.dep")

// ReleaseDir finds the module directory of a kernel release. modulesDir is
// either the release directory itself (it holds modules.dep), or a
// directory containing lib/modules/<release> (a root filesystem or an
// unpacked kernel package), or lib/modules itself. release selects one
// release when several are present; when empty, exactly one must exist. It
// returns the release directory and the release name.
func ReleaseDir(modulesDir, release string) (dir, rel string, err error) {
	if fileExists(filepath.Join(modulesDir, "modules.dep")) {
		name := filepath.Base(filepath.Clean(modulesDir))
		if release != "" && release != name {
			return "", "", fmt.Errorf("modules dir %s is for release %s, not %s", modulesDir, name, release)
		}
		return modulesDir, name, nil
	}
	for _, base := range []string{filepath.Join(modulesDir, "lib", "modules"), filepath.Join(modulesDir, "usr", "lib", "modules"), modulesDir} {
		ents, err := os.ReadDir(base)
		if err != nil {
			continue
		}
		var found []string
		for _, e := range ents {
			if !e.IsDir() || !fileExists(filepath.Join(base, e.Name(), "modules.dep")) {
				continue
			}
			found = append(found, e.Name())
		}
		sort.Strings(found)
		switch {
		case release != "":
			for _, f := range found {
				if f == release {
					return filepath.Join(base, f), f, nil
				}
			}
			if len(found) > 0 {
				return "", "", fmt.Errorf("modules dir %s has no release %s (found %s)", modulesDir, release, strings.Join(found, ", "))
			}
		case len(found) == 1:
			return filepath.Join(base, found[0]), found[0], nil
		case len(found) > 1:
			return "", "", fmt.Errorf("modules dir %s holds several kernel releases (%s): choose one", modulesDir, strings.Join(found, ", "))
		}
	}
	return "", "", fmt.Errorf("modules dir %s: %w (run depmod -b on it)", modulesDir, ErrNoKernelRelease)
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
	// modules.builtin. They are assumed built in (the guest does the same),
	// so a kernel without an optional driver still boots.
	Unknown []string
}

// ResolveModules resolves names against the modules of one kernel release
// (see ReleaseDir for modulesDir and release) and checks that every module
// file exists.
func ResolveModules(modulesDir, release string, names []string) (*ModuleSet, error) {
	dir, rel, err := ReleaseDir(modulesDir, release)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(filepath.Join(dir, "modules.dep"))
	if err != nil {
		return nil, fmt.Errorf("open modules.dep: %w", err)
	}
	defer f.Close()
	deps, err := ParseModulesDep(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f.Name(), err)
	}
	var builtin map[string]bool
	if b, err := os.Open(filepath.Join(dir, "modules.builtin")); err == nil {
		builtin, err = ParseModulesBuiltin(b)
		b.Close()
		if err != nil {
			return nil, err
		}
	}
	files, missing := deps.Resolve(names)
	set := &ModuleSet{ReleaseDir: dir, Release: rel, Deps: map[string][]string{}}
	for _, p := range files {
		rp, err := relModulePath(dir, rel, p)
		if err != nil {
			return nil, err
		}
		if !fileExists(filepath.Join(dir, filepath.FromSlash(rp))) {
			return nil, fmt.Errorf("module %s listed in modules.dep is missing from %s", rp, dir)
		}
		set.Files = append(set.Files, rp)
		var ds []string
		for _, d := range deps[ModuleName(p)].Deps {
			rd, err := relModulePath(dir, rel, d)
			if err != nil {
				return nil, err
			}
			ds = append(ds, rd)
		}
		set.Deps[rp] = ds
	}
	for _, m := range missing {
		if builtin[ModuleName(m)] {
			set.Builtin = append(set.Builtin, m)
		} else {
			set.Unknown = append(set.Unknown, m)
		}
	}
	return set, nil
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
