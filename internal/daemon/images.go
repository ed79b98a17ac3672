package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/imagefile"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/undo"
	"github.com/bangerdev/banger/internal/vmname"
)

// newID returns 16 hex digits, the first a decimal digit: names start
// with a letter, so an id is never a valid name and lookups by "name or
// id" can't confuse them.
func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	b[0] &= 0x7f
	return hex.EncodeToString(b)
}

func (d *Daemon) imageAPI(ctx context.Context, im store.Image) api.Image {
	users, err := d.store.ImageUsers(ctx, im.ID)
	if err != nil {
		d.log.Warn("list an image's VMs", "image", im.Name, "err", err)
	}
	return api.Image{
		ID: im.ID, Name: im.Name, Managed: im.Managed, Rootfs: im.Rootfs, Kernel: im.Kernel,
		Initrd: im.Initrd, ModulesDir: im.ModulesDir, SizeBytes: im.SizeBytes, CreatedAt: im.CreatedAt, UsedBy: users,
		PromotedFrom: im.PromotedFrom, User: imageUser(im),
	}
}

// imageUser is an image's default user: root unless one was registered.
func imageUser(im store.Image) string {
	if im.DefaultUser == "" {
		return "root"
	}
	return im.DefaultUser
}

// validUserName checks a login name as useradd accepts it (portable
// set, at most 32 characters): it is written into the guest's files.
func validUserName(n string) error {
	ok := n != "" && len(n) <= 32 && n[0] != '-' && !(n[0] >= '0' && n[0] <= '9')
	for _, c := range n {
		ok = ok && (c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.')
	}
	if !ok || n == "." || n == ".." {
		return fmt.Errorf("user %s: want a login name (letters, digits, '_', '-', '.', at most 32, not starting with a digit or '-'): %w", errdefs.Quote(n), errdefs.ErrInvalid)
	}
	return nil
}

// artifactErr marks image file problems as invalid arguments for the RPC edge.
func artifactErr(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
}

func (d *Daemon) imageRegister(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.ImageRegisterParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	if err := vmname.ValidateKind("image", p.Name); err != nil {
		return nil, fmt.Errorf("%w: %w", err, errdefs.ErrInvalid)
	}
	if p.User != "" {
		if err := validUserName(p.User); err != nil {
			return nil, err
		}
	}
	a := imagefile.Artifacts{Rootfs: p.Rootfs, Kernel: p.Kernel, Initrd: p.Initrd, ModulesDir: p.ModulesDir}
	if err := imagefile.ValidateArtifacts(a); err != nil {
		return nil, artifactErr(err)
	}
	st, err := os.Stat(p.Rootfs)
	if err != nil {
		return nil, artifactErr(err)
	}
	stamps, err := imagefile.Fingerprint(ctx, a, false)
	if err != nil {
		return nil, artifactErr(err)
	}
	im := store.Image{
		ID: newID(), Name: p.Name, Rootfs: p.Rootfs, Kernel: p.Kernel, Initrd: p.Initrd, ModulesDir: p.ModulesDir,
		SizeBytes: st.Size(), CreatedAt: time.Now(), Files: toStoreFiles(stamps), DefaultUser: p.User,
	}
	if err := d.store.InsertImage(ctx, im); err != nil {
		return nil, err
	}
	d.log.Info("image registered", "image", im.Name, "rootfs", im.Rootfs, "kernel", im.Kernel)
	return d.imageAPI(ctx, im), nil
}

// imagePromote copies an unmanaged image's files into the state dir, so
// that banger owns them and they can't change under its VMs:
//
//  1. the source must match its fingerprints (or, changed, have no VMs:
//     the copy then takes the files as they are now);
//  2. the files are copied into images/<id> (a temporary directory renamed
//     into place);
//  3. source and copy are hashed (sha256) and must be the same, and the
//     source must not have changed during the copy;
//  4. the image row is updated in one transaction: managed, the copy's
//     paths and fingerprints (with hashes), and the rootfs it came from.
//     This is the commit point: a crash before it leaves a copy that
//     daemon start removes, a crash after it leaves disks that daemon
//     start moves (reconcileImages);
//  5. the qcow2 disks of the image's stopped VMs are rebased onto the copy;
//     running (or busy) VMs keep the original open and move at their next
//     start. The original files can be deleted once promote returns (a
//     rebase needs only the copy), but must not be modified while a VM
//     that still uses them runs.
func (d *Daemon) imagePromote(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.NameParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	im, err := d.store.GetImage(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	if im.Managed {
		return nil, fmt.Errorf("image %q is already managed: %w", im.Name, errdefs.ErrFailedPrecondition)
	}
	src := artifactsOf(im)
	if err := imagefile.ValidateArtifacts(src); err != nil {
		return nil, fmt.Errorf("image %q can't be promoted: %w", im.Name, artifactErr(err))
	}
	// before is what the source must still be once copied and hashed: the
	// fingerprints recorded at register (the content the image's VM disks
	// were made from), or, for a changed image no VM uses, the files now.
	var before []imagefile.Stamp
	if err := d.usableImage(ctx, im); err != nil {
		users, uerr := d.store.ImageUsers(ctx, im.ID)
		if uerr != nil {
			return nil, uerr
		}
		if !errors.Is(err, imagefile.ErrChanged) || len(users) > 0 {
			return nil, fmt.Errorf("image %q can't be promoted: %w", im.Name, err)
		}
		d.log.Info("promoting an image whose files changed since registration; no VM uses it", "image", im.Name, "change", err)
		if before, err = imagefile.Fingerprint(ctx, src, false); err != nil {
			return nil, fmt.Errorf("promote image %q: %w", im.Name, artifactErr(err))
		}
	} else {
		recorded, err := d.store.ImageFiles(ctx, im.ID)
		if err != nil {
			return nil, err
		}
		before = fromStoreFiles(recorded)
	}
	dest := filepath.Join(d.cfg.StateDir, "images", im.ID)
	out, err := imagefile.Promote(ctx, src, dest, func(pr imagefile.Progress) {
		call.Progress(api.Progress{Phase: "copy " + pr.Phase, Done: pr.Done, Total: pr.Total})
	})
	if err != nil {
		return nil, fmt.Errorf("promote image %q: %w", im.Name, err)
	}
	steps := undo.New(d.log.With("op", "promote image", "image", im.Name))
	defer steps.Run(ctx) // no-op once released
	steps.Push("remove the copy", func(context.Context) error { return os.RemoveAll(dest) })
	call.Progress(api.Progress{Phase: "verify copy (sha256)"})
	srcSums, err := imagefile.Fingerprint(ctx, src, true)
	if err != nil {
		return nil, fmt.Errorf("promote image %q: %w", im.Name, err)
	}
	copySums, err := imagefile.Fingerprint(ctx, out, true)
	if err != nil {
		return nil, fmt.Errorf("promote image %q: %w", im.Name, err)
	}
	if err := imagefile.SameContent(srcSums, copySums); err != nil {
		return nil, fmt.Errorf("promote image %q: the copy differs from its source (was it modified during the copy?): %w", im.Name, err)
	}
	if err := imagefile.Verify(before); err != nil {
		return nil, fmt.Errorf("promote image %q: a file changed during the copy: %w: %w", im.Name, err, errdefs.ErrFailedPrecondition)
	}
	// image rm takes the create lock too: the image can't vanish between
	// this check and the update.
	d.create.Lock()
	if _, err := d.store.GetImage(ctx, im.ID); err != nil {
		d.create.Unlock()
		return nil, fmt.Errorf("image %q was removed while being promoted: %w", im.Name, err)
	}
	im.Managed, im.PromotedFrom = true, im.Rootfs
	im.Rootfs, im.Kernel, im.Initrd, im.ModulesDir = out.Rootfs, out.Kernel, out.Initrd, out.ModulesDir
	im.Files = toStoreFiles(copySums)
	err = d.store.UpdateImage(context.WithoutCancel(ctx), im)
	d.checked.Delete(im.ID)
	d.create.Unlock()
	if err != nil {
		return nil, err
	}
	steps.Release()
	d.log.Info("image promoted", "image", im.Name, "dir", dest)

	call.Progress(api.Progress{Phase: "move VM disks onto the copy"})
	left, err := d.moveDisksOntoImage(context.WithoutCancel(ctx), im)
	if err != nil {
		// The image is promoted; these disks move at their VM's next start.
		d.log.Warn("move vm disks onto a promoted image", "image", im.Name, "err", err)
	}
	for _, name := range left {
		call.Progress(api.Progress{Phase: fmt.Sprintf("vm %s runs: its disk moves onto the copy at its next start; don't modify the original files until it stops", name)})
	}
	return d.imageAPI(ctx, im), nil
}

func (d *Daemon) imageList(ctx context.Context, call *rpc.Call) (any, error) {
	ims, err := d.store.ListImages(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.Image, 0, len(ims))
	for _, im := range ims {
		out = append(out, d.imageAPI(ctx, im))
	}
	return out, nil
}

func (d *Daemon) imageInspect(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.NameParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	im, err := d.store.GetImage(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	out := d.imageAPI(ctx, im)
	files, err := d.store.ImageFiles(ctx, im.ID)
	if err != nil {
		return nil, err
	}
	for _, f := range files {
		if f.Role == imagefile.FieldModules {
			out.ModulesFiles++
			continue
		}
		out.Files = append(out.Files, api.ImageFile{Role: f.Role, Path: f.Path, Size: f.Size, ModTime: time.Unix(0, f.MTimeNS).UTC(), Inode: f.Inode, SHA256: f.SHA256})
	}
	order := map[string]int{imagefile.FieldRootfs: 0, imagefile.FieldKernel: 1, imagefile.FieldInitrd: 2}
	slices.SortStableFunc(out.Files, func(a, b api.ImageFile) int { return order[a.Role] - order[b.Role] })
	return out, nil
}

func (d *Daemon) imageRemove(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.NameParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	d.create.Lock() // no VM may start using it meanwhile
	defer d.create.Unlock()
	im, err := d.store.GetImage(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	if err := d.store.DeleteImage(ctx, im.ID); err != nil {
		return nil, fmt.Errorf("remove image %q: %w", im.Name, err)
	}
	d.checked.Delete(im.ID)
	if im.Managed {
		dir := filepath.Join(d.cfg.StateDir, "images", im.ID)
		if err := os.RemoveAll(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			d.log.Warn("remove image files", "dir", dir, "err", err)
		}
	}
	d.log.Info("image removed", "image", im.Name)
	return nil, nil
}
