package client

import (
	"context"
	"errors"
	"io"

	"github.com/bangerdev/banger/internal/api"
)

// VMSSHInfo returns what the system ssh client needs to reach a VM: its
// default user, its host keys and, when it can be reached straight over
// the network, its address.
func (c *Client) VMSSHInfo(ctx context.Context, name string) (api.SSHInfo, error) {
	return callFor[api.SSHInfo](ctx, c, api.MethodVMSSHInfo, api.NameParams{Name: name}, nil)
}

// VMTunnel relays a byte stream to the guest (p.SSH: its SSH service, else
// TCP port p.Port) through the daemon and the agent: what is read from in
// goes to the guest (an EOF of in half-closes the guest side), what the
// guest sends is written to out. It returns when the guest side ends the
// stream, when writing to out fails, or when ctx ends.
func (c *Client) VMTunnel(ctx context.Context, p api.VMTunnelParams, in io.Reader, out io.Writer) error {
	return c.stream(ctx, api.MethodVMTunnel, p, nil, out, nil, in, true, nil)
}

// VMHold holds an auto-remove VM until ctx ends (vm run --rm during an ssh
// session): the daemon removes the VM when the call ends, however it ends,
// including when this process dies. held (may be nil) is called once the
// daemon holds the VM. It returns nil when ctx ended it, the daemon's
// error otherwise (an early end means the VM is no longer held).
func (c *Client) VMHold(ctx context.Context, name string, held func()) error {
	err := c.call(ctx, api.MethodVMHold, api.NameParams{Name: name}, nil, func(p api.Progress) {
		if p.Phase == "held" && held != nil {
			held()
		}
	})
	if ctx.Err() != nil && (err == nil || errors.Is(err, ctx.Err())) {
		return nil
	}
	return err
}
