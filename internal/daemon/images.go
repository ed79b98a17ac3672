package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/imagefile"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
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
	}
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
	a := imagefile.Artifacts{Rootfs: p.Rootfs, Kernel: p.Kernel, Initrd: p.Initrd, ModulesDir: p.ModulesDir}
	if err := imagefile.ValidateArtifacts(a); err != nil {
		return nil, artifactErr(err)
	}
	st, err := os.Stat(p.Rootfs)
	if err != nil {
		return nil, artifactErr(err)
	}
	im := store.Image{
		ID: newID(), Name: p.Name, Rootfs: p.Rootfs, Kernel: p.Kernel, Initrd: p.Initrd, ModulesDir: p.ModulesDir,
		SizeBytes: st.Size(), CreatedAt: time.Now(),
	}
	if err := d.store.InsertImage(ctx, im); err != nil {
		return nil, err
	}
	d.log.Info("image registered", "image", im.Name, "rootfs", im.Rootfs, "kernel", im.Kernel)
	return d.imageAPI(ctx, im), nil
}

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
	src := imagefile.Artifacts{Rootfs: im.Rootfs, Kernel: im.Kernel, Initrd: im.Initrd, ModulesDir: im.ModulesDir}
	if err := imagefile.ValidateArtifacts(src); err != nil {
		return nil, fmt.Errorf("image %q can't be promoted: %w", im.Name, artifactErr(err))
	}
	dest := filepath.Join(d.cfg.StateDir, "images", im.ID)
	out, err := imagefile.Promote(ctx, src, dest, func(pr imagefile.Progress) {
		call.Progress(api.Progress{Phase: "copy " + pr.Phase, Done: pr.Done, Total: pr.Total})
	})
	if err != nil {
		return nil, fmt.Errorf("promote image %q: %w", im.Name, err)
	}
	// image rm takes the create lock too: the image can't vanish between
	// this check and the update.
	d.create.Lock()
	defer d.create.Unlock()
	if _, err := d.store.GetImage(ctx, im.ID); err != nil {
		os.RemoveAll(dest)
		return nil, fmt.Errorf("image %q was removed while being promoted: %w", im.Name, err)
	}
	im.Managed = true
	im.Rootfs, im.Kernel, im.Initrd, im.ModulesDir = out.Rootfs, out.Kernel, out.Initrd, out.ModulesDir
	if err := d.store.UpdateImage(ctx, im); err != nil {
		os.RemoveAll(dest)
		return nil, err
	}
	d.log.Info("image promoted", "image", im.Name, "dir", dest)
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
	return d.imageAPI(ctx, im), nil
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
	if im.Managed {
		dir := filepath.Join(d.cfg.StateDir, "images", im.ID)
		if err := os.RemoveAll(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			d.log.Warn("remove image files", "dir", dir, "err", err)
		}
	}
	d.log.Info("image removed", "image", im.Name)
	return nil, nil
}
