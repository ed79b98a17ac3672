package qemu

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/vmm"
)

// statLine builds a /proc/<pid>/stat line with the given comm, state and
// start time (field 22).
func statLine(pid int, comm string, state byte, start uint64) string {
	s := strconv.Itoa(pid) + " (" + comm + ") " + string(state)
	// fields 4..21
	for i := 4; i <= 21; i++ {
		s += " " + strconv.Itoa(i)
	}
	s += " " + strconv.FormatUint(start, 10) + " 23 24 25\n"
	return s
}

func TestParseProcStat(t *testing.T) {
	st, err := parseProcStat([]byte(statLine(42, "qemu) (evil x", 'S', 123456)))
	if err != nil {
		t.Fatal(err)
	}
	if st.State != 'S' || st.StartTime != 123456 {
		t.Errorf("got %+v", st)
	}
	if _, err := parseProcStat([]byte("42 (x) S 1 2")); err == nil {
		t.Error("short stat parsed")
	}
	if _, err := parseProcStat([]byte("garbage")); err == nil {
		t.Error("garbage parsed")
	}
}

func TestParseProcStatSelf(t *testing.T) {
	st, err := readProcStat("/proc", os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if st.StartTime == 0 || st.exited() {
		t.Errorf("self: %+v", st)
	}
}

func TestAliveFakeProc(t *testing.T) {
	root := t.TempDir()
	write := func(pid int, state byte, start uint64) {
		dir := filepath.Join(root, strconv.Itoa(pid))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "stat"), []byte(statLine(pid, "qemu-system-x86", state, start)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(100, 'S', 5000)
	write(101, 'Z', 5000)
	write(102, 'R', 7000)
	d := New(Config{}, nil)
	d.procRoot = root
	tests := []struct {
		h    vmm.Handle
		want bool
	}{
		{vmm.Handle{PID: 100, StartTime: 5000}, true},
		{vmm.Handle{PID: 101, StartTime: 5000}, false}, // zombie
		{vmm.Handle{PID: 102, StartTime: 5000}, false}, // pid reused
		{vmm.Handle{PID: 103, StartTime: 5000}, false}, // gone
		{vmm.Handle{PID: 0}, false},
		{vmm.Handle{PID: 100}, false}, // no start time recorded: can't rule out pid reuse
	}
	for _, tt := range tests {
		if got := d.Alive(tt.h); got != tt.want {
			t.Errorf("Alive(%+v) = %v, want %v", tt.h, got, tt.want)
		}
	}
	// Cleanup refuses while alive, removes files when not.
	dir := t.TempDir()
	h := vmm.Handle{PID: 100, StartTime: 5000, ControlSocket: filepath.Join(dir, "qmp.sock"), AgentSocket: filepath.Join(dir, "agent.sock"), PIDFile: filepath.Join(dir, "qemu.pid"),
		DataSockets: []string{filepath.Join(dir, "data0.sock"), filepath.Join(dir, "data1.sock")}}
	for _, p := range append([]string{h.ControlSocket, h.AgentSocket, h.PIDFile}, h.DataSockets...) {
		os.WriteFile(p, nil, 0o600)
	}
	if err := d.Cleanup(h); err == nil {
		t.Error("Cleanup of a live VMM succeeded")
	}
	h.PID = 101
	if err := d.Cleanup(h); err != nil {
		t.Fatal(err)
	}
	if err := d.Cleanup(h); err != nil {
		t.Fatalf("second Cleanup: %v", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("files left: %v", ents)
	}
}

func handleOf(t *testing.T, pid int) vmm.Handle {
	t.Helper()
	st, err := readProcStat("/proc", pid)
	if err != nil {
		t.Fatal(err)
	}
	return vmm.Handle{PID: pid, StartTime: st.StartTime}
}

// TestWaitChildExit checks that Wait sees a process exit even though it
// stays an unreaped zombie (as a daemonized QEMU does under a PID 1 that
// does not reap).
func TestWaitChildExit(t *testing.T) {
	cmd := exec.Command("sleep", "0.3")
	if err := cmd.Start(); err != nil {
		t.Skip("no sleep binary:", err)
	}
	defer cmd.Wait()
	d := New(Config{}, nil)
	h := handleOf(t, cmd.Process.Pid)
	if !d.Alive(h) {
		t.Fatal("child not alive")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if err := d.Wait(ctx, h); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Errorf("Wait took %v", el)
	}
	if d.Alive(h) {
		t.Error("Alive after Wait")
	}
}

func TestWaitContext(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Skip("no sleep binary:", err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	d := New(Config{}, nil)
	h := handleOf(t, cmd.Process.Pid)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := d.Wait(ctx, h)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait = %v, want deadline exceeded", err)
	}
	// Wait on a handle whose start time does not match returns at once.
	h.StartTime++
	if err := d.Wait(context.Background(), h); err != nil {
		t.Fatal(err)
	}
}

func TestKillByPIDWithoutQMP(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Skip("no sleep binary:", err)
	}
	go cmd.Wait()
	d := New(Config{}, nil)
	dir := t.TempDir()
	h := handleOf(t, cmd.Process.Pid)
	h.ControlSocket = filepath.Join(dir, "qmp.sock") // nobody listens
	h.PIDFile = filepath.Join(dir, "qemu.pid")
	os.WriteFile(h.PIDFile, []byte(strconv.Itoa(h.PID)), 0o600)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.Kill(ctx, h); err != nil {
		t.Fatal(err)
	}
	if d.Alive(h) {
		t.Error("alive after Kill")
	}
	if _, err := os.Stat(h.PIDFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pid file left: %v", err)
	}
	// Kill of an exited VM is not an error.
	if err := d.Kill(ctx, h); err != nil {
		t.Errorf("second Kill: %v", err)
	}
}

func TestMeasureTSC(t *testing.T) {
	if !haveTSC {
		t.Skip("no TSC")
	}
	khz, err := measureTSCKHz(3, 20*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("measured TSC: %d kHz", khz)
	host, err := HostTSCKHz()
	if err != nil {
		t.Fatal(err)
	}
	if diff := float64(host) - float64(khz); diff > float64(khz)/100 || -diff > float64(khz)/100 {
		t.Errorf("HostTSCKHz %d and measurement %d differ by more than 1%%", host, khz)
	}
}
