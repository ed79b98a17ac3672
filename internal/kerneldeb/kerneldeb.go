// Package kerneldeb turns a Debian kernel package (linux-image-*.deb)
// into what banger boots: the kernel image and its modules tree, with
// the module index banger's kmod reads (modules.dep), which Debian's
// packages don't ship (depmod writes it when the package is installed).
//
// The package is read in Go: the ar archive, its data.tar compressed
// with xz, zstd or gzip (or not), and only boot/vmlinuz-RELEASE and
// lib/modules/RELEASE/ (or usr/lib/modules/RELEASE/) are written. A
// package is untrusted input: names that are absolute or climb out with
// "..", links, devices and anything outside those two places are never
// written; files are created below a fresh directory that holds nothing
// else, never through a symlink. Compressed modules (.ko.xz, .ko.zst,
// .ko.gz) are stored decompressed: banger's agent loads plain .ko files.
package kerneldeb

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/bangerdev/banger/internal/kernelimage"
	"github.com/bangerdev/banger/internal/kmod"
)

// Result is what Extract wrote.
type Result struct {
	// Kernel is the kernel image (DIR/vmlinuz).
	Kernel string
	// ModulesDir is the modules tree (DIR/modules, holding
	// lib/modules/RELEASE with modules.dep), as banger's modules_dir.
	ModulesDir string
	// Release is the kernel's release (uname -r).
	Release string
	// Modules is how many modules the tree holds.
	Modules int
	// Package and Version are the package's name and Debian version
	// (its control file's Package and Version; "" when it has none).
	Package, Version string
	// SHA256 is the hex sha256 of the .deb file.
	SHA256 string
}

// Options tune ExtractWith.
type Options struct {
	// Progress, when not nil, is called with the bytes of the .deb read
	// so far and its size, at most every 8 MiB and at the end.
	Progress func(done, total int64)
}

// ErrNotKernelPackage marks a file that is not a Debian kernel package
// (not a .deb, or one without exactly one kernel and its modules).
var ErrNotKernelPackage = errors.New("not a Debian kernel package")

// ErrUnsafe marks a package entry that would be written outside its
// place (an absolute name, "..").
var ErrUnsafe = errors.New("unsafe entry in package")

// Limits on what a package may make Extract write.
const (
	maxEntries = 100_000
	maxBytes   = 4 << 30 // decompressed bytes written
)

// Extract reads the Debian kernel package deb and writes its kernel
// image and modules into dir, which must not exist or be empty, then
// writes the module index (modules.dep). On error dir may hold part of
// the package: the caller removes it (a staging directory).
func Extract(ctx context.Context, deb, dir string) (Result, error) {
	return ExtractWith(ctx, deb, dir, Options{})
}

// ExtractWith is Extract with options.
func ExtractWith(ctx context.Context, deb, dir string, o Options) (Result, error) {
	if err := emptyDir(dir); err != nil {
		return Result{}, fmt.Errorf("extract %s: %w", deb, err)
	}
	f, err := os.Open(deb)
	if err != nil {
		return Result{}, fmt.Errorf("extract kernel package: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return Result{}, fmt.Errorf("extract kernel package: %w", err)
	}
	sum := sha256.New()
	cr := &countingReader{r: io.TeeReader(f, sum), total: st.Size(), progress: o.Progress}
	data, name, control, err := dataMember(cr)
	if err != nil {
		return Result{}, fmt.Errorf("extract %s: %w", deb, err)
	}
	rd, closeRd, err := decompressor(name, data)
	if err != nil {
		return Result{}, fmt.Errorf("extract %s: %s: %w", deb, name, err)
	}
	defer closeRd()
	x := &extractor{ctx: ctx, dir: dir, modRoot: filepath.Join(dir, "modules")}
	if err := x.untar(rd); err != nil {
		return Result{}, fmt.Errorf("extract %s: %w", deb, err)
	}
	res, err := x.result()
	if err != nil {
		return Result{}, fmt.Errorf("extract %s: %w", deb, err)
	}
	if _, err := io.Copy(io.Discard, cr); err != nil { // the rest, for the sum
		return Result{}, fmt.Errorf("extract %s: %w", deb, err)
	}
	cr.report()
	res.SHA256 = hex.EncodeToString(sum.Sum(nil))
	res.Package, res.Version = control["Package"], control["Version"]
	relDir := filepath.Join(res.ModulesDir, "lib", "modules", res.Release)
	n, err := WriteModulesDep(ctx, relDir)
	if err != nil {
		return Result{}, fmt.Errorf("extract %s: %w", deb, err)
	}
	res.Modules = n
	// The tree must serve the kernel as banger will check it.
	if _, err := kmod.FindRelease(res.ModulesDir, res.Release, nil); err != nil {
		return Result{}, fmt.Errorf("extract %s: %w", deb, err)
	}
	return res, nil
}

// emptyDir makes dir, or checks that it is an empty directory.
func emptyDir(dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return os.MkdirAll(dir, 0o755)
	}
	if err != nil {
		return err
	}
	if len(ents) > 0 {
		return fmt.Errorf("destination %s is not empty", dir)
	}
	return nil
}

// dataMember finds the data.tar* member of the ar archive r and returns
// a reader of its bytes, its name, and the fields of the control file of
// the control.tar* member before it (when readable).
func dataMember(r io.Reader) (io.Reader, string, map[string]string, error) {
	br := bufio.NewReader(r)
	magic := make([]byte, 8)
	if _, err := io.ReadFull(br, magic); err != nil || string(magic) != "!<arch>\n" {
		return nil, "", nil, fmt.Errorf("no ar archive header: %w", ErrNotKernelPackage)
	}
	control := map[string]string{}
	for i := 0; i < 16; i++ {
		hdr := make([]byte, 60)
		if _, err := io.ReadFull(br, hdr); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, "", nil, fmt.Errorf("read ar member header: %w", err)
		}
		if string(hdr[58:60]) != "`\n" {
			return nil, "", nil, fmt.Errorf("bad ar member header: %w", ErrNotKernelPackage)
		}
		name := strings.TrimRight(strings.TrimSpace(string(hdr[0:16])), "/")
		size, err := strconv.ParseInt(strings.TrimSpace(string(hdr[48:58])), 10, 64)
		if err != nil || size < 0 {
			return nil, "", nil, fmt.Errorf("bad ar member size %q: %w", hdr[48:58], ErrNotKernelPackage)
		}
		if strings.HasPrefix(name, "data.tar") {
			return io.LimitReader(br, size), name, control, nil
		}
		member := io.LimitReader(br, size)
		if strings.HasPrefix(name, "control.tar") && size < 16<<20 {
			control = controlFields(name, member) // best effort: the package's name and version
		}
		if _, err := io.Copy(io.Discard, member); err != nil {
			return nil, "", nil, fmt.Errorf("read ar member %s: %w", name, err)
		}
		if size%2 == 1 {
			if _, err := br.Discard(1); err != nil {
				return nil, "", nil, fmt.Errorf("read ar member %s: %w", name, err)
			}
		}
	}
	return nil, "", nil, fmt.Errorf("no data.tar member: %w", ErrNotKernelPackage)
}

// controlFields reads the "control" file of a control.tar* member
// ("Field: value" lines; continuation lines ignored).
func controlFields(name string, r io.Reader) map[string]string {
	out := map[string]string{}
	rd, closeRd, err := decompressor(name, r)
	if err != nil {
		return out
	}
	defer closeRd()
	tr := tar.NewReader(rd)
	for {
		h, err := tr.Next()
		if err != nil {
			return out
		}
		if strings.TrimPrefix(h.Name, "./") != "control" || h.Typeflag != tar.TypeReg {
			continue
		}
		sc := bufio.NewScanner(io.LimitReader(tr, 1<<20))
		for sc.Scan() {
			l := sc.Text()
			if k, v, ok := strings.Cut(l, ":"); ok && l != "" && l[0] != ' ' && l[0] != '\t' {
				out[k] = strings.TrimSpace(v)
			}
		}
		return out
	}
}

// countingReader counts what is read and reports it.
type countingReader struct {
	r           io.Reader
	done, total int64
	reported    int64
	progress    func(done, total int64)
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.done += int64(n)
	if c.progress != nil && c.done-c.reported >= 8<<20 {
		c.report()
	}
	return n, err
}

func (c *countingReader) report() {
	if c.progress != nil {
		c.reported = c.done
		c.progress(c.done, c.total)
	}
}

// decompressor reads a data.tar member by its name's compression.
func decompressor(name string, r io.Reader) (io.Reader, func(), error) {
	switch path.Ext(name) {
	case ".tar":
		return r, func() {}, nil
	case ".xz":
		x, err := xz.NewReader(bufio.NewReaderSize(r, 1<<20))
		return x, func() {}, err
	case ".zst":
		z, err := zstd.NewReader(r)
		if err != nil {
			return nil, nil, err
		}
		return z, z.Close, nil
	case ".gz":
		g, err := gzip.NewReader(r)
		if err != nil {
			return nil, nil, err
		}
		return g, func() { g.Close() }, nil
	}
	return nil, nil, fmt.Errorf("unknown compression: %w", ErrNotKernelPackage)
}

type extractor struct {
	ctx      context.Context
	dir      string
	modRoot  string
	kernels  map[string]string // release -> kernel file written
	releases map[string]bool   // lib/modules/<release> seen
	written  int64
	entries  int
}

// untar writes the kernel images and module trees of the data tarball.
func (x *extractor) untar(r io.Reader) error {
	x.kernels, x.releases = map[string]string{}, map[string]bool{}
	tr := tar.NewReader(r)
	for {
		if err := x.ctx.Err(); err != nil {
			return err
		}
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read data.tar: %w", err)
		}
		if x.entries++; x.entries > maxEntries {
			return fmt.Errorf("more than %d entries: %w", maxEntries, ErrNotKernelPackage)
		}
		name, err := cleanName(h.Name)
		if err != nil {
			return err
		}
		if err := x.entry(h, name, tr); err != nil {
			return err
		}
	}
}

// cleanName returns an entry's name relative to the package root, or
// ErrUnsafe for one that is absolute or climbs out of it.
func cleanName(n string) (string, error) {
	s := strings.TrimPrefix(n, "./")
	if s == "" || s == "." {
		return ".", nil
	}
	if path.IsAbs(s) || !filepath.IsLocal(s) || slices.Contains(strings.Split(s, "/"), "..") {
		return "", fmt.Errorf("%q: %w", n, ErrUnsafe)
	}
	return path.Clean(s), nil
}

func (x *extractor) entry(h *tar.Header, name string, r io.Reader) error {
	parts := strings.Split(name, "/")
	// boot/vmlinuz-RELEASE
	if len(parts) == 2 && parts[0] == "boot" && strings.HasPrefix(parts[1], "vmlinuz-") {
		if h.Typeflag != tar.TypeReg {
			return nil // a link to a kernel: never written
		}
		rel := strings.TrimPrefix(parts[1], "vmlinuz-")
		if err := kernelimage.ValidRelease(rel); err != nil {
			return fmt.Errorf("%s: %w: %w", name, err, ErrNotKernelPackage)
		}
		if _, dup := x.kernels[rel]; dup {
			return fmt.Errorf("%s twice: %w", name, ErrNotKernelPackage)
		}
		dst := filepath.Join(x.dir, "vmlinuz-"+rel)
		x.kernels[rel] = dst
		return x.writeFile(dst, r, 0o644)
	}
	// [usr/]lib/modules/RELEASE/...
	if len(parts) >= 1 && parts[0] == "usr" {
		parts = parts[1:]
	}
	if len(parts) < 3 || parts[0] != "lib" || parts[1] != "modules" {
		return nil
	}
	rel := parts[2]
	if err := kernelimage.ValidRelease(rel); err != nil {
		return fmt.Errorf("lib/modules/%s: %w: %w", rel, err, ErrNotKernelPackage)
	}
	x.releases[rel] = true
	dst := filepath.Join(append([]string{x.modRoot, "lib", "modules"}, parts[2:]...)...)
	switch h.Typeflag {
	case tar.TypeDir:
		return os.MkdirAll(dst, 0o755)
	case tar.TypeReg:
		base := parts[len(parts)-1]
		for _, c := range []string{".ko.xz", ".ko.zst", ".ko.gz"} {
			if strings.HasSuffix(base, c) {
				return x.writeModule(dst, c, r)
			}
		}
		return x.writeFile(dst, r, 0o644)
	}
	// Symlinks (build, source: headers not shipped here), hardlinks and
	// devices are not part of what boot needs: never written.
	return nil
}

// writeFile writes a new file at dst from r (its parents made; dst must
// not exist: O_EXCL, and no symlink is ever made under the destination).
// What all files write together is bounded (maxBytes).
func (x *extractor) writeFile(dst string, r io.Reader, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	n, err := io.Copy(f, &io.LimitedReader{R: r, N: maxBytes - x.written + 1})
	x.written += n
	if err == nil && x.written > maxBytes {
		err = fmt.Errorf("more than %d bytes: %w", int64(maxBytes), ErrNotKernelPackage)
	}
	if err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", dst, err)
	}
	return f.Close()
}

// writeModule writes a compressed module decompressed, as NAME.ko.
func (x *extractor) writeModule(dst, ext string, r io.Reader) error {
	var dr io.Reader
	switch ext {
	case ".ko.xz":
		xr, err := xz.NewReader(r)
		if err != nil {
			return fmt.Errorf("%s: %w", dst, err)
		}
		dr = xr
	case ".ko.zst":
		zr, err := zstd.NewReader(r)
		if err != nil {
			return fmt.Errorf("%s: %w", dst, err)
		}
		defer zr.Close()
		dr = zr
	default: // .ko.gz
		gr, err := gzip.NewReader(r)
		if err != nil {
			return fmt.Errorf("%s: %w", dst, err)
		}
		defer gr.Close()
		dr = gr
	}
	return x.writeFile(strings.TrimSuffix(dst, ext)+".ko", dr, 0o644)
}

// result checks that the package held one kernel and its modules, names
// the kernel DIR/vmlinuz and checks its release.
func (x *extractor) result() (Result, error) {
	if len(x.kernels) != 1 {
		return Result{}, fmt.Errorf("%d kernel images (boot/vmlinuz-*), want 1: %w", len(x.kernels), ErrNotKernelPackage)
	}
	var rel, file string
	for r, f := range x.kernels {
		rel, file = r, f
	}
	if !x.releases[rel] {
		return Result{}, fmt.Errorf("no lib/modules/%s for kernel %s: %w", rel, rel, ErrNotKernelPackage)
	}
	for r := range x.releases {
		if r != rel {
			if err := os.RemoveAll(filepath.Join(x.modRoot, "lib", "modules", r)); err != nil {
				return Result{}, err
			}
		}
	}
	kernel := filepath.Join(x.dir, "vmlinuz")
	if err := os.Rename(file, kernel); err != nil {
		return Result{}, err
	}
	f, err := os.Open(kernel)
	if err != nil {
		return Result{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return Result{}, err
	}
	got, err := kernelimage.Release(f, st.Size())
	if err != nil {
		return Result{}, fmt.Errorf("kernel image: %w: %w", err, ErrNotKernelPackage)
	}
	if got != rel {
		return Result{}, fmt.Errorf("boot/vmlinuz-%s says release %s: %w", rel, got, ErrNotKernelPackage)
	}
	return Result{Kernel: kernel, ModulesDir: x.modRoot, Release: rel}, nil
}

// WriteModulesDep writes relDir/modules.dep (as depmod does: each
// module's path relative to relDir, then the full transitive closure of
// the modules it depends on, read from their .modinfo "depends=") for
// the .ko files under relDir, and returns how many modules it lists.
// Lines follow modules.order when there is one, then the rest by path.
func WriteModulesDep(ctx context.Context, relDir string) (int, error) {
	byName := map[string]string{} // module name -> path
	direct := map[string][]string{}
	var paths []string
	err := filepath.WalkDir(relDir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if !de.Type().IsRegular() || !strings.HasSuffix(p, ".ko") {
			return nil
		}
		rel, err := filepath.Rel(relDir, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		name, deps, err := modinfo(p)
		if err != nil {
			return fmt.Errorf("module %s: %w", rel, err)
		}
		if name == "" {
			name = kmod.ModuleName(rel)
		}
		byName[kmod.ModuleName(name)] = rel
		direct[rel] = deps
		paths = append(paths, rel)
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("index modules: %w", err)
	}
	order := moduleOrder(relDir, paths)
	var b bytes.Buffer
	for _, p := range order {
		b.WriteString(p)
		b.WriteByte(':')
		for _, d := range closure(p, direct, byName) {
			b.WriteByte(' ')
			b.WriteString(d)
		}
		b.WriteByte('\n')
	}
	if err := os.WriteFile(filepath.Join(relDir, "modules.dep"), b.Bytes(), 0o644); err != nil {
		return 0, fmt.Errorf("write modules.dep: %w", err)
	}
	return len(order), nil
}

// moduleOrder orders paths as modules.order lists them, the rest after,
// by path.
func moduleOrder(relDir string, paths []string) []string {
	have := map[string]bool{}
	for _, p := range paths {
		have[p] = true
	}
	var out []string
	if b, err := os.ReadFile(filepath.Join(relDir, "modules.order")); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			l = strings.TrimSpace(l)
			for _, c := range []string{".xz", ".zst", ".gz"} {
				l = strings.TrimSuffix(l, c)
			}
			if have[l] {
				out = append(out, l)
				delete(have, l)
			}
		}
	}
	var rest []string
	for p := range have {
		rest = append(rest, p)
	}
	sort.Strings(rest)
	return append(out, rest...)
}

// closure returns the modules p depends on, directly or not, each after
// those it depends on reversed as depmod writes them (the last one is
// loaded first); unknown names (built in) are left out.
func closure(p string, direct map[string][]string, byName map[string]string) []string {
	seen := map[string]bool{p: true}
	var post []string
	var visit func(string)
	visit = func(m string) {
		for _, d := range direct[m] {
			dp, ok := byName[kmod.ModuleName(d)]
			if !ok || seen[dp] {
				continue
			}
			seen[dp] = true
			visit(dp)
			post = append(post, dp)
		}
	}
	visit(p)
	slices.Reverse(post)
	return post
}

// modinfo reads a module's name and dependencies from its .modinfo
// section ("name=x\0depends=a,b\0...").
func modinfo(p string) (name string, deps []string, err error) {
	f, err := elf.Open(p)
	if err != nil {
		return "", nil, err
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return "", nil, fmt.Errorf("no .modinfo section")
	}
	b, err := sec.Data()
	if err != nil {
		return "", nil, err
	}
	for _, kv := range bytes.Split(b, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "name":
			name = v
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					deps = append(deps, d)
				}
			}
		}
	}
	return name, deps, nil
}
