package client

import (
	"context"

	"github.com/bangerdev/banger/internal/api"
)

// KernelList lists kernels.
func (c *Client) KernelList(ctx context.Context) ([]api.Kernel, error) {
	var r []api.Kernel
	err := c.call(ctx, api.MethodKernelList, struct{}{}, &r, nil)
	return r, err
}

// KernelInspect describes one kernel.
func (c *Client) KernelInspect(ctx context.Context, name string) (api.Kernel, error) {
	var r api.Kernel
	err := c.call(ctx, api.MethodKernelInspect, api.NameParams{Name: name}, &r, nil)
	return r, err
}

// KernelRemove removes a kernel no image or VM uses.
func (c *Client) KernelRemove(ctx context.Context, name string) error {
	return c.call(ctx, api.MethodKernelRemove, api.NameParams{Name: name}, nil, nil)
}

// KernelImport copies a kernel (files or a Debian package) into
// daemon-managed storage.
func (c *Client) KernelImport(ctx context.Context, p api.KernelImportParams, progress ProgressFunc) (api.Kernel, error) {
	var r api.Kernel
	err := c.call(ctx, api.MethodKernelImport, p, &r, progress)
	return r, err
}

// ImagePrune removes unused managed images and kernels and leftovers of
// interrupted pulls.
func (c *Client) ImagePrune(ctx context.Context, p api.PruneParams) (api.PruneResult, error) {
	var r api.PruneResult
	err := c.call(ctx, api.MethodImagePrune, p, &r, nil)
	return r, err
}
