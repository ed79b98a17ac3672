//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/store"
	"github.com/bangerdev/banger/test/harness"
)

// TestTools covers cp, logs -f, kill, ls --json, a terminal session, the
// accelerator override, promote, doctor, and a VM that died while bangerd
// was down.
func TestTools(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	e.Must("vm", "create", "--name", "tools", "--image", "tiny", "--accel", "tcg", "--memory", "256", "--start")

	t.Run("ls-json-and-accel", func(t *testing.T) {
		e.T = t
		var vms []api.VM
		if err := json.Unmarshal([]byte(e.Must("vm", "ls", "--json")), &vms); err != nil {
			t.Fatal(err)
		}
		if len(vms) != 1 || vms[0].Name != "tools" || vms[0].State != "running" || vms[0].Accel != "tcg" || vms[0].AccelWanted != "tcg" {
			t.Fatalf("vm ls --json: %+v", vms)
		}
		if out := e.Must("vm", "ls"); !strings.Contains(out, "tools") || !strings.Contains(out, "running") {
			t.Fatalf("vm ls table:\n%s", out)
		}
	})

	t.Run("cp-in-and-out", func(t *testing.T) {
		e.T = t
		src := filepath.Join(t.TempDir(), "proj")
		os.MkdirAll(filepath.Join(src, "sub"), 0o755)
		os.WriteFile(filepath.Join(src, "sub", "run.sh"), []byte("#!/bin/sh\necho ran\n"), 0o755)
		os.WriteFile(filepath.Join(src, "data.txt"), []byte("payload"), 0o600)
		e.Must("vm", "cp", src, "tools:/root")
		if out := e.Must("vm", "exec", "tools", "--", "/root/proj/sub/run.sh"); out != "ran\n" {
			t.Fatalf("copied script output %q", out)
		}
		if out := e.Must("vm", "exec", "tools", "--", "stat", "-c", "%a", "/root/proj/data.txt"); strings.TrimSpace(out) != "600" {
			t.Fatalf("mode not kept: %q", out)
		}
		dst := t.TempDir()
		e.Must("vm", "cp", "tools:/root/proj", dst)
		b, err := os.ReadFile(filepath.Join(dst, "proj", "data.txt"))
		if err != nil || string(b) != "payload" {
			t.Fatalf("copied back: %q %v", b, err)
		}
		e.Fails("must be absolute", "vm", "cp", src, "tools:relative")
		e.Fails("exactly one", "vm", "cp", src, dst)
	})

	t.Run("pty", func(t *testing.T) {
		e.T = t
		// script(1) gives banger a real terminal.
		cmd := exec.Command("script", "-qfec", strings.Join([]string{filepath.Join(binDir, "banger"), "--socket", e.Socket(),
			"vm", "exec", "-t", "tools", "--", "sh", "-c", "'tty; stty size'"}, " "), "/dev/null")
		cmd.Env = append(os.Environ(), "COLUMNS=100", "LINES=30")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("script: %v\n%s", err, out)
		}
		if !strings.Contains(string(out), "/dev/pts/") {
			t.Fatalf("no pty in the guest: %q", out)
		}
	})

	t.Run("logs-follow", func(t *testing.T) {
		e.T = t
		cmd := exec.Command(filepath.Join(binDir, "banger"), "--socket", e.Socket(), "vm", "logs", "-f", "tools")
		var out strings.Builder
		cmd.Stdout = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		e.Must("vm", "exec", "tools", "--", "sh", "-c", "echo follow-marker > /dev/console")
		harness.WaitFor(t, 20*time.Second, "the marker in vm logs -f", func() bool { return strings.Contains(out.String(), "follow-marker") })
		cmd.Process.Signal(syscall.SIGINT)
		cmd.Wait()
		if out := e.Must("vm", "logs", "-n", "1", "tools"); !strings.Contains(out, "follow-marker") || strings.Count(out, "\n") != 1 {
			t.Fatalf("vm logs -n 1: %q", out)
		}
	})

	t.Run("kill", func(t *testing.T) {
		e.T = t
		pid := e.Inspect("tools").PID
		e.Must("vm", "kill", "tools")
		if harness.ProcessAlive(pid) {
			t.Fatal("qemu alive after kill")
		}
		if st := e.Inspect("tools").State; st != "stopped" {
			t.Fatalf("state %s", st)
		}
		e.Fails("not running", "vm", "kill", "tools")
	})

	t.Run("died-while-daemon-down", func(t *testing.T) {
		e.T = t
		e.Must("vm", "start", "tools")
		vm := e.Inspect("tools")
		e.StopDaemon()
		syscall.Kill(vm.PID, syscall.SIGKILL)
		harness.WaitFor(t, 10*time.Second, "qemu to die", func() bool { return !harness.ProcessAlive(vm.PID) })
		e.StartDaemon()
		if st := e.Inspect("tools").State; st != "stopped" {
			t.Fatalf("state after restart: %s", st)
		}
		for _, f := range []string{"qmp.sock", "agent.sock", "qemu.pid"} {
			if _, err := os.Stat(filepath.Join(vm.Dir, f)); err == nil {
				t.Fatalf("stale %s not cleaned up", f)
			}
		}
		e.Must("vm", "start", "tools") // and it boots again
		e.Must("vm", "rm", "-f", "tools")
	})

	t.Run("daemon-crash-leftovers", func(t *testing.T) {
		e.T = t
		// A daemon that died between booting a VMM and recording it, and
		// in the middle of a create (a VM directory without a row).
		e.Must("vm", "create", "--name", "unrecorded", "--image", "tiny", "--memory", "256", "--start")
		vm := e.Inspect("unrecorded")
		e.StopDaemon()
		st, err := store.Open(context.Background(), filepath.Join(e.StateDir(), "state.db"))
		if err != nil {
			t.Fatal(err)
		}
		row, err := st.GetVM(context.Background(), "unrecorded")
		if err != nil {
			t.Fatal(err)
		}
		row.Handle, row.State = "", "starting"
		if err := st.UpdateVM(context.Background(), row); err != nil {
			t.Fatal(err)
		}
		st.Close()
		orphan := filepath.Join(e.StateDir(), "vms", "00000000deadbeef")
		os.MkdirAll(orphan, 0o700)
		os.WriteFile(filepath.Join(orphan, "root"), []byte("half-made"), 0o600)

		e.StartDaemon()
		if got := e.Inspect("unrecorded"); got.State != "running" || got.PID != vm.PID {
			t.Fatalf("unrecorded VMM not adopted: state %s pid %d (qemu pid %d)", got.State, got.PID, vm.PID)
		}
		if out := e.Must("vm", "exec", "unrecorded", "--", "echo", "adopted"); out != "adopted\n" {
			t.Fatalf("exec in the adopted VM: %q", out)
		}
		if _, err := os.Stat(orphan); !os.IsNotExist(err) {
			t.Fatalf("the directory of an unfinished create was not removed: %v", err)
		}
		e.Must("vm", "rm", "-f", "unrecorded")
		if harness.ProcessAlive(vm.PID) {
			t.Fatal("qemu alive after rm -f")
		}
	})

	t.Run("promote", func(t *testing.T) {
		e.T = t
		_, errOut, code := e.Banger("image", "promote", "tiny")
		if code != 0 || !strings.Contains(errOut, "copy rootfs") {
			t.Fatalf("promote: code %d, progress %q", code, errOut)
		}
		var im api.Image
		if err := json.Unmarshal([]byte(e.Must("image", "inspect", "tiny")), &im); err != nil {
			t.Fatal(err)
		}
		if !im.Managed || !strings.HasPrefix(im.Rootfs, e.StateDir()) || !strings.HasPrefix(im.Kernel, e.StateDir()) {
			t.Fatalf("promoted image: %+v", im)
		}
		e.Fails("already managed", "image", "promote", "tiny")
		out := e.Must("vm", "run", "--rm", "--image", "tiny", "--", "echo", "from-managed")
		if out != "from-managed\n" {
			t.Fatalf("boot from the managed image: %q", out)
		}
		e.Must("image", "rm", "tiny")
		if _, err := os.Stat(filepath.Dir(im.Rootfs)); !os.IsNotExist(err) {
			t.Fatalf("managed image files left after rm: %v", err)
		}
	})

	t.Run("unprivileged-user", func(t *testing.T) {
		e.T = t
		asNobody := func(args ...string) (string, error) {
			cmd := exec.Command("setpriv", append([]string{"--reuid", "65534", "--regid", "65534", "--clear-groups",
				filepath.Join(binDir, "banger"), "--socket", e.Socket()}, args...)...)
			cmd.Env = []string{"HOME=/nonexistent", "PATH=/usr/bin:/bin"}
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		// The socket's mode (0660, root and socket_group) keeps other users out.
		out, err := asNobody("vm", "ls")
		if err == nil {
			t.Fatalf("nobody could list VMs:\n%s", out)
		}
		if !strings.Contains(out, "permission denied") || !strings.Contains(out, "sudo") {
			t.Fatalf("message for a user without access to the socket: %s", out)
		}
		// Behind it, the daemon checks each caller's credentials: with the
		// socket opened to everyone, nobody reaches the daemon, may read,
		// and is refused every change by the peer-credential check.
		if err := os.Chmod(e.Socket(), 0o666); err != nil {
			t.Fatal(err)
		}
		defer os.Chmod(e.Socket(), 0o660)
		if out, err := asNobody("vm", "ls"); err != nil || !strings.Contains(out, "NAME") {
			t.Fatalf("nobody reading through an open socket: %v\n%s", err, out)
		}
		for _, args := range [][]string{
			{"vm", "create", "--name", "by-nobody", "--image", "tiny"},
			{"image", "register", "by-nobody", "--rootfs", "/etc/shadow", "--kernel", "/etc/shadow"},
		} {
			out, err := asNobody(args...)
			if err == nil {
				t.Fatalf("nobody could run %v:\n%s", args, out)
			}
			if !strings.Contains(out, "uid 65534") || !strings.Contains(out, "sudo") {
				t.Fatalf("%v: the refusal does not come from the peer-credential check: %s", args, out)
			}
		}
		e.Fails("not found", "vm", "inspect", "by-nobody")
		// The harness's daemon reads its own config file, never the host's.
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", e.DaemonPID()))
		if !strings.Contains(string(cmdline), "--config\x00") {
			t.Fatalf("the test daemon runs without an explicit --config: %q", cmdline)
		}
	})

	t.Run("doctor", func(t *testing.T) {
		e.T = t
		out, _, _ := e.Banger("doctor")
		for _, want := range []string{"KVM", "QEMU", "Firecracker", "device-mapper", "reflink", "daemon"} {
			if !strings.Contains(out, want) {
				t.Fatalf("doctor output lacks %s:\n%s", want, out)
			}
		}
		if !strings.Contains(out, "OK    daemon") {
			t.Fatalf("doctor does not see the daemon:\n%s", out)
		}
	})
}
