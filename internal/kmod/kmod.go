// Package kmod is kernel module dependency resolution from depmod's files:
// it parses modules.dep and modules.builtin and orders modules so that each
// comes after the modules it needs. It uses only the standard library, so
// both the host (package initramfs) and the static guest agent link it.
package kmod

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"path/filepath"
	"strings"
)

// moduleSuffixes are the file name endings of a kernel module, compressed
// or not, longest first.
var moduleSuffixes = []string{".ko.xz", ".ko.zst", ".ko.gz", ".ko"}

// ModuleName returns the canonical name of a kernel module given its name
// or the path of its file: the base name without ".ko" (and a compression
// suffix), with '-' replaced by '_' (the kernel treats both as equal).
func ModuleName(s string) string {
	s = path.Base(filepath.ToSlash(s))
	for _, suf := range moduleSuffixes {
		if strings.HasSuffix(s, suf) {
			s = strings.TrimSuffix(s, suf)
			break
		}
	}
	return strings.ReplaceAll(s, "-", "_")
}

// IsModuleFile tells a module file path ("kernel/fs/x.ko", "/lib/x.ko.xz",
// "x.ko") from a module name ("x", "virtio-blk").
func IsModuleFile(s string) bool {
	return strings.Contains(s, "/") || ModuleName(s) != strings.ReplaceAll(path.Base(s), "-", "_")
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
		p = strings.TrimSpace(p)
		if !ok || p == "" {
			return nil, fmt.Errorf("modules.dep line %d: missing ':'", line)
		}
		deps[ModuleName(p)] = ModuleDep{Path: p, Deps: strings.Fields(rest)}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read modules.dep: %w", err)
	}
	return deps, nil
}

// Resolve returns the module files to load for names (paths as written in
// modules.dep), each after the modules it depends on, without duplicates.
// Names may be module names ('-' and '_' are equivalent) or module file
// paths (agentproto.Config.Modules allows both). A dependency without a
// line of its own is loaded by its path.
//
// Names absent from modules.dep are returned in missing (built into the
// kernel, or not available), except file paths (see IsModuleFile): a file
// modules.dep does not know is returned in files as given, to be loaded as
// is (the guest agent does so). Such an entry is the name itself; its
// canonical name is not in d and, unless modules.dep lists it as a
// dependency without a line of its own, no module of d depends on it.
func (d ModulesDep) Resolve(names []string) (files, missing []string) {
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
		if _, ok := d[name]; ok {
			visit(name)
			continue
		}
		if state[name] != 0 {
			continue
		}
		state[name] = 2
		if IsModuleFile(n) {
			// A file unknown to modules.dep: load it as given.
			files = append(files, n)
		} else {
			missing = append(missing, n)
		}
	}
	return files, missing
}

// ParseModulesBuiltin parses modules.builtin (one "kernel/.../x.ko" per
// line) into a set of canonical module names. On a read error it returns
// the names read so far along with the error.
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
		return set, fmt.Errorf("read modules.builtin: %w", err)
	}
	return set, nil
}
