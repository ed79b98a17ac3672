package guestagent

import (
	"fmt"
	"io"
	"log/slog"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/tarcopy"
)

func (s *server) handleCopyIn(nc ssh.NewChannel, log *slog.Logger) {
	var req agentproto.CopyRequest
	if err := agentproto.UnmarshalPayload(nc.ExtraData(), &req); err != nil {
		nc.Reject(ssh.ConnectionFailed, "bad copy request: "+err.Error())
		return
	}
	ch, reqs, err := nc.Accept()
	if err != nil {
		log.Warn("accept copy-in", "err", err)
		return
	}
	defer ch.Close()
	go ssh.DiscardRequests(reqs)

	err = tarcopy.Extract(ch, req.Path, log)
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
	var req agentproto.CopyRequest
	if err := agentproto.UnmarshalPayload(nc.ExtraData(), &req); err != nil {
		nc.Reject(ssh.ConnectionFailed, "bad copy request: "+err.Error())
		return
	}
	ch, reqs, err := nc.Accept()
	if err != nil {
		log.Warn("accept copy-out", "err", err)
		return
	}
	defer ch.Close()
	go ssh.DiscardRequests(reqs)
	go io.Copy(io.Discard, ch) // the host sends nothing; keep the window open

	err = tarcopy.Write(ch, req.Path, log)
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
