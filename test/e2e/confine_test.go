//go:build e2e

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/cgroup"
	"github.com/bangerdev/banger/test/harness"
)

// TestConfinement checks a running VM's QEMU process the way an
// administrator would (docs/security.md): not root, under seccomp, in a
// cgroup of its own with memory and pids limits, unable to open a
// root-only file; the confinement survives a daemon restart, and vm stop
// removes the cgroup.
func TestConfinement(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("confinement needs root")
	}
	e := newEnv(t)
	e.RegisterImages()
	e.Must("vm", "create", "--name", "jail", "--image", "tiny", "--start")
	vm := e.Inspect("jail")
	c := vm.Confinement
	if c == nil {
		t.Fatalf("vm inspect shows no confinement: %+v", vm)
	}
	pid := strconv.Itoa(vm.PID)

	status, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(status), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.TrimSpace(v)
		}
	}
	uids := strings.Fields(fields["Uid"])
	if len(uids) != 4 || uids[0] == "0" || uids[1] == "0" || uids[2] == "0" || uids[3] == "0" {
		t.Errorf("qemu's uids are %q: it must not be root", fields["Uid"])
	}
	if uids[0] != strconv.Itoa(c.UID) {
		t.Errorf("qemu runs as uid %s, inspect says %d", uids[0], c.UID)
	}
	if fields["Seccomp"] != "2" {
		t.Errorf("qemu's Seccomp = %q, want 2 (filter)", fields["Seccomp"])
	}
	if fields["CapEff"] != "0000000000000000" {
		t.Errorf("qemu has capabilities %s", fields["CapEff"])
	}

	// Its own cgroup, from /proc/PID/cgroup, with the limits set.
	cgs, err := cgroup.ProcessCgroups(vm.PID)
	if err != nil {
		t.Fatal(err)
	}
	self, _ := cgroup.ProcessCgroups(os.Getpid())
	var memFile, pidsFile string
	switch c.CgroupMode {
	case "v1":
		for _, ctl := range []string{"memory", "pids"} {
			if cgs[ctl] == self[ctl] || !strings.Contains(cgs[ctl], vm.ID) {
				t.Errorf("qemu's %s cgroup is %q (the test's is %q): not its own", ctl, cgs[ctl], self[ctl])
			}
		}
		memFile = filepath.Join(cgroup.DefaultRoot, "memory", cgs["memory"], "memory.limit_in_bytes")
		pidsFile = filepath.Join(cgroup.DefaultRoot, "pids", cgs["pids"], "pids.max")
	case "v2":
		if cgs[""] == self[""] || !strings.Contains(cgs[""], vm.ID) {
			t.Errorf("qemu's cgroup is %q (the test's is %q): not its own", cgs[""], self[""])
		}
		memFile = filepath.Join(cgroup.DefaultRoot, cgs[""], "memory.max")
		pidsFile = filepath.Join(cgroup.DefaultRoot, cgs[""], "pids.max")
	default:
		t.Fatalf("cgroup mode %q", c.CgroupMode)
	}
	wantMem := int64(vm.MemoryMiB) << 20
	if mem := readInt(t, memFile); mem < wantMem || mem != c.MemoryLimitBytes {
		t.Errorf("%s = %d: want the recorded %d, above the VM's %d", memFile, mem, c.MemoryLimitBytes, wantMem)
	}
	if pids := readInt(t, pidsFile); pids <= 0 || pids != c.PIDsLimit {
		t.Errorf("%s = %d, want the recorded %d", pidsFile, pids, c.PIDsLimit)
	}

	// QEMU's credentials can't open a root-only file (nor the VM's own
	// disk and agent keys, which it gets as descriptors).
	dir, err := os.MkdirTemp("/tmp", "bgr-confine")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	secret, public := filepath.Join(dir, "secret"), filepath.Join(dir, "public")
	if err := os.WriteFile(secret, []byte("root only\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(public, []byte("anyone\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{secret, filepath.Join(vm.Dir, "root"), filepath.Join(vm.Dir, "agent-client-key"), "/etc/shadow"} {
		if canRead(t, p, c.UID, c.GID) {
			t.Errorf("uid %d can read %s", c.UID, p)
		}
	}
	// The helper really runs as that uid: it can read the world-readable
	// file next to the secret.
	if !canRead(t, public, c.UID, c.GID) {
		t.Errorf("the uid can't even read %s: the check above proves nothing", public)
	}

	// A restarted daemon still shows (and keeps) the confinement.
	e.StopDaemon()
	e.StartDaemon()
	after := e.Inspect("jail")
	if after.PID != vm.PID || after.Confinement == nil || after.Confinement.UID != c.UID ||
		strings.Join(after.Confinement.Cgroups, ",") != strings.Join(c.Cgroups, ",") {
		t.Fatalf("after a daemon restart: pid %d (was %d), confinement %+v (was %+v)", after.PID, vm.PID, after.Confinement, c)
	}
	if out := e.Must("vm", "exec", "jail", "--", "echo", "inside"); out != "inside\n" {
		t.Fatalf("exec after restart: %q", out)
	}

	// vm stop removes the cgroup.
	e.Must("vm", "stop", "jail")
	for _, p := range c.Cgroups {
		harness.WaitFor(t, 10*time.Second, "cgroup "+p+" removed", func() bool {
			_, err := os.Stat(p)
			return os.IsNotExist(err)
		})
	}
	if e.Inspect("jail").Confinement != nil {
		t.Error("a stopped VM still shows a confinement")
	}
}

func readInt(t *testing.T, p string) int64 {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatalf("%s: %v", p, err)
	}
	return v
}

// canRead reports whether a process running as uid:gid (no supplementary
// groups) can open path for reading.
func canRead(t *testing.T, path string, uid, gid int) bool {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", `exec 3<"$1"`, "sh", path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}}
	return cmd.Run() == nil
}
