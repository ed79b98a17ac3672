package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/catalog"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/imagefile"
	"github.com/bangerdev/banger/internal/kernelimage"
	"github.com/bangerdev/banger/internal/localbuild"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/undo"
	"github.com/bangerdev/banger/internal/vmname"
)

// Managed images and kernels (pulled, imported, built) are installed in
// two steps: their maker fills a staging directory, StateDir/tmp/
// <kind>-<random>.partial (stagingDir), then installImage or
// installKernel renames it into images/<id> or kernels/<id> (same
// filesystem), fingerprints its files and inserts the row. Either the
// object is registered with its files in place, or nothing is and the
// staging directory is gone. A crash leaves at most a *.partial
// directory (removed at daemon start and by image prune) or an
// images/<id> or kernels/<id> directory without a row (removed at daemon
// start by reconcileImages).

const partialSuffix = ".partial"

// stagingRoot is where staging directories are made.
func (d *Daemon) stagingRoot() string { return filepath.Join(d.cfg.StateDir, "tmp") }

// stagingDir makes StateDir/tmp/<kind>-<random>.partial for a pull or
// build to fill. The caller hands it to installImage or installKernel,
// which consume it, or removes it with discardStaging. Until then image
// prune leaves it alone.
func (d *Daemon) stagingDir(kind string) (string, error) {
	if err := vmname.ValidateKind("staging kind", kind); err != nil {
		return "", fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
	}
	if err := os.MkdirAll(d.stagingRoot(), 0o700); err != nil {
		return "", fmt.Errorf("make staging directory: %w", err)
	}
	dir, err := os.MkdirTemp(d.stagingRoot(), kind+"-*"+partialSuffix)
	if err != nil {
		return "", fmt.Errorf("make staging directory: %w", err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("make staging directory: %w", err)
	}
	d.stagingMu.Lock()
	if d.staging == nil {
		d.staging = map[string]bool{}
	}
	d.staging[dir] = true
	d.stagingMu.Unlock()
	return dir, nil
}

// resumableInfix marks the staging directories of catalog bundles:
// <kind>-sha256-<first 16 hex digits of the bundle's sha256>.partial. A
// pull that failed on the network keeps its directory (with the bundle's
// checkpoint) and the next pull of the same bundle resumes from it.
const resumableInfix = "-sha256-"

// resumableMaxAge: daemon start removes resumable staging directories
// untouched for longer than this (image prune removes them all).
const resumableMaxAge = 24 * time.Hour

// bundleStagingDir returns the staging directory of the bundle whose
// sha256 is sum, made or, left by an earlier failed pull, reused. When
// another running pull holds it (the same bundle under another name),
// or sum is not a sha256, a fresh one is made instead.
func (d *Daemon) bundleStagingDir(kind, sum string) (string, error) {
	if !catalog.IsSHA256(sum) {
		return d.stagingDir(kind)
	}
	if err := vmname.ValidateKind("staging kind", kind); err != nil {
		return "", fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
	}
	if err := os.MkdirAll(d.stagingRoot(), 0o700); err != nil {
		return "", fmt.Errorf("make staging directory: %w", err)
	}
	dir := filepath.Join(d.stagingRoot(), kind+resumableInfix+sum[:16]+partialSuffix)
	d.stagingMu.Lock()
	busy := d.staging[dir]
	if !busy {
		if d.staging == nil {
			d.staging = map[string]bool{}
		}
		d.staging[dir] = true
	}
	d.stagingMu.Unlock()
	if busy {
		return d.stagingDir(kind)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		st, lerr := os.Lstat(dir)
		if !errors.Is(err, fs.ErrExist) || lerr != nil || !st.IsDir() {
			d.stagingMu.Lock()
			delete(d.staging, dir)
			d.stagingMu.Unlock()
			return "", fmt.Errorf("make staging directory: %w", err)
		}
		d.log.Info("resuming from an earlier pull's staging directory", "dir", dir)
	}
	return dir, nil
}

// keepStaging releases a resumable staging directory without removing
// it: a later pull of the same bundle resumes from it (image prune, or
// daemon start after resumableMaxAge, removes it).
func (d *Daemon) keepStaging(dir string) {
	now := time.Now()
	_ = os.Chtimes(dir, now, now) // its age counts from the last failure
	d.stagingMu.Lock()
	delete(d.staging, dir)
	d.stagingMu.Unlock()
}

// discardStaging removes a staging directory that won't be installed
// (unmounting first what a killed build left mounted in it: see
// removeStaging). If a mount can't be undone the directory stays, and
// daemon start or image prune try again.
func (d *Daemon) discardStaging(dir string) {
	if err := removeStaging(dir, d.log); err != nil {
		d.log.Error("remove a staging directory", "dir", dir, "err", err)
	}
	d.stagingMu.Lock()
	delete(d.staging, dir)
	d.stagingMu.Unlock()
}

// removeStaging removes a staging directory. Every removal of one goes
// through it, never os.RemoveAll: a local build killed in the middle
// (mmdebstrap) leaves /proc, /sys and /dev bind mounts in its chroot,
// and removing through those would delete the host's files.
// localbuild.RemoveAll unmounts what is mounted under dir first and
// removes nothing when a mount stays.
func removeStaging(dir string, log *slog.Logger) error {
	return localbuild.RemoveAll(dir, log)
}

// removePartials removes the *.partial staging directories no running
// operation holds, returning them and the bytes they held. Resumable
// ones (a catalog bundle's, kept for a resume) are removed only when
// untouched for keepResumable (0: all of them, as image prune does).
func (d *Daemon) removePartials(keepResumable time.Duration) (removed []string, bytes int64, err error) {
	entries, err := os.ReadDir(d.stagingRoot())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("list staging directories: %w", err)
	}
	var errs []error
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), partialSuffix) {
			continue
		}
		p := filepath.Join(d.stagingRoot(), e.Name())
		if keepResumable > 0 && strings.Contains(e.Name(), resumableInfix) {
			// Kept unless old, or last written before the machine booted:
			// checkpoints are not fsynced, so after a crash of the machine
			// one may be ahead of the data that reached the disk.
			if st, err := e.Info(); err == nil && time.Since(st.ModTime()) < keepResumable && st.ModTime().After(bootTime()) {
				continue
			}
		}
		d.stagingMu.Lock()
		busy := d.staging[p]
		d.stagingMu.Unlock()
		if busy {
			continue
		}
		n, _ := treeSize(p)
		if err := removeStaging(p, d.log); err != nil {
			errs = append(errs, err)
			continue
		}
		removed, bytes = append(removed, p), bytes+n
	}
	return removed, bytes, errors.Join(errs...)
}

// bootTime is when the machine booted (/proc/stat btime); when
// unknown, now (nothing written before counts as safe to resume).
func bootTime() time.Time {
	data, err := os.ReadFile("/proc/stat")
	if err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(line, "btime "); ok {
				if secs, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil {
					return time.Unix(secs, 0)
				}
			}
		}
	}
	return time.Now()
}

// treeSize is the bytes allocated to the files under p (sparse files
// count what they use).
func treeSize(p string) (int64, error) {
	var n int64
	err := filepath.WalkDir(p, func(_ string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if de.Type().IsRegular() {
			if st, err := de.Info(); err == nil {
				n += allocated(st)
			}
		}
		return nil
	})
	return n, err
}

// allocated is the bytes a file uses on disk.
func allocated(st fs.FileInfo) int64 {
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		return sys.Blocks * 512
	}
	return st.Size()
}

// stagedImage is a managed image whose files are in a staging dir.
type stagedImage struct {
	Name, Source, Version, Ref, Digest string
	Dir                                string // the staging dir; Rootfs is a path inside it
	Rootfs                             string
	KernelID                           string // the kernel object it boots with (must exist)
	User                               string // default user ("" = root)
	Config                             *api.ImageConfig
	// SHA256 holds known sha256 sums (hex) of files in Dir (a bundle's),
	// by path relative to Dir; they are recorded with the fingerprints.
	SHA256 map[string]string
}

// stagedKernel is a managed kernel whose files are in a staging dir.
type stagedKernel struct {
	Name, Source, Version, Ref, Digest, Release string // Release "" = read from the kernel image
	Dir                                         string
	Kernel, Initrd, ModulesDir                  string // paths inside Dir (Initrd, ModulesDir optional)
	SHA256                                      map[string]string
}

// inside rebases p, a path inside dir, onto dest; "" stays "".
func inside(dir, p, dest string) (string, error) {
	if p == "" {
		return "", nil
	}
	rel, err := filepath.Rel(dir, p)
	if err != nil || rel == "." || !filepath.IsLocal(rel) {
		return "", fmt.Errorf("%s is not inside the staging directory %s: %w", p, dir, errdefs.ErrInvalid)
	}
	return filepath.Join(dest, rel), nil
}

// moveStaged renames a staging dir to dest, which must not exist.
func (d *Daemon) moveStaged(dir, dest string) error {
	if err := os.MkdirAll(filepath.Dir(dest), 0o700); err != nil {
		return err
	}
	if _, err := os.Lstat(dest); err == nil {
		return fmt.Errorf("install %s: %s already exists", dir, dest)
	}
	if err := os.Rename(dir, dest); err != nil {
		return fmt.Errorf("install %s: %w", dir, err)
	}
	d.stagingMu.Lock()
	delete(d.staging, dir)
	d.stagingMu.Unlock()
	return nil
}

// knownSums sets the sha256 of stamps whose files have a known sum.
func knownSums(stamps []imagefile.Stamp, dest string, sums map[string]string) {
	for i, s := range stamps {
		if rel, err := filepath.Rel(dest, s.Path); err == nil {
			if sum, ok := sums[rel]; ok && !s.Link {
				stamps[i].SHA256 = strings.ToLower(sum)
			}
		}
	}
}

// installImage moves s.Dir to images/<id> (rename, same filesystem),
// fingerprints the files and inserts the row in one step: on any error
// nothing is registered and s.Dir is removed. A name already taken is
// errdefs.ErrAlreadyExists.
func (d *Daemon) installImage(ctx context.Context, s stagedImage) (im store.Image, err error) {
	steps := undo.New(d.log.With("op", "install image", "image", s.Name))
	steps.Push("remove the staging directory", func(context.Context) error { d.discardStaging(s.Dir); return nil })
	defer func() {
		if err != nil {
			_ = steps.Run(ctx)
		}
	}()
	if err := vmname.ValidateKind("image", s.Name); err != nil {
		return im, fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
	}
	if s.User != "" {
		if err := validUserName(s.User); err != nil {
			return im, err
		}
	}
	k, err := d.store.GetKernel(ctx, s.KernelID)
	if err != nil {
		return im, fmt.Errorf("install image %q: its kernel: %w", s.Name, err)
	}
	if _, err := d.store.GetImage(ctx, s.Name); err == nil {
		return im, fmt.Errorf("image %q already exists: remove it first (banger image rm %s) or choose another name: %w", s.Name, s.Name, errdefs.ErrAlreadyExists)
	}
	var cfgJSON string
	if s.Config != nil {
		b, err := json.Marshal(s.Config)
		if err != nil {
			return im, fmt.Errorf("install image %q: config: %w", s.Name, err)
		}
		cfgJSON = string(b)
	}
	id := newID()
	dest := filepath.Join(d.cfg.StateDir, "images", id)
	rootfs, err := inside(s.Dir, s.Rootfs, dest)
	if err != nil {
		return im, fmt.Errorf("install image %q: rootfs: %w", s.Name, err)
	}
	if rootfs == "" {
		return im, fmt.Errorf("install image %q: no rootfs: %w", s.Name, errdefs.ErrInvalid)
	}
	if err := d.moveStaged(s.Dir, dest); err != nil {
		return im, fmt.Errorf("install image %q: %w", s.Name, err)
	}
	steps.Push("remove the image's files", func(context.Context) error { return removeStaging(dest, d.log) })
	if err := imagefile.ValidateParts(imagefile.Artifacts{Rootfs: rootfs}); err != nil {
		return im, fmt.Errorf("install image %q: %w", s.Name, artifactErr(err))
	}
	stamps, err := imagefile.Fingerprint(ctx, imagefile.Artifacts{Rootfs: rootfs}, false)
	if err != nil {
		return im, fmt.Errorf("install image %q: %w", s.Name, err)
	}
	knownSums(stamps, dest, s.SHA256)
	im = store.Image{
		ID: id, Name: s.Name, Managed: true, Rootfs: rootfs, KernelID: k.ID, KernelName: k.Name,
		Kernel: k.Kernel, Initrd: k.Initrd, ModulesDir: k.ModulesDir, SizeBytes: stamps[0].Size, CreatedAt: time.Now(),
		DefaultUser: s.User, Source: s.Source, Version: s.Version, Ref: s.Ref, Digest: s.Digest, ConfigJSON: cfgJSON,
		Files: toStoreFiles(stamps),
	}
	d.create.RLock() // kernel rm takes it for writing: the kernel can't go meanwhile
	err = d.store.InsertImage(context.WithoutCancel(ctx), im)
	d.create.RUnlock()
	if err != nil {
		return im, fmt.Errorf("install image %q: %w", s.Name, err)
	}
	d.log.Info("image installed", "image", im.Name, "source", im.Source, "kernel", k.Name, "dir", dest)
	return im, nil
}

// installKernel moves s.Dir to kernels/<id>, checks the kernel image
// (and its modules against its release), fingerprints the files and
// inserts the row: on any error nothing is registered and s.Dir is
// removed. A name already taken is errdefs.ErrAlreadyExists.
func (d *Daemon) installKernel(ctx context.Context, s stagedKernel) (k store.Kernel, err error) {
	steps := undo.New(d.log.With("op", "install kernel", "kernel", s.Name))
	steps.Push("remove the staging directory", func(context.Context) error { d.discardStaging(s.Dir); return nil })
	defer func() {
		if err != nil {
			_ = steps.Run(ctx)
		}
	}()
	if err := catalog.ValidateName(catalog.Kernels, s.Name); err != nil {
		return k, err
	}
	if _, err := d.store.GetKernel(ctx, s.Name); err == nil {
		return k, fmt.Errorf("kernel %q already exists: remove it first (banger kernel rm %s) or choose another name: %w", s.Name, s.Name, errdefs.ErrAlreadyExists)
	}
	id := newID()
	dest := filepath.Join(d.cfg.StateDir, "kernels", id)
	var a imagefile.Artifacts
	for _, f := range []struct {
		field    string
		src      string
		dst      *string
		required bool
	}{{"kernel", s.Kernel, &a.Kernel, true}, {"initrd", s.Initrd, &a.Initrd, false}, {"modules", s.ModulesDir, &a.ModulesDir, false}} {
		p, err := inside(s.Dir, f.src, dest)
		if err != nil {
			return k, fmt.Errorf("install kernel %q: %s: %w", s.Name, f.field, err)
		}
		if p == "" && f.required {
			return k, fmt.Errorf("install kernel %q: no kernel image: %w", s.Name, errdefs.ErrInvalid)
		}
		*f.dst = p
	}
	if err := d.moveStaged(s.Dir, dest); err != nil {
		return k, fmt.Errorf("install kernel %q: %w", s.Name, err)
	}
	steps.Push("remove the kernel's files", func(context.Context) error { return removeStaging(dest, d.log) })
	if err := imagefile.ValidateParts(a); err != nil {
		return k, fmt.Errorf("install kernel %q: %w", s.Name, artifactErr(err))
	}
	release := s.Release
	if release == "" {
		release = kernelRelease(a.Kernel)
	} else if err := kernelimage.ValidRelease(release); err != nil {
		return k, fmt.Errorf("install kernel %q: release: %w: %w", s.Name, err, errdefs.ErrInvalid)
	}
	stamps, err := imagefile.Fingerprint(ctx, a, false)
	if err != nil {
		return k, fmt.Errorf("install kernel %q: %w", s.Name, err)
	}
	knownSums(stamps, dest, s.SHA256)
	k = store.Kernel{
		ID: id, Name: s.Name, Managed: true, Source: s.Source, Version: s.Version, Release: release,
		Kernel: a.Kernel, Initrd: a.Initrd, ModulesDir: a.ModulesDir, Ref: s.Ref, Digest: s.Digest,
		SizeBytes: stampsSize(stamps), CreatedAt: time.Now(), Files: toStoreFiles(stamps),
	}
	if err := d.store.InsertKernel(context.WithoutCancel(ctx), k); err != nil {
		return k, fmt.Errorf("install kernel %q: %w", s.Name, err)
	}
	d.log.Info("kernel installed", "kernel", k.Name, "source", k.Source, "release", k.Release, "dir", dest)
	return k, nil
}
