package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
)

// ErrCopyFailed wraps the error message reported by the agent for a failed
// copy (bad path, refused tar entry, I/O error in the guest).
var ErrCopyFailed = errors.New("copy failed in guest")

// CopyIn sends tarStream to the guest, which extracts it under destDir (an
// absolute guest path, created with its parents when missing). Entries that
// would land outside destDir (".." components, absolute names, paths through
// symlinks leading out) make the whole copy fail. Modes and modification
// times are kept; files belong to root in the guest.
func (c *Client) CopyIn(ctx context.Context, tarStream io.Reader, destDir string) error {
	if !path.IsAbs(destDir) {
		return fmt.Errorf("copy in to %q: destination must be an absolute path", destDir)
	}
	ch, reqs, err := c.openCopy(ctx, agentproto.ChanCopyIn, destDir)
	if err != nil {
		return fmt.Errorf("copy in to %s: %w", destDir, err)
	}
	defer ch.Close()
	statusc := make(chan copyStatus, 1)
	go func() { statusc <- collectCopyStatus(reqs) }()
	go io.Copy(io.Discard, ch)

	sent := make(chan error, 1)
	go func() {
		src := &stickyReader{r: tarStream}
		io.Copy(ch, src)
		if src.err == nil {
			ch.CloseWrite()
		}
		sent <- src.err
	}()
	for {
		select {
		case st := <-statusc:
			if err := st.err(); err != nil {
				return fmt.Errorf("copy in to %s: %w", destDir, err)
			}
			return nil
		case err := <-sent:
			if err != nil {
				return fmt.Errorf("copy in to %s: read tar stream: %w", destDir, err)
			}
			sent = nil
		case <-ctx.Done():
			return fmt.Errorf("copy in to %s: %w", destDir, ctx.Err())
		}
	}
}

// CopyOut writes to w a tar stream of the file or directory at srcPath (an
// absolute guest path). The top entry of the archive is the base name of
// srcPath. On error, w may have received part of the stream.
func (c *Client) CopyOut(ctx context.Context, srcPath string, w io.Writer) error {
	if !path.IsAbs(srcPath) {
		return fmt.Errorf("copy out of %q: source must be an absolute path", srcPath)
	}
	ch, reqs, err := c.openCopy(ctx, agentproto.ChanCopyOut, srcPath)
	if err != nil {
		return fmt.Errorf("copy out of %s: %w", srcPath, err)
	}
	defer ch.Close()
	ch.CloseWrite()
	statusc := make(chan copyStatus, 1)
	go func() { statusc <- collectCopyStatus(reqs) }()
	copied := make(chan error, 1)
	go func() { copied <- drainTo(w, ch) }()

	var st *copyStatus
	for copied != nil || st == nil {
		select {
		case err := <-copied:
			if err != nil {
				return fmt.Errorf("copy out of %s: write tar stream: %w", srcPath, err)
			}
			copied = nil
		case s := <-statusc:
			st = &s
		case <-ctx.Done():
			return fmt.Errorf("copy out of %s: %w", srcPath, ctx.Err())
		}
	}
	if err := st.err(); err != nil {
		return fmt.Errorf("copy out of %s: %w", srcPath, err)
	}
	return nil
}

// openCopy opens a copy channel; ctx bounds the opening.
func (c *Client) openCopy(ctx context.Context, chanType, p string) (ssh.Channel, <-chan *ssh.Request, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	payload, err := agentproto.MarshalPayload(agentproto.CopyRequest{Path: p})
	if err != nil {
		return nil, nil, err
	}
	type opened struct {
		ch   ssh.Channel
		reqs <-chan *ssh.Request
		err  error
	}
	oc := make(chan opened, 1)
	go func() {
		ch, reqs, err := c.ssh.OpenChannel(chanType, payload)
		oc <- opened{ch, reqs, err}
	}()
	select {
	case o := <-oc:
		if o.err != nil {
			var oce *ssh.OpenChannelError
			if errors.As(o.err, &oce) {
				return nil, nil, fmt.Errorf("%w: %s", ErrRefused, oce.Message)
			}
			return nil, nil, fmt.Errorf("%w: %w", ErrConnectionLost, o.err)
		}
		return o.ch, o.reqs, nil
	case <-ctx.Done():
		go func() {
			if o := <-oc; o.err == nil {
				o.ch.Close()
			}
		}()
		return nil, nil, ctx.Err()
	}
}

// copyStatus is the outcome of a copy channel.
type copyStatus struct {
	received bool
	status   agentproto.CopyStatus
	decode   error
}

func (s copyStatus) err() error {
	switch {
	case s.decode != nil:
		return s.decode
	case !s.received:
		return fmt.Errorf("channel closed without a copy status: %w", ErrConnectionLost)
	case s.status.Error != "":
		return fmt.Errorf("%w: %s", ErrCopyFailed, s.status.Error)
	}
	return nil
}

// collectCopyStatus reads the channel requests until the channel closes and
// returns the agent's ReqCopyStatus.
func collectCopyStatus(reqs <-chan *ssh.Request) copyStatus {
	var st copyStatus
	for req := range reqs {
		if req.Type == agentproto.ReqCopyStatus {
			st.received = true
			if err := agentproto.UnmarshalPayload(req.Payload, &st.status); err != nil {
				st.decode = err
			}
		}
		if req.WantReply {
			req.Reply(false, nil)
		}
	}
	return st
}

// stickyReader records the first read error of r other than io.EOF.
type stickyReader struct {
	r   io.Reader
	err error
}

func (s *stickyReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		s.err = err
	}
	return n, err
}
