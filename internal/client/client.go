// Package client is the typed client of bangerd's RPC. The CLI (and tests)
// reach the daemon only through it.
package client

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/rpc"
)

// Client talks to one bangerd socket.
type Client struct {
	Socket string
}

// New returns a client for socketPath.
func New(socketPath string) *Client { return &Client{Socket: socketPath} }

// ProgressFunc receives progress of long operations; it may be nil.
type ProgressFunc func(api.Progress)

func (c *Client) call(ctx context.Context, method string, params, result any, progress ProgressFunc) error {
	return rpc.Do(ctx, c.Socket, method, params, result, func(f api.Frame) {
		if f.Type == api.FrameProgress && f.Progress != nil && progress != nil {
			progress(*f.Progress)
		}
	})
}

// callFor calls method and returns its decoded result.
func callFor[R any](ctx context.Context, c *Client, method string, params any, progress ProgressFunc) (R, error) {
	var r R
	err := c.call(ctx, method, params, &r, progress)
	return r, err
}

// IsUnreachable reports whether err means the daemon could not be reached.
func IsUnreachable(err error) bool { return errors.Is(err, rpc.ErrDaemonUnreachable) }

// Ping checks the daemon.
func (c *Client) Ping(ctx context.Context) (api.PingResult, error) {
	return callFor[api.PingResult](ctx, c, api.MethodPing, struct{}{}, nil)
}

// ImageRegister registers host files as an image.
func (c *Client) ImageRegister(ctx context.Context, p api.ImageRegisterParams) (api.Image, error) {
	return callFor[api.Image](ctx, c, api.MethodImageRegister, p, nil)
}

// ImagePromote copies an image into daemon-managed storage.
func (c *Client) ImagePromote(ctx context.Context, name string, progress ProgressFunc) (api.Image, error) {
	return callFor[api.Image](ctx, c, api.MethodImagePromote, api.NameParams{Name: name}, progress)
}

// ImageList lists images.
func (c *Client) ImageList(ctx context.Context) ([]api.Image, error) {
	return callFor[[]api.Image](ctx, c, api.MethodImageList, struct{}{}, nil)
}

// ImageInspect describes one image.
func (c *Client) ImageInspect(ctx context.Context, name string) (api.Image, error) {
	return callFor[api.Image](ctx, c, api.MethodImageInspect, api.NameParams{Name: name}, nil)
}

// ImageRemove removes an image.
func (c *Client) ImageRemove(ctx context.Context, name string) error {
	return c.call(ctx, api.MethodImageRemove, api.NameParams{Name: name}, nil, nil)
}

// VMCreate creates (and with p.Start, starts) a VM.
func (c *Client) VMCreate(ctx context.Context, p api.VMCreateParams, progress ProgressFunc) (api.VM, error) {
	return callFor[api.VM](ctx, c, api.MethodVMCreate, p, progress)
}

// VMStart starts a VM and waits until its agent is ready.
func (c *Client) VMStart(ctx context.Context, p api.VMStartParams, progress ProgressFunc) (api.VM, error) {
	return callFor[api.VM](ctx, c, api.MethodVMStart, p, progress)
}

// VMStop stops a VM gracefully (then kills it after the timeout).
func (c *Client) VMStop(ctx context.Context, p api.VMStopParams, progress ProgressFunc) (api.VM, error) {
	return callFor[api.VM](ctx, c, api.MethodVMStop, p, progress)
}

// VMKill stops a VM immediately.
func (c *Client) VMKill(ctx context.Context, name string) (api.VM, error) {
	return callFor[api.VM](ctx, c, api.MethodVMKill, api.NameParams{Name: name}, nil)
}

// VMRemove removes a VM.
func (c *Client) VMRemove(ctx context.Context, p api.VMRemoveParams) error {
	return c.call(ctx, api.MethodVMRemove, p, nil, nil)
}

// VMList lists VMs.
func (c *Client) VMList(ctx context.Context) ([]api.VM, error) {
	return callFor[[]api.VM](ctx, c, api.MethodVMList, struct{}{}, nil)
}

// VMInspect describes one VM.
func (c *Client) VMInspect(ctx context.Context, name string) (api.VM, error) {
	return callFor[api.VM](ctx, c, api.MethodVMInspect, api.NameParams{Name: name}, nil)
}

// VMLogs copies a VM's serial console to w (following it with p.Follow
// until ctx ends or the VM stops).
func (c *Client) VMLogs(ctx context.Context, p api.VMLogsParams, w io.Writer) error {
	return c.stream(ctx, api.MethodVMLogs, p, nil, w, nil, nil, false, nil)
}

// ExecIO wires an exec call to local streams.
type ExecIO struct {
	Stdin  io.Reader // nil: no stdin (EOF at once)
	Stdout io.Writer
	Stderr io.Writer
	// Resize delivers terminal size changes (TTY mode).
	Resize <-chan [2]int // rows, cols
}

// VMExec runs a command and returns its exit code.
func (c *Client) VMExec(ctx context.Context, p api.VMExecParams, io ExecIO) (int, error) {
	var r api.ExecResult
	err := c.stream(ctx, api.MethodVMExec, p, &r, io.Stdout, io.Stderr, io.Stdin, true, io.Resize)
	return r.ExitCode, err
}

// VMAttach follows a VM's main process: its output (from its start) to
// stdout and stderr until it exits; it returns its exit code.
func (c *Client) VMAttach(ctx context.Context, name string, stdout, stderr io.Writer) (int, error) {
	var r api.ExecResult
	err := c.stream(ctx, api.MethodVMAttach, api.NameParams{Name: name}, &r, stdout, stderr, nil, false, nil)
	return r.ExitCode, err
}

// VMCopyIn sends a tar stream to be extracted under p.Path in the guest.
// The stream is sent in full chunks, however small the writes that make
// it (a tar writer's 512-byte headers, a small file's few bytes).
func (c *Client) VMCopyIn(ctx context.Context, p api.VMCopyParams, tarStream io.Reader) error {
	return c.stream(ctx, api.MethodVMCopyIn, p, nil, nil, nil, fullReader{tarStream}, true, nil)
}

// fullReader reads a bulk stream, which nobody waits on piece by piece,
// in full reads: a read returns less than asked only at the stream's end
// (or with its error). Each frame then carries a full chunk, and each hop
// after the CLI (bangerd, the data port, the guest's reads: each costly
// under TCG) moves a few large pieces rather than one per tar write.
type fullReader struct{ r io.Reader }

func (f fullReader) Read(p []byte) (int, error) {
	n, err := io.ReadFull(f.r, p)
	if errors.Is(err, io.ErrUnexpectedEOF) {
		err = io.EOF // the end, after n bytes
	}
	return n, err
}

// VMCopyOut writes a tar stream of p.Path in the guest to w.
func (c *Client) VMCopyOut(ctx context.Context, p api.VMCopyParams, w io.Writer) error {
	return c.VMCopyOutProgress(ctx, p, w, nil)
}

// VMCopyOutProgress is VMCopyOut that passes the daemon's progress frames
// to progress (may be nil): before the stream, the size the guest
// announced (Phase "copy", Total in bytes, Done 0).
func (c *Client) VMCopyOutProgress(ctx context.Context, p api.VMCopyParams, w io.Writer, progress ProgressFunc) error {
	return c.stream(ctx, api.MethodVMCopyOut, p, nil, w, nil, nil, false, nil, progress)
}

// stdinChunk is the most input one frame carries: a binary frame's
// payload may be rpc.MaxFrameBytes.
const stdinChunk = rpc.MaxFrameBytes

// stream runs a call whose output comes as frames, in binary framing:
// output is written to stdout and stderr as it comes, without decoding or
// copies. A method that takes input (input: registered with
// rpc.TakesInput) gets stdin as frames of at most stdinChunk (what one
// read returns: an interactive stdin is sent as it is typed), or an EOF at
// once when stdin is nil; the daemon refuses frames sent to any other
// method. Progress frames go to progress, when given.
//
// A call with input asks the daemon first whether it reads binary framing
// (rpc.ProbeBinary: a daemon from before it can't take binary input) and
// speaks JSON lines to one that doesn't.
func (c *Client) stream(ctx context.Context, method string, params, result any, stdout, stderr io.Writer, stdin io.Reader, input bool, resize <-chan [2]int, progress ...ProgressFunc) error {
	open := rpc.OpenBinary
	if stdin != nil || input || resize != nil {
		binary, err := rpc.ProbeBinary(ctx, c.Socket)
		if err != nil {
			return err
		}
		if !binary {
			open = rpc.Open
		}
	}
	s, err := open(ctx, c.Socket, method, params)
	if err != nil {
		return err
	}
	defer s.Close()
	done := make(chan struct{})
	defer close(done)
	if stdin != nil {
		go func() {
			buf := make([]byte, stdinChunk)
			for {
				n, err := stdin.Read(buf)
				if n > 0 {
					if s.SendData(rpc.KindStdin, buf[:n]) != nil {
						return
					}
				}
				if err != nil {
					_ = s.Send(api.Frame{Type: api.FrameEOF})
					return
				}
			}
		}()
	} else if input {
		_ = s.Send(api.Frame{Type: api.FrameEOF})
	}
	if resize != nil {
		go func() {
			for {
				select {
				case sz := <-resize:
					_ = s.Send(api.Frame{Type: api.FrameResize, Rows: sz[0], Cols: sz[1]})
				case <-done:
					return
				}
			}
		}()
	}
	for {
		f, err := s.Next(result)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		var w io.Writer
		switch f.Type {
		case api.FrameProgress:
			if f.Progress != nil && len(progress) > 0 && progress[0] != nil {
				progress[0](*f.Progress)
			}
		case api.FrameStdout:
			w = stdout
		case api.FrameStderr:
			w = stderr
		}
		if w == nil {
			continue
		}
		if _, err := w.Write(f.Data); err != nil {
			return fmt.Errorf("write output: %w", err)
		}
	}
}
