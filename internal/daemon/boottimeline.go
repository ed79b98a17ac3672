package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
)

// fileTimeline holds a VM's boot timeline (api.BootTimeline, JSON) in its
// directory: it survives the start that wrote it, and daemon restarts.
const fileTimeline = "boot-timeline.json"

// earlyBootPoll is how often a start asks the agent whether early boot is
// over (a cheap global request: the agent stats a file).
const earlyBootPoll = 100 * time.Millisecond

// fullBootTimeout bounds the background wait for the full boot of a VM
// started without WaitBoot.
const fullBootTimeout = 10 * time.Minute

// bootTimeline records one start, phase by phase, and writes it to the VM's
// directory at every change. It is safe for concurrent use.
type bootTimeline struct {
	path string
	now  func() time.Time
	// ended is called once the timeline is no longer written (finish,
	// fail, abandon).
	ended func()

	mu sync.Mutex
	tl api.BootTimeline
}

// recordClone starts a VM's first timeline with the clone of its disk,
// done by vm create.
func recordClone(dir string, start time.Time, d time.Duration) error {
	tl := &bootTimeline{path: filepath.Join(dir, fileTimeline), now: time.Now}
	tl.tl = api.BootTimeline{StartedAt: start, Phases: []api.BootPhase{{Name: api.PhaseClone, StartedAt: start, DurationMS: ms(d)}}}
	return tl.save()
}

// newBootTimeline begins the timeline of a start of v. The clone phase of
// vm create is kept when v never ran.
func (d *Daemon) newBootTimeline(v store.VM) *bootTimeline {
	tl := &bootTimeline{path: filepath.Join(v.Dir, fileTimeline), now: time.Now}
	d.timelines.Store(v.ID, tl)
	tl.ended = func() { d.timelines.CompareAndDelete(v.ID, tl) }
	now := tl.now()
	tl.tl = api.BootTimeline{StartedAt: now}
	if prev, err := readTimeline(v.Dir); err == nil && v.StartedAt.IsZero() &&
		len(prev.Phases) == 1 && prev.Phases[0].Name == api.PhaseClone {
		tl.tl.StartedAt = prev.StartedAt
		tl.tl.Phases = prev.Phases
	}
	return tl
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// begin ends the running phase and starts the next one.
func (t *bootTimeline) begin(phase string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	t.endRunning(now)
	t.tl.Phases = append(t.tl.Phases, api.BootPhase{Name: phase, StartedAt: now, Running: true})
	if phase == api.PhaseFullBoot {
		t.tl.Ready = true
	}
	t.saveLocked()
}

// finish ends the running phase: the boot is over.
func (t *bootTimeline) finish() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.endRunning(t.now())
	t.tl.Done = true
	t.saveLocked()
	t.end()
}

// abandon stops recording, writing nothing (the VM's directory may be
// going away): the phase that runs is reported as not recorded to its end.
func (t *bootTimeline) abandon() {
	t.end()
}

func (t *bootTimeline) end() {
	if t.ended != nil {
		t.ended()
	}
}

// fail ends the running phase with the start's error.
func (t *bootTimeline) fail(msg string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.endRunning(t.now())
	t.tl.Error = msg
	t.saveLocked()
	t.end()
}

// current is the running phase ("" when none) and how long it has run,
// and the time since the start began.
func (t *bootTimeline) current() (phase string, inPhase, total time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	total = now.Sub(t.tl.StartedAt)
	if n := len(t.tl.Phases); n > 0 && t.tl.Phases[n-1].Running {
		p := t.tl.Phases[n-1]
		return p.Name, now.Sub(p.StartedAt), total
	}
	return "", 0, total
}

func (t *bootTimeline) endRunning(now time.Time) {
	if n := len(t.tl.Phases); n > 0 && t.tl.Phases[n-1].Running {
		p := &t.tl.Phases[n-1]
		p.Running, p.DurationMS = false, ms(now.Sub(p.StartedAt))
	}
}

func (t *bootTimeline) save() error {
	b, err := json.Marshal(t.tl)
	if err != nil {
		return fmt.Errorf("encode boot timeline: %w", err)
	}
	tmp := t.path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write boot timeline: %w", err)
	}
	if err := os.Rename(tmp, t.path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write boot timeline: %w", err)
	}
	return nil
}

func (t *bootTimeline) saveLocked() {
	// The timeline is a diagnostic: failing to write it must not fail the
	// start (the VM directory may be going away under vm rm -f).
	_ = t.save()
}

// readTimeline reads the timeline saved in a VM directory.
func readTimeline(dir string) (api.BootTimeline, error) {
	var tl api.BootTimeline
	b, err := os.ReadFile(filepath.Join(dir, fileTimeline))
	if err != nil {
		return tl, err
	}
	if err := json.Unmarshal(b, &tl); err != nil {
		return tl, fmt.Errorf("parse boot timeline: %w", err)
	}
	return tl, nil
}

// timelineAPI is the timeline of a VM as reported: a phase still running
// has the duration it has lasted so far. A phase that nothing records any
// more (the daemon restarted during it) is reported as not running, with
// the reason.
func (d *Daemon) timelineAPI(v store.VM, now time.Time) *api.BootTimeline {
	tl, err := readTimeline(v.Dir)
	if err != nil {
		return nil
	}
	if n := len(tl.Phases); n > 0 && tl.Phases[n-1].Running {
		p := &tl.Phases[n-1]
		if _, live := d.timelines.Load(v.ID); live {
			p.DurationMS = ms(now.Sub(p.StartedAt))
		} else {
			p.Running = false
			if tl.Error == "" {
				tl.Error = "phase '" + p.Name + "' not recorded to its end (the VM stopped, or the daemon restarted, during it)"
			}
		}
	}
	return &tl
}

// stuck wraps the error of a start that stopped waiting: it names the
// phase it stopped in.
func (t *bootTimeline) stuck(err error) error {
	phase, inPhase, total := t.current()
	if phase == "" {
		return fmt.Errorf("after %s: %w", total.Round(100*time.Millisecond), err)
	}
	return fmt.Errorf("stuck in phase '%s' after %s (%s since the start): %w",
		phase, inPhase.Round(100*time.Millisecond), total.Round(100*time.Millisecond), err)
}

// waitReady waits until the VM's agent answers (phase "kernel to agent"),
// then until the guest's early boot is over (phase "early boot"): the VM
// is ready for commands. It leaves the timeline in phase "full boot".
func (d *Daemon) waitReady(ctx context.Context, call *rpc.Call, v store.VM, r *runningVM, keys agent.Keys, tl *bootTimeline) error {
	tl.begin(api.PhaseKernelToAgent)
	if _, err := d.connectAgent(ctx, r, keys); err != nil {
		return err
	}
	tl.begin(api.PhaseEarlyBoot)
	if err := d.phase(ctx, call, v, "wait for early boot"); err != nil {
		return err
	}
	if err := d.waitEarlyBoot(ctx, r, keys, v.Network == api.NetworkBridge || v.Network == api.NetworkUser); err != nil {
		return err
	}
	tl.begin(api.PhaseFullBoot)
	return nil
}

// waitEarlyBoot polls the agent's info until it reports early boot done
// and, when the VM has a network card (withNet), its network configured:
// "ready" includes the network being up. An agent older than protocol
// 1.3 knows nothing of networks: only its early boot is waited for.
// A connection lost meanwhile (a keepalive unanswered in a guest that is
// busy booting, the agent restarted by its supervisor) is redialed.
func (d *Daemon) waitEarlyBoot(ctx context.Context, r *runningVM, keys agent.Keys, withNet bool) error {
	ctx, cancel := r.untilExit(ctx)
	defer cancel()
	signal := ""
	for {
		c, err := d.connectAgent(ctx, r, keys)
		if err != nil {
			if r.hasExited() {
				return errExitedDuringBoot
			}
			return err
		}
		info, err := c.Info(ctx)
		switch {
		case err == nil:
			r.mu.Lock()
			r.info = &info
			r.mu.Unlock()
			netUp, err := networkReady(info, withNet)
			if err != nil {
				return err
			}
			if info.EarlyBootDone && netUp {
				return nil
			}
			signal = info.EarlyBootSignal
			if info.EarlyBootDone {
				signal = "network"
			}
		case errors.Is(err, agent.ErrConnectionLost) && ctx.Err() == nil && !r.hasExited():
			d.log.Debug("agent connection lost during early boot; redialing", "err", err)
		case r.hasExited():
			return errExitedDuringBoot
		default:
			return err
		}
		select {
		case <-ctx.Done():
			if r.hasExited() {
				return errExitedDuringBoot
			}
			return fmt.Errorf("guest early boot not done (signal %q): %w", signal, ctx.Err())
		case <-time.After(earlyBootPoll):
		}
	}
}

// recordFullBoot ends the timeline's full boot phase in the background,
// for a start that did not wait for it. It ends with the VM.
func (d *Daemon) recordFullBoot(v store.VM, r *runningVM, tl *bootTimeline) {
	d.monitors.Add(1)
	go func() {
		defer d.monitors.Done()
		ctx, cancel := context.WithTimeout(d.ctx, fullBootTimeout)
		defer cancel()
		ctx, cancelExit := r.untilExit(ctx)
		defer cancelExit()
		if err := d.waitBoot(ctx, r); err != nil {
			d.log.Debug("full boot not recorded", "vm", v.Name, "err", err)
			tl.abandon()
			return
		}
		// Under the VM's lock: vm rm removes the directory under it.
		lock := d.vmLock(v.ID)
		lock.Lock()
		defer lock.Unlock()
		if _, err := os.Stat(v.Dir); err != nil {
			tl.abandon()
			return
		}
		tl.finish()
		if phase, _, total := tl.current(); phase == "" {
			d.log.Info("vm booted", "vm", v.Name, "booted_after", total.Round(time.Millisecond))
		}
	}()
}

// networkReady reports whether the guest's network is configured, as far
// as the agent tells: an agent before protocol 1.3 doesn't configure
// networks, and one that reports no network state was given none (nothing
// to wait for either). A setup the agent reports failed is an error.
func networkReady(info agentproto.Info, withNet bool) (bool, error) {
	if !withNet || !protoAtLeast(info.ProtoVersion, 1, 3) || info.Network == nil {
		return true, nil
	}
	if info.Network.Error != "" {
		return false, fmt.Errorf("the guest's network setup failed: %s", info.Network.Error)
	}
	return info.Network.Configured, nil
}

// protoAtLeast reports whether the agent protocol version v ("1.3") is
// maj.min or a later minor version of maj.
func protoAtLeast(v string, maj, min int) bool {
	a, b, _ := strings.Cut(v, ".")
	gotMaj, err1 := strconv.Atoi(a)
	gotMin, err2 := strconv.Atoi(b)
	return err1 == nil && err2 == nil && gotMaj == maj && gotMin >= min
}
