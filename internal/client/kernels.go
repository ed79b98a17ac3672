package client

import (
	"context"

	"github.com/bangerdev/banger/internal/api"
)

// KernelList lists kernels.
func (c *Client) KernelList(ctx context.Context) ([]api.Kernel, error) {
	return callFor[[]api.Kernel](ctx, c, api.MethodKernelList, struct{}{}, nil)
}

// KernelInspect describes one kernel.
func (c *Client) KernelInspect(ctx context.Context, name string) (api.Kernel, error) {
	return callFor[api.Kernel](ctx, c, api.MethodKernelInspect, api.NameParams{Name: name}, nil)
}

// KernelRemove removes a kernel no image or VM uses.
func (c *Client) KernelRemove(ctx context.Context, name string) error {
	return c.call(ctx, api.MethodKernelRemove, api.NameParams{Name: name}, nil, nil)
}

// KernelImport copies a kernel (files or a Debian package) into
// daemon-managed storage.
func (c *Client) KernelImport(ctx context.Context, p api.KernelImportParams, progress ProgressFunc) (api.Kernel, error) {
	return callFor[api.Kernel](ctx, c, api.MethodKernelImport, p, progress)
}

// ImagePrune removes unused managed images and kernels and leftovers of
// interrupted pulls.
func (c *Client) ImagePrune(ctx context.Context, p api.PruneParams) (api.PruneResult, error) {
	return callFor[api.PruneResult](ctx, c, api.MethodImagePrune, p, nil)
}
