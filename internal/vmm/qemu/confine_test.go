package qemu

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/cgroup"
	"github.com/bangerdev/banger/internal/disk"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/vmm"
	"github.com/bangerdev/banger/internal/vmm/vmmtest"
)

// qemuImg creates a qcow2 overlay of backing (format backingFmt) at path.
func qemuImg(t *testing.T, path, backing, backingFmt string) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		testenv.Missing(t, "qemu-img not installed")
	}
	args := []string{"create", "-q", "-f", "qcow2", path, "16M"}
	if backing != "" {
		args = []string{"create", "-q", "-f", "qcow2", "-F", backingFmt, "-b", backing, path}
	}
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v: %s", args, err, out)
	}
}

func TestQcow2Backing(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	os.WriteFile(raw, make([]byte, 1<<20), 0o600)
	mid := filepath.Join(dir, "mid.qcow2")
	qemuImg(t, mid, raw, "raw")
	top := filepath.Join(dir, "top.qcow2")
	qemuImg(t, top, "mid.qcow2", "qcow2") // relative name
	alone := filepath.Join(dir, "alone.qcow2")
	qemuImg(t, alone, "", "")
	// The overlays banger makes for its VMs (written by package disk).
	ours := filepath.Join(dir, "ours.qcow2")
	if _, err := disk.NewCloner(nil, "").Clone(t.Context(), disk.CloneRequest{Base: raw, Dest: ours, Formats: []string{vmm.FormatQcow2}}); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string][2]string{
		mid:   {raw, "raw"},
		ours:  {raw, "raw"},
		top:   {"mid.qcow2", "qcow2"},
		alone: {"", ""},
	} {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		name, format, err := qcow2Backing(f)
		f.Close()
		if err != nil || name != want[0] || format != want[1] {
			t.Errorf("%s: backing %q %q %v, want %q %q", filepath.Base(path), name, format, err, want[0], want[1])
		}
	}
	f, _ := os.Open(raw)
	defer f.Close()
	if _, _, err := qcow2Backing(f); err == nil {
		t.Error("a raw file parsed as qcow2")
	}

	// The whole chain becomes explicit -blockdev nodes, deepest first,
	// each image opened from an fd set (read-only below the top).
	cf := &confinedFiles{}
	args, err := cf.openDisk(vmm.Disk{Path: top, Format: vmm.FormatQcow2})
	if err != nil {
		t.Fatal(err)
	}
	defer cf.close()
	got := strings.Join(orderBlockdevs(args), " ")
	want := strings.Join([]string{
		"-blockdev driver=file,node-name=backing1-file,filename=/dev/fdset/3,read-only=on",
		"-blockdev driver=raw,node-name=backing1,file=backing1-file,read-only=on",
		"-blockdev driver=file,node-name=backing0-file,filename=/dev/fdset/2,read-only=on",
		"-blockdev driver=qcow2,node-name=backing0,file=backing0-file,read-only=on,backing=backing1",
		"-blockdev driver=file,node-name=root-file,filename=/dev/fdset/1,discard=unmap",
		"-blockdev driver=qcow2,node-name=root,file=root-file,discard=unmap,backing=backing0",
	}, " ")
	if got != want {
		t.Errorf("blockdevs:\n got %s\nwant %s", got, want)
	}
	if len(cf.files) != 3 || !slices.Contains(cf.args, "fd=5,set=3,opaque="+raw) {
		t.Errorf("fd sets %v (%d files)", cf.args, len(cf.files))
	}
}

func TestReadable(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		mode     os.FileMode
		uid, gid int
		want     bool
	}{
		{0o644, 1000, 1000, true},
		{0o600, 1000, 1000, false},
		{0o640, 1000, 0, true}, // the file's group (root's, 0)
		{0o600, 0, 1000, true}, // the file's owner (root, 0)
	} {
		p := filepath.Join(dir, "f")
		os.Remove(p)
		os.WriteFile(p, nil, tc.mode)
		os.Chmod(p, tc.mode)
		os.Chown(p, 0, 0)
		fi, _ := os.Stat(p)
		if os.Geteuid() != 0 {
			t.Skip("needs root to chown")
		}
		if got := readable(fi, tc.uid, tc.gid); got != tc.want {
			t.Errorf("mode %o, uid %d gid %d: readable = %v", tc.mode, tc.uid, tc.gid, got)
		}
	}
}

// Fail closed: a driver whose confinement could not be set up starts
// nothing.
func TestStartConfinementUnavailable(t *testing.T) {
	requireQEMU(t)
	img := findTestImage(t)
	spec := img.spec(t, filepath.Join(t.TempDir(), "vm"), vmmtest.RunForever)
	d := New(Config{Confine: &Confine{Err: errors.New("no cgroups here; " + fixHint)}}, testLogger(t))
	_, err := d.Start(context.Background(), spec)
	if err == nil || !strings.Contains(err.Error(), "vmm_confine = false") {
		t.Fatalf("Start = %v, want the confinement error with its fix", err)
	}
	if ents, _ := os.ReadDir(spec.Dir); len(ents) != 0 {
		t.Errorf("refused start left %v", ents)
	}
}

// TestBootConfined boots a confined guest whose files QEMU's user can't
// open (a 0600 initrd, a qcow2 overlay on a 0600 raw base in 0700
// directories) and checks what confinement promises: another uid, seccomp,
// the cgroup with its limits, the disk chain reached through descriptors,
// Recover rebuilding the record, and the cgroup gone after Kill.
func TestBootConfined(t *testing.T) {
	requireQEMU(t)
	img := findTestImage(t)
	conf := testConfine(t)
	spec := img.spec(t, filepath.Join(t.TempDir(), "vm"), vmmtest.RunForever)
	if err := os.Chmod(spec.Initrd, 0o600); err != nil {
		t.Fatal(err)
	}
	// The raw disk becomes the base of a qcow2 overlay, both private.
	base := spec.RootDisk.Path
	os.Chmod(base, 0o600)
	os.Chmod(filepath.Dir(base), 0o700)
	overlay := filepath.Join(t.TempDir(), "root.qcow2")
	qemuImg(t, overlay, base, "raw")
	os.Chmod(overlay, 0o600)
	spec.RootDisk = vmm.Disk{Path: overlay, Format: vmm.FormatQcow2}

	// A QEMU log a crashed QEMU left (Cleanup never ran) doesn't grow
	// from start to start: each start begins it anew.
	if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	stale := strings.Repeat("stale qemu log line\n", 1<<16)
	if err := os.WriteFile(filepath.Join(spec.Dir, LogFileName), []byte(stale), 0o600); err != nil {
		t.Fatal(err)
	}

	d := New(Config{Confine: conf}, testLogger(t))
	ctx, cancel := context.WithTimeout(context.Background(), vmmtest.Timeout)
	defer cancel()
	h, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Kill(context.Background(), h)
	if b, err := os.ReadFile(filepath.Join(spec.Dir, LogFileName)); err != nil || strings.Contains(string(b), "stale qemu log line") {
		t.Errorf("qemu log after start: %d bytes, %v; want the old log dropped", len(b), err)
	}
	c := h.Confinement
	if c == nil {
		t.Fatal("handle has no confinement")
	}
	if c.UID != conf.UID || c.UID == 0 || c.Sandbox != Sandbox || c.User != DefaultUser {
		t.Errorf("confinement %+v", c)
	}
	status, err := os.ReadFile("/proc/" + strconv.Itoa(h.PID) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Seccomp:\t2", "Uid:\t" + strconv.Itoa(conf.UID) + "\t", "Gid:\t" + strconv.Itoa(conf.GID) + "\t"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("qemu's /proc status lacks %q:\n%s", want, status)
		}
	}
	for _, line := range strings.Split(string(status), "\n") {
		if g, ok := strings.CutPrefix(line, "Groups:"); ok && strings.TrimSpace(g) != "" {
			t.Errorf("qemu has supplementary groups: %s", g)
		}
	}
	cgs, err := cgroup.ProcessCgroups(h.PID)
	if err != nil {
		t.Fatal(err)
	}
	limits := conf.Limits(spec.CPUs, spec.MemoryMiB, h.Accel)
	if c.MemoryLimitBytes != limits.MemoryBytes || c.PIDsLimit != limits.PIDs || len(c.Cgroups) == 0 {
		t.Errorf("recorded limits %+v, want %+v", c, limits)
	}
	for _, p := range c.Cgroups {
		procs, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil || strings.TrimSpace(string(procs)) != strconv.Itoa(h.PID) {
			t.Errorf("%s/cgroup.procs = %q, %v; want only %d", p, procs, err, h.PID)
		}
	}
	if c.CgroupMode == "v1" {
		if !strings.HasSuffix(cgs["memory"], "/"+cgroupName(spec.ID)) {
			t.Errorf("qemu's memory cgroup %q", cgs["memory"])
		}
		lim, _ := os.ReadFile(filepath.Join(c.Cgroups[0], "memory.limit_in_bytes"))
		if strings.TrimSpace(string(lim)) != strconv.FormatInt(limits.MemoryBytes, 10) {
			t.Errorf("memory.limit_in_bytes = %q", lim)
		}
	}
	if err := vmmtest.WaitForConsole(ctx, spec.ConsoleLog, vmmtest.Marker); err != nil {
		t.Fatal(err)
	}
	console, _ := os.ReadFile(spec.ConsoleLog)
	if want := "vmmtest-disk-sectors=" + strconv.Itoa(testDiskBytes/512); !slices.Contains(strings.Fields(string(console)), want) {
		t.Errorf("guest did not see the overlay disk (want %q):\n%s", want, console)
	}
	// QEMU's user can't open any of these files by name.
	for _, p := range []string{spec.Initrd, base, overlay, spec.ConsoleLog} {
		if canOpenAs(t, p, c.UID, c.GID) {
			t.Errorf("uid %d can open %s", c.UID, p)
		}
	}
	if r, ok := d.Recover(spec.Dir); !ok || !reflect.DeepEqual(r.Confinement.Cgroups, c.Cgroups) || r.Confinement.UID != c.UID {
		t.Errorf("Recover = %+v (%+v), %v; want the confinement %+v", r, r.Confinement, ok, c)
	}
	if err := d.Kill(ctx, h); err != nil {
		t.Fatal(err)
	}
	for _, p := range c.Cgroups {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left after Kill (%v)", p, err)
		}
	}
	assertNoRuntimeFiles(t, d, spec.Dir)
	if _, err := os.Stat(filepath.Join(spec.Dir, LogFileName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("qemu log left after Kill (%v)", err)
	}
}

// canOpenAs reports whether a process with uid:gid (no groups) can open
// path for reading.
func canOpenAs(t *testing.T, path string, uid, gid int) bool {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", `exec 3<"$1"`, "sh", path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}}
	return cmd.Run() == nil
}

func TestFreeUID(t *testing.T) {
	root := t.TempDir()
	for pid, uids := range map[string]string{"1": "0\t0\t0\t0", "20": "5000\t5000\t5000\t5000", "21": "1000\t5001\t1000\t1000", "self": "5002\t5002\t5002\t5002"} {
		os.MkdirAll(filepath.Join(root, pid), 0o755)
		os.WriteFile(filepath.Join(root, pid, "status"), []byte("Name:\tx\nUid:\t"+uids+"\nGid:\t0\n"), 0o644)
	}
	d := New(Config{}, nil)
	d.procRoot = root
	// 5000 and 5001 (an effective uid) are taken; "self" is no pid.
	if u, err := d.freeUID(5000, 5009); err != nil || u != 5002 {
		t.Errorf("freeUID = %d, %v; want 5002", u, err)
	}
	if _, err := d.freeUID(5000, 5001); err == nil || !strings.Contains(err.Error(), "widen the range") {
		t.Errorf("full range: %v", err)
	}
}

// With a uid range, each VM's QEMU has a uid of its own, and one QEMU's
// credentials can't signal another.
func TestBootUIDRange(t *testing.T) {
	requireQEMU(t)
	img := findTestImage(t)
	base := testConfine(t)
	conf := NewConfine(context.Background(), ConfineOptions{UIDFirst: 3917000, UIDLast: 3917009, CgroupParent: "banger-test-" + strconv.Itoa(os.Getpid()), MemoryOverheadMiB: 256})
	if conf.Err != nil {
		t.Fatal(conf.Err)
	}
	_ = base // removes the test's cgroup parent at the end
	d := New(Config{Confine: conf}, testLogger(t))
	ctx, cancel := context.WithTimeout(context.Background(), vmmtest.Timeout)
	defer cancel()
	var hs []vmm.Handle
	for _, name := range []string{"a", "b"} {
		spec := img.spec(t, filepath.Join(t.TempDir(), name), vmmtest.RunForever)
		h, err := d.Start(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Kill(context.Background(), h)
		hs = append(hs, h)
	}
	a, b := hs[0].Confinement, hs[1].Confinement
	if a.UID == b.UID || a.UID < 3917000 || b.UID > 3917009 || a.GID != a.UID || a.User != "" {
		t.Fatalf("uids %d and %d (gid %d, user %q): want two different uids of the range", a.UID, b.UID, a.GID, a.User)
	}
	for _, h := range hs {
		status, _ := os.ReadFile("/proc/" + strconv.Itoa(h.PID) + "/status")
		if !strings.Contains(string(status), "Uid:\t"+strconv.Itoa(h.Confinement.UID)+"\t") {
			t.Errorf("pid %d does not run as uid %d", h.PID, h.Confinement.UID)
		}
	}
	cmd := exec.Command("/bin/sh", "-c", "kill -0 "+strconv.Itoa(hs[1].PID))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(a.UID), Gid: uint32(a.GID), Groups: []uint32{}}}
	if err := cmd.Run(); err == nil {
		t.Errorf("uid %d can signal the other VM's qemu (pid %d)", a.UID, hs[1].PID)
	}
	cmd = exec.Command("/bin/sh", "-c", "kill -0 "+strconv.Itoa(hs[0].PID))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(a.UID), Gid: uint32(a.GID), Groups: []uint32{}}}
	if err := cmd.Run(); err != nil {
		t.Errorf("uid %d can't even signal its own qemu: the check above proves nothing (%v)", a.UID, err)
	}
}

// A confined start that fails after the cgroup was created and QEMU was
// started (here: a fake QEMU that never answers on QMP, and a start-up
// deadline) undoes both: no process and no cgroup are left.
func TestStartConfinedFailureUndoes(t *testing.T) {
	img := findTestImage(t)
	conf := testConfine(t)
	// Outside t.TempDir (0700): the fake runs as the vmm user.
	dir, err := os.MkdirTemp("", "banger-fakeqemu-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	mark := filepath.Join(dir, "started")
	fake := filepath.Join(dir, "qemu")
	// argv[0] names the VM (-name banger-ID,...), so that the test can
	// find the process; the mark says it ran.
	script := "#!/bin/bash\n: > " + mark + "\nexec -a \"fakeqemu $2\" sleep 600\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	spec := img.spec(t, filepath.Join(t.TempDir(), "vm"), vmmtest.RunForever)
	d := New(Config{Binary: fake, Confine: conf}, testLogger(t))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	h, err := d.Start(ctx, spec)
	if err == nil {
		d.Kill(context.Background(), h)
		t.Fatal("Start succeeded with a qemu that never answers")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Start = %v, want the start-up deadline", err)
	}
	if _, err := os.Stat(mark); err != nil {
		t.Fatalf("the fake qemu never ran (%v): the failure was not in the middle of the launch", err)
	}
	name := "fakeqemu banger-" + spec.ID
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.HasPrefix(string(b), name) {
			t.Errorf("process %s (%q) left after the failed start", e.Name(), b)
		}
	}
	// testConfine's parent, in every hierarchy (v2 and v1's).
	parent := "banger-test-" + strconv.Itoa(os.Getpid())
	for _, ctl := range []string{"", "memory", "pids", "cpu"} {
		p := filepath.Join("/sys/fs/cgroup", ctl, parent, cgroupName(spec.ID))
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left after the failed start (%v)", p, err)
		}
	}
	assertNoRuntimeFiles(t, d, spec.Dir)
}
