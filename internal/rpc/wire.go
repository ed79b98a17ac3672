// Package rpc is bangerd's RPC transport: messages over a unix socket,
// one call per connection.
//
// A call is: the client sends a Request (one line of JSON); both sides may
// then exchange api.Frame messages (progress, stdout, stdin, ...); the
// server ends the call with a Message carrying a result or an error. The
// client closing the connection cancels the call. A client streams frames
// only to a method registered with TakesInput.
//
// After the request, a call speaks one of two framings, chosen by the
// client per call:
//   - JSON lines (the default; every client before binary framing): one
//     JSON Message per line, stream data base64-encoded in api.Frame.Data.
//   - Binary (the request has "binary": true): every message, in both
//     directions, is [kind u8][length u32 big-endian][payload]. KindMessage
//     carries a JSON Message (frames without data: progress, eof, resize;
//     the result; an error); KindStdout, KindStderr (daemon → client) and
//     KindStdin (client → daemon) carry raw bytes of one stream, with no
//     encoding and no copy beyond the socket's. Bulk streams (exec, cp,
//     logs, attach, tunnels) use it. A daemon from before it answers in
//     JSON lines, which the client follows; a call that sends input asks
//     first (ProbeBinary), since such a daemon can't read binary input.
package rpc

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
)

// Size limits of what a client sends. The server refuses a larger request
// (ErrInvalid) and ends a call whose client sends a larger message: in JSON
// lines a message is at most MaxFrameBytes of JSON (a stdin frame then
// carries at most 96 KiB of data, base64); in binary framing a message's
// payload is at most MaxFrameBytes (a stdin frame carries 128 KiB of raw
// data). Input is streamed in chunks, so the limit bounds a chunk, not a
// stream.
//
// What a call holds of its client's input is bounded (CallInputBound): its
// request (at most MaxRequestBytes, kept for the call) and, for a method
// that takes input, the reader's buffer plus the frames in flight:
// frameQueue queued, one in the reader, one in the handler. In JSON lines
// the buffer is MaxFrameBytes and a decoded frame at most 3/4 of it
// (base64); in binary framing the buffer is binaryReadBuffer and a frame
// at most MaxFrameBytes.
const (
	MaxRequestBytes = 1 << 20
	MaxFrameBytes   = 128 << 10
)

// MaxDataFrame is the most data the daemon sends in one binary frame;
// larger writes are split.
const MaxDataFrame = 1 << 20

// binaryReadBuffer is the buffer a binary call's messages are read
// through: small messages (eof, resize) cost no syscall each, large
// payloads are read straight into their frame.
const binaryReadBuffer = 16 << 10

const (
	jsonInputBound   = MaxFrameBytes + (frameQueue+2)*MaxFrameBytes*3/4
	binaryInputBound = binaryReadBuffer + (frameQueue+2)*MaxFrameBytes
)

// CallInputBound is, in bytes, the most client input one call makes the
// server hold (about 1.5 MiB), in either framing.
const CallInputBound = MaxRequestBytes + max(jsonInputBound, binaryInputBound)

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
	// Binary switches the rest of the call to binary framing.
	Binary bool `json:"binary,omitempty"`
}

// Message is what travels after the request, in both directions (in
// binary framing: as a KindMessage payload). Exactly one field is set.
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

// MethodBinaryProbe is answered by the server itself, with an empty
// result in the request's framing: a daemon from before binary framing
// answers it with an unknown-method error in JSON lines (see ProbeBinary).
const MethodBinaryProbe = "rpc.binary_framing"

// Kind is what a binary message carries.
type Kind uint8

const (
	KindMessage Kind = 0 // a JSON Message
	KindStdout  Kind = 1 // stdout data, daemon → client
	KindStderr  Kind = 2 // stderr data, daemon → client
	KindStdin   Kind = 3 // stdin data, client → daemon
)

// headerLen is the size of a binary message's header: kind, length.
const headerLen = 5

// KindOf returns the data kind of frames of type typ (api.FrameStdout,
// ...), or KindMessage for a frame type that carries no stream data.
func KindOf(typ string) Kind {
	switch typ {
	case api.FrameStdout:
		return KindStdout
	case api.FrameStderr:
		return KindStderr
	case api.FrameStdin:
		return KindStdin
	}
	return KindMessage
}

// frameType is the api.Frame type of a data kind.
func (k Kind) frameType() string {
	switch k {
	case KindStdout:
		return api.FrameStdout
	case KindStderr:
		return api.FrameStderr
	case KindStdin:
		return api.FrameStdin
	}
	return ""
}

// putHeader fills hdr for a message of kind with n bytes of payload.
func putHeader(hdr *[headerLen]byte, kind Kind, n int) {
	hdr[0] = byte(kind)
	binary.BigEndian.PutUint32(hdr[1:], uint32(n))
}

// readHeader reads a binary message's header from r.
func readHeader(r io.Reader, hdr *[headerLen]byte) (Kind, int, error) {
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, 0, err
	}
	return Kind(hdr[0]), int(binary.BigEndian.Uint32(hdr[1:])), nil
}
