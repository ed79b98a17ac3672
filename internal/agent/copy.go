package agent

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path"
	"strconv"
	"syscall"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
)

// ErrCopyFailed wraps the error message reported by the agent for a failed
// copy (bad path, refused tar entry, I/O error in the guest).
var ErrCopyFailed = errors.New("copy failed in guest")

// CopyOptions tune CopyIn.
type CopyOptions struct {
	// Archive keeps the stream's ownership, setuid/setgid/sticky bits and
	// special files in the guest (agents of protocol 1.2 and later).
	Archive bool
}

// ErrCopyTooLarge is returned by CopyOut when the guest sends more bytes
// or more tar entries than it announced.
var ErrCopyTooLarge = errors.New("guest sent more than it announced")

// CopyIn sends tarStream to the guest, which extracts it under destDir (an
// absolute guest path, created with its parents when missing). Entries that
// would land outside destDir (".." components, absolute names, paths through
// symlinks) make the whole copy fail. Modes (without setuid, setgid and
// sticky bits unless opts.Archive) and modification times are kept; files
// belong to root in the guest unless opts.Archive.
func (c *Client) CopyIn(ctx context.Context, tarStream io.Reader, destDir string, opts CopyOptions) error {
	if !path.IsAbs(destDir) {
		return fmt.Errorf("copy in to %q: destination must be an absolute path", destDir)
	}
	if opts.Archive && !c.protoAtLeast(1, 2) {
		return fmt.Errorf("copy in to %s: the VM's agent (protocol %s) can't keep ownership; restart the VM to update it: %w",
			destDir, c.proto, ErrIncompatibleAgent)
	}
	d := c.openData(ctx, "copy in")
	defer d.abort()
	ch, reqs, err := c.openCopy(ctx, agentproto.ChanCopyIn, agentproto.CopyRequest{Path: destDir, Archive: opts.Archive, Data: d.stream(), DirectIO: c.directIO}, d)
	if err != nil {
		return fmt.Errorf("copy in to %s: %w", destDir, err)
	}
	defer ch.Close()
	statusc := make(chan copyStatus, 1)
	chClosed := make(chan struct{})
	go func() {
		statusc <- collectCopyStatus(reqs, nil)
		close(chClosed)
	}()
	go io.Copy(io.Discard, ch)

	sent := make(chan error, 1)
	var datac chan error // the guest's side of the port: its answer and End
	if d == nil {
		go func() {
			src := &stickyReader{r: tarStream}
			io.Copy(ch, src)
			if src.err == nil {
				ch.CloseWrite()
			}
			sent <- src.err
		}()
	} else {
		d.releaseAfter(chClosed)
		ch.CloseWrite()
		datac = make(chan error, 1)
		go func() {
			err := d.readAck()
			if err == nil {
				go func() { sent <- d.send(tarStream) }()
				err = d.frames(false, false, nil)
			}
			datac <- err
		}()
	}
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
		case err := <-datac:
			datac = nil
			if err != nil && !streamCut(err) {
				return fmt.Errorf("copy in to %s: %w", destDir, err)
			}
			// Else the guest went from the port: its status tells why.
		case <-ctx.Done():
			return fmt.Errorf("copy in to %s: %w", destDir, ctx.Err())
		}
	}
}

// streamCut reports whether err is a data port that ended without its End
// frame (rather than a guest breaking its rules): the SSH side's status
// says why.
func streamCut(err error) bool {
	return errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// CopyOut writes to w a tar stream of the file or directory at srcPath (an
// absolute guest path). The top entry of the archive is the base name of
// srcPath. The guest is not trusted: it must announce the stream's size
// and number of entries before sending it (agentproto.ReqCopyHeader). No
// more bytes than announced are passed to w; a longer stream, or one with
// more entries, fails with ErrCopyTooLarge. On error, w may have received
// part of the stream (with tarcopy.ExtractFrom, the partial copy is
// removed).
func (c *Client) CopyOut(ctx context.Context, srcPath string, w io.Writer) error {
	return c.CopyOutWith(ctx, srcPath, w, CopyOutOptions{})
}

// CopyOutOptions tune CopyOutWith.
type CopyOutOptions struct {
	// OnHeader, when set, is called with the size and number of entries
	// the guest announced, before the first byte is passed to w.
	OnHeader func(size, entries int64)
}

// CopyOutWith is CopyOut with options.
func (c *Client) CopyOutWith(ctx context.Context, srcPath string, w io.Writer, opts CopyOutOptions) error {
	if !path.IsAbs(srcPath) {
		return fmt.Errorf("copy out of %q: source must be an absolute path", srcPath)
	}
	if !c.protoAtLeast(1, 2) {
		return fmt.Errorf("copy out of %s: the VM's agent (protocol %s) doesn't announce copy sizes; restart the VM to update it: %w",
			srcPath, c.proto, ErrIncompatibleAgent)
	}
	d := c.openData(ctx, "copy out")
	defer d.abort()
	ch, reqs, err := c.openCopy(ctx, agentproto.ChanCopyOut, agentproto.CopyRequest{Path: srcPath, Data: d.stream()}, d)
	if err != nil {
		return fmt.Errorf("copy out of %s: %w", srcPath, err)
	}
	defer ch.Close()
	ch.CloseWrite()
	headerc := make(chan agentproto.CopyHeader, 1)
	statusc := make(chan copyStatus, 1)
	chClosed := make(chan struct{})
	go func() {
		statusc <- collectCopyStatus(reqs, headerc)
		close(chClosed)
	}()
	var src io.Reader = ch
	if d != nil {
		d.releaseAfter(chClosed)
		// The channel carries no data: what the guest sends there is
		// dropped.
		go io.Copy(io.Discard, ch)
	}

	// The header comes before the stream; the channel's window holds
	// what the guest sends meanwhile.
	var hdr agentproto.CopyHeader
	select {
	case h, ok := <-headerc:
		if !ok {
			// No header: the copy failed before it began, or the guest
			// misbehaves.
			select {
			case st := <-statusc:
				if err := st.err(); err != nil {
					return fmt.Errorf("copy out of %s: %w", srcPath, err)
				}
			case <-ctx.Done():
				return fmt.Errorf("copy out of %s: %w", srcPath, ctx.Err())
			}
			return fmt.Errorf("copy out of %s: the guest sent no copy header: %w", srcPath, ErrCopyFailed)
		}
		hdr = h
	case <-ctx.Done():
		return fmt.Errorf("copy out of %s: %w", srcPath, ctx.Err())
	}
	if hdr.Size < 0 || hdr.Entries < 0 {
		return fmt.Errorf("copy out of %s: the guest announced %d bytes in %d entries: %w",
			srcPath, hdr.Size, hdr.Entries, ErrCopyFailed)
	}
	if opts.OnHeader != nil {
		opts.OnHeader(hdr.Size, hdr.Entries)
	}

	copied := make(chan error, 1)
	go func() {
		if d != nil {
			if err := d.readAck(); err != nil {
				copied <- err
				return
			}
			// The host sends nothing on a copy out's port, not even an
			// End: the guest takes any byte from the host as a broken
			// stream (guestagent's watchHost).
			src = d.reader()
		}
		// The stream goes through an entry counter before w: past the
		// announced number of entries, writes fail. The first error
		// stops the copy (the channel is closed on return).
		entries := newEntryCounter(hdr.Entries)
		_, err := io.Copy(io.MultiWriter(entries, w), io.LimitReader(src, hdr.Size))
		if cerr := entries.close(); cerr != nil {
			err = cerr
		}
		if err != nil {
			copied <- err
			return
		}
		// Anything past the announced size stops the copy.
		var b [1]byte
		n, err := io.ReadFull(src, b[:])
		switch {
		case n > 0:
			copied <- fmt.Errorf("the copy was stopped after the %d bytes the guest announced: %w", hdr.Size, ErrCopyTooLarge)
		case d != nil && !errors.Is(err, io.EOF):
			copied <- err // the stream didn't end with its End frame
		default:
			copied <- nil
		}
	}()

	var (
		st      *copyStatus
		dataErr error
	)
	for copied != nil || st == nil {
		select {
		case err := <-copied:
			copied = nil
			switch {
			case errors.Is(err, ErrCopyTooLarge):
				return fmt.Errorf("copy out of %s: %w", srcPath, err)
			case errors.Is(err, ErrDataStream) && st != nil && st.err() != nil:
				// The guest failed and said why.
				return fmt.Errorf("copy out of %s: %w", srcPath, st.err())
			case errors.Is(err, ErrDataStream) && streamCut(err) && st == nil:
				// The guest went from the port: its status tells why.
				dataErr = err
			case errors.Is(err, ErrDataStream):
				return fmt.Errorf("copy out of %s: %w", srcPath, err)
			case err != nil:
				return fmt.Errorf("copy out of %s: write tar stream: %w", srcPath, err)
			}
		case s := <-statusc:
			st = &s
			if d != nil {
				d.channelClosed()
			}
		case <-ctx.Done():
			return fmt.Errorf("copy out of %s: %w", srcPath, ctx.Err())
		}
	}
	if err := st.err(); err != nil {
		return fmt.Errorf("copy out of %s: %w", srcPath, err)
	}
	if dataErr != nil {
		return fmt.Errorf("copy out of %s: %w", srcPath, dataErr)
	}
	return nil
}

// openCopy opens a copy channel; ctx bounds the opening. The transfer's
// data port d (nil: none) is given back when no channel carries the
// request.
func (c *Client) openCopy(ctx context.Context, chanType string, req agentproto.CopyRequest, d *dataConn) (ssh.Channel, <-chan *ssh.Request, error) {
	if err := ctx.Err(); err != nil {
		d.drop()
		return nil, nil, err
	}
	payload, err := agentproto.MarshalPayload(req)
	if err != nil {
		d.drop()
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
			d.drop()
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
				ssh.DiscardRequests(o.reqs) // until the guest closed it
			}
			d.drop()
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
		// The guest's words: quoted (no control characters reach the
		// terminal) and cut short.
		return fmt.Errorf("%w: %s", ErrCopyFailed, quoteGuest(s.status.Error))
	}
	return nil
}

// collectCopyStatus reads the channel requests until the channel closes and
// returns the agent's ReqCopyStatus. With headerc, the first
// ReqCopyHeader is sent on it; headerc is closed when the header was
// received, or can no longer come (status received, channel closed, bad
// header).
func collectCopyStatus(reqs <-chan *ssh.Request, headerc chan<- agentproto.CopyHeader) copyStatus {
	var st copyStatus
	closeHeader := func() {
		if headerc != nil {
			close(headerc)
			headerc = nil
		}
	}
	defer closeHeader()
	for req := range reqs {
		switch req.Type {
		case agentproto.ReqCopyHeader:
			var h agentproto.CopyHeader
			if headerc != nil && agentproto.UnmarshalPayload(req.Payload, &h) == nil {
				headerc <- h
			}
			closeHeader()
		case agentproto.ReqCopyStatus:
			closeHeader()
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

// entryCounter reads the tar stream written to it and fails (the write in
// progress, or close) once the stream holds more than max entries, as
// tar.Reader counts them (PAX and GNU long-name records belong to their
// entry). It doesn't judge the stream otherwise: the extractor does.
type entryCounter struct {
	pw   *io.PipeWriter
	done chan error
}

func newEntryCounter(max int64) *entryCounter {
	pr, pw := io.Pipe()
	c := &entryCounter{pw: pw, done: make(chan error, 1)}
	go func() {
		err := countEntries(pr, max)
		pr.CloseWithError(err)
		c.done <- err
	}()
	return c
}

func (c *entryCounter) Write(p []byte) (int, error) {
	n, err := c.pw.Write(p)
	if errors.Is(err, ErrCopyTooLarge) {
		return n, err
	}
	// The counter stopped reading (a malformed stream): what is left is
	// for the extractor to refuse.
	return len(p), nil
}

// close ends the stream and returns the counter's verdict.
func (c *entryCounter) close() error {
	c.pw.Close()
	return <-c.done
}

func countEntries(r io.Reader, max int64) error {
	tr := tar.NewReader(r)
	for n := int64(0); ; n++ {
		_, err := tr.Next()
		if err != nil {
			// The end marker, or a malformed stream (the extractor
			// refuses it). Read the rest.
			_, _ = io.Copy(io.Discard, r)
			return nil
		}
		if n == max {
			return fmt.Errorf("the copy was stopped at entry %d, past the %d entries the guest announced: %w", n+1, max, ErrCopyTooLarge)
		}
	}
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

// quoteGuest quotes a message from the guest, keeping at most its first
// 512 bytes.
func quoteGuest(s string) string {
	const maxLen = 512
	if len(s) <= maxLen {
		return strconv.Quote(s)
	}
	return strconv.Quote(s[:maxLen]) + fmt.Sprintf("... (%d bytes)", len(s))
}
