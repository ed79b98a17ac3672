package rpc

import (
	"bufio"
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
	"github.com/bangerdev/banger/internal/sockbuf"
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
	stop func() bool

	// JSON lines (also the reading side of a binary call the daemon
	// answered in JSON lines: see Next).
	dec *json.Decoder
	// Binary framing: r reads messages, buf holds Next's data.
	r   *bufio.Reader
	buf []byte
	hdr [headerLen]byte

	mu  sync.Mutex // guards writes: enc, bin
	enc *json.Encoder
	bin *binOut // binary framing; nil in JSON lines (also after a fall back)

	binary  bool // Next reads binary messages; Next's alone
	started bool // Next has read a binary message; Next's alone
}

// maxReplyBytes bounds a daemon's KindMessage (a result: VM lists, ...):
// a corrupt length fails the call instead of allocating gigabytes.
const maxReplyBytes = 256 << 20

// Open dials socketPath and sends the request; the call speaks JSON lines.
func Open(ctx context.Context, socketPath, method string, params any) (*Stream, error) {
	return open(ctx, socketPath, method, params, false)
}

// OpenBinary is Open for a call in binary framing: stream data travels as
// raw bytes (SendData, Next), for bulk streams.
func OpenBinary(ctx context.Context, socketPath, method string, params any) (*Stream, error) {
	return open(ctx, socketPath, method, params, true)
}

func open(ctx context.Context, socketPath, method string, params any, binary bool) (*Stream, error) {
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
	s := &Stream{conn: conn, enc: json.NewEncoder(conn)}
	if binary {
		// Input (stdin, a copy in) runs ahead of the daemon's reads.
		// Best effort (without privileges it stops at net.core.wmem_max):
		// the call works with any buffer, so an error is ignored.
		_, _ = sockbuf.GrowSend(conn, sockbuf.Stream)
		s.r = bufio.NewReaderSize(conn, 64<<10)
		s.bin = &binOut{w: conn}
		s.binary = true
	} else {
		s.dec = json.NewDecoder(conn)
	}
	if err := s.enc.Encode(Request{Method: method, Params: raw, Binary: binary}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send %s: %w", method, err)
	}
	s.stop = context.AfterFunc(ctx, func() { conn.Close() })
	return s, nil
}

// Send sends a frame to the daemon, as one message: the daemon ends a
// call whose message is over MaxFrameBytes (see SendData). In binary
// framing a stdin frame goes as raw data.
func (s *Stream) Send(f api.Frame) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.bin == nil:
		return s.enc.Encode(Message{Frame: &f})
	case f.Type == api.FrameStdin:
		return s.bin.write(KindStdin, f.Data)
	}
	raw, err := json.Marshal(Message{Frame: &f})
	if err != nil {
		return err
	}
	return s.bin.write(KindMessage, raw)
}

// jsonDataChunk is the most data SendData puts in one JSON-lines frame
// (about 44 KiB of JSON, base64).
const jsonDataChunk = 32 << 10

// SendData sends p as stdin data (kind KindStdin), split into frames the
// daemon accepts: in binary framing p is written as it is, in frames of
// at most MaxFrameBytes; in JSON lines base64-encoded in frames of 32
// KiB. An empty p sends nothing. p is not retained.
func (s *Stream) SendData(kind Kind, p []byte) error {
	if kind != KindStdin {
		return fmt.Errorf("rpc: a client sends no data of kind %d", kind)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(p) > 0 {
		var err error
		n := min(len(p), MaxFrameBytes)
		if s.bin == nil {
			n = min(len(p), jsonDataChunk)
			err = s.enc.Encode(Message{Frame: &api.Frame{Type: kind.frameType(), Data: p[:n]}})
		} else {
			err = s.bin.write(kind, p[:n])
		}
		if err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// Recv returns the next frame. When the call ends it decodes the result
// into result (if non-nil) and returns io.EOF, or returns the call's error.
func (s *Stream) Recv(result any) (api.Frame, error) {
	f, err := s.Next(result)
	if err == nil && s.r != nil && f.Data != nil {
		f.Data = bytes.Clone(f.Data)
	}
	return f, err
}

// Next is Recv without a copy: a data frame's Data is valid only until the
// next call of Next or Recv.
//
// A daemon from before binary framing ignores the request's flag and
// answers in JSON lines: Next then reads JSON lines, and Send and SendData
// write them. Input sent before its first answer would be lost on it (a
// binary message is no line: the call fails or waits for good): a call
// with input asks ProbeBinary first.
func (s *Stream) Next(result any) (api.Frame, error) {
	if s.r == nil || !s.binary {
		var msg Message
		if err := s.dec.Decode(&msg); err != nil {
			return api.Frame{}, readErr(err)
		}
		return reply(msg, result)
	}
	kind, n, err := readHeader(s.r, &s.hdr)
	if err != nil {
		return api.Frame{}, readErr(err)
	}
	if !s.started && s.hdr[0] == '{' {
		// JSON lines: a daemon from before binary framing.
		s.fallBack()
		return s.Next(result)
	}
	s.started = true
	switch kind {
	case KindStdout, KindStderr:
		if n > MaxDataFrame {
			return api.Frame{}, fmt.Errorf("read from bangerd: a data frame of %d KiB, over %d KiB", n>>10, MaxDataFrame>>10)
		}
		if cap(s.buf) < n {
			s.buf = make([]byte, max(n, 64<<10))
		}
		data := s.buf[:n]
		if _, err := io.ReadFull(s.r, data); err != nil {
			return api.Frame{}, readErr(err)
		}
		return api.Frame{Type: kind.frameType(), Data: data}, nil
	case KindMessage:
		if n > maxReplyBytes {
			return api.Frame{}, fmt.Errorf("read from bangerd: a message of %d MiB, over %d MiB", n>>20, maxReplyBytes>>20)
		}
		raw := make([]byte, n)
		if _, err := io.ReadFull(s.r, raw); err != nil {
			return api.Frame{}, readErr(err)
		}
		var msg Message
		if err := json.Unmarshal(raw, &msg); err != nil {
			return api.Frame{}, fmt.Errorf("read from bangerd: %w", err)
		}
		return reply(msg, result)
	default:
		return api.Frame{}, fmt.Errorf("read from bangerd: a message of unknown kind %d (client and daemon versions differ?)", kind)
	}
}

// ProbeBinary reports whether the daemon at socketPath reads binary
// framing (MethodBinaryProbe): a daemon from before it answers in JSON
// lines, and takes a binary message for a bad line. It costs one
// connection and one message each way.
func ProbeBinary(ctx context.Context, socketPath string) (bool, error) {
	s, err := OpenBinary(ctx, socketPath, MethodBinaryProbe, nil)
	if err != nil {
		return false, err
	}
	defer s.Close()
	_, err = s.Next(nil)
	switch {
	case errors.Is(err, io.EOF):
		return s.binary, nil // answered in binary framing, unless it fell back
	case errors.Is(err, errdefs.ErrUnknownMethod):
		return false, nil
	}
	return false, err
}

// fallBack switches the stream to JSON lines, the header just read being
// the start of the daemon's first line.
func (s *Stream) fallBack() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.binary = false
	s.bin = nil
	s.dec = json.NewDecoder(io.MultiReader(bytes.NewReader(bytes.Clone(s.hdr[:])), s.r))
}

// readErr describes a failed read of the daemon's messages.
func readErr(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		return errors.New("connection to bangerd closed before the call ended")
	}
	return fmt.Errorf("read from bangerd: %w", err)
}

// reply returns the frame msg carries, or ends the call: the daemon's
// error, or io.EOF with the result decoded into result (if non-nil).
func reply(msg Message, result any) (api.Frame, error) {
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
