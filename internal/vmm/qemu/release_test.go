package qemu

import (
	"errors"
	"os"
	"os/exec"
	"slices"
	"testing"

	"github.com/bangerdev/banger/internal/cgroup"
)

// Release removes a VM's cgroup; ReleaseStale removes the empty cgroups
// of VMs that no longer exist and leaves those of existing VMs and those
// holding a process.
func TestReleaseCgroups(t *testing.T) {
	conf := testConfine(t)
	m, ok := conf.Cgroups.(*cgroup.Manager)
	if !ok {
		t.Skipf("the host's cgroup backend is %s, not cgroupfs", conf.Cgroups.Describe())
	}
	d := New(Config{Confine: conf}, testLogger(t))
	limits := conf.Limits(1, 64, "tcg")
	groups := map[string][]string{}
	for _, id := range []string{"gone", "kept", "busy", "released"} {
		g, err := m.Create(cgroupName(id), limits)
		if err != nil {
			t.Fatal(err)
		}
		groups[id] = g.Paths
		t.Cleanup(func() { g.Remove() })
	}
	sleep := exec.Command("sleep", "600")
	if err := m.Group(cgroupName("busy")).Start(sleep); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sleep.Process.Kill(); sleep.Wait() })
	exists := func(id string) bool {
		for _, p := range groups[id] {
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				return true
			}
		}
		return false
	}

	if err := d.Release("released"); err != nil {
		t.Fatal(err)
	}
	if exists("released") {
		t.Error("Release left the cgroup")
	}
	if err := d.Release("released"); err != nil {
		t.Errorf("Release of a released VM: %v, want nil", err)
	}
	got, err := d.ReleaseStale(func(id string) bool { return id == "kept" })
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, []string{"gone"}) {
		t.Errorf("ReleaseStale released %v, want [gone]", got)
	}
	if exists("gone") {
		t.Error("ReleaseStale left the empty cgroup of a VM that no longer exists")
	}
	if !exists("kept") {
		t.Error("ReleaseStale removed the cgroup of a VM that exists")
	}
	if !exists("busy") {
		t.Error("ReleaseStale removed a cgroup that holds a process")
	}
}
