package daemon

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/ociimport"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmname"
)

// pullOCI imports an OCI image (a registry reference, an OCI layout, a
// `docker save` tarball, docker-daemon:IMAGE; docs/oci-import.md) as a
// managed image: resolved (manifest and config), its kernel ensured
// (p.Kernel, else default_kernel_name; pulled from the kernel catalog when
// missing), its layers flattened into an
// ext4 in a staging directory, installed. The same reference at the same
// digest already installed is returned as it is, like `docker pull` when
// up to date. On any failure nothing is registered and the staging
// directory is gone.
func (d *Daemon) pullOCI(ctx context.Context, p api.PullParams, progress func(api.Progress)) (im store.Image, err error) {
	if progress == nil {
		progress = func(api.Progress) {}
	}
	if p.Name != "" {
		if err := vmname.ValidateKind(vmname.KindImage, p.Name); err != nil {
			return im, fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
		}
	}
	staging, err := d.stagingDir("oci")
	if err != nil {
		return im, err
	}
	installing := false
	defer func() {
		if !installing {
			d.discardStaging(staging) // installImage consumes it otherwise
		}
	}()

	progress(api.Progress{Phase: ociimport.PhaseResolve})
	src, err := ociimport.Resolve(ctx, p.Ref, ociimport.Options{
		Platform: p.Platform, Insecure: p.Insecure, TempDir: staging, Log: d.log.With("pull", p.Ref),
	})
	if err != nil {
		return im, err
	}
	defer src.Close()
	name := cmp.Or(p.Name, src.Name)
	if p.Name == "" && name == d.cfg.DefaultImageName {
		// debian:bookworm would take the name of the default (golden)
		// image that vm run boots when no image is named.
		name = strings.TrimSuffix(name[:min(len(name), vmname.MaxLen-4)], "-") + "-oci"
	}
	if err := vmname.ValidateKind(vmname.KindImage, name); err != nil {
		return im, fmt.Errorf("image name derived from %s: %w; choose one with --name: %w", p.Ref, err, errdefs.ErrInvalid)
	}
	if existing, ok, err := d.ociUpToDate(ctx, name, p.Name != "", src); err != nil || ok {
		if ok {
			d.log.Info("image up to date", "image", existing.Name, "ref", src.Ref, "digest", src.Digest)
		}
		return existing, err
	}

	kernelName := cmp.Or(p.Kernel, d.cfg.DefaultKernelName)
	k, err := d.ensureKernel(ctx, kernelName, progress)
	if err != nil {
		return im, fmt.Errorf("image %s: kernel %s: %w", name, kernelName, err)
	}

	built, err := src.Build(ctx, staging, ociimport.BuildOptions{
		HeadroomMiB: int64(d.cfg.ImageHeadroomMiB), Progress: progress, DiscardTree: d.discardTree,
	})
	if err != nil {
		return im, err
	}
	// What the source kept in the staging dir (an unpacked oci-archive, a
	// docker save) goes before the dir becomes the image's.
	src.Close()
	installing = true
	im, err = d.installImage(ctx, stagedImage{
		Name: name, Source: api.SourceOCI, Ref: src.Ref, Digest: src.Digest,
		Dir: staging, Rootfs: built.Rootfs, KernelID: k.ID, Config: src.Config,
	})
	if errors.Is(err, errdefs.ErrAlreadyExists) && p.Name == "" {
		return im, fmt.Errorf("%w (pull it under another name with --name NAME)", err)
	}
	return im, err
}

// discardTree moves a flattened image tree out of its staging directory
// (a *.partial name, so a daemon start or image prune removes it if this
// one can't) and removes it in the background: the pull doesn't wait for
// thousands of unlinks. The daemon waits for it when it stops.
func (d *Daemon) discardTree(tree string) {
	trash, err := os.MkdirTemp(d.stagingRoot(), "oci-tree-*"+partialSuffix)
	if err == nil {
		err = os.Rename(tree, filepath.Join(trash, "tree"))
	}
	d.mu.Lock()
	background := err == nil && d.ctx.Err() == nil
	if background {
		d.removals.Add(1)
	}
	d.mu.Unlock()
	if !background {
		os.RemoveAll(tree)
		if trash != "" {
			os.RemoveAll(trash)
		}
		return
	}
	go func() {
		defer d.removals.Done()
		if err := os.RemoveAll(trash); err != nil {
			d.log.Warn("remove a flattened image tree", "dir", trash, "err", err)
		}
	}()
}

// ociUpToDate finds an installed image of src: the image called name
// when it has src's reference and digest (ok), or, when the name was
// derived (not given with --name), any image of that reference and digest.
// An image called name from something else is an ErrAlreadyExists.
func (d *Daemon) ociUpToDate(ctx context.Context, name string, named bool, src *ociimport.Source) (store.Image, bool, error) {
	same := func(im store.Image) bool {
		return im.Source == api.SourceOCI && im.Ref == src.Ref && im.Digest == src.Digest
	}
	im, err := d.store.GetImage(ctx, name)
	switch {
	case err == nil && same(im):
		return im, true, nil
	case err == nil:
		what := "another image"
		if im.Source == api.SourceOCI && im.Ref == src.Ref {
			what = fmt.Sprintf("%s at digest %s (the registry now has %s)", im.Ref, im.Digest, src.Digest)
		} else if im.Ref != "" {
			what = im.Ref
		}
		return store.Image{}, false, fmt.Errorf("image %q already exists (%s): remove it (banger image rm %s) or pull under another name with --name NAME: %w",
			name, what, name, errdefs.ErrAlreadyExists)
	case !errors.Is(err, errdefs.ErrNotFound):
		return store.Image{}, false, err
	}
	if named {
		return store.Image{}, false, nil
	}
	all, err := d.store.ListImages(ctx)
	if err != nil {
		return store.Image{}, false, err
	}
	for _, im := range all {
		if same(im) {
			return im, true, nil
		}
	}
	return store.Image{}, false, nil
}
