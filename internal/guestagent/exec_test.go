package guestagent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/guestagent"
)

func TestExecSeparateStreams(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	var stdout, stderr bytes.Buffer
	code, err := c.Exec(testCtx(t), agent.ExecOptions{
		Argv:   []string{"sh", "-c", "echo out1; echo err1 >&2; echo out2"},
		Stdout: &stdout,
		Stderr: &stderr,
	})
	if err != nil || code != 0 {
		t.Fatalf("exec: code %d, err %v", code, err)
	}
	if got, want := stdout.String(), "out1\nout2\n"; got != want {
		t.Errorf("stdout = %q, want %q", got, want)
	}
	if got, want := stderr.String(), "err1\n"; got != want {
		t.Errorf("stderr = %q, want %q", got, want)
	}
}

func TestExecExitCodes(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	tests := []struct {
		argv       []string
		code       int
		stderrPart string
	}{
		{argv: []string{"true"}, code: 0},
		{argv: []string{"sh", "-c", "exit 3"}, code: 3},
		{argv: []string{"banger-no-such-program", "x"}, code: 127, stderrPart: "banger-agent: exec banger-no-such-program: no such file"},
		{argv: []string{"/nonexistent/prog"}, code: 127, stderrPart: "banger-agent: exec /nonexistent/prog: no such file"},
		{argv: []string{"sh", "-c", "kill -TERM $$"}, code: 128 + 15},
	}
	for _, tt := range tests {
		t.Run(tt.argv[0], func(t *testing.T) {
			var stderr bytes.Buffer
			code, err := c.Exec(testCtx(t), agent.ExecOptions{Argv: tt.argv, Stderr: &stderr})
			if err != nil {
				t.Fatalf("exec: %v", err)
			}
			if code != tt.code {
				t.Errorf("code = %d, want %d (stderr %q)", code, tt.code, stderr.String())
			}
			if tt.stderrPart == "" && stderr.Len() != 0 {
				t.Errorf("unexpected stderr %q", stderr.String())
			}
			if !strings.Contains(stderr.String(), tt.stderrPart) {
				t.Errorf("stderr = %q, want it to contain %q", stderr.String(), tt.stderrPart)
			}
		})
	}
}

func TestExecStdin(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	// More than the SSH window (2 MiB) to exercise flow control both ways.
	data := make([]byte, 3<<20)
	rand.Read(data)
	var stdout bytes.Buffer
	code, err := c.Exec(testCtx(t), agent.ExecOptions{
		Argv:   []string{"cat"},
		Stdin:  bytes.NewReader(data),
		Stdout: &stdout,
	})
	if err != nil || code != 0 {
		t.Fatalf("exec cat: code %d, err %v", code, err)
	}
	if !bytes.Equal(stdout.Bytes(), data) {
		t.Fatalf("cat returned %d bytes, differing from the %d sent", stdout.Len(), len(data))
	}

	// Without Stdin the command sees an empty input at once.
	stdout.Reset()
	code, err = c.Exec(testCtx(t), agent.ExecOptions{Argv: []string{"wc", "-c"}, Stdout: &stdout})
	if err != nil || code != 0 {
		t.Fatalf("exec wc: code %d, err %v", code, err)
	}
	if got := strings.TrimSpace(stdout.String()); got != "0" {
		t.Errorf("wc -c of empty stdin = %q, want 0", got)
	}
}

func TestExecEnvAndDir(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	dir := t.TempDir()
	var stdout bytes.Buffer
	code, err := c.Exec(testCtx(t), agent.ExecOptions{
		Argv:   []string{"sh", "-c", `echo "$FOO|$HOME|$USER|$LANG|$PATH|$TERM"; pwd`},
		Env:    []string{"FOO=bar baz", "LANG=en_US.UTF-8"},
		Dir:    dir,
		Stdout: &stdout,
	})
	if err != nil || code != 0 {
		t.Fatalf("exec: code %d, err %v", code, err)
	}
	want := "bar baz|/root|root|en_US.UTF-8|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|\n" + dir + "\n"
	if stdout.String() != want {
		t.Errorf("output = %q, want %q", stdout.String(), want)
	}

	// A missing directory is reported like a missing program.
	var stderr bytes.Buffer
	code, err = c.Exec(testCtx(t), agent.ExecOptions{Argv: []string{"true"}, Dir: dir + "/missing", Stderr: &stderr})
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	if code != 127 || !strings.Contains(stderr.String(), "chdir") {
		t.Errorf("missing dir: code %d stderr %q, want 127 and a chdir message", code, stderr.String())
	}
}

func TestExecRefusesBadRequests(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	if _, err := c.Exec(testCtx(t), agent.ExecOptions{Argv: []string{""}}); err == nil {
		t.Errorf("empty program name accepted")
	}
	_, err := c.Exec(testCtx(t), agent.ExecOptions{Argv: []string{"true"}, Env: []string{"NOEQUALS"}})
	if !errors.Is(err, agent.ErrRefused) {
		t.Errorf("malformed env: err %v, want ErrRefused", err)
	}
}

func TestExecPTYResize(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	stdinR, stdinW := io.Pipe()
	defer stdinW.Close()
	var out syncBuffer
	resize := make(chan agent.WindowSize, 1)
	type result struct {
		code int
		err  error
	}
	done := make(chan result, 1)
	script := `echo "term=$TERM"; tty; stty size; while read x; do [ "$x" = q ] && exit 4; stty size; done`
	go func() {
		code, err := c.Exec(testCtx(t), agent.ExecOptions{
			Argv:   []string{"sh", "-c", script},
			Stdin:  stdinR,
			Stdout: &out,
			TTY:    true,
			Term:   "vt100",
			Rows:   24,
			Cols:   80,
			Resize: resize,
		})
		done <- result{code, err}
	}()
	waitFor(t, 10*time.Second, "initial size 24 80", func() bool { return strings.Contains(out.String(), "24 80") })
	resize <- agent.WindowSize{Rows: 40, Cols: 100}
	// The resize and the input travel separately; prod the loop until the
	// new size shows.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(out.String(), "40 100") {
		if time.Now().After(deadline) {
			t.Fatalf("size did not change; output %q", out.String())
		}
		io.WriteString(stdinW, "\n")
		time.Sleep(50 * time.Millisecond)
	}
	io.WriteString(stdinW, "q\n")
	var res result
	select {
	case res = <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("exec did not end; output %q", out.String())
	}
	if res.err != nil || res.code != 4 {
		t.Fatalf("exec: code %d, err %v", res.code, res.err)
	}
	s := out.String()
	if !regexp.MustCompile(`(?m)^/dev/pts/\d+\r?$`).MatchString(s) {
		t.Errorf("tty output missing /dev/pts/N: %q", s)
	}
	if !strings.Contains(s, "term=vt100") {
		t.Errorf("TERM not set from pty-req: %q", s)
	}
	if !strings.Contains(s, "\r\n") {
		t.Errorf("no CRLF: output does not look like it went through a terminal: %q", s)
	}
}

func TestExecWithoutPTYHasNoTerminal(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	var stdout bytes.Buffer
	code, err := c.Exec(testCtx(t), agent.ExecOptions{Argv: []string{"tty"}, Stdout: &stdout})
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	if code == 0 || !strings.Contains(stdout.String(), "not a tty") {
		t.Errorf("tty without pty: code %d, output %q", code, stdout.String())
	}
}

func TestExecCancelKillsProcessGroup(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	ctx, cancel := context.WithCancel(testCtx(t))
	var out syncBuffer
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, agent.ExecOptions{
			// The background sleep shares the command's process group.
			Argv:   []string{"sh", "-c", "sleep 100 & echo $$ $!; wait"},
			Stdout: &out,
		})
		done <- err
	}()
	waitFor(t, 10*time.Second, "pids", func() bool { return strings.Contains(out.String(), "\n") })
	fields := strings.Fields(out.String())
	if len(fields) != 2 {
		t.Fatalf("bad output %q", out.String())
	}
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("exec err = %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("exec did not return after cancel")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("exec took %s to return after cancel", d)
	}
	for _, f := range fields {
		pid, err := strconv.Atoi(f)
		if err != nil {
			t.Fatalf("bad pid %q", f)
		}
		waitFor(t, 5*time.Second, fmt.Sprintf("pid %d to die", pid), func() bool { return processGone(pid) })
	}
	// The connection is still usable.
	if code, err := c.Exec(testCtx(t), agent.ExecOptions{Argv: []string{"true"}}); err != nil || code != 0 {
		t.Errorf("exec after cancel: code %d, err %v", code, err)
	}
}

// processGone reports whether pid no longer exists or is a zombie.
func processGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// pid (comm) S ...: the state follows the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && (s[i+2] == 'Z' || s[i+2] == 'X')
}

func TestConcurrentExec(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	const n = 16
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			var stdout bytes.Buffer
			code, err := c.Exec(testCtx(t), agent.ExecOptions{
				Argv:   []string{"sh", "-c", "sleep 0.2; echo $1; exit $2", "sh", strconv.Itoa(i), strconv.Itoa(i % 5)},
				Stdout: &stdout,
			})
			switch {
			case err != nil:
				errs <- fmt.Errorf("exec %d: %w", i, err)
			case code != i%5:
				errs <- fmt.Errorf("exec %d: code %d, want %d", i, code, i%5)
			case stdout.String() != strconv.Itoa(i)+"\n":
				errs <- fmt.Errorf("exec %d: output %q", i, stdout.String())
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestStandardSession drives the agent with a plain x/crypto/ssh client:
// "exec", "shell", "env" and exit statuses follow the SSH protocol.
func TestStandardSession(t *testing.T) {
	h := startServer(t, generateKeys(t), guestagent.Hooks{})
	keys, err := h.km.Keys()
	if err != nil {
		t.Fatal(err)
	}
	sc, chans, reqs, err := ssh.NewClientConn(h.host, "agent", &ssh.ClientConfig{
		User:            "root",
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(keys.ClientSigner)},
		HostKeyCallback: ssh.FixedHostKey(keys.HostPublic),
	})
	if err != nil {
		t.Fatalf("ssh handshake: %v", err)
	}
	client := ssh.NewClient(sc, chans, reqs)
	defer client.Close()

	sess, err := client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	sess.Stdout, sess.Stderr = &stdout, &stderr
	if err := sess.Setenv("GREETING", "hi there"); err != nil {
		t.Fatalf("setenv: %v", err)
	}
	err = sess.Run(`echo "$GREETING"; echo oops >&2; exit 7`)
	var ee *ssh.ExitError
	if !errors.As(err, &ee) || ee.ExitStatus() != 7 {
		t.Fatalf("run: %v, want exit status 7", err)
	}
	if stdout.String() != "hi there\n" || stderr.String() != "oops\n" {
		t.Errorf("stdout %q stderr %q", stdout.String(), stderr.String())
	}

	sess, err = client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	stdout.Reset()
	sess.Stdout = &stdout
	sess.Stdin = strings.NewReader("echo shell-ok\nexit 5\n")
	if err := sess.Shell(); err != nil {
		t.Fatalf("shell: %v", err)
	}
	err = sess.Wait()
	if !errors.As(err, &ee) || ee.ExitStatus() != 5 {
		t.Fatalf("shell: %v, want exit status 5", err)
	}
	if !strings.Contains(stdout.String(), "shell-ok\n") {
		t.Errorf("shell output %q", stdout.String())
	}

	// A command killed by a signal is reported with exit-signal.
	sess, err = client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	err = sess.Run("kill -KILL $$")
	if !errors.As(err, &ee) || ee.Signal() != "KILL" {
		t.Fatalf("run: %v, want exit signal KILL", err)
	}

	// The "signal" request reaches the command's process group.
	sess, err = client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	out, err := sess.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := sess.Start("echo started; sleep 100"); err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 8)
	if _, err := io.ReadFull(out, line); err != nil {
		t.Fatalf("read: %v", err)
	}
	if err := sess.Signal(ssh.SIGTERM); err != nil {
		t.Fatalf("signal: %v", err)
	}
	err = sess.Wait()
	if !errors.As(err, &ee) || ee.Signal() != "TERM" {
		t.Fatalf("wait: %v, want exit signal TERM", err)
	}
}

// An empty argv asks for the guest's login shell (vm exec / vm run without
// a command).
func TestExecLoginShell(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	var out syncBuffer
	code, err := c.Exec(testCtx(t), agent.ExecOptions{
		Env:    []string{"GREETING=hello-shell"},
		Stdin:  strings.NewReader("echo \"$GREETING\"; tty; exit 5\n"),
		Stdout: &out,
		TTY:    true,
	})
	if err != nil || code != 5 {
		t.Fatalf("shell: code %d, err %v, output %q", code, err, out.String())
	}
	if !strings.Contains(out.String(), "hello-shell") || !strings.Contains(out.String(), "/dev/pts/") {
		t.Fatalf("shell output %q", out.String())
	}
}

// A terminal that cannot be allocated (early in a systemd boot, before
// /dev/pts is mounted) fails the command with the reason on stderr, not
// with a bare "request refused".
func TestExecPTYUnavailableSaysWhy(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{OpenPTY: func() (*os.File, *os.File, error) {
		return nil, nil, errors.New("open /dev/ptmx: no such device")
	}})
	var stdout, stderr bytes.Buffer
	code, err := c.Exec(testCtx(t), agent.ExecOptions{Argv: []string{"tty"}, TTY: true, Stdout: &stdout, Stderr: &stderr})
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	out := stdout.String() + stderr.String()
	if code != 126 || !strings.Contains(out, "cannot allocate a terminal") || !strings.Contains(out, "no such device") {
		t.Errorf("code %d, output %q; want 126 and the reason", code, out)
	}
}
