// Package rpc is bangerd's RPC transport: JSON messages over a unix socket,
// one call per connection.
//
// A call is: the client sends a Request; both sides may then exchange
// api.Frame messages (progress, stdout, stdin, ...); the server ends the call
// with a Response carrying a result or an error. The client closing the
// connection cancels the call.
package rpc

import (
	"encoding/json"

	"github.com/bangerdev/banger/internal/api"
)

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
