package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
)

// WindowSize is a terminal size in character cells.
type WindowSize struct {
	Rows, Cols int
}

// ExecOptions describes a command to run in the guest.
type ExecOptions struct {
	// Argv is the program and its arguments, run without a shell; the
	// program is looked up in the guest's PATH. Empty means the guest's
	// login shell (an SSH "shell" request; Dir is then ignored).
	Argv []string
	// Env entries (KEY=VALUE) are added to the agent's default
	// environment (PATH, HOME=/root, USER=root, LANG=C.UTF-8, TERM).
	Env []string
	// Dir is the working directory (default /root, or / without it).
	Dir string
	// User runs the command as this guest user (a name or a uid,
	// optionally ":group"; agent protocol 1.4). Empty: the image's user
	// (agentproto.ExecDefaults), else root.
	User string
	// Stdin feeds the command's standard input; its EOF (or a read
	// error) closes it. When nil, the command's stdin is empty. Exec does
	// not wait for a Read that is still blocked when the command ends.
	Stdin io.Reader
	// Stdout and Stderr receive the command's output (discarded when nil).
	// With TTY, both streams arrive merged on Stdout.
	Stdout, Stderr io.Writer
	// TTY runs the command on a pseudo-terminal of Rows x Cols (default
	// 24x80) with TERM=Term (default "xterm-256color").
	TTY        bool
	Term       string
	Rows, Cols int
	// Resize, when not nil (and TTY is set), delivers terminal size
	// changes until the command ends.
	Resize <-chan WindowSize
}

// ttyOpEnd terminates the (empty) encoded terminal modes of a pty-req.
const ttyOpEnd = "\x00"

// Exec runs a command in the guest and waits for it to end. It returns the
// command's exit status; a command killed by signal N gives 128+N. An
// unknown program gives 127 (with a message on Stderr). When ctx ends the
// command's process group gets SIGKILL, the channel is closed and Exec
// returns ctx's error. err is also set when writing to Stdout or Stderr
// failed (the output is then drained and dropped) or the connection died.
func (c *Client) Exec(ctx context.Context, opts ExecOptions) (int, error) {
	name := "shell"
	if len(opts.Argv) > 0 {
		if opts.Argv[0] == "" {
			return -1, errors.New("exec: empty program name")
		}
		name = opts.Argv[0]
	}
	if err := ctx.Err(); err != nil {
		return -1, fmt.Errorf("exec %s: %w", name, err)
	}
	if len(opts.Argv) > 0 && !opts.TTY {
		if d := c.openData(ctx, "exec "+name); d != nil {
			code, err := c.execData(ctx, name, opts, d)
			var se *dataSetupError
			if !errors.As(err, &se) {
				return code, err
			}
			// Nothing ran and no input was read: once more, over SSH.
			c.log.Warn("exec "+name+" over SSH: the guest could not set up its data port",
				"port", se.port, "reason", se.reason)
		}
	}
	ch, reqs, err := c.ssh.OpenChannel("session", nil)
	if err != nil {
		return -1, fmt.Errorf("exec %s: open session: %w", name, err)
	}
	defer ch.Close()

	exitc := make(chan exitResult, 1)
	go func() { exitc <- collectExit(reqs) }()

	stop := context.AfterFunc(ctx, func() {
		ch.SendRequest("signal", false, ssh.Marshal(agentproto.SignalMsg{Signal: "KILL"}))
		ch.Close()
	})
	defer stop()
	ctxErr := func() (int, error) {
		return -1, fmt.Errorf("exec %s: %w", name, ctx.Err())
	}

	if opts.TTY {
		term, rows, cols := opts.Term, opts.Rows, opts.Cols
		if term == "" {
			term = "xterm-256color"
		}
		if rows <= 0 || cols <= 0 {
			rows, cols = 24, 80
		}
		ok, err := ch.SendRequest("pty-req", true, ssh.Marshal(agentproto.PtyReqMsg{
			Term: term, Columns: uint32(cols), Rows: uint32(rows), Modes: ttyOpEnd,
		}))
		if ctx.Err() != nil {
			return ctxErr()
		}
		if err != nil {
			return -1, fmt.Errorf("exec %s: request pty: %w: %w", name, ErrConnectionLost, err)
		}
		if !ok {
			return -1, fmt.Errorf("exec %s: request pty: %w", name, ErrRefused)
		}
	}
	var ok bool
	if len(opts.Argv) == 0 {
		ok, err = c.requestShell(ch, opts.Env)
	} else {
		var payload []byte
		payload, err = agentproto.MarshalPayload(agentproto.ExecRequest{Argv: opts.Argv, Env: opts.Env, Dir: opts.Dir, User: opts.User})
		if err != nil {
			return -1, fmt.Errorf("exec %s: %w", name, err)
		}
		ok, err = ch.SendRequest(agentproto.ReqExecArgv, true, payload)
	}
	if ctx.Err() != nil {
		return ctxErr()
	}
	if err != nil {
		return -1, fmt.Errorf("exec %s: %w: %w", name, ErrConnectionLost, err)
	}
	if !ok {
		return -1, fmt.Errorf("exec %s: %w", name, ErrRefused)
	}

	resc := drainSession(ch, opts.Stdout, opts.Stderr, exitc)
	if opts.Stdin != nil {
		go func() {
			io.Copy(ch, opts.Stdin)
			ch.CloseWrite()
		}()
	} else {
		ch.CloseWrite()
	}
	finished := make(chan struct{})
	defer close(finished)
	if opts.TTY && opts.Resize != nil {
		go forwardResizes(ch, opts.Resize, finished)
	}

	// When ctx ends, the kill and close were sent by the AfterFunc;
	// waitSession gives the agent a moment to confirm, so the command is
	// gone when Exec returns.
	res, cancelled := waitSession(ctx, resc)
	if cancelled {
		return ctxErr()
	}
	if !res.ok {
		if ctx.Err() != nil {
			return ctxErr()
		}
		return -1, fmt.Errorf("exec %s: no exit status: %w", name, ErrConnectionLost)
	}
	if res.outErr != nil {
		return res.code, fmt.Errorf("exec %s: %w", name, res.outErr)
	}
	return res.code, nil
}

// execData is Exec of a command without a terminal whose stdin, stdout
// and stderr travel on data port d.
func (c *Client) execData(ctx context.Context, name string, opts ExecOptions, d *dataConn) (int, error) {
	defer d.abort()
	ch, reqs, err := c.ssh.OpenChannel("session", nil)
	if err != nil {
		d.drop()
		return -1, fmt.Errorf("exec %s: open session: %w", name, err)
	}
	defer ch.Close()
	exitc := make(chan exitResult, 1)
	chClosed := make(chan struct{})
	go func() {
		exitc <- collectExit(reqs)
		close(chClosed)
	}()
	d.releaseAfter(chClosed)
	// The session carries no data: what the guest sends on its stdout is
	// dropped. Its stderr carries only the reason the guest could not set
	// up the port (then nothing ran): kept, up to setupReasonMax bytes.
	go io.Copy(io.Discard, ch)
	reason := &headBuffer{max: setupReasonMax}
	reasonDone := make(chan struct{})
	go func() {
		io.Copy(reason, ch.Stderr())
		close(reasonDone)
	}()
	ch.CloseWrite()

	kill := func() {
		ch.SendRequest("signal", false, ssh.Marshal(agentproto.SignalMsg{Signal: "KILL"}))
		ch.Close()
		d.abort()
	}
	stop := context.AfterFunc(ctx, kill)
	defer stop()
	ctxErr := func() (int, error) {
		return -1, fmt.Errorf("exec %s: %w", name, ctx.Err())
	}

	payload, err := agentproto.MarshalPayload(agentproto.ExecRequest{Argv: opts.Argv, Env: opts.Env, Dir: opts.Dir, User: opts.User, Data: d.stream()})
	if err != nil {
		return -1, fmt.Errorf("exec %s: %w", name, err)
	}
	ok, err := ch.SendRequest(agentproto.ReqExecArgv, true, payload)
	if ctx.Err() != nil {
		return ctxErr()
	}
	if err != nil {
		return -1, fmt.Errorf("exec %s: %w: %w", name, ErrConnectionLost, err)
	}
	if !ok {
		return -1, fmt.Errorf("exec %s: %w", name, ErrRefused)
	}

	// One goroutine reads the port: the answer, then the output frames
	// until the guest's End. stdin is sent once the answer is checked.
	stdout := &stickyWriter{w: orDiscard(opts.Stdout)}
	stderr := &stickyWriter{w: orDiscard(opts.Stderr)}
	// acked goes from ackWaiting to ackReceived when the guest answered
	// (then stdin is read), or to ackGivenUp when the guest reported that
	// it could not set up the port (then the exec is retried over SSH
	// and stdin must stay unread).
	var acked atomic.Int32
	readc := make(chan error, 1)
	go func() {
		err := d.readAck()
		if err == nil && !acked.CompareAndSwap(ackWaiting, ackReceived) {
			err = fmt.Errorf("%w: data port %d: an answer after the guest's failure", ErrDataStream, d.port)
		}
		if err == nil {
			go func() {
				// A stdin that fails to read ends the command's stdin
				// too, as over SSH.
				if d.send(opts.Stdin) != nil {
					d.w.End()
				}
			}()
			err = d.frames(true, true, func(kind byte, p []byte) {
				if kind == agentproto.DataFrameStderr {
					stderr.Write(p)
				} else {
					stdout.Write(p)
				}
			})
		}
		readc <- err
	}()

	var (
		res          exitResult
		exited, read bool
		readErr      error
		graceC       <-chan time.Time
	)
	for !exited || !read {
		select {
		case res = <-exitc:
			exited = true
			d.channelClosed()
			if setupFailed(res, acked.Load(), reason, reasonDone) && acked.CompareAndSwap(ackWaiting, ackGivenUp) {
				// No answer will come: don't wait dataDrainGrace for it.
				d.abort()
			}
		case readErr = <-readc:
			read = true
			if readErr != nil && ctx.Err() == nil && !exited {
				// The guest broke the port's protocol: the command is
				// killed; give the agent a moment to confirm.
				kill()
				t := time.NewTimer(cancelGrace)
				defer t.Stop()
				graceC = t.C
			}
		case <-ctx.Done():
			// The AfterFunc killed the command and closed the channel:
			// give the agent a moment to confirm, so the command is
			// gone when Exec returns.
			if !exited {
				t := time.NewTimer(cancelGrace)
				defer t.Stop()
				select {
				case <-exitc:
				case <-t.C:
				}
			}
			return ctxErr()
		case <-graceC:
			exited = true
		}
	}
	if ctx.Err() != nil {
		return ctxErr()
	}
	// The reader is done: acked no longer changes.
	if setupFailed(res, acked.Load(), reason, reasonDone) {
		return res.code, &dataSetupError{port: d.port, reason: strings.TrimSpace(reason.String())}
	}
	if readErr != nil {
		return -1, fmt.Errorf("exec %s: %w", name, readErr)
	}
	if !res.ok {
		return -1, fmt.Errorf("exec %s: no exit status: %w", name, ErrConnectionLost)
	}
	if stdout.err != nil {
		return res.code, fmt.Errorf("exec %s: write stdout: %w", name, stdout.err)
	}
	if stderr.err != nil {
		return res.code, fmt.Errorf("exec %s: write stderr: %w", name, stderr.err)
	}
	return res.code, nil
}

// The states of a data exec's answer (execData's acked).
const (
	ackWaiting int32 = iota
	ackReceived
	ackGivenUp
)

// setupReasonMax bounds the guest's message kept from a data exec's
// session stderr.
const setupReasonMax = 4 << 10

// dataSetupError: the guest could not set up the data port of an exec
// (a port it doesn't have, busy, no preamble): it reported why on the
// session's stderr with exit status 255 and started nothing.
type dataSetupError struct {
	port   int
	reason string
}

func (e *dataSetupError) Error() string {
	return fmt.Sprintf("data port %d: the guest could not set it up: %s", e.port, e.reason)
}

// setupFailed reports whether a data exec's session ended the way the
// guest ends a request whose data port it could not set up: no answer on
// the port, a message on the session's stderr (the guest writes there
// only then) and exit status 255. It waits for that stderr's end (the
// channel has closed, it has come).
func setupFailed(res exitResult, acked int32, reason *headBuffer, reasonDone <-chan struct{}) bool {
	if !res.ok || res.code != 255 || acked == ackReceived {
		return false
	}
	<-reasonDone
	return reason.Len() > 0
}

// headBuffer keeps the first max bytes written to it and drops the rest.
type headBuffer struct {
	bytes.Buffer
	max int
}

func (h *headBuffer) Write(p []byte) (int, error) {
	if room := h.max - h.Len(); room > 0 {
		h.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func orDiscard(w io.Writer) io.Writer {
	if w == nil {
		return io.Discard
	}
	return w
}

// sessionEnd is how a session channel ended: its exit status and the
// first error writing its output.
type sessionEnd struct {
	exitResult
	outErr error
}

// drainSession copies a session channel's stdout and stderr to the writers
// (discarded when nil) and returns a channel that receives the exit status
// from exitc once both are drained, with the first write error.
func drainSession(ch ssh.Channel, stdout, stderr io.Writer, exitc <-chan exitResult) <-chan sessionEnd {
	var (
		output sync.WaitGroup
		errMu  sync.Mutex
		outErr error
	)
	setErr := func(err error) {
		errMu.Lock()
		if outErr == nil {
			outErr = err
		}
		errMu.Unlock()
	}
	output.Go(func() {
		if err := drainTo(stdout, ch); err != nil {
			setErr(fmt.Errorf("write stdout: %w", err))
		}
	})
	output.Go(func() {
		if err := drainTo(stderr, ch.Stderr()); err != nil {
			setErr(fmt.Errorf("write stderr: %w", err))
		}
	})
	resc := make(chan sessionEnd, 1)
	go func() {
		output.Wait()
		res := <-exitc
		resc <- sessionEnd{exitResult: res, outErr: outErr}
	}()
	return resc
}

// waitSession waits for the session's end. When ctx ends first it waits
// up to cancelGrace more and reports cancelled, with the end if it came
// meanwhile (else the zero sessionEnd).
func waitSession(ctx context.Context, resc <-chan sessionEnd) (res sessionEnd, cancelled bool) {
	select {
	case res = <-resc:
		return res, false
	case <-ctx.Done():
	}
	t := time.NewTimer(cancelGrace)
	defer t.Stop()
	select {
	case res = <-resc:
	case <-t.C:
	}
	return res, true
}

type exitResult struct {
	code int
	ok   bool
}

// collectExit reads the channel requests until the channel closes and
// returns the exit status reported by exit-status or exit-signal.
func collectExit(reqs <-chan *ssh.Request) exitResult {
	var res exitResult
	for req := range reqs {
		switch req.Type {
		case "exit-status":
			var m agentproto.ExitStatusMsg
			if err := ssh.Unmarshal(req.Payload, &m); err == nil {
				res = exitResult{code: int(m.Status), ok: true}
			}
		case "exit-signal":
			var m agentproto.ExitSignalMsg
			if err := ssh.Unmarshal(req.Payload, &m); err == nil {
				code := 255
				if sig := unix.SignalNum("SIG" + m.Signal); sig != 0 {
					code = 128 + int(sig)
				}
				res = exitResult{code: code, ok: true}
			}
		}
		if req.WantReply {
			req.Reply(false, nil)
		}
	}
	return res
}

// drainTo copies r to w (io.Discard when nil) and returns the first write
// error. After a write error it keeps reading r and drops the data, so the
// remote side is not blocked by flow control.
func drainTo(w io.Writer, r io.Reader) error {
	if w == nil {
		w = io.Discard
	}
	sw := &stickyWriter{w: w}
	io.Copy(sw, r)
	return sw.err
}

// stickyWriter records the first error of w and discards writes after it.
type stickyWriter struct {
	w   io.Writer
	err error
}

func (s *stickyWriter) Write(p []byte) (int, error) {
	if s.err != nil {
		return len(p), nil
	}
	n, err := s.w.Write(p)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		s.err = err
	}
	return len(p), nil
}

func forwardResizes(ch ssh.Channel, resize <-chan WindowSize, finished <-chan struct{}) {
	for {
		select {
		case <-finished:
			return
		case ws, ok := <-resize:
			if !ok {
				return
			}
			if ws.Rows <= 0 || ws.Cols <= 0 {
				continue
			}
			ch.SendRequest("window-change", false, ssh.Marshal(agentproto.WindowChangeMsg{
				Columns: uint32(ws.Cols), Rows: uint32(ws.Rows),
			}))
		}
	}
}

// requestShell starts the guest's login shell on ch: one standard "env"
// request per variable, then "shell".
func (c *Client) requestShell(ch ssh.Channel, env []string) (bool, error) {
	for _, kv := range env {
		k, v, found := strings.Cut(kv, "=")
		if !found || k == "" {
			return false, fmt.Errorf("env %q: want KEY=VALUE", kv)
		}
		ok, err := ch.SendRequest("env", true, ssh.Marshal(struct{ Name, Value string }{k, v}))
		if err != nil || !ok {
			return ok, err
		}
	}
	return ch.SendRequest("shell", true, nil)
}
