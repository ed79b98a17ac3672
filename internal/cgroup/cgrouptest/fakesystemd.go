// Package cgrouptest serves tests of systemd scopes: a private D-Bus
// daemon and a fake systemd manager on it.
package cgrouptest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/godbus/dbus/v5"

	"github.com/bangerdev/banger/internal/cgroup"
	"github.com/bangerdev/banger/internal/testenv"
)

const (
	sdDest  = "org.freedesktop.systemd1"
	sdPath  = dbus.ObjectPath("/org/freedesktop/systemd1")
	sdIface = "org.freedesktop.systemd1.Manager"
)

// Property is a unit property, a(sv).
type Property struct {
	Name  string
	Value dbus.Variant
}

// AuxUnit is an auxiliary unit, (sa(sv)).
type AuxUnit struct {
	Name  string
	Props []Property
}

func readPIDs(path string) ([]int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if p, err := strconv.Atoi(f); err == nil {
			pids = append(pids, p)
		}
	}
	return pids, nil
}

// StartBus starts a private dbus-daemon and returns its address.
func StartBus(t testing.TB) string {
	t.Helper()
	if _, err := exec.LookPath("dbus-daemon"); err != nil {
		testenv.Missing(t, "dbus-daemon missing (scripts/install-deps.sh --test)")
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

// FakeSystemd is systemd's org.freedesktop.systemd1.Manager as far as
// banger uses it, on a v1 host: it checks calls against systemd's
// documented D-Bus API and does what systemd would on cgroupfs.
type FakeSystemd struct {
	conn *dbus.Conn
	root string

	Mu         sync.Mutex
	Subscribed bool
	jobs       int
	units      map[string][]string // unit to its directories
	Errs       []string
	Calls      []string
	FailNext   bool
}

func (f *FakeSystemd) errorf(format string, a ...any) *dbus.Error {
	f.Mu.Lock()
	defer f.Mu.Unlock()
	msg := fmt.Sprintf(format, a...)
	f.Errs = append(f.Errs, msg)
	return dbus.MakeFailedError(fmt.Errorf("%s", msg))
}

func signature(msg dbus.Message) string {
	s, _ := msg.Headers[dbus.FieldSignature].Value().(dbus.Signature)
	return s.String()
}

func (f *FakeSystemd) Subscribe() *dbus.Error {
	f.Mu.Lock()
	defer f.Mu.Unlock()
	f.Subscribed = true
	f.Calls = append(f.Calls, "Subscribe")
	return nil
}

// job returns a new job path and emits its JobRemoved after the reply,
// as systemd does.
func (f *FakeSystemd) job(unit, result string) dbus.ObjectPath {
	f.Mu.Lock()
	f.jobs++
	id := f.jobs
	sub := f.Subscribed
	f.Mu.Unlock()
	p := dbus.ObjectPath(fmt.Sprintf("/org/freedesktop/systemd1/job/%d", id))
	if sub {
		go func() {
			f.conn.Emit(sdPath, sdIface+".JobRemoved", uint32(id), p, unit, result)
		}()
	}
	return p
}

func (f *FakeSystemd) StartTransientUnit(msg dbus.Message, name, mode string, props []Property, aux []AuxUnit) (dbus.ObjectPath, *dbus.Error) {
	f.Mu.Lock()
	f.Calls = append(f.Calls, "StartTransientUnit "+name)
	fail := f.FailNext
	f.FailNext = false
	f.Mu.Unlock()
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
	f.Mu.Lock()
	_, exists := f.units[name]
	f.Mu.Unlock()
	if exists {
		return "", &dbus.Error{Name: "org.freedesktop.systemd1.UnitExists", Body: []any{"Unit " + name + " was already loaded or has a fragment file."}}
	}
	var dirs []string
	for _, c := range cgroup.Controllers {
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
	f.Mu.Lock()
	f.units[name] = dirs
	f.Mu.Unlock()
	if err := f.move(dirs, vals["PIDs"].([]uint32)); err != nil {
		return "", f.errorf("move pids: %v", err)
	}
	return f.job(name, "done"), nil
}

func (f *FakeSystemd) move(dirs []string, pids []uint32) error {
	for _, d := range dirs {
		for _, p := range pids {
			if err := os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(int(p))), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

func (f *FakeSystemd) AttachProcessesToUnit(msg dbus.Message, unit, sub string, pids []uint32) *dbus.Error {
	f.Mu.Lock()
	f.Calls = append(f.Calls, "AttachProcessesToUnit "+unit)
	dirs, ok := f.units[unit]
	f.Mu.Unlock()
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

func (f *FakeSystemd) StopUnit(msg dbus.Message, name, mode string) (dbus.ObjectPath, *dbus.Error) {
	f.Mu.Lock()
	f.Calls = append(f.Calls, "StopUnit "+name)
	dirs, ok := f.units[name]
	delete(f.units, name)
	f.Mu.Unlock()
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
	if err := cgroup.Remove(dirs); err != nil {
		return "", f.errorf("remove: %v", err)
	}
	return f.job(name, "done"), nil
}

// NewFakeSystemd exports a fake systemd manager on the bus at addr; it
// makes scopes' groups under the v1 cgroupfs at root.
func NewFakeSystemd(t testing.TB, addr, root string) *FakeSystemd {
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
	f := &FakeSystemd{conn: conn, root: root, units: map[string][]string{}}
	if err := conn.Export(f, sdPath, sdIface); err != nil {
		t.Fatal(err)
	}
	if r, err := conn.RequestName(sdDest, dbus.NameFlagDoNotQueue); err != nil || r != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("own %s: %v %v", sdDest, r, err)
	}
	return f
}
