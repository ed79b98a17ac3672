package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/bangerdev/banger/internal/disk"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/imagefile"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
)

// An image's files must not change under the VMs made from it: a qcow2
// disk reads its image's rootfs as its backing file for as long as the VM
// lives, and its kernel object's kernel, initrd and modules are read at
// each start. Every file an image or a kernel uses is fingerprinted when
// it is registered (stat: size, modification and change times, inode)
// and, when banger copied it (promote, import, pull), hashed (sha256).
// The image's rootfs fingerprints are in image_files, its kernel's in
// kernel_files (one kernel is shared by images).
// A VM is created or started only while the fingerprints still match.

// artifactsOf is what a VM of im booting k reads: the image's rootfs and
// the kernel object's files.
func artifactsOf(im store.Image, k store.Kernel) imagefile.Artifacts {
	return imagefile.Artifacts{Rootfs: im.Rootfs, Kernel: k.Kernel, Initrd: k.Initrd, ModulesDir: k.ModulesDir}
}

// rootfsOf and kernelFilesOf are the image's and the kernel's parts.
func rootfsOf(im store.Image) imagefile.Artifacts { return imagefile.Artifacts{Rootfs: im.Rootfs} }

func kernelFilesOf(k store.Kernel) imagefile.Artifacts {
	return imagefile.Artifacts{Kernel: k.Kernel, Initrd: k.Initrd, ModulesDir: k.ModulesDir}
}

func toStoreFiles(ss []imagefile.Stamp) []store.ImageFile {
	out := make([]store.ImageFile, 0, len(ss))
	for _, s := range ss {
		out = append(out, store.ImageFile{Path: s.Path, Role: s.Role, Rel: s.Rel, Link: s.Link, Size: s.Size, MTimeNS: s.MTimeNS, CTimeNS: s.CTimeNS, Inode: s.Inode, Dev: s.Dev, SHA256: s.SHA256})
	}
	return out
}

func fromStoreFiles(fs []store.ImageFile) []imagefile.Stamp {
	out := make([]imagefile.Stamp, 0, len(fs))
	for _, f := range fs {
		out = append(out, imagefile.Stamp{Path: f.Path, Role: f.Role, Rel: f.Rel, Link: f.Link, Size: f.Size, MTimeNS: f.MTimeNS, CTimeNS: f.CTimeNS, Inode: f.Inode, Dev: f.Dev, SHA256: f.SHA256})
	}
	return out
}

// bootKernel returns the kernel object a VM of im boots: kernelID (vm
// create --kernel) when not empty, else the image's.
func (d *Daemon) bootKernel(ctx context.Context, im store.Image, kernelID string) (store.Kernel, error) {
	id := kernelID
	if id == "" {
		id = im.KernelID
	}
	if id == "" {
		return store.Kernel{}, fmt.Errorf("image %q has no kernel: register it again with --kernel: %w", im.Name, errdefs.ErrFailedPrecondition)
	}
	k, err := d.store.GetKernel(ctx, id)
	if errors.Is(err, errdefs.ErrNotFound) {
		if kernelID != "" {
			return store.Kernel{}, fmt.Errorf("kernel %s was removed meanwhile: %w", kernelID, err)
		}
		return store.Kernel{}, fmt.Errorf("the kernel of image %q (%s) is gone: %w: %w", im.Name, id, err, errdefs.ErrFailedPrecondition)
	}
	return k, err
}

// usableImage checks that the files a VM of im booting kernelID (""
// = the image's kernel) reads are all there and unchanged since they
// were recorded, and returns that kernel. Its errors are
// ErrFailedPrecondition and say what to do.
//
// Once a boot set passed (its files valid and matching their
// fingerprints), its fingerprints are kept in memory: the next checks only
// stat its files against them, without reading the fingerprints from the
// store (a row per file of a modules tree: over a thousand) or validating
// the files again (the kernel's release, every boot module's); any
// difference falls back to the full check. Validation depends only on the
// files' content, which the fingerprints pin.
func (d *Daemon) usableImage(ctx context.Context, im store.Image, kernelID string) (store.Kernel, error) {
	k, err := d.bootKernel(ctx, im, kernelID)
	if err != nil {
		return k, err
	}
	key := im.ID + "/" + k.ID
	if c, ok := d.checked.Load(key); ok {
		c := c.(checkedImage)
		if c.artifacts == artifactsOf(im, k) && imagefile.Verify(c.stamps) == nil {
			return k, nil
		}
		d.checked.Delete(key)
	}
	if err := imagefile.ValidateArtifacts(artifactsOf(im, k)); err != nil {
		return k, fmt.Errorf("image %q with kernel %q is unusable (were its files moved or removed?): %w: %w", im.Name, k.Name, err, errdefs.ErrFailedPrecondition)
	}
	imStamps, err := d.imageStamps(ctx, im)
	if err != nil {
		return k, err
	}
	kStamps, err := d.kernelStamps(ctx, k)
	if err != nil {
		return k, err
	}
	var ce *imagefile.ChangedError
	if err := imagefile.Verify(imStamps); err != nil {
		if !errors.As(err, &ce) {
			return k, err
		}
		if im.Managed {
			return k, fmt.Errorf("image %q is unusable: %w; banger's own copy was changed outside banger, and VMs made from it may see a corrupt disk: install the image again (sudo banger image rm, then register or pull it): %w",
				im.Name, ce, errdefs.ErrFailedPrecondition)
		}
		return k, fmt.Errorf("image %q is unusable: %w; VMs made from it before the change may see a corrupt disk. "+
			"Restore the file, or register it as a new image (sudo banger image register), or, if no VM uses %q, remove and register it again (sudo banger image rm %s). "+
			"An image promoted with sudo banger image promote is banger's own copy, which can't change under its VMs: %w",
			im.Name, ce, im.Name, im.Name, errdefs.ErrFailedPrecondition)
	}
	if err := imagefile.Verify(kStamps); err != nil {
		if !errors.As(err, &ce) {
			return k, err
		}
		if k.Managed {
			return k, fmt.Errorf("kernel %q is unusable: %w; banger's own copy was changed outside banger: install it again (sudo banger kernel rm, then import or pull it): %w",
				k.Name, ce, errdefs.ErrFailedPrecondition)
		}
		return k, fmt.Errorf("kernel %q (of image %q) is unusable: %w. Restore the file, or register the image again with the files as they are now "+
			"(sudo banger image rm %s, then sudo banger image register), or import the kernel into banger's storage (sudo banger kernel import). "+
			"An image promoted with sudo banger image promote boots banger's own copy of its kernel, which can't change under its VMs: %w",
			k.Name, im.Name, ce, im.Name, errdefs.ErrFailedPrecondition)
	}
	d.checked.Store(key, checkedImage{artifacts: artifactsOf(im, k), stamps: append(imStamps, kStamps...)})
	return k, nil
}

// imageStamps returns an image's recorded fingerprints, recording them
// first when there are none (images registered before they were kept).
func (d *Daemon) imageStamps(ctx context.Context, im store.Image) ([]imagefile.Stamp, error) {
	files, err := d.store.ImageFiles(ctx, im.ID)
	if err != nil || len(files) > 0 {
		return fromStoreFiles(files), err
	}
	if err := d.recordImageFiles(ctx, im); err != nil {
		return nil, err
	}
	files, err = d.store.ImageFiles(ctx, im.ID)
	return fromStoreFiles(files), err
}

// kernelStamps is imageStamps for a kernel.
func (d *Daemon) kernelStamps(ctx context.Context, k store.Kernel) ([]imagefile.Stamp, error) {
	files, err := d.store.KernelFiles(ctx, k.ID)
	if err != nil || len(files) > 0 {
		return fromStoreFiles(files), err
	}
	if err := d.recordKernelFiles(ctx, k); err != nil {
		return nil, err
	}
	files, err = d.store.KernelFiles(ctx, k.ID)
	return fromStoreFiles(files), err
}

// forgetChecked drops the cached checks of every boot set an image or a
// kernel (by id) is part of.
func (d *Daemon) forgetChecked(id string) {
	d.checked.Range(func(key, _ any) bool {
		im, k, _ := strings.Cut(key.(string), "/")
		if im == id || k == id {
			d.checked.Delete(key)
		}
		return true
	})
}

// checkedImage is a boot set's files as usableImage last found them usable.
type checkedImage struct {
	artifacts imagefile.Artifacts
	stamps    []imagefile.Stamp
}

// recordImageFiles fingerprints im's rootfs when none are recorded (images
// registered before fingerprints were kept).
func (d *Daemon) recordImageFiles(ctx context.Context, im store.Image) error {
	stamps, err := imagefile.Fingerprint(ctx, rootfsOf(im), false)
	if err != nil {
		return fmt.Errorf("image %q: %w", im.Name, err)
	}
	added, err := d.store.AddImageFilesIfNone(ctx, im.ID, toStoreFiles(stamps))
	if err != nil {
		return err
	}
	if added {
		d.log.Info("recorded the fingerprints of an image registered before they were kept", "image", im.Name, "files", len(stamps))
	}
	return nil
}

// recordKernelFiles fingerprints k's files when none are recorded.
func (d *Daemon) recordKernelFiles(ctx context.Context, k store.Kernel) error {
	stamps, err := imagefile.Fingerprint(ctx, kernelFilesOf(k), false)
	if err != nil {
		return fmt.Errorf("kernel %q: %w", k.Name, err)
	}
	added, err := d.store.AddKernelFilesIfNone(ctx, k.ID, toStoreFiles(stamps))
	if err != nil {
		return err
	}
	if added {
		d.log.Info("recorded the fingerprints of a kernel registered before they were kept", "kernel", k.Name, "files", len(stamps))
	}
	return nil
}

// imageReady is usableImage for a VM about to start (returning the
// kernel it boots): it also moves the VM's disk onto its image's managed
// copy when the image was promoted while the disk still named the
// original file (see moveDiskOntoImage). The caller holds the VM's lock,
// and the VM does not run.
func (d *Daemon) imageReady(ctx context.Context, v store.VM, im store.Image) (store.Kernel, error) {
	k, err := d.usableImage(ctx, im, v.KernelID)
	if err != nil {
		return k, err
	}
	return k, d.moveDiskOntoImage(ctx, v, im)
}

// moveDiskOntoImage rebases v's qcow2 disk onto im's rootfs when the disk
// is still backed by the file im was promoted from. The copy's content was
// checked (sha256) against the original before the image row named it, so
// the unsafe rebase (qemu-img rebase -u: only the header changes) is exact,
// and the original need not even exist any more. A disk backed by another
// file is an error. The caller holds the VM's lock, and the VM does not
// run (QEMU has the backing file open and would not see the change).
func (d *Daemon) moveDiskOntoImage(ctx context.Context, v store.VM, im store.Image) error {
	if v.DiskFormat != vmm.FormatQcow2 || im.PromotedFrom == "" {
		return nil
	}
	backing, err := disk.BackingFile(v.DiskPath)
	if err != nil {
		return fmt.Errorf("vm %q: %w", v.Name, err)
	}
	switch filepath.Clean(backing) {
	case filepath.Clean(im.Rootfs):
		return nil
	case filepath.Clean(im.PromotedFrom):
	default:
		return fmt.Errorf("vm %q: its disk is backed by %s, which is neither image %q's rootfs %s nor the file it was promoted from: %w",
			v.Name, backing, im.Name, im.Rootfs, errdefs.ErrFailedPrecondition)
	}
	if err := d.cloner.Rebase(ctx, v.DiskPath, im.Rootfs); err != nil {
		return fmt.Errorf("vm %q: move its disk onto image %q's copy: %w", v.Name, im.Name, err)
	}
	d.log.Info("moved a vm's disk onto its image's managed copy", "vm", v.Name, "image", im.Name, "from", backing, "to", im.Rootfs)
	return nil
}

// moveDisksOntoImage moves the disks of im's VMs that are stopped (and not
// busy) onto its managed copy, and returns the names of those it left:
// running VMs keep the original file open, and move at their next start.
func (d *Daemon) moveDisksOntoImage(ctx context.Context, im store.Image) (left []string, err error) {
	vms, err := d.store.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, v := range vms {
		if v.ImageID != im.ID || v.DiskFormat != vmm.FormatQcow2 {
			continue
		}
		lock := d.vmLock(v.ID)
		if !lock.TryLock() { // booting, stopping: it moves at its next start
			left = append(left, v.Name)
			continue
		}
		d.mu.Lock()
		running := d.running[v.ID] != nil
		d.mu.Unlock()
		if running {
			left = append(left, v.Name)
		} else if err := d.moveDiskOntoImage(ctx, v, im); err != nil {
			errs = append(errs, err)
		}
		lock.Unlock()
	}
	return left, errors.Join(errs...)
}

// reconcileImages repairs what a crash left among images, at daemon start
// (after VMs are reconciled, before serving):
//   - images registered before fingerprints were kept get them;
//   - a promote interrupted before its row was updated left a complete
//     copy in images/<id> for an image still unmanaged: it is removed (no
//     disk names it yet: disks are moved only after the row is updated);
//   - a promote interrupted after the row was updated left VM disks on the
//     original file: stopped ones are moved now, running ones at their
//     next start (the promote is completed);
//   - a directory in images/ without an image (image rm interrupted after
//     the row was deleted) is removed;
//   - kernels likewise (reconcileKernels).
func (d *Daemon) reconcileImages(ctx context.Context) error {
	ims, err := d.store.ListImages(ctx)
	if err != nil {
		return err
	}
	imagesDir := filepath.Join(d.cfg.StateDir, "images")
	known := map[string]bool{}
	for _, im := range ims {
		known[im.ID] = true
		if err := d.recordImageFiles(ctx, im); err != nil {
			d.log.Warn("can't fingerprint an image's files", "image", im.Name, "err", err)
		}
		dir := filepath.Join(imagesDir, im.ID)
		if !im.Managed {
			if _, err := os.Lstat(dir); err == nil {
				if err := os.RemoveAll(dir); err != nil {
					return fmt.Errorf("undo an interrupted promote of image %q: %w", im.Name, err)
				}
				d.log.Info("undid an interrupted promote: removed its copy", "image", im.Name, "dir", dir)
			}
			continue
		}
		if im.PromotedFrom != "" {
			left, err := d.moveDisksOntoImage(ctx, im)
			if err != nil {
				d.log.Warn("move vm disks onto a promoted image", "image", im.Name, "err", err)
			}
			if len(left) > 0 {
				d.log.Info("vms still on the file their image was promoted from; they move at their next start", "image", im.Name, "vms", strings.Join(left, ","))
			}
		}
	}
	if err := d.reconcileKernels(ctx); err != nil {
		return err
	}
	entries, err := os.ReadDir(imagesDir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") || known[e.Name()] {
			continue
		}
		dir := filepath.Join(imagesDir, e.Name())
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("remove the files of a removed image: %w", err)
		}
		d.log.Info("removed the files of a removed image (interrupted image rm)", "dir", dir)
	}
	return nil
}

// reconcileKernels repairs kernels at daemon start, as reconcileImages
// images:
//   - kernels registered before fingerprints were kept get them;
//   - a kernels/<id> directory of an unmanaged kernel (a promote
//     interrupted before its rows were updated) or of no kernel (kernel
//     rm interrupted, an install that crashed before its row) is removed;
//   - kernels without a release (made by the migration) get the one
//     their kernel image says;
//   - a managed kernel whose files are elsewhere (one made from a promoted
//     image by the kernels migration: its files are in the image's
//     directory) is copied into kernels/<id>, checked (sha256) and
//     recorded there, so removing the image leaves its kernel whole.
func (d *Daemon) reconcileKernels(ctx context.Context) error {
	kernelsDir := filepath.Join(d.cfg.StateDir, "kernels")
	if removed, err := imagefile.RemovePartial(kernelsDir); err != nil {
		d.log.Warn("remove interrupted kernel promotions", "err", err)
	} else if len(removed) > 0 {
		d.log.Info("removed interrupted kernel promotions", "dirs", removed)
	}
	ks, err := d.store.ListKernels(ctx)
	if err != nil {
		return err
	}
	known := map[string]bool{}
	for _, k := range ks {
		dir := filepath.Join(kernelsDir, k.ID)
		if k.Managed {
			known[k.ID] = true
			if !isUnder(k.Kernel, dir) {
				if err := d.relocateKernel(ctx, k, dir); err != nil {
					d.log.Warn("can't move a kernel's files into kernels/ (removing the image they are in would break it)", "kernel", k.Name, "err", err)
				}
			}
		}
		if err := d.recordKernelFiles(ctx, k); err != nil {
			d.log.Warn("can't fingerprint a kernel's files", "kernel", k.Name, "err", err)
		}
		if k.Release == "" { // made by the migration to kernel objects
			if rel := kernelRelease(k.Kernel); rel != "" {
				if cur, err := d.store.GetKernel(ctx, k.ID); err == nil {
					cur.Release = rel
					if err := d.store.UpdateKernel(ctx, cur); err != nil {
						d.log.Warn("record a kernel's release", "kernel", k.Name, "err", err)
					}
				}
			}
		}
	}
	entries, err := os.ReadDir(kernelsDir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") || known[e.Name()] {
			continue
		}
		dir := filepath.Join(kernelsDir, e.Name())
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("remove the files of a removed kernel: %w", err)
		}
		d.log.Info("removed the files of a kernel that is not registered (interrupted kernel rm, promote or install)", "dir", dir)
	}
	return nil
}

// isUnder reports whether path p is inside dir.
func isUnder(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && filepath.IsLocal(rel)
}

// relocateKernel copies a managed kernel's files into dir and records
// them there (the old files stay where they were, with their image).
func (d *Daemon) relocateKernel(ctx context.Context, k store.Kernel, dir string) error {
	if err := os.RemoveAll(dir); err != nil { // a relocation interrupted before its row
		return err
	}
	src := kernelFilesOf(k)
	out, err := imagefile.Promote(ctx, src, dir, nil)
	if err != nil {
		return err
	}
	srcSums, err := imagefile.Fingerprint(ctx, src, true)
	if err == nil {
		var copySums []imagefile.Stamp
		if copySums, err = imagefile.Fingerprint(ctx, out, true); err == nil {
			if err = imagefile.SameContent(srcSums, copySums); err == nil {
				k.Kernel, k.Initrd, k.ModulesDir = out.Kernel, out.Initrd, out.ModulesDir
				k.Files = toStoreFiles(copySums)
				k.SizeBytes = stampsSize(copySums)
				err = d.store.UpdateKernel(ctx, k)
			}
		}
	}
	if err != nil {
		os.RemoveAll(dir)
		return err
	}
	d.forgetChecked(k.ID)
	d.log.Info("moved a kernel's files into its own directory", "kernel", k.Name, "dir", dir)
	return nil
}
