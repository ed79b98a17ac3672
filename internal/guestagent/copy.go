package guestagent

import (
	"fmt"
	"io"
	"log/slog"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/tarcopy"
)

// acceptCopy decodes a copy channel's request and accepts the channel.
func acceptCopy(nc ssh.NewChannel, log *slog.Logger) (agentproto.CopyRequest, ssh.Channel, bool) {
	var req agentproto.CopyRequest
	if err := agentproto.UnmarshalPayload(nc.ExtraData(), &req); err != nil {
		nc.Reject(ssh.ConnectionFailed, "bad copy request: "+err.Error())
		return req, nil, false
	}
	ch, reqs, err := nc.Accept()
	if err != nil {
		log.Warn("accept "+nc.ChannelType(), "err", err)
		return req, nil, false
	}
	go ssh.DiscardRequests(reqs)
	return req, ch, true
}

func (s *server) handleCopyIn(nc ssh.NewChannel, log *slog.Logger) {
	req, ch, ok := acceptCopy(nc, log)
	if !ok {
		return
	}
	defer ch.Close()
	err := tarcopy.Extract(ch, req.Path, tarcopy.ExtractOptions{Archive: req.Archive, Log: log})
	if err == nil {
		// Read up to the host's EOF (tar padding after the end marker),
		// so the status follows the whole stream.
		_, err = io.Copy(io.Discard, ch)
		if err != nil {
			err = fmt.Errorf("read stream: %w", err)
		}
	}
	if err != nil {
		log.Warn("copy in", "path", req.Path, "err", err)
	} else {
		log.Debug("copy in done", "path", req.Path)
	}
	sendCopyStatus(ch, err, log)
}

func (s *server) handleCopyOut(nc ssh.NewChannel, log *slog.Logger) {
	req, ch, ok := acceptCopy(nc, log)
	if !ok {
		return
	}
	defer ch.Close()
	go io.Copy(io.Discard, ch) // the host sends nothing; keep the window open
	// Announce the stream's size first: the host stops a stream that
	// goes past it.
	err := tarcopy.Write(ch, req.Path, tarcopy.WriteOptions{Log: log, Announce: func(size, entries int64) error {
		payload, err := agentproto.MarshalPayload(agentproto.CopyHeader{Size: size, Entries: entries})
		if err != nil {
			return err
		}
		if _, err := ch.SendRequest(agentproto.ReqCopyHeader, false, payload); err != nil {
			return fmt.Errorf("announce copy size: %w", err)
		}
		return nil
	}})
	if err != nil {
		log.Warn("copy out", "path", req.Path, "err", err)
	}
	sendCopyStatus(ch, err, log)
}

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
