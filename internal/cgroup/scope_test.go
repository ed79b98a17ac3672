package cgroup_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/cgroup"
	"github.com/bangerdev/banger/internal/cgroup/cgrouptest"
)

func TestSystemdScope(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for cgroupfs")
	}
	info, err := cgroup.Detect(cgroup.DefaultRoot)
	if err != nil || info.Mode != cgroup.ModeV1 || len(info.Missing()) > 0 {
		t.Skipf("the fake systemd serves a v1 host with memory, pids and cpu; this one: %+v %v", info, err)
	}
	addr := cgrouptest.StartBus(t)
	f := cgrouptest.NewFakeSystemd(t, addr, info.Root)
	parent := fmt.Sprintf("bangertest%d", os.Getpid())
	s, err := cgroup.NewSystemd(info, parent, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, c := range cgroup.Controllers {
			os.Remove(filepath.Join(info.Root, c, parent+".slice"))
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l := cgroup.Limits{MemoryBytes: 256 << 20, PIDs: 64, CPUWeight: 50}
	g, err := s.CreateGroup(ctx, "vm-abc", l)
	if err != nil {
		t.Fatalf("CreateGroup: %v (fake saw %v)", err, f.Errs)
	}
	if g.Unit != "banger-vm-abc.scope" || len(g.Paths) != len(cgroup.Controllers) {
		t.Fatalf("group %+v", g)
	}
	// The scope holds the placeholder until Attach.
	phs, err := g.Procs()
	if err != nil || len(phs) != 1 {
		t.Fatalf("scope holds %v, %v; want the placeholder", phs, err)
	}
	ph := phs[0]
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
	if _, err := os.Stat(fmt.Sprintf("/proc/%d/stat", ph)); err == nil {
		t.Errorf("placeholder %d still exists", ph)
	}
	for _, p := range g.Paths {
		pids, err := (&cgroup.Group{Paths: []string{p}}).Procs()
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
	// A scope of that name exists: refused, and the running one is left
	// alone.
	if g2, err := s.CreateGroup(ctx, "vm-abc", l); err == nil || !strings.Contains(err.Error(), "exists already") {
		t.Errorf("second CreateGroup of a running scope = %+v, %v; want an error", g2, err)
	}
	if pids, err := g.Procs(); err != nil || !reflect.DeepEqual(pids, []int{cmd.Process.Pid}) {
		t.Errorf("after the refused CreateGroup the scope holds %v, %v; want %d", pids, err, cmd.Process.Pid)
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
	f.Mu.Lock()
	f.FailNext = true
	f.Mu.Unlock()
	if g2, err := s.CreateGroup(ctx, "vm-fail", l); err == nil || !strings.Contains(err.Error(), `"failed"`) {
		t.Errorf("CreateGroup with a failing job = %+v, %v; want an error", g2, err)
	}
	f.Mu.Lock()
	defer f.Mu.Unlock()
	if len(f.Errs) > 0 {
		t.Errorf("the fake systemd refused calls: %v", f.Errs)
	}
	if !f.Subscribed {
		t.Error("Subscribe was never called")
	}
}
