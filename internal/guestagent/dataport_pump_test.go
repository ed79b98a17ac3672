package guestagent

import (
	"bytes"
	"os"
	"testing"

	"github.com/bangerdev/banger/internal/agentproto"
)

// closeOnFirstWrite records the frames written to it and closes the pipe
// at the first: the pipe closed (the output's grace ran out) while
// pumpPipe holds a partial frame.
type closeOnFirstWrite struct {
	buf    bytes.Buffer
	r      *os.File
	closed bool
}

func (w *closeOnFirstWrite) Write(p []byte) (int, error) {
	if !w.closed {
		w.closed = true
		w.r.Close()
	}
	return w.buf.Write(p)
}

// TestPumpPipeClosedHoldingAFrame: what pumpPipe read from the pipe goes
// out even when the pipe is closed under it.
func TestPumpPipeClosedHoldingAFrame(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()    // kept open: a background process still holds it
	const n = 40 << 10 // a full frame and a partial one
	if _, err := w.Write(bytes.Repeat([]byte("x"), n)); err != nil {
		t.Fatal(err)
	}
	out := &closeOnFirstWrite{r: r}
	if err := pumpPipe(agentproto.NewDataWriter(out), agentproto.DataFrameData, r); err == nil {
		t.Errorf("pumpPipe of a closed pipe: no error")
	}
	dr := agentproto.NewDataReader(&out.buf, 0)
	got := 0
	for {
		_, p, err := dr.Next()
		if err != nil {
			break
		}
		got += len(p)
	}
	if got != n {
		t.Errorf("%d bytes in frames, want the %d read", got, n)
	}
}
