package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/imagefile"
	"github.com/bangerdev/banger/internal/kernelimage"
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
	out := api.Image{
		ID: im.ID, Name: im.Name, Managed: im.Managed, Rootfs: im.Rootfs, Kernel: im.Kernel,
		Initrd: im.Initrd, ModulesDir: im.ModulesDir, SizeBytes: im.SizeBytes, CreatedAt: im.CreatedAt, UsedBy: users,
		PromotedFrom: im.PromotedFrom, User: imageUser(im),
		KernelID: im.KernelID, KernelName: im.KernelName, Source: im.Source, Version: im.Version, Ref: im.Ref, Digest: im.Digest,
		InUse: len(users),
	}
	if im.ConfigJSON != "" {
		var c api.ImageConfig
		if err := json.Unmarshal([]byte(im.ConfigJSON), &c); err != nil {
			d.log.Warn("decode an image's config", "image", im.Name, "err", err)
		} else {
			out.Config = &c
		}
	}
	return out
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
	if p.KernelName != "" && (p.Kernel != "" || p.Initrd != "" || p.ModulesDir != "") {
		return nil, fmt.Errorf("give a kernel object's name or kernel files, not both: %w", errdefs.ErrInvalid)
	}
	// The image boots an existing kernel object, or one registered for
	// the files given (an existing unmanaged kernel of the same files
	// when there is one, so images registered with the same kernel share
	// it).
	var k store.Kernel
	var newKernel *store.Kernel
	if p.KernelName != "" {
		var err error
		if k, err = d.store.GetKernel(ctx, p.KernelName); err != nil {
			if errors.Is(err, errdefs.ErrNotFound) {
				return nil, fmt.Errorf("kernel %s not found: list kernels with banger kernel ls, or import one with banger kernel import: %w", errdefs.Quote(p.KernelName), errdefs.ErrNotFound)
			}
			return nil, err
		}
	} else {
		k = store.Kernel{Kernel: p.Kernel, Initrd: p.Initrd, ModulesDir: p.ModulesDir}
	}
	a := artifactsOf(store.Image{Rootfs: p.Rootfs}, k)
	if err := imagefile.ValidateArtifacts(a); err != nil {
		return nil, artifactErr(err)
	}
	st, err := os.Stat(p.Rootfs)
	if err != nil {
		return nil, artifactErr(err)
	}
	stamps, err := imagefile.Fingerprint(ctx, imagefile.Artifacts{Rootfs: p.Rootfs}, false)
	if err != nil {
		return nil, artifactErr(err)
	}
	if p.KernelName == "" {
		if shared, ok := d.sameUnmanagedKernel(ctx, k); ok {
			k = shared
		} else if newKernel, err = d.newRegisteredKernel(ctx, p.Name, k); err != nil {
			return nil, err
		} else {
			k = *newKernel
		}
	}
	im := store.Image{
		ID: newID(), Name: p.Name, Rootfs: p.Rootfs, KernelID: k.ID, KernelName: k.Name, Kernel: k.Kernel, Initrd: k.Initrd, ModulesDir: k.ModulesDir,
		SizeBytes: st.Size(), CreatedAt: time.Now(), Files: toStoreFiles(stamps), DefaultUser: p.User, Source: api.SourceRegistered,
	}
	if err := d.store.InsertImageAndKernel(ctx, im, newKernel); err != nil {
		return nil, err
	}
	d.log.Info("image registered", "image", im.Name, "rootfs", im.Rootfs, "kernel", k.Name, "kernel_file", k.Kernel)
	return d.imageAPI(ctx, im), nil
}

// sameUnmanagedKernel finds an unmanaged kernel object of exactly the
// files of want, still as they were recorded.
func (d *Daemon) sameUnmanagedKernel(ctx context.Context, want store.Kernel) (store.Kernel, bool) {
	ks, err := d.store.ListKernels(ctx)
	if err != nil {
		return store.Kernel{}, false
	}
	for _, k := range ks {
		if k.Managed || kernelFilesOf(k) != kernelFilesOf(want) {
			continue
		}
		files, err := d.store.KernelFiles(ctx, k.ID)
		if err == nil && len(files) > 0 && imagefile.Verify(fromStoreFiles(files)) == nil {
			return k, true
		}
	}
	return store.Kernel{}, false
}

// newRegisteredKernel makes the unmanaged kernel object of an image
// registered with kernel files (not yet inserted): named as the image
// when that name is free, else NAME-kernel, NAME-kernel-2, ...
func (d *Daemon) newRegisteredKernel(ctx context.Context, imageName string, k store.Kernel) (*store.Kernel, error) {
	stamps, err := imagefile.Fingerprint(ctx, kernelFilesOf(k), false)
	if err != nil {
		return nil, artifactErr(err)
	}
	name := ""
	for i := 0; i < 100 && name == ""; i++ {
		n := imageName
		switch {
		case i == 1:
			n += "-kernel"
		case i > 1:
			n += fmt.Sprintf("-kernel-%d", i)
		}
		if _, err := d.store.GetKernel(ctx, n); errors.Is(err, errdefs.ErrNotFound) {
			name = n
		} else if err != nil {
			return nil, err
		}
	}
	if name == "" {
		return nil, fmt.Errorf("no free name for the kernel of image %q: import the kernel (banger kernel import) and register the image with --kernel NAME: %w", imageName, errdefs.ErrAlreadyExists)
	}
	k.ID, k.Name, k.Source, k.CreatedAt = newID(), name, api.SourceRegistered, time.Now()
	k.Release = kernelRelease(k.Kernel)
	k.SizeBytes = stampsSize(stamps)
	k.Files = toStoreFiles(stamps)
	return &k, nil
}

// kernelRelease reads a kernel image's release ("" when it can't).
func kernelRelease(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	rel, err := kernelimage.Release(f, st.Size())
	if err != nil {
		return ""
	}
	return rel
}

// stampsSize is the bytes of the regular files among stamps.
func stampsSize(stamps []imagefile.Stamp) int64 {
	var n int64
	for _, s := range stamps {
		if !s.Link {
			n += s.Size
		}
	}
	return n
}

// imagePromote copies an unmanaged image's files into the state dir, so
// that banger owns them and they can't change under its VMs: its rootfs,
// and its kernel object's files when that kernel is unmanaged (the
// kernel object then becomes managed for every image sharing it: they
// boot the same content, now banger's copy; a managed kernel is left as
// it is):
//
//  1. the source must match its fingerprints (or, changed, have no VMs
//     and a kernel no other image or VM uses: the copy then takes the
//     files as they are now);
//  2. the files are copied into images/<id> and kernels/<kernel id> (each
//     a temporary directory renamed into place);
//  3. source and copy are hashed (sha256) and must be the same, and the
//     source must not have changed during the copy;
//  4. the image and kernel rows are updated in one transaction: managed,
//     the copies' paths and fingerprints (with hashes), and the rootfs the
//     image came from. This is the commit point: a crash before it leaves
//     copies that daemon start removes, a crash after it leaves disks
//     that daemon start moves (reconcileImages);
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
	k, err := d.bootKernel(ctx, im, "")
	if err != nil {
		return nil, err
	}
	copyKernel := !k.Managed
	if err := imagefile.ValidateArtifacts(artifactsOf(im, k)); err != nil {
		return nil, fmt.Errorf("image %q can't be promoted: %w", im.Name, artifactErr(err))
	}
	// The parts copied: the rootfs, and the kernel's files unless managed.
	parts := []imagefile.Artifacts{rootfsOf(im)}
	dests := []string{filepath.Join(d.cfg.StateDir, "images", im.ID)}
	if copyKernel {
		parts = append(parts, kernelFilesOf(k))
		dests = append(dests, filepath.Join(d.cfg.StateDir, "kernels", k.ID))
	}
	// before is what the sources must still be once copied and hashed: the
	// fingerprints recorded at register (the content the image's VM disks
	// were made from), or, for a changed image no VM uses, the files now.
	var before []imagefile.Stamp
	if _, err := d.usableImage(ctx, im, ""); err != nil {
		users, uerr := d.store.ImageUsers(ctx, im.ID)
		if uerr != nil {
			return nil, uerr
		}
		kImages, kVMs, kerr := d.store.KernelUsers(ctx, k.ID)
		if kerr != nil {
			return nil, kerr
		}
		kernelShared := copyKernel && (len(kImages) > 1 || len(kVMs) > 0)
		if !errors.Is(err, imagefile.ErrChanged) || len(users) > 0 || kernelShared {
			return nil, fmt.Errorf("image %q can't be promoted: %w", im.Name, err)
		}
		d.log.Info("promoting an image whose files changed since registration; no VM uses it", "image", im.Name, "change", err)
		for _, part := range parts {
			st, err := imagefile.Fingerprint(ctx, part, false)
			if err != nil {
				return nil, fmt.Errorf("promote image %q: %w", im.Name, artifactErr(err))
			}
			before = append(before, st...)
		}
	} else {
		recorded, err := d.store.ImageFiles(ctx, im.ID)
		if err != nil {
			return nil, err
		}
		before = fromStoreFiles(recorded)
		if copyKernel {
			recorded, err := d.store.KernelFiles(ctx, k.ID)
			if err != nil {
				return nil, err
			}
			before = append(before, fromStoreFiles(recorded)...)
		}
	}
	steps := undo.New(d.log.With("op", "promote image", "image", im.Name))
	defer steps.Run(ctx) // no-op once released
	outs := make([]imagefile.Artifacts, len(parts))
	sums := make([][]imagefile.Stamp, len(parts))
	for i, part := range parts {
		dest := dests[i]
		if err := os.MkdirAll(filepath.Dir(dest), 0o755); err != nil {
			return nil, fmt.Errorf("promote image %q: %w", im.Name, err)
		}
		out, err := imagefile.Promote(ctx, part, dest, func(pr imagefile.Progress) {
			call.Progress(api.Progress{Phase: "copy " + pr.Phase, Done: pr.Done, Total: pr.Total, Unit: "bytes"})
		})
		if err != nil {
			return nil, fmt.Errorf("promote image %q: %w", im.Name, err)
		}
		steps.Push("remove the copy", func(context.Context) error { return os.RemoveAll(dest) })
		call.Progress(api.Progress{Phase: "verify copy (sha256)"})
		srcSums, err := imagefile.Fingerprint(ctx, part, true)
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
		outs[i], sums[i] = out, copySums
	}
	if err := imagefile.Verify(before); err != nil {
		return nil, fmt.Errorf("promote image %q: a file changed during the copy: %w: %w", im.Name, err, errdefs.ErrFailedPrecondition)
	}
	// image rm and kernel rm take the create lock too: neither can vanish
	// between this check and the update.
	d.create.Lock()
	if _, err := d.store.GetImage(ctx, im.ID); err != nil {
		d.create.Unlock()
		return nil, fmt.Errorf("image %q was removed while being promoted: %w", im.Name, err)
	}
	im.Managed, im.PromotedFrom = true, im.Rootfs
	im.Rootfs = outs[0].Rootfs
	im.Files = toStoreFiles(sums[0])
	var newK *store.Kernel
	if copyKernel {
		k.Managed = true
		k.Kernel, k.Initrd, k.ModulesDir = outs[1].Kernel, outs[1].Initrd, outs[1].ModulesDir
		k.Files = toStoreFiles(sums[1])
		newK = &k
		im.Kernel, im.Initrd, im.ModulesDir = k.Kernel, k.Initrd, k.ModulesDir
	}
	err = d.store.UpdateImageAndKernel(context.WithoutCancel(ctx), im, newK)
	d.forgetChecked(im.ID)
	d.forgetChecked(k.ID)
	d.create.Unlock()
	if err != nil {
		return nil, err
	}
	steps.Release()
	d.log.Info("image promoted", "image", im.Name, "dir", dests[0], "kernel", k.Name, "kernel_copied", copyKernel)

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
	if im.KernelID != "" { // the kernel's files are part of what the image boots
		kfiles, err := d.store.KernelFiles(ctx, im.KernelID)
		if err != nil {
			return nil, err
		}
		files = append(files, kfiles...)
	}
	out.Files, out.ModulesFiles = fileViews(files, imagefile.FieldRootfs, imagefile.FieldKernel, imagefile.FieldInitrd)
	return out, nil
}

// fileViews returns an image's or kernel's files as inspect shows them,
// sorted by role in the order given (a role not given sorts with the
// first), and the count of the modules tree's files, which it leaves out
// (a modules tree has thousands of files: counted in SizeBytes).
func fileViews(files []store.ImageFile, roles ...string) ([]api.ImageFile, int) {
	var out []api.ImageFile
	modules := 0
	for _, f := range files {
		if f.Role == imagefile.FieldModules {
			modules++
			continue
		}
		out = append(out, api.ImageFile{Role: f.Role, Path: f.Path, Size: f.Size, ModTime: time.Unix(0, f.MTimeNS).UTC(), Inode: f.Inode, SHA256: f.SHA256})
	}
	order := make(map[string]int, len(roles))
	for i, r := range roles {
		order[r] = i
	}
	slices.SortStableFunc(out, func(a, b api.ImageFile) int { return order[a.Role] - order[b.Role] })
	return out, modules
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
	if _, err := d.removeImage(ctx, im); err != nil {
		return nil, err
	}
	return nil, nil
}

// removeImage deletes an image's row (refused while a VM uses it) and,
// when managed, its files; it returns the bytes freed. The kernel object
// image register made for the image's kernel files (unmanaged, source
// registered) goes with it when nothing else uses it: it has no files of
// banger's and would only be a stale entry. Managed kernels stay (image
// prune removes unused ones). The caller holds the create lock.
func (d *Daemon) removeImage(ctx context.Context, im store.Image) (int64, error) {
	if err := d.store.DeleteImage(ctx, im.ID); err != nil {
		return 0, fmt.Errorf("remove image %q: %w", im.Name, err)
	}
	d.forgetChecked(im.ID)
	var freed int64
	if im.Managed {
		dir := filepath.Join(d.cfg.StateDir, "images", im.ID)
		freed, _ = treeSize(dir)
		if err := os.RemoveAll(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			d.log.Warn("remove image files", "dir", dir, "err", err)
		}
	}
	d.log.Info("image removed", "image", im.Name)
	if k, err := d.store.GetKernel(ctx, im.KernelID); err == nil && !k.Managed && k.Source == api.SourceRegistered {
		if images, vms, err := d.store.KernelUsers(ctx, k.ID); err == nil && len(images)+len(vms) == 0 {
			if err := d.store.DeleteKernel(ctx, k.ID); err == nil {
				d.forgetChecked(k.ID)
				d.log.Info("removed the registered kernel no image uses any more", "kernel", k.Name)
			}
		}
	}
	return freed, nil
}
