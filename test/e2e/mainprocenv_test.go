//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/test/harness"
)

// setImageConfig gives a registered image an OCI configuration, as an OCI
// pull records it (the daemon is stopped meanwhile).
func setImageConfig(t *testing.T, e *harness.Env, image string, cfg api.ImageConfig) {
	t.Helper()
	e.StopDaemon()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := store.Open(ctx, filepath.Join(e.StateDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	im, err := st.GetImage(ctx, image)
	if err == nil {
		b, _ := json.Marshal(cfg)
		im.ConfigJSON = string(b)
		err = st.UpdateImage(ctx, im)
	}
	st.Close()
	if err != nil {
		t.Fatalf("set the config of image %s: %v", image, err)
	}
	e.StartDaemon()
}

// TestMainProcessEnv: an image without init (the busybox test image) with
// an OCI configuration runs its Cmd as the VM's main process, with its
// Env, WorkingDir and User; vm run -- ARGS replaces the Cmd; vm exec gets
// the image's defaults (-e adds); vm stop stops the main process with its
// stop signal and vm inspect shows its exit code.
func TestMainProcessEnv(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	setImageConfig(t, e, "tiny", api.ImageConfig{
		Cmd: []string{"sh", "-c", `echo "FOO=$FOO dir=$(pwd) uid=$(id -u) host=$HOSTNAME"; exit 3`},
		Env: []string{"FOO=bar", "PATH=/bin:/sbin:/usr/bin:/usr/sbin"}, WorkingDir: "/work", User: "1234",
	})

	start := time.Now()
	out, errOut, code := e.Banger("vm", "run", "--rm", "--name", "envrun", "--image", "tiny")
	t.Logf("vm run --rm --image tiny (main process): %s", time.Since(start).Round(time.Millisecond))
	if code != 3 || out != "FOO=bar dir=/work uid=1234 host=envrun\n" {
		t.Errorf("vm run: code %d stdout %q stderr %q; want 3 and the image's Env, WorkingDir, User", code, out, errOut)
	}
	out, _, code = e.Banger("vm", "run", "--rm", "--image", "tiny", "--", "sh", "-c", "echo replaced; exit 0")
	if code != 0 || out != "replaced\n" {
		t.Errorf("vm run -- CMD: code %d stdout %q; want 0 and CMD run in place of the image's Cmd", code, out)
	}
	if ls := strings.TrimSpace(e.Must("vm", "ls", "-q")); ls != "" {
		t.Errorf("vms left after vm run --rm: %q", ls)
	}

	// Detached: the main process runs, vm exec gets the image's defaults.
	out = e.Must("vm", "run", "-d", "--name", "envbg", "--image", "tiny", "--restart", "on-failure", "--", "sleep", "600")
	if strings.TrimSpace(out) != "envbg" {
		t.Errorf("vm run -d printed %q", out)
	}
	vm := e.Inspect("envbg")
	if vm.State != api.StateRunning || vm.MainState != "running" || vm.Restart != "on-failure" || strings.Join(vm.MainProcess, " ") != "sleep 600" {
		t.Errorf("vm inspect after vm run -d: state %s main %q state %q restart %q", vm.State, vm.MainProcess, vm.MainState, vm.Restart)
	}
	if got := e.MustExec("envbg", "sh", "-c", `echo "$FOO $(pwd) $(id -u)"`); got != "bar /work 1234\n" {
		t.Errorf("vm exec with the image's defaults: %q", got)
	}
	if got := e.Must("vm", "exec", "-e", "FOO=mine", "-w", "/", "envbg", "--", "sh", "-c", `echo "$FOO $(pwd)"`); got != "mine /\n" {
		t.Errorf("vm exec -e -w: %q", got)
	}
	e.Must("vm", "stop", "envbg")
	vm = e.Inspect("envbg")
	if vm.State != api.StateStopped || vm.MainExitCode == nil || *vm.MainExitCode != 143 {
		t.Errorf("after vm stop: state %s main exit code %v; want stopped, 143 (sleep killed by SIGTERM)", vm.State, vm.MainExitCode)
	}
	if ls := e.Must("vm", "ls"); !strings.Contains(ls, "stopped (exit 143)") {
		t.Errorf("vm ls lacks the main process's exit code:\n%s", ls)
	}
	if logs := e.Must("vm", "logs", "envbg"); !strings.Contains(logs, "stopping the main process") || !strings.Contains(logs, "main process exited with code 143") {
		t.Errorf("vm logs lacks the main process's stop:\n%s", logs)
	}
	e.Must("vm", "rm", "envbg")

	// -d --rm on an image with an init system (no main process to end
	// the VM): refused before anything is made.
	e.Fails("needs an image with a main process", "vm", "run", "-d", "--rm", "--image", "debian")

	// A bad restart policy: refused, nothing made.
	e.Fails("on-failure or always", "vm", "create", "--image", "tiny", "--restart", "sometimes")
	if ls := strings.TrimSpace(e.Must("vm", "ls", "-q")); ls != "" {
		t.Errorf("vms after a refused create: %q", ls)
	}
}
