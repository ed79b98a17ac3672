package guestagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/tarcopy"
)

// acceptCopy decodes a copy channel's request and accepts the channel.
// The returned context ends when the channel closes (the host is gone or
// cancelled).
func acceptCopy(nc ssh.NewChannel, log *slog.Logger) (agentproto.CopyRequest, ssh.Channel, context.Context, bool) {
	var req agentproto.CopyRequest
	if err := agentproto.UnmarshalPayload(nc.ExtraData(), &req); err != nil {
		nc.Reject(ssh.ConnectionFailed, "bad copy request: "+err.Error())
		return req, nil, nil, false
	}
	ch, reqs, err := nc.Accept()
	if err != nil {
		log.Warn("accept "+nc.ChannelType(), "err", err)
		return req, nil, nil, false
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		ssh.DiscardRequests(reqs)
		cancel()
	}()
	return req, ch, ctx, true
}

// copyData sets up a copy's transfer on the data port the request names;
// the channel closing closes the port. Call the returned stop when done.
func (s *server) copyData(ctx context.Context, ds *agentproto.DataStream) (*dataConn, func(), error) {
	dc, err := s.data.acquire(ctx, ds)
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(ctx, dc.Close)
	return dc, func() { stop(); dc.Close() }, nil
}

// A copy in on a data port reads ahead into copyInBuffers buffers of
// copyInBufferSize bytes.
const (
	copyInBuffers    = 4
	copyInBufferSize = 1 << 20
)

func (s *server) handleCopyIn(nc ssh.NewChannel, log *slog.Logger) {
	req, ch, ctx, ok := acceptCopy(nc, log)
	if !ok {
		return
	}
	defer ch.Close()
	var (
		src       io.Reader = ch
		closeData           = func() {}
	)
	if req.Data != nil {
		go io.Copy(io.Discard, ch) // the host sends nothing here
		dc, stop, err := s.copyData(ctx, req.Data)
		if err != nil {
			log.Warn("copy in", "path", req.Path, "err", err)
			sendCopyStatus(ch, err, log)
			return
		}
		log.Debug("copy in on a data port", "port", dc.port)
		// The port is read ahead of the extraction: the guest's two
		// vCPUs take bytes off the port and write files at once.
		ra := newReadAhead(&frameReader{dr: agentproto.NewDataReader(dc.r, agentproto.MaxDataFrame)}, copyInBuffers, copyInBufferSize)
		closeData = func() { stop(); ra.Close() }
		src = ra
	}
	// Sync: the copy is on the VM's disk before the host hears it
	// succeeded (a VM killed right after keeps it). DirectIO, when the
	// host asks (a guest under TCG): large files skip the page cache,
	// whose per-page work costs the emulated CPU more than the bytes
	// (docs/dev/data-path.md).
	err := tarcopy.Extract(src, req.Path, tarcopy.ExtractOptions{Archive: req.Archive, Log: log, Sync: true, DirectIO: req.DirectIO})
	if err == nil {
		err = drainStream(src)
	}
	closeData() // the port is closed before the status goes out
	if err != nil {
		log.Warn("copy in", "path", req.Path, "err", err)
	} else {
		log.Debug("copy in done", "path", req.Path)
	}
	sendCopyStatus(ch, err, log)
}

func (s *server) handleCopyOut(nc ssh.NewChannel, log *slog.Logger) {
	req, ch, ctx, ok := acceptCopy(nc, log)
	if !ok {
		return
	}
	defer ch.Close()
	go io.Copy(io.Discard, ch) // the host sends nothing; keep the window open
	var (
		dst  io.Writer = ch
		dc   *dataConn
		stop = func() {}
		fb   *frameBuffer
	)
	defer func() { stop() }()
	// Announce the stream's size first: the host stops a stream that
	// goes past it. With a data port, the port is set up after the
	// announcement (whichever of the two the host waits for first).
	opts := tarcopy.WriteOptions{Log: log}
	if req.Data != nil {
		opts.WriteSize = agentproto.GuestDataChunk // one frame per write
	}
	opts.Announce = func(size, entries int64) error {
		payload, err := agentproto.MarshalPayload(agentproto.CopyHeader{Size: size, Entries: entries})
		if err != nil {
			return err
		}
		if _, err := ch.SendRequest(agentproto.ReqCopyHeader, false, payload); err != nil {
			return fmt.Errorf("announce copy size: %w", err)
		}
		if req.Data == nil {
			return nil
		}
		if dc, stop, err = s.copyData(ctx, req.Data); err != nil {
			stop = func() {}
			return err
		}
		log.Debug("copy out on a data port", "port", dc.port)
		go dc.watchHost(log)
		fb = newFrameBuffer(dc.w, agentproto.DataFrameData, agentproto.GuestDataChunk)
		dst = fb
		return nil
	}
	err := tarcopy.Write(writerFunc(func(p []byte) (int, error) { return dst.Write(p) }), req.Path, opts)
	if req.Data != nil && dc == nil && err == nil {
		err = errors.New("copy out: the stream was not announced")
	}
	if fb != nil {
		if err == nil {
			err = fb.Flush()
		}
		if err == nil {
			err = dc.w.End()
		}
		if err != nil && dc.isClosed() && ctx.Err() != nil {
			err = fmt.Errorf("%w (the host went away)", err)
		}
	}
	// The port is closed before the status goes out.
	stop()
	if err != nil {
		log.Warn("copy out", "path", req.Path, "err", err)
	}
	sendCopyStatus(ch, err, log)
}

// drainStream reads up to the host's end of stream (tar padding after the
// end marker), so the status follows the whole stream.
func drainStream(r io.Reader) error {
	if _, err := io.Copy(io.Discard, r); err != nil {
		return fmt.Errorf("read stream: %w", err)
	}
	return nil
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func sendCopyStatus(ch ssh.Channel, err error, log *slog.Logger) {
	var st agentproto.CopyStatus
	if err != nil {
		st.Error = err.Error()
	}
	payload, merr := agentproto.MarshalPayload(st)
	if merr != nil {
		log.Error("encode copy status", "err", merr)
		return
	}
	ch.CloseWrite()
	if _, serr := ch.SendRequest(agentproto.ReqCopyStatus, false, payload); serr != nil {
		log.Debug("send copy status", "err", serr)
	}
}
