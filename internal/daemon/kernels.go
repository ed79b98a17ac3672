package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/catalog"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/imagefile"
	"github.com/bangerdev/banger/internal/kerneldeb"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
)

// Kernels are objects of their own (a kernel image, an optional initrd
// and modules tree), shared by images: an image names its kernel, a VM
// boots its image's kernel unless created with --kernel. A managed
// kernel's files are in kernels/<id> (import, pull, build, promote); an
// unmanaged one's stay where they were registered (image register with
// kernel files).

func (d *Daemon) kernelAPI(ctx context.Context, k store.Kernel) api.Kernel {
	images, vms, err := d.store.KernelUsers(ctx, k.ID)
	if err != nil {
		d.log.Warn("list a kernel's users", "kernel", k.Name, "err", err)
	}
	return api.Kernel{
		ID: k.ID, Name: k.Name, Managed: k.Managed, Source: k.Source, Version: k.Version, Release: k.Release,
		Kernel: k.Kernel, Initrd: k.Initrd, ModulesDir: k.ModulesDir, Ref: k.Ref, Digest: k.Digest,
		SizeBytes: k.SizeBytes, CreatedAt: k.CreatedAt, Images: images, VMs: vms,
	}
}

// kernelForCreate resolves vm create's --kernel NAME (or NAME@VERSION),
// pulling it from the kernel catalog when it is not local (ensureKernel,
// pulls.go). createVM calls it before taking the create lock.
func (d *Daemon) kernelForCreate(ctx context.Context, name string, progress func(api.Progress)) (store.Kernel, error) {
	return d.ensureKernel(ctx, name, progress)
}

func (d *Daemon) kernelList(ctx context.Context, call *rpc.Call) (any, error) {
	ks, err := d.store.ListKernels(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.Kernel, 0, len(ks))
	for _, k := range ks {
		out = append(out, d.kernelAPI(ctx, k))
	}
	return out, nil
}

func (d *Daemon) kernelInspect(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.NameParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	k, err := d.store.GetKernel(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	out := d.kernelAPI(ctx, k)
	files, err := d.store.KernelFiles(ctx, k.ID)
	if err != nil {
		return nil, err
	}
	out.Files, _ = fileViews(files, imagefile.FieldKernel, imagefile.FieldInitrd)
	return out, nil
}

func (d *Daemon) kernelRemove(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.NameParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	d.create.Lock() // no image or VM may start using it meanwhile
	defer d.create.Unlock()
	k, err := d.store.GetKernel(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	if _, err := d.removeKernel(ctx, k); err != nil {
		return nil, err
	}
	return nil, nil
}

// removeKernel deletes a kernel's row (refused while used) and, when
// managed, its files; it returns the bytes freed. The caller holds the
// create lock.
func (d *Daemon) removeKernel(ctx context.Context, k store.Kernel) (int64, error) {
	if err := d.store.DeleteKernel(ctx, k.ID); err != nil {
		return 0, fmt.Errorf("remove kernel %q: %w", k.Name, err)
	}
	d.forgetChecked(k.ID)
	var freed int64
	if k.Managed {
		dir := filepath.Join(d.cfg.StateDir, "kernels", k.ID)
		freed, _ = treeSize(dir)
		if err := os.RemoveAll(dir); err != nil {
			d.log.Warn("remove kernel files", "dir", dir, "err", err)
		}
	}
	d.log.Info("kernel removed", "kernel", k.Name)
	return freed, nil
}

// kernelImport copies a kernel into banger's storage: kernel image files
// (with an optional initrd and modules tree) or a Debian kernel package,
// extracted with its module index (kerneldeb). The files are staged,
// then installed (installKernel): either the kernel is registered with
// its files in kernels/<id>, or nothing is.
func (d *Daemon) kernelImport(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.KernelImportParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	if err := catalog.ValidateName(catalog.Kernels, p.Name); err != nil { // kernel names may hold dots: generic-6.1
		return nil, err
	}
	switch {
	case p.Deb != "" && (p.Kernel != "" || p.Initrd != "" || p.ModulesDir != ""):
		return nil, fmt.Errorf("give a Debian package or kernel files, not both: %w", errdefs.ErrInvalid)
	case p.Deb == "" && p.Kernel == "":
		return nil, fmt.Errorf("give a kernel image (--kernel FILE) or a Debian kernel package (--deb FILE): %w", errdefs.ErrInvalid)
	}
	for _, f := range []string{p.Deb, p.Kernel, p.Initrd, p.ModulesDir} {
		if f != "" && !filepath.IsAbs(f) {
			return nil, fmt.Errorf("%s: want an absolute path: %w", f, errdefs.ErrInvalid)
		}
	}
	if _, err := d.store.GetKernel(ctx, p.Name); err == nil {
		return nil, fmt.Errorf("kernel %q already exists: remove it first (banger kernel rm %s) or choose another name: %w", p.Name, p.Name, errdefs.ErrAlreadyExists)
	}
	dir, err := d.stagingDir("kernel")
	if err != nil {
		return nil, err
	}
	s := stagedKernel{Name: p.Name, Source: api.SourceImported, Dir: dir}
	if p.Deb != "" {
		if _, err := os.Stat(p.Deb); err != nil {
			d.discardStaging(dir)
			return nil, fmt.Errorf("import kernel %q: %w: %w", p.Name, err, errdefs.ErrInvalid)
		}
		phase := "extract " + filepath.Base(p.Deb)
		res, err := kerneldeb.ExtractWith(ctx, p.Deb, filepath.Join(dir, "deb"), kerneldeb.Options{Progress: func(done, total int64) {
			call.Progress(api.Progress{Phase: phase, Done: done, Total: total, Unit: "bytes"})
		}})
		if err != nil {
			d.discardStaging(dir)
			if errors.Is(err, kerneldeb.ErrNotKernelPackage) || errors.Is(err, kerneldeb.ErrUnsafe) {
				err = fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
			}
			return nil, fmt.Errorf("import kernel %q: %w", p.Name, err)
		}
		s.Kernel, s.ModulesDir, s.Release, s.Ref = res.Kernel, res.ModulesDir, res.Release, p.Deb
		s.Version, s.Digest = res.Version, "sha256:"+res.SHA256
	} else {
		src := imagefile.Artifacts{Kernel: p.Kernel, Initrd: p.Initrd, ModulesDir: p.ModulesDir}
		if err := imagefile.ValidateParts(src); err != nil {
			d.discardStaging(dir)
			return nil, fmt.Errorf("import kernel %q: %w", p.Name, artifactErr(err))
		}
		out, err := imagefile.Promote(ctx, src, filepath.Join(dir, "files"), func(pr imagefile.Progress) {
			call.Progress(api.Progress{Phase: "copy " + pr.Phase, Done: pr.Done, Total: pr.Total, Unit: "bytes"})
		})
		if err != nil {
			d.discardStaging(dir)
			return nil, fmt.Errorf("import kernel %q: %w", p.Name, err)
		}
		s.Kernel, s.Initrd, s.ModulesDir, s.Ref = out.Kernel, out.Initrd, out.ModulesDir, p.Kernel
	}
	call.Progress(api.Progress{Phase: "install"})
	k, err := d.installKernel(ctx, s)
	if err != nil {
		return nil, err
	}
	return d.kernelAPI(ctx, k), nil
}
