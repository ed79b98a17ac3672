package cgroup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"
)

// Backend creates and removes the groups of VMM processes: cgroupfs
// (Manager) or systemd transient scopes (Systemd). The VMM driver does not
// care which: both give a Group whose Start places the process.
type Backend interface {
	// Mode is the host's cgroup layout.
	Mode() Mode
	// CreateGroup makes the group name (a single path element) with
	// limits l.
	CreateGroup(ctx context.Context, name string, l Limits) (*Group, error)
	// RemoveGroup removes a group, given what a handle recorded: its
	// scope unit ("" for cgroupfs) and its directories.
	RemoveGroup(ctx context.Context, unit string, paths []string) error
	// GroupOf returns the group of process pid when it is one of the
	// backend's.
	GroupOf(pid int) (*Group, error)
	// Attach is called once the process pid runs in g (started by
	// g.Start); it ends g's set-up, whether it fails or not.
	Attach(ctx context.Context, g *Group, pid int) error
	// Describe says how groups are made, for logs and doctor.
	Describe() string
}

// CreateGroup is Create (cgroupfs does not block).
func (m *Manager) CreateGroup(_ context.Context, name string, l Limits) (*Group, error) {
	return m.Create(name, l)
}

// RemoveGroup removes the directories paths (unit is ignored).
func (m *Manager) RemoveGroup(_ context.Context, _ string, paths []string) error {
	return Remove(paths)
}

// Attach implements Backend: nothing to do on cgroupfs.
func (m *Manager) Attach(context.Context, *Group, int) error { return nil }

// Describe implements Backend.
func (m *Manager) Describe() string {
	return "cgroupfs under " + m.parent
}

// SystemBusAddress is the system bus, where systemd's manager listens.
const SystemBusAddress = "unix:path=/run/dbus/system_bus_socket"

// SystemdBooted reports whether systemd is the host's init (sd_booted(3):
// /run/systemd/system exists).
func SystemdBooted() bool {
	fi, err := os.Stat("/run/systemd/system")
	return err == nil && fi.IsDir()
}

// Systemd asks systemd for a transient scope per VMM
// (org.freedesktop.systemd1.Manager.StartTransientUnit over D-Bus), in
// the slice Slice. The scope is created around a placeholder process
// (systemd needs a process to put in a scope); the VMM is then started
// into the scope's directories with the cgroupfs start code (Group.Start)
// and attached to the unit, and the placeholder is killed. systemd owns
// the groups: it writes the limits, and removes the scope when its last
// process exits or it is stopped (StopUnit).
type Systemd struct {
	info Info
	// Bus is the D-Bus address of systemd's manager (SystemBusAddress).
	bus string
	// Slice holds the scopes, e.g. banger.slice.
	slice string
}

// NewSystemd returns a Backend that makes scopes in the slice named
// after parent ("banger" is banger.slice, "a/b" is a-b.slice) through
// the manager on the D-Bus at bus.
func NewSystemd(info Info, parent, bus string) (*Systemd, error) {
	if _, err := NewManager(info, parent); err != nil {
		return nil, err
	}
	slice, err := SliceName(parent)
	if err != nil {
		return nil, err
	}
	return &Systemd{info: info, bus: bus, slice: slice}, nil
}

// SliceName maps a cgroup parent to a systemd slice name.
func SliceName(parent string) (string, error) {
	p := strings.Trim(filepath.Clean(parent), "/")
	if p == "" || p == "." || strings.Contains(p, "..") {
		return "", fmt.Errorf("cgroup parent %q: want a relative path such as banger", parent)
	}
	s := strings.ReplaceAll(p, "/", "-")
	if !validUnitChars(s) {
		return "", fmt.Errorf("cgroup parent %q: a systemd slice name takes only letters, digits, and :_.-", parent)
	}
	return s + ".slice", nil
}

func validUnitChars(s string) bool {
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune(":_.-", r)) {
			return false
		}
	}
	return s != ""
}

// ScopeName is the scope unit of the group name: banger-<name>.scope,
// with characters a unit name can't hold replaced by _.
func ScopeName(name string) string {
	b := []rune(name)
	for i, r := range b {
		if !validUnitChars(string(r)) {
			b[i] = '_'
		}
	}
	return "banger-" + string(b) + ".scope"
}

// Mode implements Backend.
func (s *Systemd) Mode() Mode { return s.info.Mode }

// Slice returns the slice that holds the scopes.
func (s *Systemd) Slice() string { return s.slice }

// Describe implements Backend.
func (s *Systemd) Describe() string {
	return "systemd transient scopes banger-vm-<id>.scope in " + s.slice
}

// property is a systemd unit property, a(sv) on the bus.
type property struct {
	Name  string
	Value dbus.Variant
}

// auxUnit is an auxiliary unit of StartTransientUnit, a(sa(sv)).
type auxUnit struct {
	Name  string
	Props []property
}

// ScopeProperties returns the properties of a VM's scope, as systemd's
// D-Bus API types them: MemoryMax/MemorySwapMax and CPUWeight on v2,
// MemoryLimit and CPUShares on v1, TasksMax on both.
func ScopeProperties(mode Mode, slice, description string, pid int, l Limits) []property {
	u64 := func(v int64) dbus.Variant { return dbus.MakeVariant(uint64(v)) }
	ps := []property{
		{"Description", dbus.MakeVariant(description)},
		{"Slice", dbus.MakeVariant(slice)},
		{"PIDs", dbus.MakeVariant([]uint32{uint32(pid)})},
		{"Delegate", dbus.MakeVariant(true)},
		{"CollectMode", dbus.MakeVariant("inactive-or-failed")},
		{"TasksMax", u64(l.PIDs)},
	}
	if mode == ModeV2 {
		ps = append(ps, property{"MemoryMax", u64(l.MemoryBytes)}, property{"MemorySwapMax", u64(0)})
		if l.CPUWeight > 0 {
			ps = append(ps, property{"CPUWeight", u64(int64(clamp(l.CPUWeight, 1, 10000)))})
		}
	} else {
		ps = append(ps, property{"MemoryLimit", u64(l.MemoryBytes)})
		if l.CPUWeight > 0 {
			shares := max(clamp(l.CPUWeight, 1, 10000)*1024/100, 2)
			ps = append(ps, property{"CPUShares", u64(int64(shares))})
		}
	}
	return ps
}

const (
	sdDest  = "org.freedesktop.systemd1"
	sdPath  = dbus.ObjectPath("/org/freedesktop/systemd1")
	sdIface = "org.freedesktop.systemd1.Manager"
)

// sdConn is one connection to systemd's manager, subscribed to job
// signals.
type sdConn struct {
	conn *dbus.Conn
	obj  dbus.BusObject
	sigs chan *dbus.Signal
}

// session bounds ctx by jobTimeout when it has no deadline and connects to
// systemd; end closes the connection and releases the bound.
func (s *Systemd) session(ctx context.Context) (_ context.Context, c *sdConn, end func(), err error) {
	cancel := context.CancelFunc(func() {})
	if _, ok := ctx.Deadline(); !ok {
		ctx, cancel = context.WithTimeout(ctx, jobTimeout)
	}
	c, err = s.dial(ctx)
	if err != nil {
		cancel()
		return ctx, nil, nil, err
	}
	return ctx, c, func() { c.conn.Close(); cancel() }, nil
}

func (s *Systemd) dial(ctx context.Context) (*sdConn, error) {
	conn, err := dbus.Dial(s.bus, dbus.WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("connect to systemd at %s: %w", s.bus, err)
	}
	if err := conn.Auth(nil); err != nil {
		conn.Close()
		return nil, fmt.Errorf("authenticate to the bus at %s: %w", s.bus, err)
	}
	if err := conn.Hello(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("hello to the bus at %s: %w", s.bus, err)
	}
	c := &sdConn{conn: conn, obj: conn.Object(sdDest, sdPath), sigs: make(chan *dbus.Signal, 64)}
	conn.Signal(c.sigs)
	if err := conn.AddMatchSignalContext(ctx, dbus.WithMatchInterface(sdIface), dbus.WithMatchMember("JobRemoved")); err != nil {
		conn.Close()
		return nil, fmt.Errorf("watch systemd jobs: %w", err)
	}
	// systemd sends job signals only once a client subscribed.
	if err := c.obj.CallWithContext(ctx, sdIface+".Subscribe", 0).Err; err != nil {
		conn.Close()
		return nil, fmt.Errorf("subscribe to systemd: %w", err)
	}
	return c, nil
}

// wait waits for the JobRemoved signal of job and returns an error when
// its result is not "done".
func (c *sdConn) wait(ctx context.Context, job dbus.ObjectPath, what string) error {
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: waiting for systemd job %s: %w", what, job, ctx.Err())
		case sig, ok := <-c.sigs:
			if !ok {
				return fmt.Errorf("%s: connection to systemd closed", what)
			}
			if sig.Name != sdIface+".JobRemoved" || len(sig.Body) < 4 {
				continue
			}
			if p, _ := sig.Body[1].(dbus.ObjectPath); p != job {
				continue
			}
			if r, _ := sig.Body[3].(string); r != "done" {
				return fmt.Errorf("%s: systemd job %s ended with %q (see journalctl -u %v)", what, job, r, sig.Body[2])
			}
			return nil
		}
	}
}

// jobTimeout bounds a wait for systemd when ctx has no deadline.
const jobTimeout = 30 * time.Second

// CreateGroup implements Backend: it starts the scope ScopeName(name)
// with limits l around a placeholder, and returns its directories.
func (s *Systemd) CreateGroup(ctx context.Context, name string, l Limits) (g *Group, err error) {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return nil, fmt.Errorf("cgroup name %q: want a single path element", name)
	}
	if l.MemoryBytes <= 0 || l.PIDs <= 0 {
		return nil, fmt.Errorf("cgroup %s: memory and pids limits are required", name)
	}
	unit := ScopeName(name)
	ctx, c, end, err := s.session(ctx)
	if err != nil {
		return nil, err
	}
	defer end()

	ph, hold, err := startPlaceholder()
	if err != nil {
		return nil, fmt.Errorf("start scope %s: placeholder: %w", unit, err)
	}
	pg := &Group{Mode: s.info.Mode, Unit: unit, placeholder: ph, hold: hold}
	g = pg
	defer func() {
		if err != nil {
			pg.Release()
		}
	}()
	props := ScopeProperties(s.info.Mode, s.slice, "banger VMM of "+name, ph.Process.Pid, l)
	var job dbus.ObjectPath
	if err := c.obj.CallWithContext(ctx, sdIface+".StartTransientUnit", 0, unit, "fail", props, []auxUnit{}).Store(&job); err != nil {
		var derr dbus.Error
		if errors.As(err, &derr) && derr.Name == "org.freedesktop.systemd1.UnitExists" {
			return nil, fmt.Errorf("start scope %s: it exists already, so a VMM of this VM may still run: check with systemctl status %s, stop it with systemctl stop %s: %w", unit, unit, unit, errBusy)
		}
		return nil, fmt.Errorf("start scope %s: %w", unit, err)
	}
	defer func() {
		if err != nil {
			if rerr := s.stop(context.WithoutCancel(ctx), c, unit); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}
	}()
	if err := c.wait(ctx, job, "start scope "+unit); err != nil {
		return nil, err
	}
	cgs, err := ProcessCgroups(ph.Process.Pid)
	if err != nil {
		return nil, fmt.Errorf("start scope %s: read its cgroups: %w", unit, err)
	}
	suffix := "/" + s.slice + "/" + unit
	if s.info.Mode == ModeV2 {
		rel := cgs[""]
		if !strings.HasSuffix(rel, suffix) {
			return nil, fmt.Errorf("start scope %s: placeholder is in cgroup %s, not in the scope", unit, rel)
		}
		g.Paths = []string{filepath.Join(s.info.Root, rel)}
		return g, nil
	}
	for _, ctl := range Controllers {
		rel := cgs[ctl]
		if !strings.HasSuffix(rel, suffix) {
			return nil, fmt.Errorf("start scope %s: placeholder is in %s cgroup %s, not in the scope (does systemd delegate %s?)", unit, ctl, rel, ctl)
		}
		g.Paths = append(g.Paths, filepath.Join(s.info.Root, ctl, rel))
	}
	return g, nil
}

// Attach implements Backend: it asks systemd to put pid into the
// group's scope in every hierarchy systemd tracks (on v1, its own
// name=systemd one, which Group.Start does not enter), then ends the
// placeholder: the scope lives on with pid.
func (s *Systemd) Attach(ctx context.Context, g *Group, pid int) error {
	defer g.Release()
	if g.Unit == "" {
		return nil
	}
	ctx, c, end, err := s.session(ctx)
	if err != nil {
		return err
	}
	defer end()
	if err := c.obj.CallWithContext(ctx, sdIface+".AttachProcessesToUnit", 0, g.Unit, "", []uint32{uint32(pid)}).Err; err != nil {
		return fmt.Errorf("attach pid %d to %s: %w", pid, g.Unit, err)
	}
	return nil
}

// RemoveGroup implements Backend: it stops the scope (killing what is
// left in it) and waits until systemd removed it. A unit that is gone is
// not an error. Directories systemd left are removed.
func (s *Systemd) RemoveGroup(ctx context.Context, unit string, paths []string) error {
	if unit != "" {
		ctx, c, end, err := s.session(ctx)
		if err != nil {
			return err
		}
		defer end()
		if err := s.stop(ctx, c, unit); err != nil {
			return err
		}
	}
	// systemd removed the scope's groups; remove what a scope collected
	// meanwhile may have left, without touching the slice (systemd's).
	var errs []error
	for _, p := range paths {
		if err := unix.Rmdir(p); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

func (s *Systemd) stop(ctx context.Context, c *sdConn, unit string) error {
	var job dbus.ObjectPath
	err := c.obj.CallWithContext(ctx, sdIface+".StopUnit", 0, unit, "replace").Store(&job)
	var derr dbus.Error
	if errors.As(err, &derr) && derr.Name == "org.freedesktop.systemd1.NoSuchUnit" {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stop scope %s: %w", unit, err)
	}
	return c.wait(ctx, job, "stop scope "+unit)
}

// GroupOf implements Backend: the scope of pid when it is one of the
// slice's.
func (s *Systemd) GroupOf(pid int) (*Group, error) {
	cgs, err := ProcessCgroups(pid)
	if err != nil {
		return nil, err
	}
	g := &Group{Mode: s.info.Mode}
	ctls := Controllers
	if s.info.Mode == ModeV2 {
		ctls = []string{""}
	}
	for _, ctl := range ctls {
		rel := cgs[ctl]
		unit := filepath.Base(rel)
		if filepath.Base(filepath.Dir(rel)) != s.slice || !strings.HasPrefix(unit, "banger-") || !strings.HasSuffix(unit, ".scope") {
			return nil, fmt.Errorf("pid %d is in cgroup %s, not in a scope of %s", pid, rel, s.slice)
		}
		g.Unit = unit
		g.Paths = append(g.Paths, filepath.Join(s.info.Root, ctl, rel))
	}
	return g, nil
}

// startPlaceholder starts the process a scope is created around: cat
// reading a pipe whose only writer is hold (close-on-exec, so no VMM
// inherits it). If bangerd dies before Release, the pipe closes, cat
// exits, and systemd collects the empty scope: no stale scope keeps the
// VM's unit name.
func startPlaceholder() (*exec.Cmd, *os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	defer r.Close()
	cmd := exec.Command("cat")
	cmd.Stdin = r
	if err := cmd.Start(); err != nil {
		w.Close()
		return nil, nil, err
	}
	return cmd, w, nil
}

// Release ends the placeholder process of a scope being set up, if any.
func (g *Group) Release() {
	if g.placeholder == nil {
		return
	}
	g.hold.Close()
	g.placeholder.Process.Kill()
	g.placeholder.Wait()
	g.placeholder, g.hold = nil, nil
}
