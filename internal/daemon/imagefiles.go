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
// lives, and the kernel, initrd and modules are read at each start. Every
// file an image uses is fingerprinted when it is registered (stat: size,
// modification and change times, inode) and, when promote copies it,
// hashed (sha256).
// A VM is created or started only while the fingerprints still match.

func artifactsOf(im store.Image) imagefile.Artifacts {
	return imagefile.Artifacts{Rootfs: im.Rootfs, Kernel: im.Kernel, Initrd: im.Initrd, ModulesDir: im.ModulesDir}
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

// usableImage checks that im's files are all there and unchanged since
// they were recorded. Its errors are ErrFailedPrecondition and say what
// to do.
//
// Once an image passed (its files valid and matching their fingerprints),
// its fingerprints are kept in memory: the next checks only stat its files
// against them, without reading the fingerprints from the store (a row
// per file of a modules tree: over a thousand) or validating the files
// again (the kernel's release, every boot module's); any difference falls
// back to the full check. Validation depends only on the files' content,
// which the fingerprints pin.
func (d *Daemon) usableImage(ctx context.Context, im store.Image) error {
	if c, ok := d.checked.Load(im.ID); ok {
		c := c.(checkedImage)
		if c.artifacts == artifactsOf(im) && imagefile.Verify(c.stamps) == nil {
			return nil
		}
		d.checked.Delete(im.ID)
	}
	if err := imagefile.ValidateArtifacts(artifactsOf(im)); err != nil {
		return fmt.Errorf("image %q is unusable (were its files moved or removed?): %w: %w", im.Name, err, errdefs.ErrFailedPrecondition)
	}
	files, err := d.store.ImageFiles(ctx, im.ID)
	if err != nil {
		return err
	}
	if len(files) == 0 {
		// Registered before fingerprints were kept: trust what is there now.
		return d.recordImageFiles(ctx, im)
	}
	stamps := fromStoreFiles(files)
	err = imagefile.Verify(stamps)
	if err == nil {
		d.checked.Store(im.ID, checkedImage{artifacts: artifactsOf(im), stamps: stamps})
	}
	var ce *imagefile.ChangedError
	if !errors.As(err, &ce) {
		return err
	}
	if im.Managed {
		return fmt.Errorf("image %q is unusable: %w; banger's own copy was changed outside banger, and VMs made from it may see a corrupt disk: register the image again from a good copy (sudo banger image register): %w",
			im.Name, ce, errdefs.ErrFailedPrecondition)
	}
	return fmt.Errorf("image %q is unusable: %w; VMs made from it before the change may see a corrupt disk. "+
		"Restore the file, or register it as a new image (sudo banger image register), or, if no VM uses %q, remove and register it again (sudo banger image rm %s). "+
		"An image promoted with sudo banger image promote is banger's own copy, which can't change under its VMs: %w",
		im.Name, ce, im.Name, im.Name, errdefs.ErrFailedPrecondition)
}

// checkedImage is an image's files as usableImage last found them usable.
type checkedImage struct {
	artifacts imagefile.Artifacts
	stamps    []imagefile.Stamp
}

// recordImageFiles fingerprints im's files when none are recorded (images
// registered before fingerprints were kept).
func (d *Daemon) recordImageFiles(ctx context.Context, im store.Image) error {
	stamps, err := imagefile.Fingerprint(ctx, artifactsOf(im), false)
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

// imageReady is usableImage for a VM about to start: it also moves the
// VM's disk onto its image's managed copy when the image was promoted
// while the disk still named the original file (see moveDiskOntoImage).
// The caller holds the VM's lock, and the VM does not run.
func (d *Daemon) imageReady(ctx context.Context, v store.VM, im store.Image) error {
	if err := d.usableImage(ctx, im); err != nil {
		return err
	}
	return d.moveDiskOntoImage(ctx, v, im)
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
//     the row was deleted) is removed.
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
