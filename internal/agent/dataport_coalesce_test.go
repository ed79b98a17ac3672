package agent

import (
	"bufio"
	"bytes"
	"errors"
	"net"
	"testing"

	"github.com/bangerdev/banger/internal/agentproto"
)

// framesOf runs dataConn.frames over stream, all of it already read (in
// the buffer), and returns the calls made to fn.
func framesOf(t *testing.T, stream []byte, bufSize int) ([]string, []byte, error) {
	t.Helper()
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	r := bufio.NewReaderSize(bytes.NewReader(stream), bufSize)
	if _, err := r.Peek(1); err != nil { // fill the buffer
		t.Fatal(err)
	}
	d := &dataConn{conn: a, r: r}
	var calls []string
	var out []byte
	err := d.frames(true, true, func(kind byte, p []byte) {
		calls = append(calls, string(rune('0'+kind))+":"+string(rune('0'+len(p)/1000)))
		if kind == agentproto.DataFrameData {
			out = append(out, p...)
		}
	})
	return calls, out, err
}

func frame(kind byte, p []byte) []byte {
	b := make([]byte, agentproto.DataHeaderSize, agentproto.DataHeaderSize+len(p))
	agentproto.PutDataHeader(b, kind, len(p))
	return append(b, p...)
}

func TestFramesCoalesce(t *testing.T) {
	k := bytes.Repeat([]byte("k"), 1000)
	e := bytes.Repeat([]byte("e"), 1000)
	var s []byte
	for range 3 {
		s = append(s, frame(agentproto.DataFrameData, k)...)
	}
	s = append(s, frame(agentproto.DataFrameStderr, e)...)
	s = append(s, frame(agentproto.DataFrameData, k)...)
	s = append(s, frame(agentproto.DataFrameEnd, nil)...)
	calls, out, err := framesOf(t, s, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	// Three stdout payloads joined, stderr alone (a kind change ends a
	// run), the last stdout alone.
	want := []string{"1:3", "2:1", "1:1"}
	if len(calls) != len(want) {
		t.Fatalf("calls %v, want %v", calls, want)
	}
	for i := range want {
		if calls[i] != want[i] {
			t.Fatalf("calls %v, want %v", calls, want)
		}
	}
	if len(out) != 4000 || !bytes.Equal(out[:1000], k) {
		t.Fatalf("stdout of %d bytes", len(out))
	}
}

// A frame that is not whole in the buffer is not waited for: what was
// joined so far goes on first.
func TestFramesCoalesceStopsAtAPartialFrame(t *testing.T) {
	k := bytes.Repeat([]byte("k"), 1000)
	s := append(frame(agentproto.DataFrameData, k), frame(agentproto.DataFrameData, k)...)
	s = append(s, frame(agentproto.DataFrameEnd, nil)...)
	// A buffer holding the first frame and part of the second.
	calls, out, err := framesOf(t, s, 1500)
	if err != nil {
		t.Fatal(err)
	}
	if len(calls) != 2 || len(out) != 2000 {
		t.Fatalf("calls %v, %d bytes", calls, len(out))
	}
}

// What was joined before a broken frame is passed on before the error.
func TestFramesCoalesceFlushesBeforeAnError(t *testing.T) {
	k := bytes.Repeat([]byte("k"), 1000)
	s := append(frame(agentproto.DataFrameData, k), frame(agentproto.DataFrameData, k)...)
	bad := frame(agentproto.DataFrameData, nil)
	bad[0] = 9
	s = append(s, bad...)
	calls, out, err := framesOf(t, s, 1<<20)
	if !errors.Is(err, agentproto.ErrDataFrame) {
		t.Fatalf("err %v", err)
	}
	if len(calls) != 1 || len(out) != 2000 {
		t.Fatalf("calls %v, %d bytes", calls, len(out))
	}
}
