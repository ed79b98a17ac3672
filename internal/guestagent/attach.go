package guestagent

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
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
		// Never block the attach on PID 1's end.
		go func() {
			if _, err := m.conn.Write([]byte{linkAck}); err != nil {
				m.slog.Warn("main process link: acknowledge the exit", "err", err)
			}
		}()
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
	// With a reply asked for (the host's client answers every request
	// it reads), the answer proves the host has the status: only then may
	// PID 1 power the VM off, which cuts the connection.
	if _, err := ch.SendRequest("exit-status", true, ssh.Marshal(agentproto.ExitStatusMsg{Status: uint32(code)})); err == nil {
		m.delivered()
	}
}

// MainFeeder writes to a MainLink what PID 1's supervisor sends: the main
// process's output and its state changes (the last one its final exit).
// It stands in for PID 1 in tests of the host side (the daemon's fake
// VMM), which have no real guest.
type MainFeeder struct {
	mu   sync.Mutex
	conn io.ReadWriteCloser
}

// Output sends output of the main process (stderr or stdout).
func (f *MainFeeder) Output(stderr bool, p []byte) error {
	kind := byte(entryStdout)
	if stderr {
		kind = entryStderr
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return writeLinkEntry(f.conn, logEntry{kind: kind, data: p})
}

// State sends a state change.
func (f *MainFeeder) State(st agentproto.MainProcessState) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return writeLinkEntry(f.conn, logEntry{kind: entryState, data: b})
}

// WaitAck waits until the agent reported the final exit delivered to a
// client (it reports true), or ctx ends.
func (f *MainFeeder) WaitAck(ctx context.Context) bool {
	got := make(chan bool, 1)
	go func() {
		b := make([]byte, 1)
		for {
			n, err := f.conn.Read(b)
			if n == 1 && b[0] == linkAck {
				got <- true
				return
			}
			if err != nil {
				got <- false
				return
			}
		}
	}()
	select {
	case ok := <-got:
		return ok
	case <-ctx.Done():
		return false
	}
}

// Close closes the feeder's end of the link.
func (f *MainFeeder) Close() error { return f.conn.Close() }

// NewMainLinkPair returns a MainLink (for Hooks.Main; run it with Run)
// and the MainFeeder that feeds it, over an in-memory pipe.
func NewMainLinkPair(log *slog.Logger) (*MainLink, *MainFeeder) {
	a, b := net.Pipe()
	return NewMainLink(a, log), &MainFeeder{conn: b}
}
