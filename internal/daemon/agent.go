package daemon

import (
	"context"
	"fmt"
	"net"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/internal/vmm"
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
	// A guest whose CPU is emulated gets ChaCha20 first and copies in
	// past its page cache (docs/dev/data-path.md).
	tcg := r.handle.Accel != vmm.AccelKVM
	c, err := agent.WaitReady(ctx, dial, keys, d.log, agent.WithCiphers(agentCiphers(r.handle.Accel)...), agent.WithDirectCopyIn(tcg))
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
	d.useDataPorts(c, r.handle, info)
	r.mu.Lock()
	r.agent, r.info = c, &info
	r.mu.Unlock()
	return c, nil
}

// agentCiphers is the SSH cipher preference of the agent connection: the
// guest's CPU, emulated under TCG, has no AES instructions.
func agentCiphers(accel string) []string {
	if accel == vmm.AccelKVM {
		return agent.CiphersAESNI
	}
	return agent.CiphersSoftware
}

// useDataPorts moves the agent's bulk streams to the VM's data ports when
// the driver, the VMM and the agent all have them (else they stay on SSH).
func (d *Daemon) useDataPorts(c *agent.Client, h vmm.Handle, info agentproto.Info) {
	dd, ok := d.driver.(vmm.DataDialer)
	n := min(len(h.DataSockets), info.DataPorts)
	if !ok || n <= 0 {
		d.log.Debug("agent transfers over SSH only", "driver_data_ports", ok,
			"vmm_data_ports", len(h.DataSockets), "agent_data_ports", info.DataPorts)
		return
	}
	c.UseDataPorts(n, func(ctx context.Context, port int) (net.Conn, error) {
		return dd.DialData(ctx, h, port)
	})
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
