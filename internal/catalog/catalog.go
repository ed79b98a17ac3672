// Package catalog is the core shared by banger's image and kernel catalogs
// (internal/imagecat, internal/kernelcat): the catalog file format, its
// validation, merging the embedded catalog with the catalogs of
// catalog_urls, and resolving NAME or NAME@VERSION to an entry.
//
// A catalog file (docs/image-catalog.md):
//
//	{"schema": 1,
//	 "images":  [{"name": "debian-bookworm", "version": "2026.12.06", "arch": "amd64", ...}],
//	 "kernels": [{"name": "generic-6.1", "version": "...", "arch": "amd64", ...}]}
//
// An image catalog reads "images", a kernel catalog "kernels"; one file may
// hold both.
package catalog

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"

	"github.com/bangerdev/banger/internal/download"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/vmname"
)

// Schema is the catalog file format version this package reads.
const Schema = 1

// Kind says which list of a catalog file a Catalog reads.
type Kind string

// Kinds.
const (
	Images  Kind = "image"
	Kernels Kind = "kernel"
)

// EmbeddedName is how the catalog compiled into banger is named in messages.
const EmbeddedName = "embedded"

// MaxCatalogSize bounds a catalog file read from a path or fetched.
const MaxCatalogSize = 16 << 20

// Entry is one version of one image or kernel in a catalog.
type Entry struct {
	Name        string `json:"name"`
	Version     string `json:"version"`
	Arch        string `json:"arch"`
	Description string `json:"description,omitempty"`
	// URL of the bundle (https, http on a loopback host, file, or relative
	// to the catalog's own URL); empty only when Build is set.
	URL string `json:"url,omitempty"`
	// Size and SHA256 of the compressed bundle (required with URL).
	Size   int64  `json:"size,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
	// Images: the kernel catalog entry (NAME or NAME@VERSION) the image
	// boots with, and its default user.
	Kernel string `json:"kernel,omitempty"`
	User   string `json:"user,omitempty"`
	// Kernels: the kernel release (uname -r).
	Release string `json:"release,omitempty"`
	// Build names the local build recipe used when the bundle can't be
	// fetched ("golden", "debian-cloud").
	Build string `json:"build,omitempty"`
	// Catalog is the catalog the entry came from (EmbeddedName, a path or a
	// URL); not part of the file.
	Catalog string `json:"-"`
}

// Ref is the entry's NAME@VERSION.
func (e Entry) Ref() string { return e.Name + "@" + e.Version }

// File is a catalog file.
type File struct {
	Schema  int     `json:"schema"`
	Images  []Entry `json:"images,omitempty"`
	Kernels []Entry `json:"kernels,omitempty"`
}

// List returns the file's list of the given kind.
func (f *File) List(kind Kind) *[]Entry {
	if kind == Kernels {
		return &f.Kernels
	}
	return &f.Images
}

// Arches are the architectures an entry may name (GOARCH spelling).
var Arches = []string{"amd64", "arm64", "riscv64"}

// Parse reads and validates a catalog file; name (a path or URL, or
// EmbeddedName) is used in errors and as the base of relative bundle URLs.
// A bad entry is an error naming the catalog and the entry.
func Parse(name string, data []byte) (*File, error) {
	var f File
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("catalog %s: %w: %w", name, err, errdefs.ErrInvalid)
	}
	if f.Schema != Schema {
		return nil, fmt.Errorf("catalog %s: schema %d, this banger reads schema %d: %w", name, f.Schema, Schema, errdefs.ErrInvalid)
	}
	for _, kind := range []Kind{Images, Kernels} {
		list := f.List(kind)
		seen := map[string]bool{}
		for i := range *list {
			e := &(*list)[i]
			e.Catalog = name
			if err := validate(kind, e); err != nil {
				return nil, fmt.Errorf("catalog %s: %s entry %d (%s): %w", name, kind, i, errdefs.Quote(e.Ref()), err)
			}
			if _, err := ResolveURL(name, e.URL); err != nil {
				return nil, fmt.Errorf("catalog %s: %s entry %d (%s): %w", name, kind, i, errdefs.Quote(e.Ref()), err)
			}
			key := e.Ref() + "/" + e.Arch
			if seen[key] {
				return nil, fmt.Errorf("catalog %s: %s %s for %s listed twice: %w", name, kind, errdefs.Quote(e.Ref()), e.Arch, errdefs.ErrInvalid)
			}
			seen[key] = true
		}
	}
	return &f, nil
}

func validate(kind Kind, e *Entry) error {
	if err := ValidateName(kind, e.Name); err != nil {
		return err
	}
	if e.Version == "" || strings.ContainsAny(e.Version, "@/ \t\n") {
		return fmt.Errorf("version %s: must be non-empty, without '@', '/' or spaces: %w", errdefs.Quote(e.Version), errdefs.ErrInvalid)
	}
	if !slices.Contains(Arches, e.Arch) {
		return fmt.Errorf("arch %s: want one of %s: %w", errdefs.Quote(e.Arch), strings.Join(Arches, ", "), errdefs.ErrInvalid)
	}
	if e.URL == "" {
		if e.Build == "" {
			return fmt.Errorf("no url and no build: one of them is needed: %w", errdefs.ErrInvalid)
		}
		if e.Size != 0 || e.SHA256 != "" {
			return fmt.Errorf("size or sha256 without url: %w", errdefs.ErrInvalid)
		}
	} else {
		if e.Size <= 0 {
			return fmt.Errorf("url without a positive size: %w", errdefs.ErrInvalid)
		}
		if !IsSHA256(e.SHA256) {
			return fmt.Errorf("sha256 %s: want 64 lowercase hex digits: %w", errdefs.Quote(e.SHA256), errdefs.ErrInvalid)
		}
	}
	switch kind {
	case Images:
		if e.Release != "" {
			return fmt.Errorf("an image entry has no release: %w", errdefs.ErrInvalid)
		}
		if e.Kernel != "" {
			n, _, _ := strings.Cut(e.Kernel, "@")
			if err := ValidateName(Kernels, n); err != nil {
				return fmt.Errorf("kernel: %w", err)
			}
		}
	case Kernels:
		if e.Kernel != "" || e.User != "" {
			return fmt.Errorf("a kernel entry has no kernel or user: %w", errdefs.ErrInvalid)
		}
	}
	return nil
}

// ValidateName checks an entry's name: an image's is a DNS label (as every
// image name); a kernel's may also hold dots ("generic-6.1").
func ValidateName(kind Kind, name string) error {
	if kind == Images {
		if err := vmname.ValidateKind(vmname.KindImage, name); err != nil {
			return fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
		}
		return nil
	}
	label := strings.ReplaceAll(name, ".", "-")
	if err := vmname.ValidateKind("kernel", label); err != nil || strings.HasSuffix(name, ".") || strings.Contains(name, "..") {
		return fmt.Errorf("invalid kernel name %s: use lowercase letters, digits, '-' and '.', start with a letter, at most 63 characters: %w", errdefs.Quote(name), errdefs.ErrInvalid)
	}
	return nil
}

// IsSHA256 reports whether s is a sha256 in lowercase hex.
func IsSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// ResolveURL checks a bundle URL of the given catalog and makes a relative
// one absolute against the catalog's location ("" stays ""). Bundles of a
// remote (http(s)) catalog and of the embedded one are fetched over
// https, or http on a loopback host; file URLs come only from catalogs
// that are local files.
func ResolveURL(catalog, ref string) (string, error) {
	if ref == "" {
		return "", nil
	}
	u, err := url.Parse(ref)
	if err != nil {
		return "", fmt.Errorf("url: %w: %w", err, errdefs.ErrInvalid)
	}
	if !u.IsAbs() {
		if catalog == EmbeddedName {
			return "", fmt.Errorf("relative url %s in the embedded catalog: %w", errdefs.Quote(ref), errdefs.ErrInvalid)
		}
		base, err := locationURL(catalog)
		if err != nil {
			return "", err
		}
		u = base.ResolveReference(u)
	}
	if err := CheckURL(u); err != nil {
		return "", err
	}
	// A file URL only from a catalog that is itself a local file: a
	// catalog fetched over http(s) (or the embedded one) must not make the
	// daemon, running as root, read local files as bundles.
	if u.Scheme == "file" && !isFileCatalog(catalog) {
		return "", fmt.Errorf("url %s: a file url is only accepted in a catalog that is a local file, not in %s: %w", errdefs.Quote(u.String()), errdefs.Quote(catalog), errdefs.ErrInvalid)
	}
	return u.String(), nil
}

// isFileCatalog reports whether a catalog location is a local file (a
// path or a file:// URL).
func isFileCatalog(loc string) bool {
	if loc == EmbeddedName {
		return false
	}
	if !strings.Contains(loc, "://") {
		return true
	}
	u, err := url.Parse(loc)
	return err == nil && u.Scheme == "file"
}

// locationURL is a catalog's location as a URL (a path becomes file://).
func locationURL(loc string) (*url.URL, error) {
	if strings.Contains(loc, "://") {
		return url.Parse(loc)
	}
	abs, err := filepath.Abs(loc)
	if err != nil {
		return nil, err
	}
	return &url.URL{Scheme: "file", Path: abs}, nil
}

// CheckURL accepts what download accepts (https URLs, and http URLs whose
// host is a loopback address or localhost) and file URLs with an absolute
// path.
func CheckURL(u *url.URL) error {
	if u.Scheme != "file" {
		return download.CheckURL(u)
	}
	if u.Host != "" && u.Host != "localhost" || !filepath.IsAbs(u.Path) {
		return fmt.Errorf("url %s: a file url needs an absolute path (file:///...): %w", errdefs.Quote(u.String()), errdefs.ErrInvalid)
	}
	return nil
}

// Fetch reads the catalog at an http(s) URL.
type Fetch func(url string) ([]byte, error)

// Catalog is the merged view of the embedded catalog and the catalog_urls,
// for one kind.
type Catalog struct {
	kind    Kind
	arch    string
	sources []string
	entries []Entry
}

// Load parses the embedded catalog and each of urls in order (a path,
// file://, https://, or http:// on a loopback host), fetching http(s)
// ones with fetch (nil: a plain GET bound by ctx); a later catalog's entry
// overrides an earlier one of the same name, version and arch. A nil
// embedded leaves the embedded catalog out (embedded_catalogs = false).
func Load(ctx context.Context, kind Kind, embedded []byte, urls []string, fetch Fetch) (*Catalog, error) {
	c := &Catalog{kind: kind, arch: runtime.GOARCH}
	add := func(name string, data []byte) error {
		f, err := Parse(name, data)
		if err != nil {
			return err
		}
		c.sources = append(c.sources, name)
		for _, e := range *f.List(kind) {
			if e.URL, err = ResolveURL(name, e.URL); err != nil {
				return err
			}
			i := slices.IndexFunc(c.entries, func(o Entry) bool {
				return o.Name == e.Name && o.Version == e.Version && o.Arch == e.Arch
			})
			if i >= 0 {
				c.entries[i] = e
			} else {
				c.entries = append(c.entries, e)
			}
		}
		return nil
	}
	if embedded != nil {
		if err := add(EmbeddedName, embedded); err != nil {
			return nil, err
		}
	}
	for _, u := range urls {
		data, err := read(ctx, u, fetch)
		if err != nil {
			return nil, err
		}
		if err := add(u, data); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func read(ctx context.Context, loc string, fetch Fetch) ([]byte, error) {
	if !strings.Contains(loc, "://") {
		return readFile(loc, loc)
	}
	u, err := url.Parse(loc)
	if err != nil {
		return nil, fmt.Errorf("catalog %s: %w: %w", loc, err, errdefs.ErrInvalid)
	}
	if err := CheckURL(u); err != nil {
		return nil, fmt.Errorf("catalog %s: %w", loc, err)
	}
	if u.Scheme == "file" {
		return readFile(loc, u.Path)
	}
	if fetch == nil {
		fetch = func(s string) ([]byte, error) { return get(ctx, s) }
	}
	data, err := fetch(loc)
	if err != nil {
		return nil, fmt.Errorf("catalog %s: %w", loc, err)
	}
	return data, nil
}

func readFile(name, path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("catalog %s: %w: %w", name, err, errdefs.ErrNotFound)
		}
		return nil, fmt.Errorf("catalog %s: %w", name, err)
	}
	defer f.Close()
	return readBounded(name, f)
}

func readBounded(name string, r io.Reader) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxCatalogSize+1))
	if err != nil {
		return nil, fmt.Errorf("catalog %s: %w", name, err)
	}
	if len(data) > MaxCatalogSize {
		return nil, fmt.Errorf("catalog %s: larger than %d bytes: %w", name, MaxCatalogSize, errdefs.ErrInvalid)
	}
	return data, nil
}

func get(ctx context.Context, u string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		err := fmt.Errorf("GET: %s", resp.Status)
		if resp.StatusCode == http.StatusNotFound {
			err = fmt.Errorf("%w: %w", err, errdefs.ErrNotFound)
		}
		return nil, err
	}
	return readBounded(u, resp.Body)
}

// Kind is the kind of entries the catalog holds.
func (c *Catalog) Kind() Kind { return c.kind }

// Sources are the catalogs merged, in order (EmbeddedName first).
func (c *Catalog) Sources() []string { return slices.Clone(c.sources) }

// Entries are the entries for this host's architecture, by name then
// newest version first.
func (c *Catalog) Entries() []Entry {
	var out []Entry
	for _, e := range c.entries {
		if e.Arch == c.arch {
			out = append(out, e)
		}
	}
	slices.SortStableFunc(out, func(a, b Entry) int {
		return cmp.Or(strings.Compare(a.Name, b.Name), -CompareVersions(a.Version, b.Version))
	})
	return out
}

// Has reports whether ref's name is in the catalog (any version).
func (c *Catalog) Has(ref string) bool {
	_, err := c.Resolve(ref)
	return err == nil
}

// Resolve finds NAME (its newest version) or NAME@VERSION for this host's
// architecture. Not found is errdefs.ErrNotFound, naming the catalogs
// searched.
func (c *Catalog) Resolve(ref string) (Entry, error) {
	name, version, pinned := strings.Cut(ref, "@")
	var best *Entry
	var versions []string
	for _, e := range c.Entries() {
		if e.Name != name {
			continue
		}
		versions = append(versions, e.Version)
		if pinned && e.Version != version {
			continue
		}
		if best == nil || CompareVersions(e.Version, best.Version) > 0 {
			best = &e
		}
	}
	if best != nil {
		return *best, nil
	}
	searched := strings.Join(c.sources, ", ")
	if len(versions) > 0 {
		return Entry{}, fmt.Errorf("%s %s: no version %s for %s in the catalogs searched (%s); versions: %s: %w",
			c.kind, errdefs.Quote(name), errdefs.Quote(version), c.arch, searched, strings.Join(versions, ", "), errdefs.ErrNotFound)
	}
	return Entry{}, fmt.Errorf("%s %s is not in the catalogs searched (%s) for %s: %w",
		c.kind, errdefs.Quote(ref), searched, c.arch, errdefs.ErrNotFound)
}

// SetEntry writes e into the catalog file at path (made when missing),
// replacing the entry of the same kind, name and arch (whatever its
// version; its description and build stay when e has none): what a
// publish script does after building a new bundle.
func SetEntry(path string, kind Kind, e Entry) error {
	f := &File{Schema: Schema}
	data, err := os.ReadFile(path)
	switch {
	case err == nil:
		if f, err = Parse(path, data); err != nil {
			return err
		}
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("catalog %s: %w", path, err)
	}
	e.Catalog = path
	if err := validate(kind, &e); err != nil {
		return fmt.Errorf("catalog %s: %s entry %s: %w", path, kind, errdefs.Quote(e.Ref()), err)
	}
	list := f.List(kind)
	i := slices.IndexFunc(*list, func(o Entry) bool { return o.Name == e.Name && o.Arch == e.Arch })
	if i >= 0 {
		old := (*list)[i]
		e.Description = cmp.Or(e.Description, old.Description)
		e.Build = cmp.Or(e.Build, old.Build)
		(*list)[i] = e
	} else {
		*list = append(*list, e)
	}
	out, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(out, '\n'), 0o644); err != nil {
		return fmt.Errorf("catalog %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("catalog %s: %w", path, err)
	}
	return nil
}

// CompareVersions orders versions: as dotted numbers when both are
// ("2026.12.6" < "2026.12.10"), else lexically.
func CompareVersions(a, b string) int {
	na, okA := dotted(a)
	nb, okB := dotted(b)
	if okA && okB {
		if c := slices.Compare(na, nb); c != 0 {
			return c
		}
	}
	return strings.Compare(a, b)
}

func dotted(v string) ([]uint64, bool) {
	parts := strings.Split(v, ".")
	out := make([]uint64, len(parts))
	for i, p := range parts {
		n, err := strconv.ParseUint(p, 10, 64)
		if err != nil {
			return nil, false
		}
		out[i] = n
	}
	return out, true
}
