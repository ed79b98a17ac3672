package guestagent_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
)

// childrenOf lists the live (non-zombie) children of pid.
func childrenOf(pid int) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) > 1 && f[0] != "Z" && f[1] == strconv.Itoa(pid) {
			out = append(out, n)
		}
	}
	return out
}

// The supervisor (used when PID 1 is the image's init) restarts an agent
// server that dies, and stops it on SIGTERM.
func TestSupervisorRestartsAgent(t *testing.T) {
	bin := buildAgent(t)
	cfg := agentConfig(generateKeys(t))
	cfg.Transport = agentproto.TransportVirtioSerial
	cfg.PortName = "no.such.port" // the server waits for it, forever
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "supervise-fd", "3")
	cmd.ExtraFiles = []*os.File{r}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r.Close()
	w.Write(raw)
	w.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })

	waitFor(t, 10*time.Second, "the first agent server", func() bool { return len(childrenOf(cmd.Process.Pid)) == 1 })
	first := childrenOf(cmd.Process.Pid)[0]
	syscall.Kill(first, syscall.SIGKILL)
	waitFor(t, 10*time.Second, "a restarted agent server", func() bool {
		c := childrenOf(cmd.Process.Pid)
		return len(c) == 1 && c[0] != first
	})
	second := childrenOf(cmd.Process.Pid)[0]

	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("supervisor exit: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("supervisor ignored SIGTERM")
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(second)); err == nil {
		if b, _ := os.ReadFile("/proc/" + strconv.Itoa(second) + "/stat"); !strings.Contains(string(b), ") Z") {
			t.Fatalf("agent server %d outlived its supervisor", second)
		}
	}
}
