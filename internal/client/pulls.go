package client

import (
	"context"

	"github.com/bangerdev/banger/internal/api"
)

// ImagePull pulls an image (a catalog name, else an OCI reference). The
// pull runs in the daemon: if ctx ends first, it goes on there (cancel it
// with PullCancel).
func (c *Client) ImagePull(ctx context.Context, p api.PullParams, progress ProgressFunc) (api.Image, error) {
	return callFor[api.Image](ctx, c, api.MethodImagePull, p, progress)
}

// KernelPull pulls a kernel of the kernel catalog (as ImagePull).
func (c *Client) KernelPull(ctx context.Context, p api.PullParams, progress ProgressFunc) (api.Kernel, error) {
	return callFor[api.Kernel](ctx, c, api.MethodKernelPull, p, progress)
}

// PullCancel cancels the running pull of kind ("image" or "kernel") that
// ref names, and returns once it has unwound.
func (c *Client) PullCancel(ctx context.Context, kind, ref string) error {
	return c.call(ctx, api.MethodPullCancel, api.PullCancelParams{Kind: kind, Ref: ref}, nil, nil)
}
