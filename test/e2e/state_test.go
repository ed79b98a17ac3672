//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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
