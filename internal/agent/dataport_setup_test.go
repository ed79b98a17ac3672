package agent_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/bangerdev/banger/internal/agent"
)

// A data port the guest can't set up (here: a port it doesn't have) makes
// it report why on the session's stderr with status 255, having started
// nothing: the exec runs again over SSH, stdin untouched.
func TestDataPortSetupFailureRetriesOverSSH(t *testing.T) {
	g := serveData(t, 1)
	var dials1 atomic.Int32
	// The host believes in 2 ports; the pool hands out port 1 first.
	g.c.UseDataPorts(2, func(ctx context.Context, port int) (net.Conn, error) {
		if port != 1 {
			return nil, errors.New("only port 1 in this test")
		}
		dials1.Add(1)
		_, hc := socketPair(t)
		return hc, nil
	})
	ctx := dataCtx(t)
	var out, errOut bytes.Buffer
	code, err := g.c.Exec(ctx, agent.ExecOptions{Argv: []string{"sh", "-c", "cat; echo err >&2; exit 3"},
		Stdin: strings.NewReader("all of stdin"), Stdout: &out, Stderr: &errOut})
	if err != nil || code != 3 || out.String() != "all of stdin" || errOut.String() != "err\n" {
		t.Errorf("exec on a port the guest lacks: %d, %v, stdout %q, stderr %q; want 3, the input, err", code, err, out.String(), errOut.String())
	}
	if dials1.Load() != 1 {
		t.Errorf("%d dials of port 1, want 1", dials1.Load())
	}
}

// failingReader returns its data, then an error (not EOF).
type failingReader struct{ data []byte }

func (f *failingReader) Read(p []byte) (int, error) {
	if len(f.data) == 0 {
		return 0, errors.New("stdin broke")
	}
	n := copy(p, f.data)
	f.data = f.data[n:]
	return n, nil
}

// A stdin that fails to read ends the command's stdin on a data port, as
// over SSH: cat ends instead of waiting for more.
func TestDataPortStdinReadError(t *testing.T) {
	g := serveData(t, 1)
	var out bytes.Buffer
	code, err := g.c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"cat"}, Stdin: &failingReader{data: []byte("abc")}, Stdout: &out})
	if err != nil || code != 0 || out.String() != "abc" || g.dials.Load() != 1 {
		t.Errorf("cat with a failing stdin: %d, %v, %q, %d dials; want 0 and abc over the port", code, err, out.String(), g.dials.Load())
	}
}
