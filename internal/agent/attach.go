package agent

import (
	"context"
	"fmt"
	"io"

	"github.com/bangerdev/banger/internal/agentproto"
)

// ErrNoMainProcess: the guest runs no main process to attach to (its image
// has an init system, or no Entrypoint/Cmd). It wraps ErrRefused.
var ErrNoMainProcess = fmt.Errorf("no main process in the guest: %w", ErrRefused)

// AttachOptions says where the main process's output goes.
type AttachOptions struct {
	// Stdout and Stderr receive its output (discarded when nil).
	Stdout, Stderr io.Writer
	// NoReplay skips what it wrote before the call.
	NoReplay bool
}

// Attach follows the guest's main process (agentproto.ReqAttach, agent
// protocol 1.4): its output from its first run on (within the guest's
// bound), across restarts, until it finally exits; it returns its exit
// code (128+N for signal N). When ctx ends it returns ctx's error (the
// process goes on).
func (c *Client) Attach(ctx context.Context, opts AttachOptions) (int, error) {
	if !c.protoAtLeast(1, 4) {
		return -1, fmt.Errorf("attach: the guest agent speaks protocol %s, attach needs 1.4 (restart the VM to update its agent): %w", c.proto, ErrNoMainProcess)
	}
	if err := ctx.Err(); err != nil {
		return -1, fmt.Errorf("attach: %w", err)
	}
	ch, reqs, err := c.ssh.OpenChannel("session", nil)
	if err != nil {
		return -1, fmt.Errorf("attach: open session: %w: %w", ErrConnectionLost, err)
	}
	defer ch.Close()
	exitc := make(chan exitResult, 1)
	go func() { exitc <- collectExit(reqs) }()
	stop := context.AfterFunc(ctx, func() { ch.Close() })
	defer stop()

	payload, err := agentproto.MarshalPayload(agentproto.AttachRequest{NoReplay: opts.NoReplay})
	if err != nil {
		return -1, fmt.Errorf("attach: %w", err)
	}
	ok, err := ch.SendRequest(agentproto.ReqAttach, true, payload)
	if ctx.Err() != nil {
		return -1, fmt.Errorf("attach: %w", ctx.Err())
	}
	if err != nil {
		return -1, fmt.Errorf("attach: %w: %w", ErrConnectionLost, err)
	}
	if !ok {
		return -1, fmt.Errorf("attach: %w", ErrNoMainProcess)
	}
	ch.CloseWrite()

	resc := drainSession(ch, opts.Stdout, opts.Stderr, exitc)
	res, cancelled := waitSession(ctx, resc)
	if cancelled {
		// The channel is being closed; an exit status that arrived
		// meanwhile still counts (the VM powering off right after it
		// ends the caller's context).
		if res.ok {
			return res.code, nil
		}
		return -1, fmt.Errorf("attach: %w", ctx.Err())
	}
	if !res.ok {
		if ctx.Err() != nil {
			return -1, fmt.Errorf("attach: %w", ctx.Err())
		}
		return -1, fmt.Errorf("attach: no exit status: %w", ErrConnectionLost)
	}
	if res.outErr != nil {
		return res.code, fmt.Errorf("attach: %w", res.outErr)
	}
	return res.code, nil
}
