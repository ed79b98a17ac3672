package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/store"
)

// frameWriter sends everything written to it as stream data of one frame
// type (api.FrameStdout or api.FrameStderr): raw in a binary call, no
// copy, no encoding (rpc.Call.SendData).
type frameWriter struct {
	call *rpc.Call
	typ  string
}

func (w frameWriter) Write(p []byte) (int, error) {
	if err := w.call.SendData(rpc.KindOf(w.typ), p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// pumpInput feeds the client's stdin frames into a pipe and its resize
// frames into a channel, until the client's frames end (the RPC server ends
// them when the call returns). The handler must call stop when it is done
// with the input: stop closes the pipe's read end, so a pump blocked writing
// input that nobody will read (the command ended before reading it all:
// "yes | banger vm exec x -- head -1") returns and drains the remaining
// frames, and a reader still waiting for input gets an error.
func pumpInput(call *rpc.Call) (io.Reader, <-chan agent.WindowSize, func()) {
	pr, pw := io.Pipe()
	resize := make(chan agent.WindowSize, 4)
	go func() {
		defer pw.Close()
		open := true
		for f := range call.Frames() {
			switch f.Type {
			case api.FrameStdin:
				if open {
					if _, err := pw.Write(f.Data); err != nil {
						open = false
					}
				}
				// The pipe's reader has copied it all out.
				call.Release(f)
			case api.FrameEOF:
				if open {
					pw.Close()
					open = false
				}
			case api.FrameResize:
				select {
				case resize <- agent.WindowSize{Rows: f.Rows, Cols: f.Cols}:
				default:
				}
			}
		}
	}()
	return pr, resize, func() { pr.CloseWithError(errInputDone) }
}

// errInputDone is what a reader of a call's input gets once the call is
// done with it.
var errInputDone = errors.New("the call no longer reads its input")

func (d *Daemon) vmExec(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.VMExecParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	if len(p.Argv) == 0 && !p.TTY {
		return nil, fmt.Errorf("no command given: %w", errdefs.ErrInvalid)
	}
	v, err := d.store.GetVM(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	// An auto-remove VM goes when its command ends, however the call ends.
	defer d.attach(v)(true)
	c, _, err := d.agentFor(ctx, v)
	if err != nil {
		return nil, err
	}
	stdin, resize, stop := pumpInput(call)
	defer stop()
	code, err := c.Exec(ctx, agent.ExecOptions{
		Argv: p.Argv, Env: p.Env, Dir: p.Dir,
		Stdin: stdin, Stdout: frameWriter{call, api.FrameStdout}, Stderr: frameWriter{call, api.FrameStderr},
		TTY: p.TTY, Term: p.Term, Rows: p.Rows, Cols: p.Cols, Resize: resize,
	})
	if err != nil {
		return nil, fmt.Errorf("exec in vm %q: %w", v.Name, err)
	}
	return api.ExecResult{ExitCode: code}, nil
}

// copyTarget decodes a copy call and returns its parameters, VM and agent.
func (d *Daemon) copyTarget(ctx context.Context, call *rpc.Call) (api.VMCopyParams, store.VM, *agent.Client, error) {
	var p api.VMCopyParams
	if err := call.Decode(&p); err != nil {
		return p, store.VM{}, nil, err
	}
	if !filepath.IsAbs(p.Path) {
		return p, store.VM{}, nil, fmt.Errorf("guest path %s must be absolute: %w", errdefs.Quote(p.Path), errdefs.ErrInvalid)
	}
	v, err := d.store.GetVM(ctx, p.Name)
	if err != nil {
		return p, v, nil, err
	}
	c, _, err := d.agentFor(ctx, v)
	return p, v, c, err
}

func (d *Daemon) vmCopyIn(ctx context.Context, call *rpc.Call) (any, error) {
	p, v, c, err := d.copyTarget(ctx, call)
	if err != nil {
		return nil, err
	}
	stdin, _, stop := pumpInput(call)
	defer stop()
	if err := c.CopyIn(ctx, stdin, p.Path, agent.CopyOptions{Archive: p.Archive}); err != nil {
		return nil, fmt.Errorf("copy into vm %q: %w", v.Name, err)
	}
	return nil, nil
}

// vmCopyOut relays the guest's tar stream to the client, which extracts
// it as the invoking user. The agent client passes on no more than the
// size the guest announced; that size goes to the client first, as a
// progress frame (phase "copy", Total in bytes), for its progress bar.
func (d *Daemon) vmCopyOut(ctx context.Context, call *rpc.Call) (any, error) {
	p, v, c, err := d.copyTarget(ctx, call)
	if err != nil {
		return nil, err
	}
	announce := func(size, _ int64) { call.Progress(api.Progress{Phase: "copy", Total: size, Unit: "bytes"}) }
	err = c.CopyOutWith(ctx, p.Path, frameWriter{call, api.FrameStdout}, agent.CopyOutOptions{OnHeader: announce})
	if err != nil {
		return nil, fmt.Errorf("copy from vm %q: %w", v.Name, err)
	}
	return nil, nil
}

// vmLogs streams the serial console log; with Follow it keeps streaming
// until the client goes away or the VM stops.
func (d *Daemon) vmLogs(ctx context.Context, call *rpc.Call) (any, error) {
	var p api.VMLogsParams
	if err := call.Decode(&p); err != nil {
		return nil, err
	}
	v, err := d.store.GetVM(ctx, p.Name)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(v.Dir, fileConsole)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		if !p.Follow {
			return nil, nil
		}
		// Not booted yet: wait for the file.
		for errors.Is(err, os.ErrNotExist) {
			select {
			case <-ctx.Done():
				return nil, nil
			case <-time.After(200 * time.Millisecond):
			}
			f, err = os.Open(path)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open console log: %w", err)
	}
	defer f.Close()
	if p.Tail > 0 {
		if err := seekTail(f, p.Tail); err != nil {
			return nil, err
		}
	}
	w := frameWriter{call, api.FrameStdout}
	buf := make([]byte, 32*1024)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return nil, nil
			}
			continue
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("read console log: %w", err)
		}
		if !p.Follow {
			return nil, nil
		}
		// The log was capped (cut in place): go on from its new start.
		if off, err := f.Seek(0, io.SeekCurrent); err == nil {
			if st, err := f.Stat(); err == nil && st.Size() < off {
				if _, err := f.Seek(0, io.SeekStart); err != nil {
					return nil, fmt.Errorf("read console log: %w", err)
				}
				continue
			}
		}
		d.mu.Lock()
		r := d.running[v.ID]
		d.mu.Unlock()
		var exited <-chan struct{}
		if r != nil {
			exited = r.exited
		}
		select {
		case <-ctx.Done():
			return nil, nil
		case <-exited:
			// Drain what the VM wrote last, then end.
			_, _ = io.Copy(w, f)
			return nil, nil
		case <-time.After(150 * time.Millisecond):
		}
	}
}

// seekTail positions f at the start of its last n lines.
func seekTail(f *os.File, n int) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	const chunk = 64 * 1024
	buf := make([]byte, chunk)
	count := 0
	for off := size; off > 0; {
		start := max(off-chunk, 0)
		m, err := f.ReadAt(buf[:off-start], start)
		if err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		for i := m - 1; i >= 0; i-- {
			if buf[i] == '\n' && start+int64(i) != size-1 {
				count++
				if count == n {
					_, err := f.Seek(start+int64(i)+1, io.SeekStart)
					return err
				}
			}
		}
		off = start
	}
	_, err = f.Seek(0, io.SeekStart)
	return err
}
