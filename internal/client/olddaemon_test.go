package client

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/rpc"
)

// serveOldDaemon is a daemon from before binary framing: JSON lines only
// (the request's binary flag unknown to it), an exec that echoes its
// stdin, an unknown-method error for anything else. It records the
// methods called.
func serveOldDaemon(t *testing.T) (*Client, chan string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "old.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	methods := make(chan string, 16)
	go func() {
		for range 16 {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(30 * time.Second))
				r := bufio.NewReader(conn)
				enc := json.NewEncoder(conn)
				line, err := r.ReadBytes('\n')
				if err != nil {
					return
				}
				var req rpc.Request
				if json.Unmarshal(line, &req) != nil {
					return
				}
				methods <- req.Method
				if req.Method != api.MethodVMExec {
					enc.Encode(rpc.Message{Error: &rpc.WireError{Code: api.CodeUnknownMethod, Message: "unknown method"}})
					return
				}
				var in []byte
				for {
					line, err := r.ReadBytes('\n')
					if err != nil {
						return // what a new client's binary EOF would do: no newline, ever
					}
					var msg rpc.Message
					if json.Unmarshal(line, &msg) != nil || msg.Frame == nil {
						enc.Encode(rpc.Message{Error: &rpc.WireError{Code: api.CodeInvalid, Message: "bad message"}})
						return
					}
					if msg.Frame.Type == api.FrameEOF {
						break
					}
					in = append(in, msg.Frame.Data...)
				}
				enc.Encode(rpc.Message{Frame: &api.Frame{Type: api.FrameStdout, Data: in}})
				res, _ := json.Marshal(api.ExecResult{ExitCode: 5})
				enc.Encode(rpc.Message{Result: res, Done: true})
			}()
		}
	}()
	return New(sock), methods
}

// A new CLI's exec with input against an old daemon: it finds out the
// daemon doesn't read binary framing and speaks JSON lines.
func TestExecInputOldDaemon(t *testing.T) {
	c, methods := serveOldDaemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, stdin := range []string{"", "some input"} {
		var out strings.Builder
		eio := ExecIO{Stdout: &out}
		if stdin != "" {
			eio.Stdin = strings.NewReader(stdin)
		}
		code, err := c.VMExec(ctx, api.VMExecParams{Name: "d1", Argv: []string{"cat"}}, eio)
		if err != nil || code != 5 || out.String() != stdin {
			t.Errorf("exec with stdin %q on an old daemon: %d, %v, %q", stdin, code, err, out.String())
		}
	}
	close(methods)
	var got []string
	for m := range methods {
		got = append(got, m)
	}
	want := []string{rpc.MethodBinaryProbe, api.MethodVMExec, rpc.MethodBinaryProbe, api.MethodVMExec}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("calls %v, want %v", got, want)
	}
}

// A new daemon says it reads binary framing.
func TestProbeBinaryNewDaemon(t *testing.T) {
	c := serveFake(t, &fakeDaemon{})
	ok, err := rpc.ProbeBinary(context.Background(), c.Socket)
	if err != nil || !ok {
		t.Errorf("probe of a new daemon: %v, %v; want true", ok, err)
	}
}
