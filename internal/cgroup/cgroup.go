// Package cgroup puts a process into its own control group with a memory
// limit, a pids limit and a CPU weight, on cgroup v2 (one unified tree) or
// cgroup v1 (one hierarchy per controller), through cgroupfs. It serves any
// VMM driver: QEMU's today, Firecracker's next.
//
// The process must be in its group before it allocates anything, so a
// group starts the process itself (Group.Start):
//
//   - v2: clone(CLONE_INTO_CGROUP) through SysProcAttr.UseCgroupFD; the
//     child is born in the group.
//   - v1: v1 places threads, not only processes, and a child inherits the
//     cgroups of the thread that forked it. Start runs exec.Cmd.Start on a
//     goroutine locked to its OS thread, moves that thread into the
//     group's tasks files, forks, and lets the goroutine exit still locked,
//     so that the Go runtime destroys the thread instead of reusing it.
//     Threads the runtime creates meanwhile come from its template thread
//     (LockOSThread forces that), so no other daemon thread ends up in the
//     group.
//
// Layout: <root>/<parent>/<name> on v2, <root>/<controller>/<parent>/<name>
// on v1, with parent "banger" by default.
package cgroup

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultRoot is where cgroupfs is mounted.
const DefaultRoot = "/sys/fs/cgroup"

// Mode is the cgroup layout of a host.
type Mode string

// Modes.
const (
	ModeNone Mode = "none" // no usable cgroupfs
	ModeV1   Mode = "v1"   // one hierarchy per controller (hybrid hosts too)
	ModeV2   Mode = "v2"   // the unified hierarchy holds the controllers
)

// Controllers banger uses.
var Controllers = []string{"memory", "pids", "cpu"}

// Info is what Detect found.
type Info struct {
	Mode Mode
	Root string
	// Controllers are the usable controllers among Controllers.
	Controllers []string
	// Systemd is true when systemd is the host's init: VMM groups are
	// then systemd transient scopes (see Systemd).
	Systemd bool
}

// Missing returns the controllers banger needs that the host lacks.
func (i Info) Missing() []string {
	var m []string
	for _, c := range Controllers {
		if !slices.Contains(i.Controllers, c) {
			m = append(m, c)
		}
	}
	return m
}

// Detect inspects the cgroupfs mounted at root.
func Detect(root string) (Info, error) {
	info := Info{Mode: ModeNone, Root: root}
	info.Systemd = SystemdBooted()
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		return info, fmt.Errorf("detect cgroups: statfs %s: %w", root, err)
	}
	if st.Type == unix.CGROUP2_SUPER_MAGIC {
		info.Mode = ModeV2
		info.Controllers = v2Controllers(root)
		return info, nil
	}
	for _, c := range Controllers {
		var cst unix.Statfs_t
		if err := unix.Statfs(filepath.Join(root, c), &cst); err == nil && cst.Type == unix.CGROUP_SUPER_MAGIC {
			info.Controllers = append(info.Controllers, c)
		}
	}
	if len(info.Controllers) > 0 {
		info.Mode = ModeV1
	}
	return info, nil
}

func v2Controllers(root string) []string {
	b, err := os.ReadFile(filepath.Join(root, "cgroup.controllers"))
	if err != nil {
		return nil
	}
	var cs []string
	for _, c := range strings.Fields(string(b)) {
		if slices.Contains(Controllers, c) {
			cs = append(cs, c)
		}
	}
	return cs
}

// Limits of one group.
type Limits struct {
	// MemoryBytes is the hard memory limit (v2 memory.max, v1
	// memory.limit_in_bytes). Required.
	MemoryBytes int64
	// PIDs is the most tasks (processes and threads) the group may hold
	// (pids.max). Required.
	PIDs int64
	// CPUWeight is the group's CPU share on the v2 scale (1-10000, 100 is
	// a default process); v1 cpu.shares gets CPUWeight*1024/100. 0 leaves
	// the default.
	CPUWeight int
}

// Manager creates groups under one parent.
type Manager struct {
	info   Info
	parent string
}

// NewManager returns a manager for the host info describes, creating
// groups under parent (a relative path such as "banger").
func NewManager(info Info, parent string) (*Manager, error) {
	if info.Mode != ModeV1 && info.Mode != ModeV2 {
		return nil, fmt.Errorf("no usable cgroup hierarchy at %s", info.Root)
	}
	if missing := info.Missing(); len(missing) > 0 {
		return nil, fmt.Errorf("cgroup controllers missing at %s: %s", info.Root, strings.Join(missing, ", "))
	}
	parent = filepath.Clean(parent)
	if parent == "." || filepath.IsAbs(parent) || strings.HasPrefix(parent, "..") {
		return nil, fmt.Errorf("cgroup parent %q: want a relative path such as banger", parent)
	}
	return &Manager{info: info, parent: parent}, nil
}

// Mode returns the manager's cgroup mode.
func (m *Manager) Mode() Mode { return m.info.Mode }

// Group returns the group name under m's parent, whether or not it exists.
func (m *Manager) Group(name string) *Group {
	g := &Group{Mode: m.info.Mode}
	if m.info.Mode == ModeV2 {
		g.Paths = []string{filepath.Join(m.info.Root, m.parent, name)}
	} else {
		for _, c := range Controllers {
			g.Paths = append(g.Paths, filepath.Join(m.info.Root, c, m.parent, name))
		}
	}
	return g
}

// List returns the names of the groups under m's parent, in any of its
// hierarchies. A parent not created yet has none.
func (m *Manager) List() ([]string, error) {
	var dirs []string
	if m.info.Mode == ModeV2 {
		dirs = []string{filepath.Join(m.info.Root, m.parent)}
	} else {
		for _, c := range Controllers {
			dirs = append(dirs, filepath.Join(m.info.Root, c, m.parent))
		}
	}
	var names []string
	for _, dir := range dirs {
		ents, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list cgroups: %w", err)
		}
		for _, e := range ents {
			if e.IsDir() && !slices.Contains(names, e.Name()) {
				names = append(names, e.Name())
			}
		}
	}
	return names, nil
}

// RemoveIfEmpty removes g when none of its directories holds a process,
// and reports whether it did; a group in use is left alone.
func (g *Group) RemoveIfEmpty() (bool, error) {
	for _, p := range g.Paths {
		if err := empty(p); err != nil {
			if errors.Is(err, errBusy) {
				return false, nil
			}
			return false, err
		}
	}
	return true, g.Remove()
}

// Group is one created group. Paths are its directories: one on v2, one
// per controller on v1.
type Group struct {
	Mode  Mode
	Paths []string
	// Unit is the systemd scope holding the group ("" on cgroupfs).
	Unit string
	// placeholder keeps a scope alive until its process runs in it.
	placeholder *exec.Cmd
	hold        *os.File
}

// Create makes the group name (a single path element) with limits l. A
// group of that name left by a crash is reused if it holds no process.
func (m *Manager) Create(name string, l Limits) (*Group, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return nil, fmt.Errorf("cgroup name %q: want a single path element", name)
	}
	if l.MemoryBytes <= 0 || l.PIDs <= 0 {
		return nil, fmt.Errorf("cgroup %s: memory and pids limits are required", name)
	}
	g := m.Group(name)
	if err := m.create(g, l); err != nil {
		if errors.Is(err, errBusy) {
			return nil, fmt.Errorf("create cgroup %s: %w", name, err)
		}
		if rerr := g.Remove(); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return nil, fmt.Errorf("create cgroup %s: %w", name, err)
	}
	return g, nil
}

func (m *Manager) create(g *Group, l Limits) error {
	if m.info.Mode == ModeV2 {
		// Controllers reach a group only through every ancestor's
		// subtree_control.
		ctrl := "+memory +pids +cpu"
		if err := writeFile(filepath.Join(m.info.Root, "cgroup.subtree_control"), ctrl); err != nil {
			return err
		}
		dir := m.info.Root
		for _, el := range strings.Split(m.parent, string(filepath.Separator)) {
			dir = filepath.Join(dir, el)
			if err := mkdir(dir); err != nil {
				return err
			}
			if err := writeFile(filepath.Join(dir, "cgroup.subtree_control"), ctrl); err != nil {
				return err
			}
		}
		p := g.Paths[0]
		if err := mkdir(p); err != nil {
			return err
		}
		if err := empty(p); err != nil {
			return err
		}
		if err := writeFile(filepath.Join(p, "memory.max"), strconv.FormatInt(l.MemoryBytes, 10)); err != nil {
			return err
		}
		// No swap: a VM past its limit is stopped, not slowed to a crawl.
		if _, err := os.Stat(filepath.Join(p, "memory.swap.max")); err == nil {
			if err := writeFile(filepath.Join(p, "memory.swap.max"), "0"); err != nil {
				return err
			}
		}
		if err := writeFile(filepath.Join(p, "pids.max"), strconv.FormatInt(l.PIDs, 10)); err != nil {
			return err
		}
		if l.CPUWeight > 0 {
			if err := writeFile(filepath.Join(p, "cpu.weight"), strconv.Itoa(clamp(l.CPUWeight, 1, 10000))); err != nil {
				return err
			}
		}
		return rebalance(filepath.Dir(p))
	}
	for i, c := range Controllers {
		p := g.Paths[i]
		if err := os.MkdirAll(p, 0o755); err != nil {
			return err
		}
		if err := empty(p); err != nil {
			return err
		}
		switch c {
		case "memory":
			if err := writeFile(filepath.Join(p, "memory.limit_in_bytes"), strconv.FormatInt(l.MemoryBytes, 10)); err != nil {
				return err
			}
		case "pids":
			if err := writeFile(filepath.Join(p, "pids.max"), strconv.FormatInt(l.PIDs, 10)); err != nil {
				return err
			}
		case "cpu":
			if l.CPUWeight > 0 {
				shares := clamp(l.CPUWeight, 1, 10000) * 1024 / 100
				if err := writeFile(filepath.Join(p, "cpu.shares"), strconv.Itoa(max(shares, 2))); err != nil {
					return err
				}
			}
			if err := rebalance(filepath.Dir(p)); err != nil {
				return err
			}
		}
	}
	return nil
}

// cpuFiles are the CPU weight files with their default and maximum.
var cpuFiles = []struct {
	name     string
	def, max int
}{{"cpu.weight", 100, 10000}, {"cpu.shares", 1024, 262144}}

// rebalance gives the parent of VM groups the sum of its children's CPU
// weights. Left at the default, the parent would weigh as much as one
// ordinary process, and every VM together would get one process's share
// of a busy host (v1 hosts and v2 hosts without systemd keep processes in
// the root group, each weighing the default). With the sum, each VM
// competes as if it were placed at the top with its own weight. A parent
// without a CPU weight file (not the cpu hierarchy) is left alone.
func rebalance(parent string) error {
	for _, f := range cpuFiles {
		if _, err := os.Stat(filepath.Join(parent, f.name)); err != nil {
			continue
		}
		ents, err := os.ReadDir(parent)
		if err != nil {
			return err
		}
		sum := 0
		for _, e := range ents {
			if !e.IsDir() {
				continue
			}
			b, err := os.ReadFile(filepath.Join(parent, e.Name(), f.name))
			if err != nil {
				continue
			}
			if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				sum += v
			}
		}
		if sum == 0 {
			sum = f.def
		}
		return writeFile(filepath.Join(parent, f.name), strconv.Itoa(clamp(sum, 2, f.max)))
	}
	return nil
}

// GroupOf returns the group of process pid when it is one of m's (under
// its parent): how a restarted daemon finds the cgroup of a VMM that was
// started without a record.
func (m *Manager) GroupOf(pid int) (*Group, error) {
	cgs, err := ProcessCgroups(pid)
	if err != nil {
		return nil, err
	}
	prefix := "/" + m.parent + "/"
	g := &Group{Mode: m.info.Mode}
	if m.info.Mode == ModeV2 {
		rel := cgs[""]
		if !strings.HasPrefix(rel, prefix) {
			return nil, fmt.Errorf("pid %d is in cgroup %s, not under %s", pid, rel, prefix)
		}
		g.Paths = []string{filepath.Join(m.info.Root, rel)}
		return g, nil
	}
	for _, c := range Controllers {
		rel := cgs[c]
		if !strings.HasPrefix(rel, prefix) {
			return nil, fmt.Errorf("pid %d is in %s cgroup %s, not under %s", pid, c, rel, prefix)
		}
		g.Paths = append(g.Paths, filepath.Join(m.info.Root, c, rel))
	}
	return g, nil
}

// Start starts cmd inside g, so that the process and all it creates are
// limited from their first instruction.
func (g *Group) Start(cmd *exec.Cmd) error {
	if g.Mode == ModeV2 {
		dir, err := os.Open(g.Paths[0])
		if err != nil {
			return fmt.Errorf("open cgroup: %w", err)
		}
		defer dir.Close()
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = int(dir.Fd())
		return cmd.Start()
	}
	done := make(chan error, 1)
	go startOnThread(g.Paths, cmd, done, nil)
	return <-done
}

// startOnThread runs cmd.Start on a thread of its own moved into the v1
// groups at paths, and sends the result to done. The thread is never
// unlocked, so the runtime destroys it when the goroutine ends. The main
// thread, which the runtime never destroys, is never used: on it, the
// work moves to another goroutine, started while the main thread is held
// so that it gets another thread. locked, when not nil, is closed once the
// thread is locked.
func startOnThread(paths []string, cmd *exec.Cmd, done chan<- error, locked chan<- struct{}) {
	runtime.LockOSThread()
	if locked != nil {
		close(locked)
	}
	if unix.Gettid() == unix.Getpid() {
		l := make(chan struct{})
		go startOnThread(paths, cmd, done, l)
		<-l
		runtime.UnlockOSThread()
		return
	}
	tid := strconv.Itoa(unix.Gettid())
	for _, p := range paths {
		if err := writeFile(filepath.Join(p, "tasks"), tid); err != nil {
			done <- fmt.Errorf("enter cgroup: %w", err)
			return
		}
	}
	done <- cmd.Start()
}

// Procs returns the processes in g (from its first path).
func (g *Group) Procs() ([]int, error) {
	return readPIDs(filepath.Join(g.Paths[0], "cgroup.procs"))
}

// Remove removes g's directories. A group that still holds processes is
// waited for briefly (an exiting process leaves it asynchronously), then
// Remove fails. Removing a group that is gone is not an error.
func (g *Group) Remove() error { return Remove(g.Paths) }

// removeWait bounds how long Remove waits for exiting processes.
const removeWait = 5 * time.Second

// Remove removes the cgroup directories paths (a Group's Paths, as
// recorded in a VMM handle).
func Remove(paths []string) error {
	var errs []error
	for _, p := range paths {
		deadline := time.Now().Add(removeWait)
		for {
			err := unix.Rmdir(p)
			if err == nil || errors.Is(err, unix.ENOENT) {
				break
			}
			if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", p, err))
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err := rebalance(filepath.Dir(p)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("rebalance cgroup %s: %w", filepath.Dir(p), err))
		}
	}
	return errors.Join(errs...)
}

var errBusy = errors.New("cgroup in use")

// empty fails if the group at p holds processes (a group of the same
// name still in use).
func empty(p string) error {
	pids, err := readPIDs(filepath.Join(p, "cgroup.procs"))
	if err != nil {
		return err
	}
	if len(pids) > 0 {
		return fmt.Errorf("cgroup %s already holds processes %v: %w", p, pids, errBusy)
	}
	return nil
}

func readPIDs(path string) ([]int, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// ProcessCgroups parses /proc/<pid>/cgroup: controller (or "" for the v2
// tree) to path.
func ProcessCgroups(pid int) (map[string]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return nil, err
	}
	return ParseProcCgroup(string(b)), nil
}

// ParseProcCgroup parses the contents of /proc/<pid>/cgroup.
func ParseProcCgroup(s string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "" {
			m[""] = parts[2]
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			m[c] = parts[2]
		}
	}
	return m
}

func mkdir(p string) error {
	if err := os.Mkdir(p, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return nil
}

func writeFile(path, v string) error {
	// O_CREATE only matters for a fake tree (tests): cgroupfs refuses to
	// create a control file that is not there.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	_, err = f.WriteString(v)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %q to %s: %w", v, path, err)
	}
	return nil
}

func clamp(v, lo, hi int) int { return min(max(v, lo), hi) }
