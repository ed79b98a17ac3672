package client

import (
	"encoding/json"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/rpc"
)

// A full chunk of stdin fits in a frame the daemon accepts: streams are
// chunked, so any input size works.
func TestStdinChunkFitsInAFrame(t *testing.T) {
	line, err := json.Marshal(rpc.Message{Frame: &api.Frame{Type: api.FrameStdin, Data: make([]byte, stdinChunk)}})
	if err != nil {
		t.Fatal(err)
	}
	if len(line)+1 > rpc.MaxFrameBytes {
		t.Fatalf("a %d KiB stdin chunk is a %d-byte frame, over the daemon's %d KiB", stdinChunk>>10, len(line)+1, rpc.MaxFrameBytes>>10)
	}
}
