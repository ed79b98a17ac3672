package qemu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/cgroup"
	"github.com/bangerdev/banger/internal/cgroup/cgrouptest"
	"github.com/bangerdev/banger/internal/vmm/vmmtest"
)

// A confined QEMU on a systemd host runs in a transient scope, asked for
// on D-Bus (a fake systemd manager on a private bus here), from its
// start to its end.
func TestBootConfinedScope(t *testing.T) {
	requireQEMU(t)
	img := findTestImage(t)
	if os.Geteuid() != 0 {
		t.Skip("confinement needs root")
	}
	info, err := cgroup.Detect(cgroup.DefaultRoot)
	if err != nil || info.Mode != cgroup.ModeV1 || len(info.Missing()) > 0 {
		t.Skipf("the fake systemd serves a v1 host with memory, pids and cpu; this one: %+v %v", info, err)
	}
	addr := cgrouptest.StartBus(t)
	f := cgrouptest.NewFakeSystemd(t, addr, info.Root)
	parent := "bangerscope" + strconv.Itoa(os.Getpid())
	conf := NewConfine(context.Background(), ConfineOptions{CgroupParent: parent, MemoryOverheadMiB: 256, SystemdBus: addr})
	if conf.Err != nil {
		t.Fatalf("confinement unavailable: %v", conf.Err)
	}
	t.Cleanup(func() {
		for _, ctl := range cgroup.Controllers {
			os.Remove(filepath.Join(info.Root, ctl, parent+".slice"))
		}
	})
	spec := img.spec(t, filepath.Join(t.TempDir(), "vm"), vmmtest.RunForever)
	d := New(Config{Confine: conf}, testLogger(t))
	ctx, cancel := context.WithTimeout(context.Background(), vmmtest.Timeout)
	defer cancel()
	h, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatalf("start: %v (fake systemd: %v)", err, f.Errs)
	}
	defer d.Kill(context.Background(), h)
	c := h.Confinement
	unit := "banger-" + cgroupName(spec.ID) + ".scope"
	if c == nil || c.Unit != unit || len(c.Cgroups) != len(cgroup.Controllers) {
		t.Fatalf("confinement %+v; want unit %s", c, unit)
	}
	cgs, err := cgroup.ProcessCgroups(h.PID)
	if err != nil {
		t.Fatal(err)
	}
	for _, ctl := range cgroup.Controllers {
		if want := "/" + parent + ".slice/" + unit; cgs[ctl] != want {
			t.Errorf("qemu's %s cgroup %q, want %q", ctl, cgs[ctl], want)
		}
	}
	for _, p := range c.Cgroups {
		procs, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil || strings.TrimSpace(string(procs)) != strconv.Itoa(h.PID) {
			t.Errorf("%s/cgroup.procs = %q, %v; want only qemu %d", p, procs, err, h.PID)
		}
	}
	limits := conf.Limits(spec.CPUs, spec.MemoryMiB, h.Accel)
	lim, _ := os.ReadFile(filepath.Join(c.Cgroups[0], "memory.limit_in_bytes"))
	if strings.TrimSpace(string(lim)) != strconv.FormatInt(limits.MemoryBytes, 10) {
		t.Errorf("memory.limit_in_bytes = %q, want %d", lim, limits.MemoryBytes)
	}
	if err := vmmtest.WaitForConsole(ctx, spec.ConsoleLog, vmmtest.Marker); err != nil {
		t.Fatal(err)
	}
	if r, ok := d.Recover(spec.Dir); !ok || r.Confinement == nil || r.Confinement.Unit != unit {
		t.Errorf("Recover = %+v, %v; want unit %s", r.Confinement, ok, unit)
	}
	if err := d.Kill(ctx, h); err != nil {
		t.Fatal(err)
	}
	for _, p := range c.Cgroups {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left after Kill (%v)", p, err)
		}
	}
	f.Mu.Lock()
	defer f.Mu.Unlock()
	for _, want := range []string{"StartTransientUnit " + unit, "AttachProcessesToUnit " + unit, "StopUnit " + unit} {
		if !slices.Contains(f.Calls, want) {
			t.Errorf("systemd was not asked %s; calls %v", want, f.Calls)
		}
	}
	if len(f.Errs) > 0 {
		t.Errorf("the fake systemd refused calls: %v", f.Errs)
	}
}
