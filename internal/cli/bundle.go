package cli

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/bundle"
	"github.com/bangerdev/banger/internal/catalog"
	"github.com/bangerdev/banger/internal/errdefs"
)

// bundleFileNames are the paths in a bundle of the files given by role.
var bundleFileNames = map[string]string{
	bundle.RoleRootfs:   "rootfs.ext4",
	bundle.RoleWorkSeed: "work-seed.ext4",
	bundle.RoleKernel:   "vmlinuz",
	bundle.RoleInitrd:   "initrd.img",
	bundle.RoleVmlinux:  "vmlinux",
}

// imageBundleCmd writes a bundle offline (no daemon) and prints its
// catalog entry: the publish scripts' tool (docs/image-catalog.md).
func (a *app) imageBundleCmd() *cobra.Command {
	var (
		m                                  = bundle.Manifest{Schema: bundle.Schema}
		files                              []string
		byRole                             = map[string]*string{}
		configJSON, modules, out, url, cat string
		description, build                 string
	)
	cmd := &cobra.Command{
		Use:   "bundle --kind image|kernel --name NAME --version VERSION --file ROLE=PATH... -o OUT.tar.zst",
		Short: "Write an image or kernel bundle and print its catalog entry (offline; for publishing)",
		Long: `Write an image or kernel bundle (a zstd-compressed tar with a manifest,
docs/image-catalog.md) from local files, and print its catalog entry as JSON
(size and sha256 of OUT, url from --url). With --catalog FILE the entry of the
same name and arch in that catalog file is replaced (or added).

Roles: an image has one rootfs and an optional work-seed; a kernel has one
kernel (bzImage), an optional initrd, an optional vmlinux (the same kernel as
an ELF, for Firecracker) and a modules tree (--modules DIR: its regular
files, under modules/ in the bundle; symlinks such as build and source are
left out).`,
		Example: `  banger image bundle --kind image --name debian-bookworm --version 2026.12.06 \
    --kernel generic-6.1 --user dev --file rootfs=rootfs.ext4 -o debian-bookworm.tar.zst
  banger image bundle --kind kernel --name generic-6.1 --version 2026.12.06 --release 6.1.0-28-cloud-amd64 \
    --file kernel=vmlinuz --modules lib/modules/6.1.0-28-cloud-amd64 -o generic-6.1.tar.zst \
    --url https://example.org/generic-6.1.tar.zst --catalog internal/kernelcat/catalog.json`,
		Args: cobra.NoArgs,
		// Offline: no daemon, no CLI config needed.
		PersistentPreRunE: func(*cobra.Command, []string) error { return nil },
		RunE: func(cmd *cobra.Command, args []string) error {
			if configJSON != "" {
				dec := json.NewDecoder(strings.NewReader(configJSON))
				dec.DisallowUnknownFields()
				m.Config = &api.ImageConfig{}
				if err := dec.Decode(m.Config); err != nil {
					return fmt.Errorf("--config: %w: %w", err, errdefs.ErrInvalid)
				}
			}
			for _, role := range []string{bundle.RoleRootfs, bundle.RoleWorkSeed, bundle.RoleKernel, bundle.RoleInitrd, bundle.RoleVmlinux} {
				if p := *byRole[role]; p != "" {
					files = append(files, role+"="+p)
				}
			}
			src := map[string]string{}
			for _, f := range files {
				role, path, ok := strings.Cut(f, "=")
				name := bundleFileNames[role]
				if !ok || path == "" || name == "" {
					return fmt.Errorf("--file %s: want ROLE=PATH with ROLE one of rootfs, work-seed, kernel, initrd, vmlinux: %w", errdefs.Quote(f), errdefs.ErrInvalid)
				}
				if _, dup := src[name]; dup {
					return fmt.Errorf("--file %s given twice: %w", role, errdefs.ErrInvalid)
				}
				src[name] = path
				m.Files = append(m.Files, bundle.File{Path: name, Role: role})
			}
			if modules != "" {
				skipped, err := addModules(&m, src, modules)
				if err != nil {
					return err
				}
				if len(skipped) > 0 {
					fmt.Fprintf(a.stderr, "banger: left out of the bundle (not regular files): %s\n", strings.Join(skipped, ", "))
				}
			}
			e, err := writeBundle(cmd, &m, src, out)
			if err != nil {
				return err
			}
			e.URL, e.Description, e.Build = cmp(url, filepath.Base(out)), description, build
			if cat != "" {
				kind := catalog.Images
				if m.Kind == bundle.KindKernel {
					kind = catalog.Kernels
				}
				if err := catalog.SetEntry(cat, kind, e); err != nil {
					return err
				}
			}
			enc := json.NewEncoder(a.stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(e)
		},
	}
	f := cmd.Flags()
	f.StringVar(&m.Kind, "kind", "", "image or kernel (required)")
	f.StringVar(&m.Name, "name", "", "the catalog name (required)")
	f.StringVar(&m.Version, "version", "", "the version (required; newest wins: dotted numbers compare as numbers)")
	f.StringVar(&m.Arch, "arch", runtime.GOARCH, "architecture (GOARCH spelling)")
	f.StringVar(&m.Kernel, "kernel", "", "image: the kernel catalog entry it boots with (NAME or NAME@VERSION)")
	f.StringVar(&m.User, "user", "", "image: its default user")
	f.StringVar(&configJSON, "config", "", `image: its config as JSON ({"env":[...],"working_dir":...,"user":...,"entrypoint":[...],"cmd":[...]})`)
	f.StringVar(&m.Release, "release", "", "kernel: its release (uname -r)")
	f.StringArrayVar(&files, "file", nil, "ROLE=PATH: a file of the bundle (rootfs, work-seed, kernel, initrd, vmlinux); repeatable")
	for _, r := range []struct{ role, flag string }{
		{bundle.RoleRootfs, "rootfs"}, {bundle.RoleWorkSeed, "work-seed"}, {bundle.RoleKernel, "kernel-file"},
		{bundle.RoleInitrd, "initrd"}, {bundle.RoleVmlinux, "vmlinux"},
	} {
		byRole[r.role] = f.String(r.flag, "", "same as --file "+r.role+"=PATH")
	}
	f.StringVar(&modules, "modules", "", "kernel: a modules tree to include (under modules/ in the bundle)")
	f.StringVarP(&out, "out", "o", "", "the bundle to write (required)")
	f.StringVar(&url, "url", "", "the url to put in the catalog entry (default: OUT's file name, relative to the catalog)")
	f.StringVar(&description, "description", "", "the catalog entry's description (default: kept from --catalog's entry)")
	f.StringVar(&build, "build", "", "the catalog entry's local build recipe (golden, debian-cloud), used when the bundle can't be fetched")
	f.StringVar(&cat, "catalog", "", "a catalog file whose entry of this name and arch to replace (or add)")
	for _, r := range []string{"kind", "name", "version", "out"} {
		_ = cmd.MarkFlagRequired(r)
	}
	return cmd
}

func cmp(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// addModules adds the regular files of the tree at dir to m, under
// modules/, returning what it left out.
func addModules(m *bundle.Manifest, src map[string]string, dir string) ([]string, error) {
	var skipped []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			skipped = append(skipped, rel)
			return nil
		}
		name := "modules/" + filepath.ToSlash(rel)
		src[name] = p
		m.Files = append(m.Files, bundle.File{Path: name, Role: bundle.RoleModules})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("--modules: %w", err)
	}
	slices.Sort(skipped)
	return skipped, nil
}

// writeBundle writes the bundle to out (through out.partial, renamed when
// complete) and returns its catalog entry, without url.
func writeBundle(cmd *cobra.Command, m *bundle.Manifest, src map[string]string, out string) (catalog.Entry, error) {
	tmp := out + ".partial"
	f, err := os.Create(tmp)
	if err != nil {
		return catalog.Entry{}, err
	}
	h := sha256.New()
	cw := &countWriter{w: io.MultiWriter(f, h)}
	err = bundle.WriteFiles(cmd.Context(), cw, m, src)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, out)
	}
	if err != nil {
		return catalog.Entry{}, errors.Join(err, os.Remove(tmp))
	}
	return catalog.Entry{
		Name: m.Name, Version: m.Version, Arch: m.Arch, Size: cw.n, SHA256: hex.EncodeToString(h.Sum(nil)),
		Kernel: m.Kernel, User: m.User, Release: m.Release,
	}, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
