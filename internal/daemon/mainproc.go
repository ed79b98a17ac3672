package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
)

// The main process of a VM whose image has no init system (docs/agent.md,
// "Main process"): the agent runs the image's Entrypoint+Cmd as PID 1's
// child and powers the VM off when it finally exits. The daemon:
//   - composes it from the image's configuration and the VM's Cmd and
//     Restart (agentProcess), and the defaults of exec requests
//     (agentExecDefaults), into the agent's config at each start;
//   - attaches to it as soon as the VM is ready (watchMain), keeping its
//     output (the last mainLogMax bytes) and its exit code, which it
//     records in the VM's directory (fileMainExit) for vm inspect;
//   - serves vm.attach from that watch, so a client that attaches late
//     (even after the VM stopped) still gets the output and the code.

// fileMainExit records, in a VM's directory, its main process's last exit.
const fileMainExit = "main-exit.json"

// mainRemoveDelay is how long an auto-remove VM stays after its main
// process ended and its VMM exited, for a client's attach to come.
const mainRemoveDelay = 5 * time.Second

// mainLogMax bounds the output a watch keeps (what vm.attach replays).
const mainLogMax = 1 << 20

// imageConfig decodes an image's recorded OCI configuration (nil: none).
func imageConfig(im store.Image) (*api.ImageConfig, error) {
	if im.ConfigJSON == "" {
		return nil, nil
	}
	var cfg api.ImageConfig
	if err := json.Unmarshal([]byte(im.ConfigJSON), &cfg); err != nil {
		return nil, fmt.Errorf("image %q: decode its recorded configuration: %w", im.Name, err)
	}
	return &cfg, nil
}

// mainArgv is the main process's argv, as docker run composes it: the
// image's Entrypoint followed by the VM's Cmd (vm run --image X -- ARGS)
// when it has one, else the image's Cmd. Empty: no main process.
func mainArgv(cfg *api.ImageConfig, cmd []string) []string {
	if cfg == nil {
		return nil
	}
	args := cfg.Cmd
	if len(cmd) > 0 {
		args = cmd
	}
	out := append(slices.Clone(cfg.Entrypoint), args...)
	if len(out) == 0 {
		return nil
	}
	return out
}

// agentProcess is the main process the agent runs when the image has no
// init (the agent ignores it otherwise); nil when there is nothing to run.
func agentProcess(cfg *api.ImageConfig, cmd []string, restart string) *agentproto.Process {
	argv := mainArgv(cfg, cmd)
	if argv == nil {
		return nil
	}
	if restart == "" {
		restart = api.RestartNo
	}
	return &agentproto.Process{
		Argv: argv, Env: slices.Clone(cfg.Env), Dir: cfg.WorkingDir, User: cfg.User,
		Restart: restart, StopSignal: cfg.StopSignal,
	}
}

// agentExecDefaults are the image's defaults for vm exec (nil: none).
func agentExecDefaults(cfg *api.ImageConfig) *agentproto.ExecDefaults {
	if cfg == nil || (len(cfg.Env) == 0 && cfg.WorkingDir == "" && cfg.User == "") {
		return nil
	}
	return &agentproto.ExecDefaults{Env: slices.Clone(cfg.Env), Dir: cfg.WorkingDir, User: cfg.User}
}

// checkRestart validates a restart policy ("" is "no").
func checkRestart(policy string) error {
	switch policy {
	case "", api.RestartNo, api.RestartOnFailure, api.RestartAlways:
		return nil
	}
	return fmt.Errorf("restart policy %s: want no, on-failure or always: %w", errdefs.Quote(policy), errdefs.ErrInvalid)
}

// mainExit is what fileMainExit holds.
type mainExit struct {
	ExitCode int       `json:"exit_code"`
	At       time.Time `json:"at"`
}

// readMainExit reads a VM's recorded main process exit (nil: none).
func readMainExit(dir string) *mainExit {
	b, err := os.ReadFile(filepath.Join(dir, fileMainExit))
	if err != nil {
		return nil
	}
	var e mainExit
	if json.Unmarshal(b, &e) != nil {
		return nil
	}
	return &e
}

// mainFrame is one piece of the main process's output.
type mainFrame struct {
	typ  string // api.FrameStdout or api.FrameStderr
	data []byte
}

// mainWatch is the daemon's attachment to a VM's main process: its output
// (bounded) and, once it finally exited, its exit code.
type mainWatch struct {
	mu      sync.Mutex
	frames  []mainFrame
	first   int64 // index of frames[0]
	size    int
	changed chan struct{} // closed (and replaced) at each change
	ended   bool
	code    *int  // the exit code, when it ended with one
	err     error // why it ended without one
}

func newMainWatch() *mainWatch { return &mainWatch{changed: make(chan struct{})} }

func (w *mainWatch) add(typ string, p []byte) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.frames = append(w.frames, mainFrame{typ: typ, data: append([]byte(nil), p...)})
	w.size += len(p)
	for w.size > mainLogMax && len(w.frames) > 1 {
		w.size -= len(w.frames[0].data)
		w.frames[0] = mainFrame{}
		w.frames = w.frames[1:]
		w.first++
	}
	close(w.changed)
	w.changed = make(chan struct{})
}

func (w *mainWatch) end(code *int, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ended, w.code, w.err = true, code, err
	close(w.changed)
	w.changed = make(chan struct{})
}

// writer returns an io.Writer adding frames of typ.
func (w *mainWatch) writer(typ string) watchWriter { return watchWriter{w, typ} }

type watchWriter struct {
	w   *mainWatch
	typ string
}

func (ww watchWriter) Write(p []byte) (int, error) {
	ww.w.add(ww.typ, p)
	return len(p), nil
}

// follow calls send for each frame from the first held on, as they come,
// until the watch ends (it returns its code and error) or ctx ends.
func (w *mainWatch) follow(ctx context.Context, send func(mainFrame) error) (*int, error) {
	var i int64
	for {
		w.mu.Lock()
		if i < w.first {
			i = w.first
		}
		fs := slices.Clone(w.frames[i-w.first:])
		i = w.first + int64(len(w.frames))
		ended, code, werr, changed := w.ended, w.code, w.err, w.changed
		w.mu.Unlock()
		for _, f := range fs {
			if err := send(f); err != nil {
				return nil, err
			}
		}
		if ended && len(fs) == 0 {
			return code, werr
		}
		if len(fs) > 0 {
			continue
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// watchMain attaches to the main process of a VM that just became ready,
// when its guest runs one (the agent's info says so). It runs until the
// process finally exits or the VM stops.
func (d *Daemon) watchMain(v store.VM, r *runningVM) {
	r.mu.Lock()
	info := r.info
	r.mu.Unlock()
	if info == nil || info.MainProcess == nil {
		return
	}
	w := newMainWatch()
	d.mu.Lock()
	d.mainWatches[v.ID] = w
	d.mu.Unlock()
	detach := d.attach(v)
	d.monitors.Add(1)
	go func() {
		defer d.monitors.Done()
		// An auto-remove VM is held until its VMM exited, then a few
		// seconds more: a vm run that attaches just after its start (its
		// main process may be done by then) still finds it; vm run -d
		// --rm has it removed then.
		defer func() {
			select {
			case <-r.exited:
			case <-d.ctx.Done():
			}
			select {
			case <-time.After(min(mainRemoveDelay, d.autoRemoveGrace)):
			case <-d.ctx.Done():
			}
			detach(true)
		}()
		code, err := d.followMain(v, r, w)
		if err != nil {
			d.log.Info("main process watch ended without an exit code", "vm", v.Name, "err", err)
			w.end(nil, err)
			return
		}
		d.log.Info("main process exited", "vm", v.Name, "exit_code", code)
		b, _ := json.Marshal(mainExit{ExitCode: code, At: time.Now()})
		if err := os.WriteFile(filepath.Join(v.Dir, fileMainExit), b, 0o600); err != nil {
			d.log.Warn("record the main process's exit", "vm", v.Name, "err", err)
		}
		w.end(&code, nil)
	}()
}

// watchMainAdopted watches the main process of a VM adopted at daemon
// start, if its guest runs one (asked in the background: the agent may be
// slow to answer).
func (d *Daemon) watchMainAdopted(v store.VM, r *runningVM) {
	d.monitors.Add(1)
	go func() {
		defer d.monitors.Done()
		keys, err := readVMKeys(v.Dir)
		if err != nil {
			return
		}
		ctx, cancel := r.untilExit(d.ctx)
		defer cancel()
		ctx, cancelT := context.WithTimeout(ctx, d.cfg.ReadyTimeout.Duration)
		defer cancelT()
		if _, err := d.connectAgent(ctx, r, keys); err != nil {
			d.log.Info("adopted vm: agent unreachable, its main process (if any) is not watched", "vm", v.Name, "err", err)
			return
		}
		d.watchMain(v, r)
	}()
}

// followMain attaches to the main process until it exits, attaching again
// (without replay) when the agent connection is lost while the VM runs.
func (d *Daemon) followMain(v store.VM, r *runningVM, w *mainWatch) (int, error) {
	ctx, cancel := r.untilExit(d.ctx)
	defer cancel()
	keys, err := readVMKeys(v.Dir)
	if err != nil {
		return 0, err
	}
	replay := true
	for attempt := 0; ; attempt++ {
		c, err := d.connectAgent(ctx, r, keys)
		if err == nil {
			var code int
			code, err = c.Attach(ctx, agent.AttachOptions{
				Stdout: w.writer(api.FrameStdout), Stderr: w.writer(api.FrameStderr), NoReplay: !replay,
			})
			if err == nil {
				return code, nil
			}
			if errors.Is(err, agent.ErrNoMainProcess) {
				return 0, err
			}
			replay = false
		}
		if ctx.Err() != nil || attempt >= 20 {
			return 0, fmt.Errorf("attach to the main process of vm %q: %w", v.Name, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// vmAttach streams a VM's main process's output (from its start, within
// mainLogMax) until it exits, and returns its exit code. A VM that already
// stopped gives what its last watch kept (output, when the daemon has not
// restarted since) and its recorded code. An auto-remove VM goes when the
// call ends.
func (d *Daemon) vmAttach(ctx context.Context, call *rpc.Call) (any, error) {
	v, detach, err := d.attachCall(ctx, call)
	if err != nil {
		return nil, err
	}
	defer detach(true)
	d.mu.Lock()
	w := d.mainWatches[v.ID]
	d.mu.Unlock()
	if w == nil {
		if e := readMainExit(v.Dir); e != nil && v.State != api.StateRunning {
			return api.ExecResult{ExitCode: e.ExitCode}, nil
		}
		return nil, fmt.Errorf("vm %q runs no main process (its image has an init system, or no Entrypoint/Cmd; or the VM is not running): use banger vm exec %s -- CMD: %w",
			v.Name, v.Name, errdefs.ErrFailedPrecondition)
	}
	code, err := w.follow(ctx, func(f mainFrame) error {
		return call.Send(api.Frame{Type: f.typ, Data: f.data})
	})
	if err != nil {
		return nil, fmt.Errorf("attach to vm %q: %w", v.Name, err)
	}
	if code == nil {
		return nil, fmt.Errorf("vm %q stopped before its main process reported an exit code: %w", v.Name, errdefs.ErrFailedPrecondition)
	}
	return api.ExecResult{ExitCode: *code}, nil
}

// mainAPI fills a VM's main process fields of the API.
func (d *Daemon) mainAPI(out *api.VM, v store.VM, r *runningVM) {
	if im, err := d.store.GetImage(context.WithoutCancel(d.ctx), v.ImageID); err == nil {
		if cfg, err := imageConfig(im); err == nil {
			out.MainProcess = mainArgv(cfg, v.Cmd)
		}
	}
	d.mu.Lock()
	w := d.mainWatches[v.ID]
	d.mu.Unlock()
	if w != nil {
		w.mu.Lock()
		switch {
		case !w.ended && r != nil:
			out.MainState = agentproto.MainRunning
		case w.code != nil:
			out.MainState = agentproto.MainExited
		}
		w.mu.Unlock()
	}
	if e := readMainExit(v.Dir); e != nil {
		code := e.ExitCode
		out.MainExitCode = &code
	}
}
