// Package bundle writes and installs banger's image and kernel bundles
// (docs/image-catalog.md).
//
// A bundle is a tar stream compressed with zstd as a sequence of
// independent frames: a new frame starts at each tar entry and at least
// every 8 MiB of a file's content. Its first entry is manifest.json (a
// Manifest: what the bundle is and each file's path, role, size and
// sha256); the files follow, regular files only. Install streams a bundle
// from a Source into a directory: it never stores the compressed bundle,
// verifies every file's size and sha256 while writing it (zero runs become
// holes), refuses anything the manifest doesn't list, and checkpoints
// after each frame so that a later Install into the same directory resumes
// at the next frame (an HTTP Range request for a download).
package bundle

import (
	"errors"
	"fmt"
	"path"
	"slices"
	"strings"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/catalog"
	"github.com/bangerdev/banger/internal/errdefs"
)

// Schema is the manifest format version this package writes and reads.
const Schema = 1

// Kinds of bundles.
const (
	KindImage  = "image"
	KindKernel = "kernel"
)

// File roles.
const (
	RoleRootfs   = "rootfs"    // image: the root filesystem (ext4), exactly one
	RoleWorkSeed = "work-seed" // image: optional
	RoleKernel   = "kernel"    // kernel: the kernel image (bzImage or vmlinux), exactly one
	RoleInitrd   = "initrd"    // kernel: optional
	RoleVmlinux  = "vmlinux"   // kernel: optional, the same kernel as an ELF vmlinux (Firecracker boots it)
	RoleModules  = "modules"   // kernel: the modules tree, files under "modules/"
)

// ManifestName is the name of a bundle's first entry.
const ManifestName = "manifest.json"

// MaxManifestSize bounds manifest.json.
const MaxManifestSize = 16 << 20

// Manifest describes a bundle; it is its first entry, manifest.json.
type Manifest struct {
	Schema  int              `json:"schema"` // 1
	Kind    string           `json:"kind"`   // "image" or "kernel"
	Name    string           `json:"name"`
	Version string           `json:"version"`
	Arch    string           `json:"arch"`
	Kernel  string           `json:"kernel,omitempty"`  // image: the kernel catalog entry (NAME[@VERSION]) it expects
	User    string           `json:"user,omitempty"`    // image: default user
	Config  *api.ImageConfig `json:"config,omitempty"`  // image
	Release string           `json:"release,omitempty"` // kernel: uname -r
	Files   []File           `json:"files"`
}

// File is one file of a bundle.
type File struct {
	Path   string `json:"path"` // relative, clean, e.g. "rootfs.ext4", "modules/lib/modules/6.1.0-x/kernel/..."
	Role   string `json:"role"` // rootfs, work-seed, kernel, initrd, vmlinux, modules
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
	Mode   uint32 `json:"mode,omitempty"` // permission bits (default 0644)
}

// File returns the first file of the given role (nil if none).
func (m *Manifest) File(role string) *File {
	for i := range m.Files {
		if m.Files[i].Role == role {
			return &m.Files[i]
		}
	}
	return nil
}

// roles lists, per kind, the roles allowed and how many files each may
// have (-1: any number).
var roles = map[string]map[string][2]int{
	KindImage:  {RoleRootfs: {1, 1}, RoleWorkSeed: {0, 1}},
	KindKernel: {RoleKernel: {1, 1}, RoleInitrd: {0, 1}, RoleVmlinux: {0, 1}, RoleModules: {0, -1}},
}

func invalid(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, errdefs.ErrInvalid)...)
}

// Validate checks a manifest. withSums also requires every file's sha256
// (a manifest read from a bundle; Write fills them in).
func (m *Manifest) Validate(withSums bool) error {
	if m.Schema != Schema {
		return invalid("manifest schema %d: this banger reads schema %d", m.Schema, Schema)
	}
	allowed, ok := roles[m.Kind]
	if !ok {
		return invalid("manifest kind %s: want %q or %q", errdefs.Quote(m.Kind), KindImage, KindKernel)
	}
	ck := catalog.Images
	if m.Kind == KindKernel {
		ck = catalog.Kernels
	}
	if err := catalog.ValidateName(ck, m.Name); err != nil {
		return fmt.Errorf("manifest name: %w", err)
	}
	if m.Version == "" || strings.ContainsAny(m.Version, "@/ \t\n") {
		return invalid("manifest version %s: must be non-empty, without '@', '/' or spaces", errdefs.Quote(m.Version))
	}
	if !slices.Contains(catalog.Arches, m.Arch) {
		return invalid("manifest arch %s: want one of %s", errdefs.Quote(m.Arch), strings.Join(catalog.Arches, ", "))
	}
	if m.Kind == KindKernel && (m.Kernel != "" || m.User != "" || m.Config != nil) {
		return invalid("a kernel bundle's manifest has no kernel, user or config")
	}
	if m.Kind == KindImage && m.Release != "" {
		return invalid("an image bundle's manifest has no release")
	}
	count := map[string]int{}
	paths := map[string]bool{}
	for i := range m.Files {
		f := &m.Files[i]
		if err := checkPath(f.Path); err != nil {
			return err
		}
		if paths[f.Path] {
			return invalid("manifest lists %s twice", errdefs.Quote(f.Path))
		}
		paths[f.Path] = true
		if _, ok := allowed[f.Role]; !ok {
			return invalid("manifest file %s: role %s is not one of a %s bundle's", errdefs.Quote(f.Path), errdefs.Quote(f.Role), m.Kind)
		}
		if f.Role == RoleModules && !strings.HasPrefix(f.Path, "modules/") {
			return invalid("manifest file %s: a modules file's path starts with modules/", errdefs.Quote(f.Path))
		}
		count[f.Role]++
		if f.Size < 0 {
			return invalid("manifest file %s: negative size", errdefs.Quote(f.Path))
		}
		if withSums && !catalog.IsSHA256(f.SHA256) {
			return invalid("manifest file %s: sha256 %s: want 64 lowercase hex digits", errdefs.Quote(f.Path), errdefs.Quote(f.SHA256))
		}
		if f.Mode&^0o777 != 0 {
			return invalid("manifest file %s: mode %#o: only permission bits", errdefs.Quote(f.Path), f.Mode)
		}
	}
	for role, n := range allowed {
		if count[role] < n[0] || n[1] >= 0 && count[role] > n[1] {
			return invalid("a %s bundle has %d %s file(s); want %s", m.Kind, count[role], role, want(n))
		}
	}
	// A path can't be both a file and a directory holding others.
	for p := range paths {
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			if paths[d] {
				return invalid("manifest lists %s as a file and as the directory of %s", errdefs.Quote(d), errdefs.Quote(p))
			}
		}
	}
	return nil
}

func want(n [2]int) string {
	switch {
	case n[1] < 0:
		return fmt.Sprintf("at least %d", n[0])
	case n[0] == n[1]:
		return fmt.Sprint(n[0])
	}
	return fmt.Sprintf("%d to %d", n[0], n[1])
}

// checkPath accepts a relative, clean path of names (no "..", no
// absolute, no empty or "." parts) that is not reserved.
func checkPath(p string) error {
	if p == "" || path.IsAbs(p) || path.Clean(p) != p || p == "." || p == ".." || strings.HasPrefix(p, "../") ||
		strings.ContainsAny(p, "\\\x00") {
		return invalid("path %s: want a clean relative path inside the bundle", errdefs.Quote(p))
	}
	if p == ManifestName || p == checkpointName || strings.HasPrefix(p, checkpointName+".") {
		return invalid("path %s is reserved", errdefs.Quote(p))
	}
	return nil
}

// ErrCorrupt is matched (errors.Is) by the errors of a bundle whose content
// doesn't match its manifest or isn't a valid archive; it is also an
// errdefs.ErrInvalid.
var ErrCorrupt = errors.New("corrupt bundle")

func corrupt(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, corruptErr{})...)
}

type corruptErr struct{}

func (corruptErr) Error() string { return "corrupt bundle" }
func (corruptErr) Is(target error) bool {
	return target == ErrCorrupt || target == errdefs.ErrInvalid
}
