// Package rpc is bangerd's RPC transport: JSON messages over a unix socket,
// one call per connection.
//
// A call is: the client sends a Request; both sides may then exchange
// api.Frame messages (progress, stdout, stdin, ...), one JSON message per
// line; the server ends the call with a Response carrying a result or an
// error. The client closing the connection cancels the call. A client
// streams frames only to a method registered with TakesInput.
package rpc

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
)

// Size limits of what a client sends, in bytes of JSON. The server refuses
// a larger request (ErrInvalid) and ends a call whose client sends a larger
// frame (stdin and copy-in frames carry at most 32 KiB of data, about 44 KiB
// of JSON: input is streamed in chunks, so the limit bounds a chunk, not a
// stream).
//
// What a call holds of its client's input is bounded (CallInputBound): its
// request (at most MaxRequestBytes, kept for the call) and, for a method
// that takes input, the frame reader's buffer of MaxFrameBytes plus the
// decoded frames in flight: frameQueue queued, one in the reader, one in the
// handler (decoded data is at most 3/4 of a frame's JSON, base64).
const (
	MaxRequestBytes = 1 << 20
	MaxFrameBytes   = 128 << 10
)

// CallInputBound is, in bytes, the most client input one call makes the
// server hold (about 1.5 MiB).
const CallInputBound = MaxRequestBytes + MaxFrameBytes + (frameQueue+2)*MaxFrameBytes*3/4

// budgetReader reads from r until the request's budget is spent, then
// fails with an ErrInvalid error: what the server buffers of a request
// stays near the limit.
type budgetReader struct {
	r     io.Reader
	left  int
	limit int
}

func (b *budgetReader) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, fmt.Errorf("message larger than %d KiB: %w", b.limit>>10, errdefs.ErrInvalid)
	}
	if len(p) > b.left {
		p = p[:b.left]
	}
	n, err := b.r.Read(p)
	b.left -= n
	return n, err
}

// Request opens a call.
type Request struct {
	Method string          `json:"method"`
	Params json.RawMessage `json:"params,omitempty"`
}

// Message is what travels after the request, in both directions. Exactly
// one field is set.
type Message struct {
	Frame  *api.Frame      `json:"frame,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  *WireError      `json:"error,omitempty"`
	Done   bool            `json:"done,omitempty"` // set with Result (which may be null)
}

// WireError is an error as carried on the wire.
type WireError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}
