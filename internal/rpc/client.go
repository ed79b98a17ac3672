package rpc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
)

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

// ErrDaemonUnreachable wraps failures to connect to the daemon's socket.
var ErrDaemonUnreachable = errors.New("daemon unreachable")

// RemoteError is an error returned by the daemon. errors.Is matches the
// errdefs sentinel of its code.
type RemoteError struct {
	Code    string
	Message string
}

func (e *RemoteError) Error() string { return e.Message }

// Unwrap returns the errdefs sentinel of the code, if any.
func (e *RemoteError) Unwrap() error { return errdefs.FromCode(e.Code) }

// Stream is an open call.
type Stream struct {
	conn net.Conn
	dec  *json.Decoder
	mu   sync.Mutex
	enc  *json.Encoder
	stop func() bool
}

// Open dials socketPath and sends the request.
func Open(ctx context.Context, socketPath, method string, params any) (*Stream, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("connect to bangerd at %s: %w: %w", socketPath, ErrDaemonUnreachable, err)
	}
	raw, err := json.Marshal(params)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("encode %s params: %w", method, err)
	}
	if len(raw) > MaxRequestBytes-len(method)-64 {
		conn.Close()
		return nil, fmt.Errorf("%s request of %d bytes is larger than the daemon accepts (%d KiB): %w", method, len(raw), MaxRequestBytes>>10, errdefs.ErrInvalid)
	}
	s := &Stream{conn: conn, dec: json.NewDecoder(conn), enc: json.NewEncoder(conn)}
	if err := s.enc.Encode(Request{Method: method, Params: raw}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send %s: %w", method, err)
	}
	s.stop = context.AfterFunc(ctx, func() { conn.Close() })
	return s, nil
}

// Send sends a frame to the daemon.
func (s *Stream) Send(f api.Frame) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.enc.Encode(Message{Frame: &f})
}

// Recv returns the next frame. When the call ends it decodes the result
// into result (if non-nil) and returns io.EOF, or returns the call's error.
func (s *Stream) Recv(result any) (api.Frame, error) {
	var msg Message
	if err := s.dec.Decode(&msg); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
			return api.Frame{}, errors.New("connection to bangerd closed before the call ended")
		}
		return api.Frame{}, fmt.Errorf("read from bangerd: %w", err)
	}
	switch {
	case msg.Error != nil:
		return api.Frame{}, &RemoteError{Code: msg.Error.Code, Message: msg.Error.Message}
	case msg.Frame != nil:
		return *msg.Frame, nil
	default:
		if result != nil && len(msg.Result) > 0 {
			if err := json.Unmarshal(msg.Result, result); err != nil {
				return api.Frame{}, fmt.Errorf("decode result: %w", err)
			}
		}
		return api.Frame{}, io.EOF
	}
}

// Close ends the call (cancelling it on the daemon if still running).
func (s *Stream) Close() error {
	s.stop()
	return s.conn.Close()
}

// Do performs a call, passing frames to onFrame (which may be nil), and
// decodes the result into result.
func Do(ctx context.Context, socketPath, method string, params, result any, onFrame func(api.Frame)) error {
	s, err := Open(ctx, socketPath, method, params)
	if err != nil {
		return err
	}
	defer s.Close()
	for {
		f, err := s.Recv(result)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		if onFrame != nil {
			onFrame(f)
		}
	}
}
