package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// QMPError is an error answered by QEMU to a QMP command.
type QMPError struct {
	Command string
	Class   string
	Desc    string
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

// QMPVersion is the QEMU version announced in the QMP greeting.
type QMPVersion struct {
	Major, Minor, Micro int
	Package             string
}

// QMP is a client of QEMU's machine protocol. It is not safe for concurrent
// use: QEMU's QMP socket serves one client at a time anyway.
type QMP struct {
	conn    net.Conn
	dec     *json.Decoder
	enc     *json.Encoder
	nextID  int
	Version QMPVersion

	mu     sync.Mutex
	events []json.RawMessage // asynchronous events seen while waiting for replies
}

type qmpMessage struct {
	QMP *struct {
		Version struct {
			QEMU struct {
				Major int `json:"major"`
				Minor int `json:"minor"`
				Micro int `json:"micro"`
			} `json:"qemu"`
			Package string `json:"package"`
		} `json:"version"`
	} `json:"QMP"`
	Event  string          `json:"event"`
	ID     json.RawMessage `json:"id"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

// maxEvents bounds the events a QMP client keeps.
const maxEvents = 64

// DialQMP connects to the QMP unix socket at path, reads the greeting and
// negotiates capabilities.
func DialQMP(ctx context.Context, path string) (*QMP, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect qmp %s: %w", path, err)
	}
	q := &QMP{conn: conn, dec: json.NewDecoder(bufio.NewReader(conn)), enc: json.NewEncoder(conn)}
	if err := q.handshake(ctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp %s: %w", path, err)
	}
	return q, nil
}

func (q *QMP) handshake(ctx context.Context) error {
	stop := q.bound(ctx)
	defer stop()
	for {
		var m qmpMessage
		if err := q.dec.Decode(&m); err != nil {
			return q.ctxErr(ctx, fmt.Errorf("read greeting: %w", err))
		}
		if m.QMP != nil {
			v := m.QMP.Version
			q.Version = QMPVersion{Major: v.QEMU.Major, Minor: v.QEMU.Minor, Micro: v.QEMU.Micro, Package: v.Package}
			break
		}
	}
	stop()
	return q.Execute(ctx, "qmp_capabilities", nil, nil)
}

// bound makes blocking reads and writes on the connection end when ctx
// does. The returned function undoes it.
func (q *QMP) bound(ctx context.Context) (stop func()) {
	if dl, ok := ctx.Deadline(); ok {
		q.conn.SetDeadline(dl)
	}
	cancel := context.AfterFunc(ctx, func() {
		// Wake up any blocked read or write.
		q.conn.SetDeadline(time.Unix(1, 0))
	})
	return func() {
		cancel()
		q.conn.SetDeadline(time.Time{})
	}
}

// ctxErr prefers ctx's error over the I/O error it caused.
func (q *QMP) ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	// The connection deadline (ctx's deadline) may fire just before ctx's
	// own timer does.
	if dl, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(dl) {
		return fmt.Errorf("%w (%w)", context.DeadlineExceeded, err)
	}
	return err
}

// Execute runs a QMP command with optional arguments and decodes its return
// value into result (if not nil). Asynchronous events received meanwhile are
// kept (see Events). A command QEMU rejects returns a *QMPError.
func (q *QMP) Execute(ctx context.Context, command string, args any, result any) error {
	stop := q.bound(ctx)
	defer stop()
	q.nextID++
	id := "banger-" + strconv.Itoa(q.nextID)
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        string `json:"id"`
	}{command, args, id}
	if err := q.enc.Encode(req); err != nil {
		return q.ctxErr(ctx, fmt.Errorf("qmp %s: send: %w", command, err))
	}
	for {
		var raw json.RawMessage
		if err := q.dec.Decode(&raw); err != nil {
			return q.ctxErr(ctx, fmt.Errorf("qmp %s: read reply: %w", command, err))
		}
		var m qmpMessage
		if err := json.Unmarshal(raw, &m); err != nil {
			return fmt.Errorf("qmp %s: decode reply: %w", command, err)
		}
		if m.Event != "" {
			q.keepEvent(raw)
			continue
		}
		var gotID string
		if len(m.ID) > 0 && json.Unmarshal(m.ID, &gotID) == nil && gotID != id {
			continue // a reply to an earlier, abandoned command
		}
		if m.Error != nil {
			return &QMPError{Command: command, Class: m.Error.Class, Desc: m.Error.Desc}
		}
		if result != nil && len(m.Return) > 0 {
			if err := json.Unmarshal(m.Return, result); err != nil {
				return fmt.Errorf("qmp %s: decode return: %w", command, err)
			}
		}
		return nil
	}
}

func (q *QMP) keepEvent(raw json.RawMessage) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.events) == maxEvents {
		q.events = q.events[1:]
	}
	q.events = append(q.events, append(json.RawMessage(nil), raw...))
}

// Events returns and forgets the asynchronous events (raw JSON objects)
// received so far, oldest first, at most the last 64.
func (q *QMP) Events() []json.RawMessage {
	q.mu.Lock()
	defer q.mu.Unlock()
	ev := q.events
	q.events = nil
	return ev
}

// QueryStatus returns the VM's run state ("running", "paused",
// "shutdown", ...).
func (q *QMP) QueryStatus(ctx context.Context) (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	if err := q.Execute(ctx, "query-status", nil, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}

// Close closes the connection.
func (q *QMP) Close() error { return q.conn.Close() }

// isClosedConn reports whether err means the peer went away, which is how
// QEMU answers "quit" when it exits before its reply is read.
func isClosedConn(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
