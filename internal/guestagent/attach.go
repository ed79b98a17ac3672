package guestagent

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"sync"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
)

// MainLink is the agent server's end of its link to PID 1's main process
// supervisor: it mirrors the main process's output and state into a log
// that attach requests (agentproto.ReqAttach) follow, and tells PID 1
// when the final exit status reached a client.
type MainLink struct {
	conn io.ReadWriteCloser
	log  *outputLog
	slog *slog.Logger

	mu      sync.Mutex
	state   *agentproto.MainProcessState
	ackOnce sync.Once
}

// NewMainLink returns the link over conn; Run reads it.
func NewMainLink(conn io.ReadWriteCloser, log *slog.Logger) *MainLink {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &MainLink{conn: conn, log: newOutputLog(mainLogMax), slog: log}
}

// Run reads the link until PID 1's end closes it or ctx ends.
func (m *MainLink) Run(ctx context.Context) {
	stop := context.AfterFunc(ctx, func() { m.conn.Close() })
	defer stop()
	for {
		e, err := readLinkEntry(m.conn)
		if err != nil {
			if ctx.Err() == nil && err != io.EOF {
				m.slog.Warn("main process link", "err", err)
			}
			return
		}
		if e.kind == entryState {
			var st agentproto.MainProcessState
			if err := json.Unmarshal(e.data, &st); err != nil {
				m.slog.Warn("main process link: bad state", "err", err)
				continue
			}
			m.mu.Lock()
			m.state = &st
			m.mu.Unlock()
		}
		m.log.append(e.kind, e.data)
	}
}

// State is the main process's last known state ("starting" until PID 1
// sent one).
func (m *MainLink) State() *agentproto.MainProcessState {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state == nil {
		return &agentproto.MainProcessState{State: agentproto.MainStarting}
	}
	st := *m.state
	return &st
}

// delivered tells PID 1 the final exit status reached a client.
func (m *MainLink) delivered() {
	m.ackOnce.Do(func() {
		if _, err := m.conn.Write([]byte{linkAck}); err != nil {
			m.slog.Warn("main process link: acknowledge the exit", "err", err)
		}
	})
}

// attach streams the main process's output to a session channel from
// index from on, then its final exit status, and closes the channel. It
// ends early when ctx ends (the client closed the channel).
func (m *MainLink) attach(ctx context.Context, ch ssh.Channel, from int64) {
	defer ch.Close()
	var final *agentproto.MainProcessState
	err := m.log.follow(ctx, from, func(e logEntry) (bool, error) {
		switch e.kind {
		case entryStdout:
			_, err := ch.Write(e.data)
			return true, err
		case entryStderr:
			_, err := ch.Stderr().Write(e.data)
			return true, err
		case entryState:
			var st agentproto.MainProcessState
			if json.Unmarshal(e.data, &st) == nil && st.State == agentproto.MainExited {
				final = &st
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil || final == nil {
		return
	}
	code := 255
	if final.ExitCode != nil {
		code = *final.ExitCode
	}
	ch.CloseWrite()
	if _, err := ch.SendRequest("exit-status", false, ssh.Marshal(agentproto.ExitStatusMsg{Status: uint32(code)})); err == nil {
		m.delivered()
	}
}
