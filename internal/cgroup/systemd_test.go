package cgroup

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
)

func TestScopeProperties(t *testing.T) {
	l := Limits{MemoryBytes: 1 << 30, PIDs: 256, CPUWeight: 200}
	want := map[string]any{
		"Description": "d", "Slice": "banger.slice", "PIDs": []uint32{42}, "Delegate": true,
		"CollectMode": "inactive-or-failed", "TasksMax": uint64(256),
	}
	check := func(mode Mode, extra map[string]any) {
		t.Helper()
		got := map[string]any{}
		for _, p := range ScopeProperties(mode, "banger.slice", "d", 42, l) {
			if _, dup := got[p.Name]; dup {
				t.Errorf("%s: property %s twice", mode, p.Name)
			}
			got[p.Name] = p.Value.Value()
		}
		w := map[string]any{}
		for k, v := range want {
			w[k] = v
		}
		for k, v := range extra {
			w[k] = v
		}
		if !reflect.DeepEqual(got, w) {
			t.Errorf("%s: properties\n got %#v\nwant %#v", mode, got, w)
		}
	}
	check(ModeV2, map[string]any{"MemoryMax": uint64(1 << 30), "MemorySwapMax": uint64(0), "CPUWeight": uint64(200)})
	check(ModeV1, map[string]any{"MemoryLimit": uint64(1 << 30), "CPUShares": uint64(2048)})
}

func TestSliceAndScopeNames(t *testing.T) {
	for in, want := range map[string]string{"banger": "banger.slice", "a/b": "a-b.slice", "/x/": "x.slice"} {
		if got, err := SliceName(in); err != nil || got != want {
			t.Errorf("SliceName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"..", "a b", "é"} {
		if got, err := SliceName(bad); err == nil {
			t.Errorf("SliceName(%q) = %q; want an error", bad, got)
		}
	}
	if got := ScopeName("vm-ab c"); got != "banger-vm-ab_c.scope" {
		t.Errorf("ScopeName = %q", got)
	}
}

// startBus starts a private dbus-daemon and returns its address.
func startBus(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("dbus-daemon"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("dbus-daemon missing: scripts/install-deps.sh --test installs it")
		}
		t.Skip("dbus-daemon missing (scripts/install-deps.sh --test)")
	}
	dir := t.TempDir()
	conf := filepath.Join(dir, "bus.conf")
	if err := os.WriteFile(conf, []byte(`<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=`+dir+`/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
`), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("dbus-daemon", "--config-file="+conf, "--nofork", "--print-address")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	// --print-address writes the address once the bus listens.
	buf := make([]byte, 512)
	n, err := out.Read(buf)
	if err != nil {
		t.Fatalf("dbus-daemon address: %v", err)
	}
	addr := strings.TrimSpace(strings.SplitN(string(buf[:n]), "\n", 2)[0])
	if !strings.HasPrefix(addr, "unix:") {
		t.Fatalf("dbus-daemon printed %q", addr)
	}
	return addr
}

// fakeSystemd is systemd's org.freedesktop.systemd1.Manager as far as
// banger uses it, on a v1 host: it checks calls against systemd's
// documented D-Bus API and does what systemd would on cgroupfs.
type fakeSystemd struct {
	t    *testing.T
	conn *dbus.Conn
	root string

	mu         sync.Mutex
	subscribed bool
	jobs       int
	units      map[string][]string // unit to its directories
	errs       []string
	calls      []string
	failNext   bool
}

func (f *fakeSystemd) errorf(format string, a ...any) *dbus.Error {
	f.mu.Lock()
	defer f.mu.Unlock()
	msg := fmt.Sprintf(format, a...)
	f.errs = append(f.errs, msg)
	return dbus.MakeFailedError(fmt.Errorf("%s", msg))
}

func signature(msg dbus.Message) string {
	s, _ := msg.Headers[dbus.FieldSignature].Value().(dbus.Signature)
	return s.String()
}

func (f *fakeSystemd) Subscribe() *dbus.Error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.subscribed = true
	f.calls = append(f.calls, "Subscribe")
	return nil
}

// job returns a new job path and emits its JobRemoved after the reply,
// as systemd does.
func (f *fakeSystemd) job(unit, result string) dbus.ObjectPath {
	f.mu.Lock()
	f.jobs++
	id := f.jobs
	sub := f.subscribed
	f.mu.Unlock()
	p := dbus.ObjectPath(fmt.Sprintf("/org/freedesktop/systemd1/job/%d", id))
	if sub {
		go func() {
			f.conn.Emit(sdPath, sdIface+".JobRemoved", uint32(id), p, unit, result)
		}()
	}
	return p
}

func (f *fakeSystemd) StartTransientUnit(msg dbus.Message, name, mode string, props []property, aux []auxUnit) (dbus.ObjectPath, *dbus.Error) {
	f.mu.Lock()
	f.calls = append(f.calls, "StartTransientUnit "+name)
	fail := f.failNext
	f.failNext = false
	f.mu.Unlock()
	if s := signature(msg); s != "ssa(sv)a(sa(sv))" {
		return "", f.errorf("StartTransientUnit signature %q", s)
	}
	if mode != "fail" || !strings.HasSuffix(name, ".scope") || len(aux) != 0 {
		return "", f.errorf("StartTransientUnit(%q, %q, aux %d)", name, mode, len(aux))
	}
	// The D-Bus type systemd requires for each property banger sets.
	types := map[string]string{
		"Description": "s", "Slice": "s", "PIDs": "au", "Delegate": "b", "CollectMode": "s",
		"TasksMax": "t", "MemoryLimit": "t", "CPUShares": "t", "MemoryMax": "t", "MemorySwapMax": "t", "CPUWeight": "t",
	}
	vals := map[string]any{}
	for _, p := range props {
		want, ok := types[p.Name]
		if !ok {
			return "", f.errorf("unknown property %s", p.Name)
		}
		if got := p.Value.Signature().String(); got != want {
			return "", f.errorf("property %s has type %s, systemd wants %s", p.Name, got, want)
		}
		vals[p.Name] = p.Value.Value()
	}
	for _, req := range []string{"Slice", "PIDs", "Delegate", "TasksMax", "MemoryLimit", "Description"} {
		if _, ok := vals[req]; !ok {
			return "", f.errorf("property %s missing", req)
		}
	}
	if fail {
		return f.job(name, "failed"), nil
	}
	var dirs []string
	for _, c := range Controllers {
		d := filepath.Join(f.root, c, vals["Slice"].(string), name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", f.errorf("mkdir: %v", err)
		}
		dirs = append(dirs, d)
	}
	files := map[string]string{
		"memory/memory.limit_in_bytes": strconv.FormatUint(vals["MemoryLimit"].(uint64), 10),
		"pids/pids.max":                strconv.FormatUint(vals["TasksMax"].(uint64), 10),
	}
	if v, ok := vals["CPUShares"]; ok {
		files["cpu/cpu.shares"] = strconv.FormatUint(v.(uint64), 10)
	}
	for f2, v := range files {
		c, file, _ := strings.Cut(f2, "/")
		if err := os.WriteFile(filepath.Join(f.root, c, vals["Slice"].(string), name, file), []byte(v), 0o644); err != nil {
			return "", f.errorf("write %s: %v", f2, err)
		}
	}
	f.mu.Lock()
	f.units[name] = dirs
	f.mu.Unlock()
	if err := f.move(dirs, vals["PIDs"].([]uint32)); err != nil {
		return "", f.errorf("move pids: %v", err)
	}
	return f.job(name, "done"), nil
}

func (f *fakeSystemd) move(dirs []string, pids []uint32) error {
	for _, d := range dirs {
		for _, p := range pids {
			if err := os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(int(p))), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

func (f *fakeSystemd) AttachProcessesToUnit(msg dbus.Message, unit, sub string, pids []uint32) *dbus.Error {
	f.mu.Lock()
	f.calls = append(f.calls, "AttachProcessesToUnit "+unit)
	dirs, ok := f.units[unit]
	f.mu.Unlock()
	if s := signature(msg); s != "ssau" {
		return f.errorf("AttachProcessesToUnit signature %q", s)
	}
	if !ok {
		return &dbus.Error{Name: "org.freedesktop.systemd1.NoSuchUnit", Body: []any{"no unit " + unit}}
	}
	if err := f.move(dirs, pids); err != nil {
		return f.errorf("attach: %v", err)
	}
	return nil
}

func (f *fakeSystemd) StopUnit(msg dbus.Message, name, mode string) (dbus.ObjectPath, *dbus.Error) {
	f.mu.Lock()
	f.calls = append(f.calls, "StopUnit "+name)
	dirs, ok := f.units[name]
	delete(f.units, name)
	f.mu.Unlock()
	if s := signature(msg); s != "ss" || mode != "replace" {
		return "", f.errorf("StopUnit signature %q mode %q", s, mode)
	}
	if !ok {
		return "", &dbus.Error{Name: "org.freedesktop.systemd1.NoSuchUnit", Body: []any{"Unit " + name + " not loaded."}}
	}
	// systemd kills what is left (KillMode=control-group), then removes
	// the cgroup.
	pids, _ := readPIDs(filepath.Join(dirs[0], "cgroup.procs"))
	for _, p := range pids {
		if proc, err := os.FindProcess(p); err == nil {
			proc.Kill()
		}
	}
	if err := Remove(dirs); err != nil {
		return "", f.errorf("remove: %v", err)
	}
	return f.job(name, "done"), nil
}

func newFakeSystemd(t *testing.T, addr, root string) *fakeSystemd {
	conn, err := dbus.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := conn.Auth(nil); err != nil {
		t.Fatal(err)
	}
	if err := conn.Hello(); err != nil {
		t.Fatal(err)
	}
	f := &fakeSystemd{t: t, conn: conn, root: root, units: map[string][]string{}}
	if err := conn.Export(f, sdPath, sdIface); err != nil {
		t.Fatal(err)
	}
	if r, err := conn.RequestName(sdDest, dbus.NameFlagDoNotQueue); err != nil || r != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("own %s: %v %v", sdDest, r, err)
	}
	return f
}

func TestSystemdScope(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for cgroupfs")
	}
	info, err := Detect(DefaultRoot)
	if err != nil || info.Mode != ModeV1 || len(info.Missing()) > 0 {
		t.Skipf("the fake systemd serves a v1 host with memory, pids and cpu; this one: %+v %v", info, err)
	}
	addr := startBus(t)
	f := newFakeSystemd(t, addr, info.Root)
	parent := fmt.Sprintf("bangertest%d", os.Getpid())
	s, err := NewSystemd(info, parent, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, c := range Controllers {
			os.Remove(filepath.Join(info.Root, c, parent+".slice"))
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l := Limits{MemoryBytes: 256 << 20, PIDs: 64, CPUWeight: 50}
	g, err := s.CreateGroup(ctx, "vm-abc", l)
	if err != nil {
		t.Fatalf("CreateGroup: %v (fake saw %v)", err, f.errs)
	}
	if g.Unit != "banger-vm-abc.scope" || len(g.Paths) != len(Controllers) {
		t.Fatalf("group %+v", g)
	}
	ph := g.placeholder.Process.Pid
	cmd := exec.Command("sleep", "1000")
	if err := g.Start(cmd); err != nil {
		g.Release()
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() { cmd.Process.Kill(); <-exited }()
	if err := s.Attach(ctx, g, cmd.Process.Pid); err != nil {
		t.Fatalf("Attach: %v", err)
	}
	if g.placeholder != nil {
		t.Error("placeholder still running after Attach")
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d/stat", ph)); err == nil {
		t.Errorf("placeholder %d still exists", ph)
	}
	for _, p := range g.Paths {
		pids, err := readPIDs(filepath.Join(p, "cgroup.procs"))
		if err != nil || !reflect.DeepEqual(pids, []int{cmd.Process.Pid}) {
			t.Errorf("%s holds %v, %v; want only %d", p, pids, err, cmd.Process.Pid)
		}
	}
	for file, want := range map[string]string{
		"memory/memory.limit_in_bytes": strconv.FormatInt(l.MemoryBytes, 10),
		"pids/pids.max":                "64",
		"cpu/cpu.shares":               "512",
	} {
		c, name, _ := strings.Cut(file, "/")
		b, err := os.ReadFile(filepath.Join(info.Root, c, parent+".slice", g.Unit, name))
		if err != nil || strings.TrimSpace(string(b)) != want {
			t.Errorf("%s = %q, %v; want %s", file, b, err, want)
		}
	}
	back, err := s.GroupOf(cmd.Process.Pid)
	if err != nil || back.Unit != g.Unit || !reflect.DeepEqual(back.Paths, g.Paths) {
		t.Errorf("GroupOf = %+v, %v; want %+v", back, err, g)
	}
	if err := s.RemoveGroup(ctx, g.Unit, g.Paths); err != nil {
		t.Fatalf("RemoveGroup: %v", err)
	}
	select {
	case <-exited:
	case <-ctx.Done():
		t.Fatal("process in the scope still runs after StopUnit")
	}
	for _, p := range g.Paths {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s still there after RemoveGroup: %v", p, err)
		}
	}
	// A scope that is gone already is not an error.
	if err := s.RemoveGroup(ctx, g.Unit, g.Paths); err != nil {
		t.Errorf("second RemoveGroup: %v", err)
	}

	// A failed job is an error, and leaves no placeholder behind.
	f.mu.Lock()
	f.failNext = true
	f.mu.Unlock()
	if g2, err := s.CreateGroup(ctx, "vm-fail", l); err == nil || !strings.Contains(err.Error(), `"failed"`) {
		t.Errorf("CreateGroup with a failing job = %+v, %v; want an error", g2, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.errs) > 0 {
		t.Errorf("the fake systemd refused calls: %v", f.errs)
	}
	if !f.subscribed {
		t.Error("Subscribe was never called")
	}
}

// The placeholder ends by itself once its holder (bangerd) is gone.
func TestPlaceholderEndsWithHolder(t *testing.T) {
	cmd, hold, err := startPlaceholder()
	if err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		t.Fatalf("placeholder exited while held: %v", err)
	default:
	}
	hold.Close()
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("placeholder: %v", err)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Fatal("placeholder still runs after its holder closed the pipe")
	}
}
