package guestagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
)

// mainProc is PID 1's supervisor of the main process (agentproto.Process).
// Its methods run on PID 1's loop goroutine, except the output pumps and
// the links to the agent server, which only touch the log and acked.
type mainProc struct {
	c        *initConsole
	spec     *agentproto.Process
	hostname string
	etcDir   string
	log      *outputLog
	console  [2]io.Writer // stdout, stderr copies (the console)

	pid      int
	started  time.Time
	state    agentproto.MainProcessState
	failures int
	stopping bool
	restart  <-chan time.Time // the backoff of a pending restart

	ackOnce sync.Once
	acked   chan struct{} // closed when an agent sent the final exit to a client

	// output is the current run's output pumps: a run's end is logged
	// after its last output (drainOutput).
	output *sync.WaitGroup
}

// outputDrainMax bounds how long a run's end waits for its output pumps:
// a child that outlives the run may hold the pipes open.
const outputDrainMax = 2 * time.Second

func newMainProc(c *initConsole, spec *agentproto.Process, hostname string) *mainProc {
	return &mainProc{
		c: c, spec: spec, hostname: hostname, etcDir: "/etc",
		log:     newOutputLog(mainLogMax),
		console: [2]io.Writer{os.Stdout, os.Stderr},
		acked:   make(chan struct{}),
	}
}

// publish records the state and appends it to the log.
func (m *mainProc) publish() {
	b, err := json.Marshal(m.state)
	if err != nil {
		return
	}
	m.log.append(entryState, b)
}

// launch starts a run of the process. A run that cannot start counts as
// one that exited with 127 (program not found) or 126; the caller
// applies the restart policy to it like to any exit (failed reports it).
func (m *mainProc) launch() (failed bool, code int) {
	m.restart = nil
	m.started = time.Now()
	code, err := m.start()
	if err != nil {
		msg := fmt.Sprintf("banger-agent: main process: %v\n", err)
		m.log.append(entryStderr, []byte(msg))
		m.c.logf("error: main process: %v", err)
		m.state.Error = err.Error()
		return true, code
	}
	m.state.Error = ""
	m.state.State, m.state.PID = agentproto.MainRunning, m.pid
	m.publish()
	m.c.logf("main process started (pid %d): %s", m.pid, strings.Join(m.spec.Argv, " "))
	return false, 0
}

// start starts the process; on error it returns the exit code the
// failure stands for.
func (m *mainProc) start() (int, error) {
	if len(m.spec.Argv) == 0 || m.spec.Argv[0] == "" {
		return 127, errors.New("no program to run (the image has neither an Entrypoint nor a Cmd)")
	}
	u, err := resolveUser(m.etcDir, m.spec.User)
	if err != nil {
		return 126, err
	}
	env := processEnv(m.spec.Env, m.hostname, u)
	dir := m.spec.Dir
	if dir == "" {
		dir = "/"
	}
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		// Container runtimes make a missing working directory.
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return 126, fmt.Errorf("working directory: %w", err)
		}
	}
	path, err := lookPath(m.spec.Argv[0], envValue(env, "PATH"))
	if err != nil {
		return 127, fmt.Errorf("%s: not found in PATH %s", m.spec.Argv[0], envValue(env, "PATH"))
	}
	devNull, err := os.OpenFile("/dev/null", os.O_RDWR, 0)
	if err != nil {
		return 126, fmt.Errorf("open /dev/null: %w", err)
	}
	defer devNull.Close()
	outR, outW, err := os.Pipe()
	if err != nil {
		return 126, fmt.Errorf("pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		closeAll(outR, outW)
		return 126, fmt.Errorf("pipe: %w", err)
	}
	p, err := os.StartProcess(path, m.spec.Argv, &os.ProcAttr{
		Dir:   dir,
		Env:   env,
		Files: []*os.File{devNull, outW, errW},
		Sys:   &syscall.SysProcAttr{Setsid: true, Credential: u.credential()},
	})
	closeAll(outW, errW)
	if err != nil {
		closeAll(outR, errR)
		code := 126
		if errors.Is(err, fs.ErrNotExist) {
			code = 127
		}
		return code, fmt.Errorf("start %s: %w", path, err)
	}
	m.pid = p.Pid
	// PID 1 reaps with wait4(-1); the handle is not needed.
	_ = p.Release()
	m.output = &sync.WaitGroup{}
	m.output.Add(2)
	go m.pump(outR, entryStdout, m.console[0], m.output)
	go m.pump(errR, entryStderr, m.console[1], m.output)
	return 0, nil
}

// pump copies one output stream of a run to the console and the log.
func (m *mainProc) pump(r *os.File, kind byte, console io.Writer, wg *sync.WaitGroup) {
	defer wg.Done()
	defer r.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			console.Write(buf[:n])
			m.log.append(kind, buf[:n])
		}
		if err != nil {
			return
		}
	}
}

// ended handles the end of a run with code: a restart per the policy, or
// the final exit (it reports true).
func (m *mainProc) ended(code int) (final bool) {
	m.drainOutput()
	m.pid = 0
	m.state.PID = 0
	m.state.ExitCode = &code
	ran := time.Since(m.started)
	if !shouldRestart(m.spec.Restart, code, m.stopping) {
		m.state.State = agentproto.MainExited
		m.publish()
		what := "powering off"
		if m.stopping {
			what = "stopping"
		}
		m.c.logf("%s%d after %s; %s", agentproto.MainExitMarker, code, ran.Round(time.Millisecond), what)
		return true
	}
	if ran > mainHealthy {
		m.failures = 0
	}
	m.failures++
	d := restartDelay(m.failures)
	m.state.State = agentproto.MainRestarting
	m.state.Restarts++
	m.publish()
	m.c.logf("main process ended with code %d after %s; restarting in %s (restart policy %s)", code, ran.Round(time.Millisecond), d, m.spec.Restart)
	m.restart = time.After(d)
	return false
}

// drainOutput waits until the last run's output is in the log (its pumps
// read EOF), at most outputDrainMax, so that what the process wrote just
// before it exited reaches attached clients before its exit status.
func (m *mainProc) drainOutput() {
	wg := m.output
	if wg == nil {
		return
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(outputDrainMax):
		m.c.logf("the main process's output is still open %s after it exited (a child holds it?): its exit is reported now", outputDrainMax)
	}
}

// run launches the process until a run starts or the policy gives up;
// it reports the final exit.
func (m *mainProc) run() (final bool) {
	failed, code := m.launch()
	if !failed {
		return false
	}
	return m.ended(code)
}

// waitAck waits until an agent reported the final exit sent to a client,
// or exitLinger passed.
func (m *mainProc) waitAck() {
	select {
	case <-m.acked:
	case <-time.After(exitLinger):
		m.c.logf("no client took the main process's exit status within %s", exitLinger)
	}
}

// stop ends the process when the guest powers off: its stop signal, then
// SIGKILL after its grace period (reaping other children meanwhile).
// Nothing restarts afterwards.
func (m *mainProc) stop() {
	m.stopping = true
	if m.state.State == agentproto.MainExited {
		return
	}
	if m.pid == 0 {
		// Waiting out a restart backoff: its last exit is final.
		m.restart = nil
		code := 0
		if m.state.ExitCode != nil {
			code = *m.state.ExitCode
		}
		m.ended(code)
		m.waitAck()
		return
	}
	sig, err := parseSignal(m.spec.StopSignal)
	if err != nil {
		m.c.logf("warning: main process stop signal: %v; using SIGTERM", err)
		sig = unix.SIGTERM
	}
	grace := stopGraceOf(m.spec)
	m.c.logf("stopping the main process (pid %d) with %s", m.pid, unix.SignalName(sig))
	_ = unix.Kill(m.pid, sig)
	if !m.waitExit(grace) {
		m.c.logf("main process still running %s after its stop signal: killing it", grace)
		_ = unix.Kill(m.pid, unix.SIGKILL)
		m.waitExit(2 * time.Second)
	}
	if m.pid != 0 {
		m.ended(128 + int(unix.SIGKILL))
	}
	m.waitAck()
}

// waitExit reaps children until the run exits (ended is called) or d
// passes; it reports whether it exited.
func (m *mainProc) waitExit(d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		reapAll(func(pid int, ws unix.WaitStatus) {
			if pid == m.pid && m.pid != 0 {
				m.ended(exitCode(ws))
			}
		})
		if m.pid == 0 {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// serveLink feeds the log to an agent server over conn (everything held,
// then each entry as it comes) and watches for its acknowledgement of the
// final exit. It ends when the agent goes.
func (m *mainProc) serveLink(conn *os.File) {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		defer cancel()
		b := make([]byte, 1)
		for {
			n, err := conn.Read(b)
			if n == 1 && b[0] == linkAck {
				m.ackOnce.Do(func() { close(m.acked) })
			}
			if err != nil {
				return
			}
		}
	}()
	go func() {
		defer conn.Close()
		defer cancel()
		_ = m.log.follow(ctx, 0, func(e logEntry) (bool, error) {
			return true, writeLinkEntry(conn, e)
		})
	}()
}

// socketPair returns the two ends of a unix stream socket pair
// (close-on-exec).
func socketPair() (*os.File, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "main-link"), os.NewFile(uintptr(fds[1]), "main-link"), nil
}
