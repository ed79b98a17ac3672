package guestagent_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/testenv"
)

type attachResult struct {
	code           int
	err            error
	stdout, stderr *syncBuffer
}

// attachAsync attaches to the guest's main process in the background.
func attachAsync(ctx context.Context, c *agent.Client) (*attachResult, <-chan struct{}) {
	r := &attachResult{stdout: &syncBuffer{}, stderr: &syncBuffer{}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.code, r.err = c.Attach(ctx, agent.AttachOptions{Stdout: r.stdout, Stderr: r.stderr})
	}()
	return r, done
}

// waitPowerOff waits for QEMU to exit after the guest powered off.
func (v *vm) waitPowerOff(t *testing.T, within time.Duration) {
	t.Helper()
	select {
	case <-v.exited:
		if v.waitErr != nil {
			t.Errorf("QEMU exit: %v", v.waitErr)
		}
	case <-time.After(within):
		t.Fatalf("QEMU still running %s after the main process ended; console:\n%s", within, v.consoleTail(30))
	}
}

// TestBootMainProcess runs a main process in an image without init (the
// busybox rootfs): as the given user, in its directory, with the image's
// environment; its output reaches the console and an attached client; exec
// requests get the image's defaults; a shutdown sends it its stop signal,
// its exit code reaches the client and the VM powers off.
func TestBootMainProcess(t *testing.T) {
	img := findTestImage(t)
	script := `echo "out FOO=$FOO"; echo "err line" >&2; echo "dir $(pwd)"; echo "uid $(id -u) gid $(id -g)"; ` +
		`echo "home $HOME host $HOSTNAME"; trap 'echo got-usr1; exit 5' USR1; i=0; while [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; exit 9`
	v, cfg, keys := bootVM(t, img, bootSpec{rootfs: "busybox-rootfs.ext4", useModulesDir: true, config: func(c *agentproto.Config) {
		c.Process = &agentproto.Process{
			Argv: []string{"sh", "-c", script}, Env: []string{"FOO=bar", "PATH=/bin:/sbin:/usr/bin:/usr/sbin"},
			Dir: "/work/dir", User: "1234:2345", StopSignal: "SIGUSR1",
		}
		c.ExecDefaults = &agentproto.ExecDefaults{Env: []string{"FOO=execbar"}, Dir: "/work", User: "1234"}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c, err := agent.WaitReady(ctx, v.dial, keys, nil)
	if err != nil {
		t.Fatalf("agent not ready: %v", err)
	}
	defer c.Close()
	res, attached := attachAsync(ctx, c)

	// The process is running: its state in the info, its output attached.
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(res.stdout.String(), "home ") {
		if time.Now().After(deadline) {
			t.Fatalf("no output attached after 30s: stdout %q stderr %q; console:\n%s", res.stdout.String(), res.stderr.String(), v.consoleTail(30))
		}
		time.Sleep(100 * time.Millisecond)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if mp := info.MainProcess; mp == nil || mp.State != agentproto.MainRunning || mp.PID <= 1 {
		t.Errorf("Info.MainProcess %+v, want running", mp)
	}
	for _, want := range []string{"out FOO=bar\n", "dir /work/dir\n", "uid 1234 gid 2345\n", "home / host " + cfg.Hostname + "\n"} {
		if !strings.Contains(res.stdout.String(), want) {
			t.Errorf("attached stdout %q lacks %q", res.stdout.String(), want)
		}
	}
	if got := res.stderr.String(); got != "err line\n" {
		t.Errorf("attached stderr %q, want %q", got, "err line\n")
	}

	// Exec defaults: the image's env, dir and user, explicit values win.
	if got := run(ctx, t, c, "sh", "-c", `echo "$FOO $(pwd) $(id -u)"`); got != "execbar /work 1234\n" {
		t.Errorf("exec with the image's defaults: %q, want %q", got, "execbar /work 1234\n")
	}
	var out bytes.Buffer
	code, err := c.Exec(ctx, agent.ExecOptions{Argv: []string{"sh", "-c", `echo "$FOO $(pwd) $(id -u)"`}, Env: []string{"FOO=mine"}, Dir: "/", User: "root", Stdout: &out})
	if err != nil || code != 0 || out.String() != "mine / 0\n" {
		t.Errorf("exec with explicit env, dir, user: code %d err %v out %q, want %q", code, err, out.String(), "mine / 0\n")
	}
	// A second attach replays the output from the start.
	var replay bytes.Buffer
	actx, acancel := context.WithTimeout(ctx, 2*time.Second)
	_, err = c.Attach(actx, agent.AttachOptions{Stdout: &replay})
	acancel()
	if !strings.Contains(replay.String(), "out FOO=bar\n") {
		t.Errorf("second attach replayed %q (err %v), want the output from the start", replay.String(), err)
	}

	// Power off: the main process gets its stop signal first.
	if err := c.Shutdown(ctx, false); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	select {
	case <-attached:
	case <-time.After(40 * time.Second):
		t.Fatal("attach did not end 40s after the shutdown request")
	}
	if res.err != nil || res.code != 5 {
		t.Errorf("attach: code %d err %v, want 5 (the USR1 trap's exit)", res.code, res.err)
	}
	if !strings.Contains(res.stdout.String(), "got-usr1\n") {
		t.Errorf("attached stdout %q lacks the stop signal's trap output", res.stdout.String())
	}
	v.waitPowerOff(t, 30*time.Second)
	cons, _ := os.ReadFile(v.console)
	for _, want := range []string{"out FOO=bar", "err line", "got-usr1", agentproto.MainExitMarker + "5 "} {
		if !bytes.Contains(cons, []byte(want)) {
			t.Errorf("console lacks %q", want)
		}
	}
	if t.Failed() || testing.Verbose() {
		logInitLines(t, cons)
	}
}

// TestBootMainProcessRestart: restart policy on-failure restarts a failing
// process (with its backoff) until it succeeds; the VM then powers off by
// itself.
func TestBootMainProcessRestart(t *testing.T) {
	img := findTestImage(t)
	script := `n=$(cat /tmp/runs 2>/dev/null || echo 0); n=$((n+1)); echo $n > /tmp/runs; echo "run $n"; [ $n -ge 3 ] && exit 0; exit 7`
	v, _, keys := bootVM(t, img, bootSpec{rootfs: "busybox-rootfs.ext4", useModulesDir: true, config: func(c *agentproto.Config) {
		c.Process = &agentproto.Process{Argv: []string{"/bin/sh", "-c", script}, Restart: agentproto.RestartOnFailure}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c, err := agent.WaitReady(ctx, v.dial, keys, nil)
	if err != nil {
		t.Fatalf("agent not ready: %v", err)
	}
	defer c.Close()
	var stdout bytes.Buffer
	code, err := c.Attach(ctx, agent.AttachOptions{Stdout: &stdout})
	if err != nil || code != 0 {
		t.Errorf("attach: code %d err %v, want 0 (the third run)", code, err)
	}
	if got := stdout.String(); got != "run 1\nrun 2\nrun 3\n" {
		t.Errorf("attached output %q, want three runs", got)
	}
	v.waitPowerOff(t, 30*time.Second)
	cons, _ := os.ReadFile(v.console)
	if n := bytes.Count(cons, []byte("restarting in")); n != 2 {
		t.Errorf("console has %d restarts, want 2", n)
	}
	if !bytes.Contains(cons, []byte(agentproto.MainExitMarker+"0 ")) {
		t.Errorf("console lacks the final exit")
	}
	if t.Failed() || testing.Verbose() {
		logInitLines(t, cons)
	}
}

// scratchProgram is a static program for a FROM scratch image: it prints
// its arguments, environment and directory, and exits with its first
// argument as status.
const scratchProgram = `package main

import (
	"fmt"
	"os"
	"strconv"
)

func main() {
	wd, _ := os.Getwd()
	fmt.Printf("hello from scratch args=%v FOO=%s PATH=%s wd=%s uid=%d\n", os.Args[1:], os.Getenv("FOO"), os.Getenv("PATH"), wd, os.Getuid())
	fmt.Fprintln(os.Stderr, "scratch stderr")
	code, _ := strconv.Atoi(os.Args[1])
	os.Exit(code)
}
`

// buildStatic builds a Go program (source src) as a static binary.
func buildStatic(t *testing.T, src, out string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module scratchprog\n\ngo 1.22\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=-mod=mod")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build static program: %v\n%s", err, b)
	}
}

// TestBootMainProcessScratch boots a FROM scratch style root filesystem
// holding only one static binary (no shell, no /etc, /tmp, /dev, /proc):
// it runs as the main process, its exit code is reported and the VM
// powers off.
func TestBootMainProcessScratch(t *testing.T) {
	img := findTestImage(t)
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		testenv.Missing(t, "needs mkfs.ext4 (apt-get install e2fsprogs)")
	}
	root := t.TempDir()
	buildStatic(t, scratchProgram, filepath.Join(root, "hello"))
	rootfs := filepath.Join(t.TempDir(), "scratch.ext4")
	if b, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", root, rootfs, "32M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, b)
	}
	simg := img
	simg.dir = filepath.Dir(rootfs)
	v, _, keys := bootVM(t, simg, bootSpec{rootfs: filepath.Base(rootfs), useModulesDir: true, config: func(c *agentproto.Config) {
		c.Process = &agentproto.Process{Argv: []string{"/hello", "3", "x"}, Env: []string{"FOO=scratch"}, Dir: "/app"}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c, err := agent.WaitReady(ctx, v.dial, keys, nil)
	if err != nil {
		t.Fatalf("agent not ready: %v", err)
	}
	defer c.Close()
	var stdout, stderr bytes.Buffer
	code, err := c.Attach(ctx, agent.AttachOptions{Stdout: &stdout, Stderr: &stderr})
	if err != nil || code != 3 {
		t.Errorf("attach: code %d err %v, want 3", code, err)
	}
	want := "hello from scratch args=[3 x] FOO=scratch PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin wd=/app uid=0\n"
	if stdout.String() != want || stderr.String() != "scratch stderr\n" {
		t.Errorf("attached stdout %q stderr %q, want %q and %q", stdout.String(), stderr.String(), want, "scratch stderr\n")
	}
	v.waitPowerOff(t, 30*time.Second)
	cons, _ := os.ReadFile(v.console)
	for _, w := range []string{"hello from scratch", agentproto.MainExitMarker + "3 "} {
		if !bytes.Contains(cons, []byte(w)) {
			t.Errorf("console lacks %q", w)
		}
	}
	if t.Failed() || testing.Verbose() {
		logInitLines(t, cons)
	}
}
