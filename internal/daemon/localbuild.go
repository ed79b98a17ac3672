package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/bangerdev/banger/images/golden"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/imagecat"
	"github.com/bangerdev/banger/internal/kernelcat"
	"github.com/bangerdev/banger/internal/kerneldeb"
	"github.com/bangerdev/banger/internal/kmod"
	"github.com/bangerdev/banger/internal/localbuild"
	"github.com/bangerdev/banger/internal/store"
)

// Local builds (internal/localbuild): when a catalog entry's bundle can't
// be fetched and the entry names a build recipe, the pull dispatch
// (pulls.go) builds it here from Debian's archive, into the same kind of
// managed image or kernel a bundle gives (source local-build):
//
//   - image recipe "golden": the image's kernel, which the pull ensured
//     first (pulled or built), has its modules tree goes into the image's
//     /lib/modules/<release>, then mmdebstrap + images/golden/provision.sh
//     + mkfs.ext4 (localbuild.BuildGolden).
//   - kernel recipe "debian-cloud": linux-image-cloud-amd64's versioned
//     package, verified against the archive's signed index
//     (localbuild.FetchDebianKernel), unpacked with its module index made
//     (kerneldeb.Extract).
//
// One local build runs at a time (they take minutes and both cores); a
// build's output goes to StateDir/tmp/<recipe>.log, named in its errors.
// Cancelling the build's context kills its processes; its staging
// directory is removed after unmounting what mmdebstrap mounted in it.

// Local build recipes (catalog "build" values).
const (
	RecipeGolden      = "golden"
	RecipeDebianCloud = "debian-cloud"
)

// localBuildsAllowed refuses local builds when the config turns them
// off (local_builds = false: test set-ups, machines that must only
// install prebuilt bundles).
func (d *Daemon) localBuildsAllowed(kind, ref string) error {
	if d.cfg.LocalBuilds {
		return nil
	}
	return fmt.Errorf("%s %s: its bundle can't be fetched and local builds are off (local_builds = false in bangerd's config): %w", kind, ref, errdefs.ErrFailedPrecondition)
}

// buildImageLocally builds catalog image e under name.
func (d *Daemon) buildImageLocally(ctx context.Context, e imagecat.Entry, name string, progress func(api.Progress)) (store.Image, error) {
	if e.Build != RecipeGolden {
		return store.Image{}, fmt.Errorf("image %s: no local build recipe %q (this banger builds %q): %w", e.Ref(), e.Build, RecipeGolden, errdefs.ErrInvalid)
	}
	if err := d.localBuildsAllowed("image", e.Ref()); err != nil {
		return store.Image{}, err
	}
	kernelName := e.Kernel
	if kernelName == "" {
		kernelName = d.cfg.DefaultKernelName
	}
	// The pull ensured the kernel (pulled or built) before the image.
	kname, _, _ := strings.Cut(kernelName, "@")
	k, err := d.store.GetKernel(ctx, kname)
	if err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			return store.Image{}, fmt.Errorf("build image %s locally: its kernel %s is not installed (banger kernel pull %s): %w", e.Ref(), kname, kname, errdefs.ErrFailedPrecondition)
		}
		return store.Image{}, fmt.Errorf("build image %s locally: its kernel %s: %w", e.Ref(), kname, err)
	}
	release, err := d.localBuildTurn(ctx)
	if err != nil {
		return store.Image{}, fmt.Errorf("build image %s locally: %w", e.Ref(), err)
	}
	defer release()

	opts := localbuild.GoldenOptions{
		User:     e.User,
		Label:    "banger-" + e.Name,
		Progress: progress,
		Log:      d.log.With("op", "local build", "image", name, "recipe", e.Build),
	}
	if k.ModulesDir != "" && k.Release != "" {
		mods, err := kmod.FindRelease(k.ModulesDir, k.Release, nil)
		if err != nil {
			return store.Image{}, fmt.Errorf("build image %s locally: the modules of kernel %s: %w", e.Ref(), k.Name, err)
		}
		opts.Modules, opts.Release = mods, k.Release
	}
	if opts.User == "" {
		opts.User = golden.User
	}

	dir, err := d.stagingDir("build")
	if err != nil {
		return store.Image{}, err
	}
	logPath, logf, err := d.localBuildLog(e.Build)
	if err != nil {
		d.discardBuild(dir)
		return store.Image{}, err
	}
	defer logf.Close()
	opts.LogFile = logf
	rootfs := filepath.Join(dir, "rootfs.ext4")
	work := filepath.Join(dir, "work")
	if err := os.Mkdir(work, 0o755); err != nil {
		d.discardBuild(dir)
		return store.Image{}, fmt.Errorf("build image %s locally: %w", e.Ref(), err)
	}
	d.log.Info("building image locally", "image", name, "ref", e.Ref(), "kernel", k.Name, "log", logPath)
	err = localbuild.BuildGolden(ctx, work, rootfs, opts)
	if rerr := localbuild.RemoveAll(work, d.log); rerr != nil && err == nil {
		err = rerr
	}
	if err != nil {
		d.discardBuild(dir)
		return store.Image{}, buildErr(ctx, "image "+e.Ref(), logPath, err)
	}
	im, err := d.installImage(ctx, stagedImage{
		Name: name, Source: api.SourceLocalBuild, Version: e.Version, Ref: e.Ref(),
		Dir: dir, Rootfs: rootfs, KernelID: k.ID, User: opts.User,
	})
	if err != nil {
		return store.Image{}, fmt.Errorf("build image %s locally: %w", e.Ref(), err)
	}
	return im, nil
}

// buildKernelLocally builds catalog kernel e under name.
func (d *Daemon) buildKernelLocally(ctx context.Context, e kernelcat.Entry, name string, progress func(api.Progress)) (store.Kernel, error) {
	if e.Build != RecipeDebianCloud {
		return store.Kernel{}, fmt.Errorf("kernel %s: no local build recipe %q (this banger builds %q): %w", e.Ref(), e.Build, RecipeDebianCloud, errdefs.ErrInvalid)
	}
	if err := d.localBuildsAllowed("kernel", e.Ref()); err != nil {
		return store.Kernel{}, err
	}
	release, err := d.localBuildTurn(ctx)
	if err != nil {
		return store.Kernel{}, fmt.Errorf("build kernel %s locally: %w", e.Ref(), err)
	}
	defer release()
	dir, err := d.stagingDir("build")
	if err != nil {
		return store.Kernel{}, err
	}
	logPath, logf, err := d.localBuildLog(e.Build)
	if err != nil {
		d.discardBuild(dir)
		return store.Kernel{}, err
	}
	defer logf.Close()
	log := d.log.With("op", "local build", "kernel", name, "recipe", e.Build)
	dl := filepath.Join(dir, "download")
	if err := os.Mkdir(dl, 0o755); err != nil {
		d.discardBuild(dir)
		return store.Kernel{}, fmt.Errorf("build kernel %s locally: %w", e.Ref(), err)
	}
	arch := e.Arch
	if arch == "" {
		arch = "amd64"
	}
	deb, err := localbuild.FetchDebianKernel(ctx, dl, localbuild.KernelOptions{
		Arch: arch, Package: "linux-image-cloud-" + arch, Progress: progress, Log: log, LogFile: logf,
	})
	if err != nil {
		d.discardBuild(dir)
		return store.Kernel{}, buildErr(ctx, "kernel "+e.Ref(), logPath, err)
	}
	if progress != nil {
		progress(api.Progress{Phase: "extract: " + deb.Package})
	}
	res, err := kerneldeb.Extract(ctx, deb.Path, filepath.Join(dir, "kernel"))
	if err == nil {
		err = os.RemoveAll(dl)
	}
	if err != nil {
		d.discardBuild(dir)
		return store.Kernel{}, buildErr(ctx, "kernel "+e.Ref(), logPath, err)
	}
	if e.Release != "" && e.Release != res.Release {
		log.Warn("the archive's kernel is not the catalog's release", "catalog", e.Release, "built", res.Release)
	}
	k, err := d.installKernel(ctx, stagedKernel{
		Name: name, Source: api.SourceLocalBuild, Version: e.Version, Release: res.Release,
		Ref: deb.Package + "=" + deb.Version, Digest: "sha256:" + deb.SHA256,
		Dir: dir, Kernel: res.Kernel, ModulesDir: res.ModulesDir,
	})
	if err != nil {
		return store.Kernel{}, fmt.Errorf("build kernel %s locally: %w", e.Ref(), err)
	}
	return k, nil
}

// localBuildTurn waits until no other local build runs (or ctx ends).
func (d *Daemon) localBuildTurn(ctx context.Context) (func(), error) {
	return d.localBuilds.acquire(ctx)
}

// buildTurns lets one local build run at a time; the zero value is ready.
type buildTurns struct {
	mu sync.Mutex
	ch chan struct{}
}

func (b *buildTurns) acquire(ctx context.Context) (func(), error) {
	b.mu.Lock()
	if b.ch == nil {
		b.ch = make(chan struct{}, 1)
	}
	ch := b.ch
	b.mu.Unlock()
	select {
	case ch <- struct{}{}:
		return func() { <-ch }, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// localBuildLog opens StateDir/tmp/<recipe>.log for a build's output.
func (d *Daemon) localBuildLog(recipe string) (string, *os.File, error) {
	p := filepath.Join(d.stagingRoot(), "local-build-"+recipe+".log")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return "", nil, fmt.Errorf("local build log: %w", err)
	}
	return p, f, nil
}

// discardBuild removes a build's staging directory, unmounting first
// what a killed mmdebstrap left mounted in it.
func (d *Daemon) discardBuild(dir string) {
	if err := localbuild.RemoveAll(dir, d.log); err != nil {
		d.log.Error("remove a local build's staging directory", "dir", dir, "err", err)
		return
	}
	d.discardStaging(dir)
}

// buildErr wraps a failed build's error: cancelled builds say so, others
// name the build's log.
func buildErr(ctx context.Context, what, logPath string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("build %s locally: cancelled: %w", what, context.Cause(ctx))
	}
	return fmt.Errorf("build %s locally (full log: %s): %w", what, logPath, err)
}
