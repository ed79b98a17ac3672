package guestagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
)

// defaultPath is the PATH of commands run by the agent.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// outputGrace is how long output is still forwarded after the command
// exited, when a background process it started keeps stdout or stderr open.
const outputGrace = 2 * time.Second

// command is what a session runs.
type command struct {
	path string // the program; "" = argv[0] looked up in PATH
	argv []string
	env  []string // added after the defaults and the session's env requests
	dir  string
	// startErr fails the command before it starts (an unknown user).
	startErr error
	// user, when not nil, is who an agent session's command runs as
	// (ExecRequest.User or ExecDefaults.User); nil: root.
	user *procUser
	// data, when not nil, moves stdin, stdout and stderr to a data port
	// (ExecRequest.Data; never with a PTY).
	data *agentproto.DataStream
}

// session is one "session" channel.
type session struct {
	log *slog.Logger
	ch  ssh.Channel
	env []string // from "env" requests

	// PTY state, set by pty-req.
	term   string
	ptmx   *os.File
	tty    *os.File
	rows   uint16
	cols   uint16
	ptySet bool
	// ptyErr is why the terminal asked for could not be allocated: the
	// pty-req is accepted and the command fails with this message on
	// stderr, which the user sees (a refused request carries no reason).
	ptyErr  error
	openPTY func() (ptmx, tty *os.File, err error)
	// acct is the user of a built-in SSH server's session (sshd.go); nil
	// for the agent's own sessions, which run as root.
	acct       *account
	sftpServer []string // the "sftp" subsystem's command (acct set)
	// openAgent opens an agent channel to the client (acct set).
	openAgent func() (ssh.Channel, <-chan *ssh.Request, error)
	cleanups  []func() // run when the session ends
	// main is the main process's link (ReqAttach), nil without one;
	// execDefaults apply to ReqExecArgv (agent sessions only).
	main         *MainLink
	execDefaults *agentproto.ExecDefaults
	attachCancel context.CancelFunc // ends a ReqAttach stream
	// ctx ends when the channel's requests end (the channel closed: the
	// host is gone or cancelled).
	ctx    context.Context
	cancel context.CancelFunc
	// dataPorts serves ExecRequest.Data; dc is the command's transfer.
	dataPorts *dataPorts
	dc        *dataConn

	mu      sync.Mutex
	started bool
	proc    *os.Process // nil until started
	exited  bool        // the process was reaped
	done    chan struct{}
}

func (s *server) handleSession(nc ssh.NewChannel, log *slog.Logger) {
	ch, reqs, err := nc.Accept()
	if err != nil {
		log.Warn("accept session", "err", err)
		return
	}
	s.newSession(ch, log).serve(reqs)
}

func (ss *session) serve(reqs <-chan *ssh.Request) {
	defer ss.ch.Close()
	defer ss.cancel()
	defer func() {
		for _, f := range ss.cleanups {
			f()
		}
	}()
	for req := range reqs {
		ok, launch := ss.handleRequest(req)
		if req.WantReply {
			req.Reply(ok, nil)
		}
		// Start the command only after the reply: a command that ends at
		// once must not close the channel before the reply is sent.
		if launch != nil {
			launch()
		}
	}
	// The channel is closed (by the client or because the connection
	// died): a command that still runs is killed with its process group,
	// its data port closed.
	ss.cancel()
	ss.mu.Lock()
	started := ss.started
	if ss.attachCancel != nil {
		ss.attachCancel()
	}
	if ss.proc != nil && !ss.exited {
		ss.log.Debug("session closed, killing command", "pid", ss.proc.Pid)
		unix.Kill(-ss.proc.Pid, unix.SIGKILL)
	}
	ss.mu.Unlock()
	if started {
		<-ss.done
	} else {
		ss.closePTY()
	}
}

// handleRequest handles one channel request and says whether it succeeded.
// For exec, shell and ReqExecArgv it returns launch, which starts the
// command in its own goroutine (later requests, such as window-change and
// signal, are handled while it runs).
func (ss *session) handleRequest(req *ssh.Request) (ok bool, launch func()) {
	switch req.Type {
	case "env":
		var m agentproto.EnvMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil || m.Name == "" || strings.ContainsAny(m.Name, "=\x00") {
			return false, nil
		}
		ss.mu.Lock()
		defer ss.mu.Unlock()
		if ss.started {
			return false, nil
		}
		ss.env = append(ss.env, m.Name+"="+m.Value)
		return true, nil
	case "pty-req":
		var m agentproto.PtyReqMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil {
			return false, nil
		}
		return ss.allocPTY(m) == nil, nil
	case "window-change":
		var m agentproto.WindowChangeMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil {
			return false, nil
		}
		return ss.resize(m.Rows, m.Columns), nil
	case "signal":
		var m agentproto.SignalMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil {
			return false, nil
		}
		return ss.signal(m.Signal), nil
	case "exec":
		var m agentproto.ExecMsg
		if err := ssh.Unmarshal(req.Payload, &m); err != nil {
			return false, nil
		}
		if ss.acct != nil {
			return ss.start(ss.acct.loginCommand(&m.Command))
		}
		return ss.start(command{argv: []string{"/bin/sh", "-c", m.Command}})
	case "shell":
		if ss.acct != nil {
			return ss.start(ss.acct.loginCommand(nil))
		}
		shell := "/bin/sh"
		if fi, err := os.Stat("/bin/bash"); err == nil && fi.Mode().IsRegular() {
			shell = "/bin/bash"
		}
		return ss.start(command{argv: []string{shell, "-l"}})
	case "subsystem":
		var m subsystemMsg
		if ss.acct == nil || ssh.Unmarshal(req.Payload, &m) != nil || m.Name != "sftp" {
			return false, nil
		}
		return ss.start(command{path: ss.sftpServer[0], argv: ss.sftpServer})
	case "auth-agent-req@openssh.com":
		return ss.forwardAgent() == nil, nil
	case agentproto.ReqExecArgv:
		if ss.acct != nil {
			return false, nil // the built-in SSH server's users get standard SSH only
		}
		var m agentproto.ExecRequest
		if err := agentproto.UnmarshalPayload(req.Payload, &m); err != nil {
			ss.log.Warn("bad exec request", "err", err)
			return false, nil
		}
		if len(m.Argv) == 0 || m.Argv[0] == "" {
			ss.log.Warn("exec request without argv")
			return false, nil
		}
		for _, kv := range m.Env {
			if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
				ss.log.Warn("exec request with malformed env entry", "entry", kv)
				return false, nil
			}
		}
		if m.Data != nil {
			if err := m.Data.Validate(agentproto.MaxDataPorts); err != nil {
				ss.log.Warn("bad exec request", "err", err)
				return false, nil
			}
			ss.mu.Lock()
			pty := ss.ptySet
			ss.mu.Unlock()
			if pty {
				ss.log.Warn("exec request with a data port and a terminal")
				return false, nil
			}
		}
		c := command{argv: m.Argv, env: m.Env, dir: m.Dir, data: m.Data}
		user := m.User
		if d := ss.execDefaults; d != nil {
			// The image's configuration: explicit values win, the
			// request's env is added to the image's.
			c.env = append(append([]string(nil), d.Env...), m.Env...)
			if c.dir == "" {
				c.dir = d.Dir
			}
			if user == "" {
				user = d.User
			}
		}
		if user != "" && user != "root" {
			u, err := resolveUser("/etc", user)
			if err != nil {
				c.startErr = err
			} else {
				c.user = &u
			}
		}
		return ss.start(c)
	case agentproto.ReqAttach:
		if ss.acct != nil || ss.main == nil {
			return false, nil
		}
		var m agentproto.AttachRequest
		if err := agentproto.UnmarshalPayload(req.Payload, &m); err != nil {
			ss.log.Warn("bad attach request", "err", err)
			return false, nil
		}
		ss.mu.Lock()
		defer ss.mu.Unlock()
		if ss.started {
			return false, nil
		}
		ss.started = true
		var from int64
		if m.NoReplay {
			from = ss.main.log.end()
		}
		ctx, cancel := context.WithCancel(context.Background())
		ss.attachCancel = cancel
		return true, func() {
			go func() {
				defer close(ss.done)
				ss.main.attach(ctx, ss.ch, from)
			}()
		}
	default:
		return false, nil
	}
}

func (ss *session) allocPTY(m agentproto.PtyReqMsg) error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.started || ss.ptySet {
		return errors.New("pty already allocated or command started")
	}
	ss.ptySet = true
	ptmx, tty, err := ss.openPTY()
	if err != nil {
		ss.ptyErr = explainPTYError(err, "/dev/pts")
		ss.log.Warn("allocate pty", "err", ss.ptyErr)
		return nil
	}
	ss.ptmx, ss.tty, ss.ptySet = ptmx, tty, true
	if ss.acct != nil {
		// The user's terminal is theirs, as login and sshd make it.
		if err := errors.Join(tty.Chown(int(ss.acct.uid), int(ss.acct.ttyGID)), tty.Chmod(0o620)); err != nil {
			ss.log.Warn("give the terminal to the user", "err", err)
		}
	}
	ss.term = m.Term
	ss.rows, ss.cols = clampSize(m.Rows), clampSize(m.Columns)
	if ss.rows == 0 || ss.cols == 0 {
		ss.rows, ss.cols = 24, 80
	}
	if err := pty.Setsize(ptmx, &pty.Winsize{Rows: ss.rows, Cols: ss.cols}); err != nil {
		ss.log.Warn("set pty size", "err", err)
	}
	return nil
}

func clampSize(v uint32) uint16 {
	if v > 0xffff {
		return 0xffff
	}
	return uint16(v)
}

func (ss *session) resize(rows, cols uint32) bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.ptmx == nil || rows == 0 || cols == 0 {
		return false
	}
	ss.rows, ss.cols = clampSize(rows), clampSize(cols)
	// Setting the size on the master raises SIGWINCH in the foreground
	// process group of the terminal.
	if err := pty.Setsize(ss.ptmx, &pty.Winsize{Rows: ss.rows, Cols: ss.cols}); err != nil {
		ss.log.Debug("resize pty", "err", err)
		return false
	}
	return true
}

func (ss *session) signal(name string) bool {
	sig := unix.SignalNum("SIG" + name)
	if sig == 0 {
		return false
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.proc == nil || ss.exited {
		return false
	}
	return unix.Kill(-ss.proc.Pid, sig) == nil
}

func (ss *session) closePTY() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.tty != nil {
		ss.tty.Close()
		ss.tty = nil
	}
	if ss.ptmx != nil {
		ss.ptmx.Close()
	}
}

// environ builds the command's environment: defaults, TERM from pty-req,
// env requests, then the command's own entries (later entries win).
func (ss *session) environ(c command) []string {
	home, user := "/root", "root"
	if ss.acct != nil {
		home, user = ss.acct.home, ss.acct.name
	} else if c.user != nil {
		home, user = c.user.home, c.user.name
		if user == "" {
			user = strconv.FormatUint(uint64(c.user.uid), 10)
		}
	}
	env := []string{
		"PATH=" + defaultPath,
		"HOME=" + home,
		"USER=" + user,
		"LOGNAME=" + user,
		"LANG=C.UTF-8",
	}
	if ss.acct != nil {
		env = append(env, "SHELL="+ss.acct.shell)
	}
	if ss.term != "" {
		env = append(env, "TERM="+ss.term)
	}
	env = append(env, ss.env...)
	env = append(env, c.env...)
	return env
}

// start marks the session started and returns the function launching c in
// a goroutine; it reports false when a command was already started.
func (ss *session) start(c command) (bool, func()) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.started {
		return false, nil
	}
	ss.started = true
	return true, func() {
		go func() {
			defer close(ss.done)
			ss.run(c)
		}()
	}
}

// run runs the command, forwards its I/O, reports its exit and closes the
// channel.
func (ss *session) run(c command) {
	defer ss.ch.Close()
	defer ss.closePTY()

	env := ss.environ(c)
	dir := c.dir
	if dir == "" {
		dir = "/root"
		if ss.acct != nil {
			dir = ss.acct.home
		} else if c.user != nil {
			dir = c.user.home
		}
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			dir = "/"
		}
	}
	errOut := io.Writer(ss.ch.Stderr())
	if ss.ptmx != nil {
		errOut = ss.ch
	}
	if c.data != nil {
		dc, err := ss.dataPorts.acquire(ss.ctx, c.data)
		if err != nil {
			// Nothing was started; the message goes on the channel.
			ss.failStart(errOut, c.argv[0], &dataPortError{err})
			return
		}
		ss.dc = dc
		dc.onFail = ss.killCommand
		// The channel closed: the host is gone, free the port.
		stop := context.AfterFunc(ss.ctx, dc.Close)
		defer stop()
		defer dc.Close()
		errOut = dc.w.Writer(agentproto.DataFrameStderr, 4096)
	}
	if ss.ptyErr != nil {
		ss.failStart(errOut, c.argv[0], ss.ptyErr)
		return
	}
	if c.startErr != nil {
		ss.failStart(errOut, c.argv[0], c.startErr)
		return
	}
	// The child's chdir error would look like a missing program: check
	// the directory first.
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		if err == nil {
			err = syscall.ENOTDIR
		} else {
			err = errors.Unwrap(err)
		}
		ss.failStart(errOut, c.argv[0], &fs.PathError{Op: "chdir", Path: dir, Err: err})
		return
	}
	path := c.path
	var err error
	if path == "" {
		if path, err = lookPath(c.argv[0], envValue(env, "PATH")); err != nil {
			ss.failStart(errOut, c.argv[0], err)
			return
		}
	}
	cmd := &exec.Cmd{Path: path, Args: c.argv, Env: env, Dir: dir}

	var (
		copies   sync.WaitGroup
		outputs  []*os.File // read ends of stdout and stderr
		stdinW   *os.File
		childEnd []*os.File // closed in the parent after start
	)
	if ss.ptmx != nil {
		cmd.Stdin, cmd.Stdout, cmd.Stderr = ss.tty, ss.tty, ss.tty
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
		childEnd = append(childEnd, ss.tty)
	} else {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		inR, inW, err := os.Pipe()
		if err != nil {
			ss.failStart(errOut, c.argv[0], err)
			return
		}
		outR, outW, err := os.Pipe()
		if err != nil {
			closeAll(inR, inW)
			ss.failStart(errOut, c.argv[0], err)
			return
		}
		errR, errW, err := os.Pipe()
		if err != nil {
			closeAll(inR, inW, outR, outW)
			ss.failStart(errOut, c.argv[0], err)
			return
		}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errW
		childEnd = append(childEnd, inR, outW, errW)
		outputs = append(outputs, outR, errR)
		stdinW = inW
	}
	if ss.acct != nil {
		cmd.SysProcAttr.Credential = ss.acct.credential()
	} else if c.user != nil {
		cmd.SysProcAttr.Credential = c.user.credential()
		if ss.tty != nil {
			// The user's terminal is theirs.
			if err := ss.tty.Chown(int(c.user.uid), int(c.user.gid)); err != nil {
				ss.log.Warn("give the terminal to the user", "err", err)
			}
		}
	}

	ss.mu.Lock()
	err = cmd.Start()
	if err == nil {
		ss.proc = cmd.Process
	}
	ss.mu.Unlock()
	closeAll(childEnd...)
	if ss.ptmx != nil {
		ss.mu.Lock()
		ss.tty = nil
		ss.mu.Unlock()
	}
	if err != nil {
		closeAll(outputs...)
		if stdinW != nil {
			stdinW.Close()
		}
		ss.failStart(errOut, c.argv[0], err)
		return
	}
	dataPort := -1 // the streams' path: -1 over SSH, else the data port
	if ss.dc != nil {
		dataPort = ss.dc.port
	}
	ss.log.Debug("command started", "argv", c.argv, "pid", cmd.Process.Pid, "pty", ss.ptmx != nil, "data_port", dataPort)

	if ss.ptmx != nil {
		ptmx := ss.ptmx
		// Client EOF is ignored with a PTY (as sshd does): the terminal
		// stays open until the command exits.
		go io.Copy(ptmx, ss.ch)
		// Reading the master fails with EIO once every slave end is
		// closed: that is the terminal's end of file.
		copies.Go(func() { io.Copy(ss.ch, ptmx) })
	} else if dc := ss.dc; dc != nil {
		growPipe(stdinW)
		go dc.feedStdin(stdinW, ss.log)
		outR, errR := outputs[0], outputs[1]
		growPipe(outR)
		copies.Go(func() { pumpPipe(dc.w, agentproto.DataFrameData, outR) })
		copies.Go(func() { pumpPipe(dc.w, agentproto.DataFrameStderr, errR) })
	} else {
		go func() {
			io.Copy(stdinW, ss.ch)
			stdinW.Close() // client EOF: the command's stdin ends
		}()
		outR, errR := outputs[0], outputs[1]
		copies.Go(func() { io.Copy(ss.ch, outR) })
		copies.Go(func() { io.Copy(ss.ch.Stderr(), errR) })
	}

	waitErr := cmd.Wait()
	ss.mu.Lock()
	ss.exited = true
	ss.mu.Unlock()
	if stdinW != nil {
		stdinW.Close()
	}

	// Forward what is left of the output; give up after outputGrace when a
	// background process keeps the pipes (or the terminal) open.
	copied := make(chan struct{})
	go func() { copies.Wait(); close(copied) }()
	select {
	case <-copied:
	case <-time.After(outputGrace):
		closeAll(outputs...)
		if ss.ptmx != nil {
			ss.ptmx.Close()
		}
		<-copied
	}
	// Without readers, processes still writing get EPIPE instead of
	// blocking on a full pipe.
	closeAll(outputs...)
	ss.endData()
	ss.ch.CloseWrite()
	ss.sendExit(cmd.ProcessState, waitErr)
}

func (ss *session) sendExit(ps *os.ProcessState, waitErr error) {
	if ps == nil {
		ss.log.Warn("command wait", "err", waitErr)
		ss.ch.SendRequest("exit-status", false, ssh.Marshal(agentproto.ExitStatusMsg{Status: 255}))
		return
	}
	ws, _ := ps.Sys().(syscall.WaitStatus)
	if ws.Signaled() {
		name := strings.TrimPrefix(unix.SignalName(ws.Signal()), "SIG")
		if name != "" {
			ss.ch.SendRequest("exit-signal", false, ssh.Marshal(agentproto.ExitSignalMsg{
				Signal:     name,
				CoreDumped: ws.CoreDump(),
			}))
			return
		}
		ss.ch.SendRequest("exit-status", false, ssh.Marshal(agentproto.ExitStatusMsg{Status: 128 + uint32(ws.Signal())}))
		return
	}
	ss.ch.SendRequest("exit-status", false, ssh.Marshal(agentproto.ExitStatusMsg{Status: uint32(ps.ExitCode())}))
}

// failStart reports a command that could not be started the way a shell
// does: a message on stderr and status 127 (not found) or 126.
func (ss *session) failStart(stderr io.Writer, name string, err error) {
	status := uint32(126)
	var msg string
	var pe *fs.PathError
	var pte *ptyError
	var dpe *dataPortError
	switch {
	case errors.As(err, &dpe):
		status = 255
		msg = fmt.Sprintf("banger-agent: %v\n", dpe)
	case errors.As(err, &pte):
		msg = fmt.Sprintf("banger-agent: %v\n", pte)
	case errors.As(err, &pe) && pe.Op == "chdir":
		status = 127
		msg = fmt.Sprintf("banger-agent: chdir %s: %v\n", pe.Path, pe.Err)
	case errors.Is(err, exec.ErrNotFound), errors.Is(err, fs.ErrNotExist):
		status = 127
		msg = fmt.Sprintf("banger-agent: exec %s: no such file\n", name)
	case errors.Is(err, fs.ErrPermission):
		msg = fmt.Sprintf("banger-agent: exec %s: permission denied\n", name)
	default:
		msg = fmt.Sprintf("banger-agent: exec %s: %v\n", name, err)
	}
	ss.log.Debug("command start failed", "argv0", name, "err", err)
	io.WriteString(stderr, msg)
	ss.endData()
	ss.ch.CloseWrite()
	ss.ch.SendRequest("exit-status", false, ssh.Marshal(agentproto.ExitStatusMsg{Status: status}))
}

// lookPath resolves name like execvp with the command's PATH (not the
// agent's own environment). Names with a slash are used as they are.
func lookPath(name, path string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			continue // no implicit current directory
		}
		p := filepath.Join(dir, name)
		fi, err := os.Stat(p)
		if err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("look up %s: %w", name, exec.ErrNotFound)
}

// envValue returns the last value of key in env.
func envValue(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, ok := strings.Cut(env[i], "="); ok && k == key {
			return v
		}
	}
	return ""
}

func closeAll(files ...*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}

// endData ends the command's data port transfer, if any: the End frame,
// then the port closed, before the exit status goes on the channel.
func (ss *session) endData() {
	if ss.dc == nil {
		return
	}
	if err := ss.dc.w.End(); err != nil && !ss.dc.isClosed() {
		ss.log.Debug("end of the data stream", "port", ss.dc.port, "err", err)
	}
	ss.dc.Close()
}

// killCommand kills the command's process group (a broken data stream).
func (ss *session) killCommand() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.proc != nil && !ss.exited {
		unix.Kill(-ss.proc.Pid, unix.SIGKILL)
	}
}

// dataPortError is a data port that could not be set up for a command.
type dataPortError struct{ err error }

func (e *dataPortError) Error() string { return e.err.Error() }
func (e *dataPortError) Unwrap() error { return e.err }

// ptyError is a terminal that could not be allocated.
type ptyError struct{ err error }

func (e *ptyError) Error() string { return e.err.Error() }
func (e *ptyError) Unwrap() error { return e.err }

// explainPTYError says why a terminal could not be allocated; most often
// the guest is still early in its boot and devpts is not mounted on
// ptsDir yet.
func explainPTYError(err error, ptsDir string) error {
	var fs unix.Statfs_t
	if serr := unix.Statfs(ptsDir, &fs); serr != nil || fs.Type != unix.DEVPTS_SUPER_MAGIC {
		return &ptyError{fmt.Errorf("cannot allocate a terminal: %s is not mounted yet (the guest is still booting; try again in a moment): %w", ptsDir, err)}
	}
	return &ptyError{fmt.Errorf("cannot allocate a terminal: %w", err)}
}
