package guestagent

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"strings"
)

// Kernel module resolution inside the initramfs. Package initramfs has the
// same logic for the host; it is repeated here (it is short) so the guest
// binary links nothing but the standard library, x/ packages and agentproto.

// moduleName returns the canonical name of a module given its name or file
// path: base name without ".ko[.xz|.zst|.gz]", '-' replaced by '_'.
func moduleName(s string) string {
	s = path.Base(s)
	for _, suf := range []string{".ko.xz", ".ko.zst", ".ko.gz", ".ko"} {
		if strings.HasSuffix(s, suf) {
			s = strings.TrimSuffix(s, suf)
			break
		}
	}
	return strings.ReplaceAll(s, "-", "_")
}

type moduleDep struct {
	path string
	deps []string
}

// parseModulesDep parses modules.dep ("path: dep1 dep2" per line) into a
// map keyed by canonical module name.
func parseModulesDep(r io.Reader) (map[string]moduleDep, error) {
	deps := map[string]moduleDep{}
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
		deps[moduleName(p)] = moduleDep{path: p, deps: strings.Fields(rest)}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read modules.dep: %w", err)
	}
	return deps, nil
}

// parseModulesBuiltin returns the canonical names listed in modules.builtin.
func parseModulesBuiltin(r io.Reader) map[string]bool {
	set := map[string]bool{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if s := strings.TrimSpace(sc.Text()); s != "" {
			set[moduleName(s)] = true
		}
	}
	return set
}

// moduleOrder returns the module files (as written in modules.dep) to load
// for names, each after its dependencies, without duplicates; and the names
// that modules.dep does not know (built in, or absent). Entries may be
// module names ('-' and '_' are equivalent) or module file paths
// (agentproto.Config.Modules allows both); a path unknown to modules.dep is
// loaded as given.
func moduleOrder(deps map[string]moduleDep, names []string) (files, missing []string) {
	seen := map[string]bool{}
	var visit func(name string)
	visit = func(name string) {
		if seen[name] {
			return
		}
		seen[name] = true
		m := deps[name]
		for _, d := range m.deps {
			dn := moduleName(d)
			if _, ok := deps[dn]; ok {
				visit(dn)
			} else if !seen[dn] {
				seen[dn] = true
				files = append(files, d)
			}
		}
		files = append(files, m.path)
	}
	for _, n := range names {
		name := moduleName(n)
		if _, ok := deps[name]; !ok {
			if !seen[name] {
				seen[name] = true
				if isModuleFile(n) {
					// A file unknown to modules.dep: load it as given.
					files = append(files, n)
				} else {
					missing = append(missing, n)
				}
			}
			continue
		}
		visit(name)
	}
	return files, missing
}

// isModuleFile tells a module file path ("kernel/fs/x.ko", "/lib/x.ko.xz")
// from a module name.
func isModuleFile(s string) bool {
	return strings.Contains(s, "/") || moduleName(s) != strings.ReplaceAll(path.Base(s), "-", "_")
}

// modulePath turns a modules.dep entry into an absolute path: relative
// entries are relative to the release directory.
func modulePath(releaseDir, p string) string {
	if path.IsAbs(p) {
		return p
	}
	return path.Join(releaseDir, p)
}
