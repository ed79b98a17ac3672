package daemon

import (
	"context"
	"fmt"
	"net"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/store"
)

func (d *Daemon) connectAgent(ctx context.Context, r *runningVM, keys agent.Keys) (*agent.Client, error) {
	r.connecting.Lock()
	defer r.connecting.Unlock()
	r.mu.Lock()
	if r.agent != nil {
		select {
		case <-r.agent.Done():
			r.agent.Close()
			r.agent = nil
		default:
			c := r.agent
			r.mu.Unlock()
			return c, nil
		}
	}
	r.mu.Unlock()
	dial := func(ctx context.Context) (net.Conn, error) { return d.driver.DialAgent(ctx, r.handle) }
	ctx, cancel := r.untilExit(ctx)
	defer cancel()
	c, err := agent.WaitReady(ctx, dial, keys, d.log)
	if err != nil {
		if r.hasExited() {
			return nil, errExitedDuringBoot
		}
		return nil, err
	}
	info, err := c.Info(ctx)
	if err != nil {
		c.Close()
		return nil, err // already "agent info: ..."
	}
	r.mu.Lock()
	r.agent, r.info = c, &info
	r.mu.Unlock()
	return c, nil
}

// agentFor returns the agent client of a running VM.
func (d *Daemon) agentFor(ctx context.Context, v store.VM) (*agent.Client, *runningVM, error) {
	d.mu.Lock()
	r := d.running[v.ID]
	d.mu.Unlock()
	if r == nil || v.State != api.StateRunning {
		return nil, nil, fmt.Errorf("vm %q is %s: start it with banger vm start %s: %w", v.Name, v.State, v.Name, errdefs.ErrFailedPrecondition)
	}
	keys, err := readVMKeys(v.Dir)
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, d.cfg.ReadyTimeout.Duration)
	defer cancel()
	c, err := d.connectAgent(ctx, r, keys)
	if err != nil {
		return nil, nil, fmt.Errorf("vm %q: guest agent unreachable: %w", v.Name, err)
	}
	return c, r, nil
}

func (d *Daemon) closeAgents() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, r := range d.running {
		r.mu.Lock()
		if r.agent != nil {
			r.agent.Close()
		}
		r.mu.Unlock()
	}
}
