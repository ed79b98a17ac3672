package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/guestagent"
	"github.com/bangerdev/banger/internal/store"
)

func TestMainArgv(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  *api.ImageConfig
		cmd  []string
		want []string
	}{
		{"no config", nil, []string{"x"}, nil},
		{"empty config", &api.ImageConfig{Env: []string{"A=1"}}, nil, nil},
		{"cmd only", &api.ImageConfig{Cmd: []string{"nginx", "-g", "daemon off;"}}, nil, []string{"nginx", "-g", "daemon off;"}},
		{"entrypoint only", &api.ImageConfig{Entrypoint: []string{"/hello"}}, nil, []string{"/hello"}},
		{"entrypoint and cmd", &api.ImageConfig{Entrypoint: []string{"/docker-entrypoint.sh"}, Cmd: []string{"nginx"}}, nil, []string{"/docker-entrypoint.sh", "nginx"}},
		{"vm cmd replaces cmd", &api.ImageConfig{Entrypoint: []string{"/e"}, Cmd: []string{"default"}}, []string{"a", "b"}, []string{"/e", "a", "b"}},
		{"vm cmd without entrypoint", &api.ImageConfig{Cmd: []string{"sh"}}, []string{"echo", "hi"}, []string{"echo", "hi"}},
	} {
		if got := mainArgv(tc.cfg, tc.cmd); !slices.Equal(got, tc.want) {
			t.Errorf("%s: mainArgv = %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestAgentProcessAndExecDefaults(t *testing.T) {
	cfg := &api.ImageConfig{Env: []string{"PATH=/opt/bin", "A=1"}, WorkingDir: "/srv", User: "app:app", Entrypoint: []string{"/srv/run"}, StopSignal: "SIGQUIT"}
	p := agentProcess(cfg, []string{"--port", "8080"}, "")
	want := agentproto.Process{Argv: []string{"/srv/run", "--port", "8080"}, Env: cfg.Env, Dir: "/srv", User: "app:app", Restart: api.RestartNo, StopSignal: "SIGQUIT"}
	if p == nil || !slices.Equal(p.Argv, want.Argv) || !slices.Equal(p.Env, want.Env) || p.Dir != want.Dir || p.User != want.User || p.Restart != want.Restart || p.StopSignal != want.StopSignal {
		t.Errorf("agentProcess = %+v, want %+v", p, want)
	}
	if p := agentProcess(cfg, nil, api.RestartAlways); p.Restart != api.RestartAlways {
		t.Errorf("restart %q", p.Restart)
	}
	if p := agentProcess(&api.ImageConfig{Env: []string{"A=1"}}, nil, ""); p != nil {
		t.Errorf("no entrypoint nor cmd: %+v, want none", p)
	}
	d := agentExecDefaults(cfg)
	if d == nil || !slices.Equal(d.Env, cfg.Env) || d.Dir != "/srv" || d.User != "app:app" {
		t.Errorf("agentExecDefaults = %+v", d)
	}
	if d := agentExecDefaults(&api.ImageConfig{Cmd: []string{"sh"}}); d != nil {
		t.Errorf("nothing to default: %+v", d)
	}
	if d := agentExecDefaults(nil); d != nil {
		t.Errorf("no config: %+v", d)
	}
}

func TestImageConfig(t *testing.T) {
	cfg, err := imageConfig(store.Image{ConfigJSON: `{"entrypoint":["/hello"],"env":["A=1"]}`})
	if err != nil || cfg == nil || !slices.Equal(cfg.Entrypoint, []string{"/hello"}) {
		t.Errorf("imageConfig = %+v, %v", cfg, err)
	}
	if cfg, err := imageConfig(store.Image{}); cfg != nil || err != nil {
		t.Errorf("no config: %+v, %v", cfg, err)
	}
	if _, err := imageConfig(store.Image{Name: "x", ConfigJSON: "{"}); err == nil {
		t.Error("a broken config was accepted")
	}
}

func TestCheckRestart(t *testing.T) {
	for _, ok := range []string{"", "no", "on-failure", "always"} {
		if err := checkRestart(ok); err != nil {
			t.Errorf("checkRestart(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"sometimes", "unless-stopped", "on-failure:3", "Always"} {
		err := checkRestart(bad)
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "no, on-failure or always") {
			t.Errorf("checkRestart(%q) = %v, want invalid naming the policies", bad, err)
		}
	}
}

func TestMainWatchFollow(t *testing.T) {
	w := newMainWatch()
	w.writer(api.FrameStdout).Write([]byte("one\n"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	type result struct {
		out  string
		code *int
		err  error
	}
	res := make(chan result, 1)
	go func() {
		var b strings.Builder
		code, err := w.follow(ctx, func(f mainFrame) error {
			b.WriteString(f.typ + ":" + string(f.data))
			return nil
		})
		res <- result{b.String(), code, err}
	}()
	time.Sleep(50 * time.Millisecond)
	w.writer(api.FrameStderr).Write([]byte("two\n"))
	code := 4
	w.end(&code, nil)
	r := <-res
	if r.err != nil || r.code == nil || *r.code != 4 || r.out != api.FrameStdout+":one\n"+api.FrameStderr+":two\n" {
		t.Errorf("follow = %q, %v, %v", r.out, r.code, r.err)
	}
	// A late follower gets the same (the watch is kept after the end).
	var late strings.Builder
	c2, err := w.follow(ctx, func(f mainFrame) error { late.Write(f.data); return nil })
	if err != nil || c2 == nil || *c2 != 4 || late.String() != "one\ntwo\n" {
		t.Errorf("late follow = %q, %v, %v", late.String(), c2, err)
	}
	// Bounded: a flood keeps about mainLogMax bytes.
	big := newMainWatch()
	chunk := make([]byte, 64<<10)
	for range 40 {
		big.add(api.FrameStdout, chunk)
	}
	if big.size > mainLogMax || big.size < mainLogMax-len(chunk) {
		t.Errorf("watch holds %d bytes, want about %d", big.size, mainLogMax)
	}
}

// TestCreateRestartPolicy: a bad restart policy is refused before anything
// is made; a good one and the Cmd are stored and shown by vm inspect.
func TestCreateRestartPolicy(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	_, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "bad", Restart: "sometimes"}, nil)
	wireErr(t, "create with a bad restart policy", err, errdefs.ErrInvalid)
	if got := vmNames(t, d); len(got) != 0 {
		t.Errorf("vms after a refused create: %v", got)
	}
	if got := vmDirs(t, e); len(got) != 0 {
		t.Errorf("vm dirs after a refused create: %v", got)
	}
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "good", Restart: api.RestartOnFailure, Cmd: []string{"a", "b"}}, nil); err != nil {
		t.Fatal(err)
	}
	vm := inspect(t, d, "good")
	if vm.Restart != api.RestartOnFailure {
		t.Errorf("inspect: restart %q, want on-failure", vm.Restart)
	}
	// The test image has no OCI configuration: no main process.
	if vm.MainProcess != nil || vm.MainState != "" || vm.MainExitCode != nil {
		t.Errorf("inspect: main process %q state %q exit %v, want none", vm.MainProcess, vm.MainState, vm.MainExitCode)
	}
}

// setImageConfig records an OCI configuration for an image, as an OCI
// pull would.
func setImageConfig(t *testing.T, e *testEnv, name string, cfg api.ImageConfig) {
	t.Helper()
	ctx := testCtx(t)
	st, err := store.Open(ctx, filepath.Join(e.cfg.StateDir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	im, err := st.GetImage(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	im.ConfigJSON = string(b)
	if err := st.UpdateImage(ctx, im); err != nil {
		t.Fatal(err)
	}
}

// TestMainProcessAttach: a VM of an image with an Entrypoint gets its main
// process in the agent's config (the VM's Cmd replacing the image's),
// the image's exec defaults, a watch from the daemon; vm.attach relays its
// output and exit code; the code stays in vm inspect after the VM stopped,
// and a late attach still gets it.
func TestMainProcessAttach(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	setImageConfig(t, e, "default", api.ImageConfig{Entrypoint: []string{"/hello"}, Cmd: []string{"default-arg"}, Env: []string{"A=1"}, WorkingDir: "/w", User: "app", StopSignal: "SIGQUIT"})
	release := make(chan struct{})
	e.fake.setBehaviour("m1", fakeBehaviour{MainProcess: func(ctx context.Context, feed *guestagent.MainFeeder, p agentproto.Process, powerOff func()) {
		feed.State(agentproto.MainProcessState{State: agentproto.MainRunning, PID: 7})
		feed.Output(false, []byte("hello "+strings.Join(p.Argv, " ")+"\n"))
		feed.Output(true, []byte("oops\n"))
		select {
		case <-release:
		case <-ctx.Done():
			return
		}
		code := 3
		feed.State(agentproto.MainProcessState{State: agentproto.MainExited, ExitCode: &code})
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if !feed.WaitAck(actx) {
			t.Errorf("the daemon did not take the exit status")
		}
		powerOff()
	}})
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "m1", Start: true, MemoryMiB: 128, CPUs: 1, Cmd: []string{"x", "y"}, Restart: api.RestartOnFailure}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(vm.MainProcess, []string{"/hello", "x", "y"}) || vm.Restart != api.RestartOnFailure || vm.MainState != agentproto.MainRunning {
		t.Errorf("created vm: main process %q restart %q state %q", vm.MainProcess, vm.Restart, vm.MainState)
	}
	cfg := e.fake.byName("m1").agentCfg
	if p := cfg.Process; p == nil || !slices.Equal(p.Argv, []string{"/hello", "x", "y"}) || p.Dir != "/w" || p.User != "app" || p.Restart != api.RestartOnFailure || p.StopSignal != "SIGQUIT" || !slices.Equal(p.Env, []string{"A=1"}) {
		t.Errorf("agent config's process %+v", cfg.Process)
	}
	if x := cfg.ExecDefaults; x == nil || x.Dir != "/w" || x.User != "app" || !slices.Equal(x.Env, []string{"A=1"}) {
		t.Errorf("agent config's exec defaults %+v", cfg.ExecDefaults)
	}

	var stdout, stderr syncBuffer
	type res struct {
		code int
		err  error
	}
	got := make(chan res, 1)
	go func() {
		code, err := d.c.VMAttach(ctx, "m1", &stdout, &stderr)
		got <- res{code, err}
	}()
	waitFor(ctx, t, "attached output", func() bool { return strings.Contains(stdout.String(), "hello") })
	close(release)
	r := <-got
	if r.err != nil || r.code != 3 {
		t.Fatalf("attach: %d, %v; want 3", r.code, r.err)
	}
	if stdout.String() != "hello /hello x y\n" || stderr.String() != "oops\n" {
		t.Errorf("attached stdout %q stderr %q", stdout.String(), stderr.String())
	}
	waitFor(ctx, t, "the vm to stop", func() bool { return inspect(t, d, "m1").State == api.StateStopped })
	vm = inspect(t, d, "m1")
	if vm.MainExitCode == nil || *vm.MainExitCode != 3 || vm.MainState != agentproto.MainExited {
		t.Errorf("stopped vm: main exit code %v state %q, want 3 and exited", vm.MainExitCode, vm.MainState)
	}
	// Late: the output kept and the code.
	var late syncBuffer
	code, err := d.c.VMAttach(ctx, "m1", &late, nil)
	if err != nil || code != 3 || late.String() != "hello /hello x y\n" {
		t.Errorf("late attach: %d, %v, %q", code, err, late.String())
	}

	// A VM whose image has no main process: attach is refused.
	setImageConfig(t, e, "default", api.ImageConfig{Env: []string{"A=1"}})
	createStarted(t, d, "plain")
	_, err = d.c.VMAttach(ctx, "plain", nil, nil)
	wireErr(t, "attach to a vm without a main process", err, errdefs.ErrFailedPrecondition)
}

// TestMainProcessDetachedAutoRemove: an auto-remove VM with a main process
// (vm run -d --rm) outlives its start call's grace period while its main
// process runs, and is removed once it ended.
func TestMainProcessDetachedAutoRemove(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.autoRemoveGrace = 300 * time.Millisecond
	d := e.start()
	ctx := testCtx(t)
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd}); err != nil {
		t.Fatal(err)
	}
	setImageConfig(t, e, "default", api.ImageConfig{Cmd: []string{"serve"}})
	release := make(chan struct{})
	e.fake.setBehaviour("bg", fakeBehaviour{MainProcess: func(ctx context.Context, feed *guestagent.MainFeeder, p agentproto.Process, powerOff func()) {
		feed.State(agentproto.MainProcessState{State: agentproto.MainRunning, PID: 9})
		select {
		case <-release:
		case <-ctx.Done():
			return
		}
		code := 0
		feed.State(agentproto.MainProcessState{State: agentproto.MainExited, ExitCode: &code})
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		feed.WaitAck(actx)
		powerOff()
	}})
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "bg", Start: true, AutoRemove: true, MemoryMiB: 128, CPUs: 1}, nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * e.autoRemoveGrace)
	if vm := inspect(t, d, "bg"); vm.State != api.StateRunning {
		t.Fatalf("the vm went while its main process ran: %+v", vm)
	}
	close(release)
	waitFor(ctx, t, "the vm to be removed", func() bool {
		_, err := d.c.VMInspect(ctx, "bg")
		return errors.Is(err, errdefs.ErrNotFound)
	})
}

// TestMainProcessAdopted: a daemon restarted while a VM's main process
// runs watches it again (the guest replays its output): attach gets the
// whole output and the exit code.
func TestMainProcessAdopted(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	setImageConfig(t, e, "default", api.ImageConfig{Cmd: []string{"serve"}})
	release := make(chan struct{})
	e.fake.setBehaviour("ad", fakeBehaviour{MainProcess: func(ctx context.Context, feed *guestagent.MainFeeder, p agentproto.Process, powerOff func()) {
		feed.State(agentproto.MainProcessState{State: agentproto.MainRunning, PID: 9})
		feed.Output(false, []byte("before the restart\n"))
		select {
		case <-release:
		case <-ctx.Done():
			return
		}
		feed.Output(false, []byte("after\n"))
		code := 5
		feed.State(agentproto.MainProcessState{State: agentproto.MainExited, ExitCode: &code})
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		feed.WaitAck(actx)
		powerOff()
	}})
	createStarted(t, d, "ad")
	d.close()
	d2 := e.start()
	waitFor(ctx, t, "the adopted vm's main process watched", func() bool { return inspect(t, d2, "ad").MainState == agentproto.MainRunning })
	var out syncBuffer
	got := make(chan error, 1)
	var code int
	go func() {
		var err error
		code, err = d2.c.VMAttach(ctx, "ad", &out, nil)
		got <- err
	}()
	waitFor(ctx, t, "replayed output", func() bool { return strings.Contains(out.String(), "before the restart") })
	close(release)
	if err := <-got; err != nil || code != 5 || out.String() != "before the restart\nafter\n" {
		t.Errorf("attach after a daemon restart: %d, %v, %q", code, err, out.String())
	}
}
