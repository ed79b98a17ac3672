package daemon

import (
	"context"
	"fmt"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/rpc"
)

// prunable reports whether image prune removes an unused managed object
// of source: what came from catalogs, registries and local builds can be
// had again; with all, also what was promoted or imported. Unmanaged
// objects (their files are the user's) never are.
func prunable(managed bool, source string, all bool) bool {
	if !managed {
		return false
	}
	switch source {
	case api.SourceCatalog, api.SourceOCI, api.SourceLocalBuild:
		return true
	}
	return all
}

// imagePrune removes the unused managed images and kernels prunable
// names, then the staging directories of interrupted pulls and builds
// (not those of running ones). Images go first: a kernel only they used
// is then unused too.
func (d *Daemon) imagePrune(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.PruneParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	d.create.Lock() // no create may start using what is removed
	defer d.create.Unlock()
	res := api.PruneResult{}
	ims, err := d.store.ListImages(ctx)
	if err != nil {
		return nil, err
	}
	for _, im := range ims {
		if !prunable(im.Managed, im.Source, p.All) {
			continue
		}
		if users, err := d.store.ImageUsers(ctx, im.ID); err != nil || len(users) > 0 {
			continue
		}
		freed, err := d.removeImage(ctx, im)
		if err != nil {
			return res, fmt.Errorf("prune: %w", err)
		}
		res.Images = append(res.Images, im.Name)
		res.ReclaimedBytes += freed
	}
	ks, err := d.store.ListKernels(ctx)
	if err != nil {
		return res, err
	}
	for _, k := range ks {
		if !prunable(k.Managed, k.Source, p.All) {
			continue
		}
		if images, vms, err := d.store.KernelUsers(ctx, k.ID); err != nil || len(images)+len(vms) > 0 {
			continue
		}
		freed, err := d.removeKernel(ctx, k)
		if err != nil {
			return res, fmt.Errorf("prune: %w", err)
		}
		res.Kernels = append(res.Kernels, k.Name)
		res.ReclaimedBytes += freed
	}
	partial, freed, err := d.removePartials(0)
	res.PartialFiles = partial
	res.ReclaimedBytes += freed
	if err != nil {
		return res, fmt.Errorf("prune: %w", err)
	}
	d.log.Info("pruned", "images", res.Images, "kernels", res.Kernels, "partial", len(res.PartialFiles), "bytes", res.ReclaimedBytes)
	return res, nil
}
