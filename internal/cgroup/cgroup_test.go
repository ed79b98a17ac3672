package cgroup

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// allocEnv, set in the environment of this test binary, makes it a
// helper process (see TestMain) that allocates and touches that many MiB,
// then prints "survived".
const allocEnv = "BANGER_CGROUP_TEST_ALLOC_MIB"

func TestMain(m *testing.M) {
	if v := os.Getenv(allocEnv); v != "" {
		mib, err := strconv.Atoi(v)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		b := make([]byte, mib<<20)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1 // touch every page: the memory is charged
		}
		fmt.Println("survived")
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// testManager returns a manager for a parent group of its own, removed
// with everything under it when the test ends (its cleanups run first:
// they end the processes), even after a failure.
func testManager(t *testing.T, info Info) (*Manager, string) {
	t.Helper()
	parent := "banger-" + randName(t)
	m, err := NewManager(info, parent)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		var dirs []string
		if info.Mode == ModeV2 {
			dirs = []string{filepath.Join(info.Root, parent)}
		} else {
			for _, c := range Controllers {
				dirs = append(dirs, filepath.Join(info.Root, c, parent))
			}
		}
		for _, dir := range dirs {
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				if e.IsDir() {
					if err := Remove([]string{filepath.Join(dir, e.Name())}); err != nil {
						t.Errorf("cleanup: %v", err)
					}
				}
			}
			// Not Remove: it would rebalance the root group's weight.
			if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	return m, parent
}

func randName(t *testing.T) string {
	b := make([]byte, 4)
	rand.Read(b)
	return "test-" + hex.EncodeToString(b)
}

func readTrim(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// startSleep starts a long sleep in g and returns it; it is killed at the
// end of the test.
func startSleep(t *testing.T, g *Group) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := g.Start(cmd); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

func waitGone(t *testing.T, paths []string) {
	t.Helper()
	for _, p := range paths {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s still exists after Remove (stat: %v)", p, err)
		}
	}
}

// The v1 path on the host's real cgroupfs: limits are written, the child
// is born in the group with no daemon thread alongside it, and Remove
// waits for it to go.
func TestV1Real(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	info, err := Detect(DefaultRoot)
	if err != nil {
		t.Fatal(err)
	}
	if info.Mode != ModeV1 {
		t.Skipf("host cgroups are %s, not v1", info.Mode)
	}
	m, parent := testManager(t, info)
	name := "vm1"
	g, err := m.Create(name, Limits{MemoryBytes: 512 << 20, PIDs: 40, CPUWeight: 200})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Remove() })
	if len(g.Paths) != 3 {
		t.Fatalf("paths %v", g.Paths)
	}
	mem := filepath.Join(DefaultRoot, "memory", parent, name)
	if got := readTrim(t, filepath.Join(mem, "memory.limit_in_bytes")); got != strconv.Itoa(512<<20) {
		t.Errorf("memory.limit_in_bytes = %s", got)
	}
	if got := readTrim(t, filepath.Join(DefaultRoot, "pids", parent, name, "pids.max")); got != "40" {
		t.Errorf("pids.max = %s", got)
	}
	if got := readTrim(t, filepath.Join(DefaultRoot, "cpu", parent, name, "cpu.shares")); got != "2048" {
		t.Errorf("cpu.shares = %s", got)
	}
	// The parent weighs what its VMs weigh together, not one process.
	g2, err := m.Create("vm2", Limits{MemoryBytes: 64 << 20, PIDs: 10, CPUWeight: 300})
	if err != nil {
		t.Fatal(err)
	}
	if got := readTrim(t, filepath.Join(DefaultRoot, "cpu", parent, "cpu.shares")); got != strconv.Itoa(2048+3072) {
		t.Errorf("parent cpu.shares = %s with two VMs, want %d", got, 2048+3072)
	}
	if err := g2.Remove(); err != nil {
		t.Fatal(err)
	}
	if got := readTrim(t, filepath.Join(DefaultRoot, "cpu", parent, "cpu.shares")); got != "2048" {
		t.Errorf("parent cpu.shares = %s after one VM left, want 2048", got)
	}

	cmd := startSleep(t, g)
	cgs, err := ProcessCgroups(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range Controllers {
		if want := "/" + parent + "/" + name; cgs[c] != want {
			t.Errorf("child's %s cgroup = %q, want %q", c, cgs[c], want)
		}
	}
	// Only the child stays in the group: the thread that forked it ends
	// (asynchronously, once its goroutine has returned).
	deadline := time.Now().Add(5 * time.Second)
	for _, p := range g.Paths {
		for {
			tasks, err := readPIDs(filepath.Join(p, "tasks"))
			if err != nil {
				t.Fatal(err)
			}
			if slices.Equal(tasks, []int{cmd.Process.Pid}) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s/tasks = %v, want only the child %d", p, tasks, cmd.Process.Pid)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	procs, err := g.Procs()
	if err != nil || !slices.Equal(procs, []int{cmd.Process.Pid}) {
		t.Errorf("Procs = %v, %v", procs, err)
	}
	// Our own threads stayed where they were.
	self, err := ProcessCgroups(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(self["memory"], parent) {
		t.Errorf("the test process moved into %s", self["memory"])
	}
	// A group of the same name in use can't be created again.
	if _, err := m.Create(name, Limits{MemoryBytes: 1 << 30, PIDs: 10}); err == nil || !strings.Contains(err.Error(), "already holds processes") {
		t.Errorf("Create over a group in use: %v", err)
	}
	// Remove refuses a group whose process lives (after waiting for it
	// to leave, which it doesn't) and leaves it whole. One directory is
	// enough: each is waited for in turn.
	if err := Remove(g.Paths[:1]); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("Remove of a group with a live process = %v, want EBUSY", err)
	}
	for _, p := range g.Paths {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("refused Remove: %v", err)
		}
	}
	if procs, err := g.Procs(); err != nil || !slices.Equal(procs, []int{cmd.Process.Pid}) {
		t.Errorf("Procs after a refused Remove = %v, %v; want the live child", procs, err)
	}
	// Once the process is dead (it leaves the group asynchronously, which
	// Remove waits for), Remove succeeds; removing again is fine.
	cmd.Process.Kill()
	cmd.Wait()
	if err := g.Remove(); err != nil {
		t.Fatalf("Remove after the process died: %v", err)
	}
	waitGone(t, g.Paths)
	if err := g.Remove(); err != nil {
		t.Errorf("second Remove: %v", err)
	}
}

// The memory limit really binds on v1: a process that allocates past it is
// killed.
func TestV1MemoryLimitEnforced(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	info, err := Detect(DefaultRoot)
	if err != nil || info.Mode != ModeV1 {
		t.Skipf("host cgroups are not v1 (%v)", err)
	}
	m, _ := testManager(t, info)
	g, err := m.Create("vm", Limits{MemoryBytes: 64 << 20, PIDs: 64})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Remove() })
	// alloc runs this test binary in g as the helper process of TestMain.
	alloc := func(mib int) (string, error) {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), allocEnv+"="+strconv.Itoa(mib))
		out := &strings.Builder{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := g.Start(cmd); err != nil {
			t.Fatal(err)
		}
		err := cmd.Wait()
		return out.String(), err
	}
	// Under the limit the helper lives: what kills it below is the limit.
	if out, err := alloc(8); err != nil || !strings.Contains(out, "survived") {
		t.Fatalf("an 8 MiB allocation under a 64 MiB limit: %v, %q", err, out)
	}
	out, err := alloc(256)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || strings.Contains(out, "survived") {
		t.Fatalf("a 256 MiB allocation under a 64 MiB limit succeeded (err %v, out %q)", err, out)
	}
	if ws, ok := ee.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Errorf("the 256 MiB helper ended with %v, want killed (SIGKILL) by the OOM killer; output %q", ee, out)
	}
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
}

// The v2 layout, on a fake tree: controllers enabled down the parent, the
// limits written.
func TestV2Layout(t *testing.T) {
	root := t.TempDir()
	m, err := NewManager(Info{Mode: ModeV2, Root: root, Controllers: Controllers}, "banger/vms")
	if err != nil {
		t.Fatal(err)
	}
	// The kernel gives every non-root v2 group a cpu.weight (when the cpu
	// controller is on); the fake parent has one.
	os.MkdirAll(filepath.Join(root, "banger", "vms"), 0o755)
	os.WriteFile(filepath.Join(root, "banger", "vms", "cpu.weight"), []byte("100\n"), 0o644)
	g, err := m.Create("vm1", Limits{MemoryBytes: 1 << 30, PIDs: 130, CPUWeight: 200})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{filepath.Join(root, "banger", "vms", "vm1")}; !slices.Equal(g.Paths, want) {
		t.Fatalf("paths %v, want %v", g.Paths, want)
	}
	for _, p := range []string{root, filepath.Join(root, "banger"), filepath.Join(root, "banger", "vms")} {
		if got := readTrim(t, filepath.Join(p, "cgroup.subtree_control")); got != "+memory +pids +cpu" {
			t.Errorf("%s/cgroup.subtree_control = %q", p, got)
		}
	}
	if got := readTrim(t, filepath.Join(root, "banger", "vms", "cpu.weight")); got != "200" {
		t.Errorf("parent cpu.weight = %q, want its child's 200", got)
	}
	for file, want := range map[string]string{"memory.max": strconv.Itoa(1 << 30), "pids.max": "130", "cpu.weight": "200"} {
		if got := readTrim(t, filepath.Join(g.Paths[0], file)); got != want {
			t.Errorf("%s = %q, want %q", file, got, want)
		}
	}
	// A fake group in use (a crash left it with a process) is refused.
	if err := os.WriteFile(filepath.Join(root, "banger", "vms", "vm2", "cgroup.procs"), nil, 0o644); err == nil {
		t.Fatal("vm2 exists before creation")
	}
	os.MkdirAll(filepath.Join(root, "banger", "vms", "vm2"), 0o755)
	os.WriteFile(filepath.Join(root, "banger", "vms", "vm2", "cgroup.procs"), []byte("4242\n"), 0o644)
	if _, err := m.Create("vm2", Limits{MemoryBytes: 1 << 30, PIDs: 10}); err == nil || !strings.Contains(err.Error(), "4242") {
		t.Errorf("Create over a busy group: %v", err)
	}
}

// v2's CLONE_INTO_CGROUP on a real cgroup2 mount (hybrid hosts mount one
// at unified/ with no controllers: enough to prove the child is born in
// the group).
func TestV2StartReal(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	root := ""
	for _, r := range []string{DefaultRoot, filepath.Join(DefaultRoot, "unified")} {
		var st unix.Statfs_t
		if unix.Statfs(r, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			root = r
		}
	}
	if root == "" {
		t.Skip("no cgroup2 mount")
	}
	dir := filepath.Join(root, "banger-"+randName(t))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	g := &Group{Mode: ModeV2, Paths: []string{dir}}
	t.Cleanup(func() { g.Remove() })
	cmd := startSleep(t, g)
	cgs, err := ProcessCgroups(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	rel := strings.TrimPrefix(dir, root)
	if cgs[""] != rel {
		t.Errorf("child's v2 cgroup = %q, want %q", cgs[""], rel)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	waitGone(t, g.Paths)
}

func TestBadInput(t *testing.T) {
	info := Info{Mode: ModeV2, Root: t.TempDir(), Controllers: Controllers}
	for _, parent := range []string{"", "/abs", "../up", "."} {
		if _, err := NewManager(info, parent); err == nil {
			t.Errorf("parent %q accepted", parent)
		}
	}
	if _, err := NewManager(Info{Mode: ModeV2, Root: "/x", Controllers: []string{"memory"}}, "banger"); err == nil || !strings.Contains(err.Error(), "pids, cpu") {
		t.Errorf("missing controllers: %v", err)
	}
	if _, err := NewManager(Info{Mode: ModeNone, Root: "/x"}, "banger"); err == nil {
		t.Error("mode none accepted")
	}
	m, err := NewManager(info, "banger")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"", "a/b", "..", "."} {
		if _, err := m.Create(name, Limits{MemoryBytes: 1, PIDs: 1}); err == nil {
			t.Errorf("name %q accepted", name)
		}
	}
	if _, err := m.Create("x", Limits{}); err == nil {
		t.Error("no limits accepted")
	}
	if _, err := os.Stat(filepath.Join(info.Root, "banger", "x")); !os.IsNotExist(err) {
		t.Errorf("refused Create left a directory (%v)", err)
	}
}

func TestParseProcCgroup(t *testing.T) {
	m := ParseProcCgroup("12:pids:/banger/a\n4:cpu,cpuacct:/banger/a\n1:name=systemd:/\n0::/banger.slice/x\n")
	want := map[string]string{"pids": "/banger/a", "cpu": "/banger/a", "cpuacct": "/banger/a", "name=systemd": "/", "": "/banger.slice/x"}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%q = %q, want %q", k, m[k], v)
		}
	}
}
