//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/test/harness"
)

// TestRunRmClientKilled kills -9 the CLI of `vm run --rm -- sleep 60` while
// the command runs: the daemon removes the VM (row, directory, VMM) anyway.
func TestRunRmClientKilled(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := e.Command(ctx, "vm", "run", "--rm", "--name", "doomed", "--image", "tiny", "--memory", "256", "--",
		"sh", "-c", "echo started; exec sleep 60")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	started := make(chan bool, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		started <- strings.TrimSpace(line) == "started"
	}()
	select {
	case ok := <-started:
		if !ok {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatal("the command did not start in the VM")
		}
	case <-ctx.Done():
		t.Fatal("timed out waiting for the command to start")
	}
	vm := e.Inspect("doomed")
	if !vm.AutoRemove || vm.PID == 0 {
		t.Fatalf("vm run --rm made auto_remove=%v pid=%d", vm.AutoRemove, vm.PID)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	harness.WaitFor(t, time.Minute, "the VM of a killed vm run --rm to be removed", func() bool {
		ls, _, _ := e.Banger("vm", "ls", "-q")
		_, err := os.Stat(vm.Dir)
		return !strings.Contains(ls, "doomed") && os.IsNotExist(err) && !harness.ProcessAlive(vm.PID)
	})
}

// endless is stdin that never ends (yes's output).
type endless struct{}

func (endless) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = "y\n"[i%2]
	}
	return len(p), nil
}

// TestExecEndlessStdin: `yes | banger vm exec x -- head -1` returns.
func TestExecEndlessStdin(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	e.Must("vm", "create", "--name", "pipe", "--image", "tiny", "--memory", "256", "--start")
	for i := 0; i < 2; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		cmd := e.Command(ctx, "vm", "exec", "pipe", "--", "head", "-1")
		cmd.Stdin = endless{}
		got, err := cmd.Output()
		cancel()
		if err != nil || string(got) != "y\n" {
			t.Fatalf("yes | banger vm exec pipe -- head -1 = %q, %v (ctx: %v)", got, err, ctx.Err())
		}
	}
}

// rssKiB is a process's resident set size.
func rssKiB(t *testing.T, pid int) int {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.Fields(rest)[0])
			return n
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// TestOversizedRequestBoundedRSS sends bangerd a 10 MB vm.create request
// (a 10 MB name): it is refused as invalid and bangerd's RSS barely moves.
// (Before the request was bounded: 12 -> 100 MiB.)
func TestOversizedRequestBoundedRSS(t *testing.T) {
	e := newEnv(t)
	pid := e.DaemonPID()
	before := rssKiB(t, pid)
	req := []byte(`{"method":"` + api.MethodVMCreate + `","params":{"name":"` + strings.Repeat("a", 10<<20) + `"}}` + "\n")
	for i := 0; i < 3; i++ {
		conn, err := net.Dial("unix", e.Socket())
		if err != nil {
			t.Fatal(err)
		}
		go conn.Write(req) // fails once bangerd closed the connection
		var msg rpc.Message
		err = json.NewDecoder(conn).Decode(&msg)
		conn.Close()
		if err != nil || msg.Error == nil || msg.Error.Code != api.CodeInvalid {
			t.Fatalf("10 MB request: answer %+v, %v; want an invalid-argument error", msg.Error, err)
		}
		if len(msg.Error.Message) > 200 {
			t.Errorf("error message is %d bytes", len(msg.Error.Message))
		}
	}
	after := rssKiB(t, pid)
	t.Logf("bangerd RSS: %d KiB before, %d KiB after three 10 MB requests", before, after)
	if after-before > 16<<10 {
		t.Errorf("bangerd RSS grew by %d KiB (from %d KiB)", after-before, before)
	}
}

// TestStreamedInputBoundedRSS floods bangerd with input frames of the
// largest size it accepts, in JSON lines (old clients) and in binary
// framing: exec calls whose command never reads its stdin, and calls of a
// method that takes no input (vm logs --follow), three of each in each
// framing. The exec calls are slowed down (bangerd stops reading them),
// the others are refused, and bangerd's RSS stays bounded. (Before: every
// call queued 64 frames of up to 1 MiB.)
func TestStreamedInputBoundedRSS(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	e.Must("vm", "create", "--name", "flood", "--image", "tiny", "--memory", "256", "--start")
	pid := e.DaemonPID()
	before := rssKiB(t, pid)

	jsonLine, err := json.Marshal(rpc.Message{Frame: &api.Frame{Type: api.FrameStdin, Data: make([]byte, (rpc.MaxFrameBytes-128)/4*3)}})
	if err != nil {
		t.Fatal(err)
	}
	jsonLine = append(jsonLine, '\n')
	// A binary stdin message: kind, length (big-endian), payload.
	binLine := make([]byte, 5+rpc.MaxFrameBytes)
	binLine[0] = byte(rpc.KindStdin)
	binary.BigEndian.PutUint32(binLine[1:5], rpc.MaxFrameBytes)
	type flood struct {
		conn    net.Conn
		binary  bool
		written atomic.Int64
		stalled atomic.Bool
		done    chan struct{}
	}
	start := func(method string, params any, bin bool) *flood {
		conn, err := net.Dial("unix", e.Socket())
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := json.Marshal(params)
		req, _ := json.Marshal(rpc.Request{Method: method, Params: raw, Binary: bin})
		if _, err := conn.Write(append(req, '\n')); err != nil {
			t.Fatal(err)
		}
		line := jsonLine
		if bin {
			line = binLine
		}
		f := &flood{conn: conn, binary: bin, done: make(chan struct{})}
		go func() {
			defer close(f.done)
			off := 0
			for f.written.Load() < 256<<20 {
				// How long a write may make no progress before it counts as
				// stalled (bangerd stopped reading); it is then retried.
				_ = conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
				n, err := conn.Write(line[off:])
				off = (off + n) % len(line)
				f.written.Add(int64(n))
				var ne net.Error
				switch {
				case err == nil:
				case errors.As(err, &ne) && ne.Timeout():
					f.stalled.Store(true)
				default:
					return // bangerd ended the call, or the test closed it
				}
			}
		}()
		return f
	}
	var execs, logs []*flood
	for _, bin := range []bool{false, true} {
		for range 3 {
			execs = append(execs, start(api.MethodVMExec, api.VMExecParams{Name: "flood", Argv: []string{"sleep", "600"}}, bin))
			logs = append(logs, start(api.MethodVMLogs, api.VMLogsParams{Name: "flood", Follow: true}, bin))
		}
	}
	defer func() {
		for _, f := range append(execs, logs...) {
			f.conn.Close()
			<-f.done
		}
	}()
	harness.WaitFor(t, 5*time.Minute, "bangerd to stop reading (exec) or end (logs) every call", func() bool {
		for i, f := range execs {
			select {
			case <-f.done:
				t.Fatalf("exec call %d: its input ended after %d bytes", i, f.written.Load())
			default:
			}
			if !f.stalled.Load() {
				return false
			}
		}
		for _, f := range logs {
			select {
			case <-f.done:
			default:
				if !f.stalled.Load() {
					return false
				}
			}
		}
		return true
	})
	after := rssKiB(t, pid)
	var written int64
	for _, f := range append(execs, logs...) {
		written += f.written.Load()
	}
	t.Logf("bangerd RSS: %d KiB before, %d KiB after %d calls sent %d MiB of input frames", before, after, len(execs)+len(logs), written>>20)
	if after-before > 16<<10 {
		t.Errorf("bangerd RSS grew by %d KiB (from %d KiB)", after-before, before)
	}
	for i, f := range logs {
		// Generous: the answer is already sent or never comes.
		_ = f.conn.SetReadDeadline(time.Now().Add(time.Minute))
		werr, err := callError(f.conn, f.binary)
		if err != nil {
			t.Fatalf("logs call %d (binary %v): %v, want an invalid-argument error for its input", i, f.binary, err)
		}
		if werr.Code != api.CodeInvalid {
			t.Fatalf("logs call %d (binary %v) sent input: %+v, want an invalid-argument error", i, f.binary, werr)
		}
	}
}

// callError reads a call's messages, in JSON lines or binary framing,
// until its error.
func callError(r io.Reader, bin bool) (*rpc.WireError, error) {
	dec := json.NewDecoder(r)
	for {
		var msg rpc.Message
		if bin {
			var hdr [5]byte
			if _, err := io.ReadFull(r, hdr[:]); err != nil {
				return nil, err
			}
			payload := make([]byte, binary.BigEndian.Uint32(hdr[1:]))
			if _, err := io.ReadFull(r, payload); err != nil {
				return nil, err
			}
			if rpc.Kind(hdr[0]) != rpc.KindMessage {
				continue // output
			}
			if err := json.Unmarshal(payload, &msg); err != nil {
				return nil, err
			}
		} else if err := dec.Decode(&msg); err != nil {
			return nil, err
		}
		if msg.Error != nil {
			return msg.Error, nil
		}
	}
}
