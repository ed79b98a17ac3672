// Package ociimport turns an OCI or Docker image into an ext4 root file
// system: Resolve reads a reference's manifest and config (a registry
// through go-containerregistry, an OCI layout directory, a `docker save`
// tarball, the Docker daemon through `docker save`), Source.Build
// flattens its layers into a directory and makes the ext4 with
// `mkfs.ext4 -d`.
//
// Layers are hostile input. They are applied in order, whiteouts
// (".wh.NAME") and opaque directories (".wh..wh..opq") honoured, and every
// path is resolved with openat2(RESOLVE_IN_ROOT): "../" names are refused,
// absolute names, absolute symlinks and symlinked parent directories
// resolve inside the root as they will in the guest, hard links can only
// name files inside it, and the last component of a name is never
// followed. Owners, modes, times, extended attributes (security.capability
// among them) and device nodes are kept: the daemon extracts as root.
//
// Layers are streamed: each is downloaded and decompressed by a goroutine
// of its own into a bounded queue while the previous one is extracted; no
// layer is stored whole.
package ociimport

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/bangerdev/banger/internal/api"
)

// BuildOptions tune Source.Build.
type BuildOptions struct {
	// HeadroomMiB is the free space added to the content (config
	// image_headroom_mib).
	HeadroomMiB int64
	// Progress receives PhaseLayers and PhaseMkfs frames; nil discards
	// them. It is called from the calling goroutine only.
	Progress func(api.Progress)
	// DiscardTree, when set, is handed the flattened tree (a directory
	// inside dir) once the ext4 is made or Build failed, instead of Build
	// removing it: the caller may move it aside and remove it in the
	// background (thousands of files: a tenth of the extraction's time).
	// It must be gone from dir when DiscardTree returns.
	DiscardTree func(tree string)
}

// Built is the result of Source.Build.
type Built struct {
	Rootfs string // dir/RootfsName
	// ContentBytes is the flattened tree's estimated size on ext4.
	ContentBytes int64
	Stats        FlattenStats
}

// RootfsName is the file Build writes in its directory.
const RootfsName = "rootfs.ext4"

// Build flattens the image's layers into a work tree inside dir and makes
// dir/rootfs.ext4 from it. Registry downloads run under the context given
// to Resolve (go-containerregistry binds it then): cancel both. dir must exist (the caller's staging
// directory); the work tree is removed before Build returns, and so is
// rootfs.ext4 when Build fails.
func (s *Source) Build(ctx context.Context, dir string, opts BuildOptions) (b Built, err error) {
	progress := opts.Progress
	if progress == nil {
		progress = func(api.Progress) {}
	}
	// The tree holds the image's setuid files and device nodes: it lives
	// under a directory only root can enter.
	work, err := os.MkdirTemp(dir, "tree-")
	if err != nil {
		return b, fmt.Errorf("make work directory: %w", err)
	}
	defer func() {
		if opts.DiscardTree != nil {
			opts.DiscardTree(work)
			return
		}
		os.RemoveAll(work)
	}()
	if err := os.Chmod(work, 0o700); err != nil {
		return b, err
	}
	root := filepath.Join(work, "root")
	if err := emptyDir(root); err != nil {
		return b, err
	}
	b.Stats, err = flatten(ctx, s.layers, root, s.log, progress)
	if err != nil {
		return b, fmt.Errorf("import %s: %w", s.Ref, err)
	}
	// Container runtimes give every container an /etc (hosts,
	// resolv.conf, hostname are mounted there, even in FROM scratch
	// images); banger's agent writes those files at boot into an /etc
	// that exists.
	if _, err := os.Lstat(filepath.Join(root, "etc")); os.IsNotExist(err) {
		if err := os.Mkdir(filepath.Join(root, "etc"), 0o755); err != nil {
			return b, fmt.Errorf("import %s: make /etc: %w", s.Ref, err)
		}
	}
	out := filepath.Join(dir, RootfsName)
	u, err := MakeExt4(ctx, root, out, Ext4Options{HeadroomMiB: opts.HeadroomMiB, Progress: progress})
	if err != nil {
		return b, fmt.Errorf("import %s: %w", s.Ref, err)
	}
	b.Rootfs, b.ContentBytes = out, u.Bytes
	return b, nil
}
