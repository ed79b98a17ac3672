//go:build e2e

package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/vmm/qemu"
	"github.com/bangerdev/banger/test/harness"
)

// TestVM boots real VMs through bangerd and exercises the lifecycle. The
// subtests share one daemon and run in order.
func TestVM(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	release := kernelRelease(t)

	t.Run("run-rm-uname", func(t *testing.T) {
		e.T = t
		start := time.Now()
		out, errOut, code := e.Banger("vm", "run", "--rm", "--image", "debian", "--", "uname", "-r")
		if code != 0 {
			t.Fatalf("vm run: exit %d, stderr: %s", code, errOut)
		}
		if strings.TrimSpace(out) != release {
			t.Fatalf("uname -r = %q, want %q", out, release)
		}
		t.Logf("vm run --rm -- uname -r took %s", time.Since(start).Round(time.Millisecond))
		if ls := e.Must("vm", "ls", "-q"); strings.TrimSpace(ls) != "" {
			t.Fatalf("--rm left VMs: %q", ls)
		}
		if d := e.VMDirs(); len(d) != 0 {
			t.Fatalf("--rm left VM dirs: %v", d)
		}
	})

	t.Run("wait-boot", func(t *testing.T) {
		e.T = t
		start := time.Now()
		out, _, _ := e.Banger("vm", "run", "--rm", "--wait-boot", "--image", "debian", "--", "systemctl", "is-system-running")
		if st := strings.TrimSpace(out); st != "running" && st != "degraded" {
			t.Fatalf("after --wait-boot systemd is %q, want running (or degraded)", st)
		}
		t.Logf("vm run --wait-boot took %s", time.Since(start).Round(time.Millisecond))
	})

	t.Run("create-start-exec", func(t *testing.T) {
		e.T = t
		if out := e.Must("vm", "create", "--name", "box", "--image", "debian", "--cpus", "2", "--memory", "768"); strings.TrimSpace(out) != "box" {
			t.Fatalf("create printed %q", out)
		}
		vm := e.Inspect("box")
		if vm.State != "stopped" || vm.CPUs != 2 || vm.MemoryMiB != 768 || vm.DiskStrategy != "qcow2-overlay" {
			t.Fatalf("created vm: %+v", vm)
		}
		e.Must("vm", "start", "box")
		vm = e.Inspect("box")
		if vm.State != "running" || vm.PID == 0 || !harness.ProcessAlive(vm.PID) {
			t.Fatalf("started vm: %+v", vm)
		}
		if vm.Guest == nil || vm.Guest.KernelRelease != release || vm.Guest.InitMode != "systemd" {
			t.Fatalf("guest info: %+v", vm.Guest)
		}
		if vm.Accel != "tcg" && vm.Accel != "kvm" {
			t.Fatalf("accel %q", vm.Accel)
		}
		// Under TCG the guest's CPU has no ERMS or FSRM (qemu.CPUModel),
		// so its kernel doesn't copy memory a byte per emulated iteration.
		if vm.Accel == "tcg" {
			flags := strings.Fields(e.Must("vm", "exec", "box", "--", "grep", "-m1", "^flags", "/proc/cpuinfo"))
			if slices.Contains(flags, "erms") || slices.Contains(flags, "fsrm") {
				t.Fatalf("guest CPU flags under TCG: %v", flags)
			}
		}
	})

	t.Run("exit-code", func(t *testing.T) {
		e.T = t
		_, _, code := e.Banger("vm", "exec", "box", "--", "sh", "-c", "exit 3")
		if code != 3 {
			t.Fatalf("exit code %d, want 3", code)
		}
		_, errOut, code := e.Banger("vm", "exec", "box", "--", "no-such-program")
		if code != 127 || !strings.Contains(errOut, "no-such-program") {
			t.Fatalf("unknown program: code %d stderr %q", code, errOut)
		}
	})

	t.Run("separate-streams", func(t *testing.T) {
		e.T = t
		out, errOut, code := e.Banger("vm", "exec", "box", "--", "sh", "-c", "echo to-out; echo to-err >&2; echo more-out")
		if code != 0 || out != "to-out\nmore-out\n" || errOut != "to-err\n" {
			t.Fatalf("code %d stdout %q stderr %q", code, out, errOut)
		}
		out, _, code = e.BangerIn([]byte("hello stdin\n"), "vm", "exec", "box", "--", "cat")
		if code != 0 || out != "hello stdin\n" {
			t.Fatalf("stdin: code %d stdout %q", code, out)
		}
		out, _, _ = e.Banger("vm", "exec", "-e", "FOO=bar baz", "-w", "/tmp", "box", "--", "sh", "-c", `echo "$FOO $(pwd)"`)
		if out != "bar baz /tmp\n" {
			t.Fatalf("env/workdir: %q", out)
		}
	})

	t.Run("logs", func(t *testing.T) {
		e.T = t
		out := e.Must("vm", "logs", "box")
		if !strings.Contains(out, "banger-init") {
			t.Fatalf("console log lacks banger-init lines:\n%s", out)
		}
	})

	t.Run("bad-input", func(t *testing.T) {
		e.T = t
		before := e.Must("vm", "ls", "-q")
		dirs := len(e.VMDirs())
		e.Fails("invalid VM name", "vm", "create", "--name", "Bad_Name", "--image", "debian")
		e.Fails("invalid VM name", "vm", "create", "--name", "-lead", "--image", "debian")
		e.Fails("already exists", "vm", "create", "--name", "box", "--image", "debian")
		e.Fails(`image "nope" not found`, "vm", "create", "--image", "nope")
		e.Fails("invalid size", "vm", "create", "--image", "debian", "--disk-size", "lots")
		e.Fails("smaller than image", "vm", "create", "--image", "debian", "--disk-size", "1M")
		e.Fails("no such file", "image", "register", "broken", "--rootfs", filepath.Join(imageDir, "rootfs.ext4"), "--kernel", "/nonexistent/vmlinuz")
		qcow := filepath.Join(t.TempDir(), "disk.qcow2")
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", qcow, "64M").CombinedOutput(); err != nil {
			t.Fatalf("qemu-img: %v: %s", err, out)
		}
		e.Fails("qemu-img convert -O raw", "image", "register", "broken", "--rootfs", qcow, "--kernel", filepath.Join(imageDir, "vmlinuz"))
		e.Fails("used by", "image", "rm", "debian")
		e.Fails("not found", "vm", "exec", "ghost", "--", "true")
		if after := e.Must("vm", "ls", "-q"); after != before {
			t.Fatalf("bad input changed VMs: %q → %q", before, after)
		}
		if len(e.VMDirs()) != dirs {
			t.Fatalf("bad input left VM dirs: %v", e.VMDirs())
		}
		if out := e.Must("image", "ls"); strings.Contains(out, "broken") {
			t.Fatalf("half-registered image: %s", out)
		}
	})

	t.Run("daemon-restart", func(t *testing.T) {
		e.T = t
		pid := e.Inspect("box").PID
		e.StopDaemon()
		if !harness.ProcessAlive(pid) {
			t.Fatal("VM died with the daemon")
		}
		e.StartDaemon()
		vm := e.Inspect("box")
		if vm.State != "running" || vm.PID != pid {
			t.Fatalf("after restart: state %s pid %d (was %d)", vm.State, vm.PID, pid)
		}
		out, _, code := e.Banger("vm", "exec", "box", "--", "echo", "still-here")
		if code != 0 || out != "still-here\n" {
			t.Fatalf("exec after restart: code %d out %q", code, out)
		}
	})

	t.Run("agent-restarted-after-crash", func(t *testing.T) {
		e.T = t
		// The agent server is the parent of the commands it runs; under
		// systemd a supervisor restarts it and bangerd reconnects.
		before := e.Must("vm", "exec", "box", "--", "sh", "-c", "echo $PPID")
		e.Banger("vm", "exec", "box", "--", "sh", "-c", "kill -9 $PPID")
		start := time.Now()
		var after string
		harness.WaitFor(t, 90*time.Second, "exec to work again", func() bool {
			out, _, code := e.Banger("vm", "exec", "box", "--", "sh", "-c", "echo $PPID")
			after = out
			return code == 0
		})
		if after == before {
			t.Fatalf("agent pid unchanged (%s): it was not killed", strings.TrimSpace(after))
		}
		t.Logf("agent back after %s (pid %s → %s)", time.Since(start).Round(time.Millisecond), strings.TrimSpace(before), strings.TrimSpace(after))
	})

	t.Run("stop-start-rm", func(t *testing.T) {
		e.T = t
		vm := e.Inspect("box")
		e.Must("vm", "exec", "box", "--", "sh", "-c", "echo persisted > /root/marker && sync")
		start := time.Now()
		e.Must("vm", "stop", "box")
		t.Logf("graceful stop took %s", time.Since(start).Round(time.Millisecond))
		if harness.ProcessAlive(vm.PID) {
			t.Fatal("qemu still runs after stop")
		}
		if st := e.Inspect("box").State; st != "stopped" {
			t.Fatalf("state after stop: %s", st)
		}
		e.Fails("start it with", "vm", "exec", "box", "--", "true")
		for _, s := range []string{"qmp.sock", "agent.sock", "qemu.pid"} {
			if _, err := os.Stat(filepath.Join(vm.Dir, s)); err == nil {
				t.Fatalf("%s left after stop", s)
			}
		}
		e.Must("vm", "start", "box")
		if out := e.Must("vm", "exec", "box", "--", "cat", "/root/marker"); out != "persisted\n" {
			t.Fatalf("disk content after restart: %q", out)
		}
		pid := e.Inspect("box").PID
		e.Fails("running", "vm", "rm", "box")
		e.Must("vm", "rm", "-f", "box")
		if harness.ProcessAlive(pid) {
			t.Fatal("qemu still runs after rm -f")
		}
		if _, err := os.Stat(vm.Dir); !os.IsNotExist(err) {
			t.Fatalf("vm dir left after rm: %v", err)
		}
		if p := harness.ProcessesMentioning(vm.ID); len(p) != 0 {
			t.Fatalf("processes of the removed VM remain: %v", p)
		}
		e.Fails("not found", "vm", "inspect", "box")
		e.Must("image", "rm", "debian") // no longer in use
	})

	t.Run("no-init-image-and-disk-size", func(t *testing.T) {
		e.T = t
		e.Must("vm", "create", "--name", "tiny1", "--image", "tiny", "--disk-size", "256M", "--start")
		vm := e.Inspect("tiny1")
		if vm.Guest == nil || vm.Guest.InitMode != "agent" {
			t.Fatalf("guest info: %+v", vm.Guest)
		}
		out := e.Must("vm", "exec", "tiny1", "--", "cat", "/proc/1/comm")
		if strings.TrimSpace(out) == "" {
			t.Fatal("no PID 1")
		}
		// The disk grew from the image's 16 MiB and the guest filesystem with it.
		out = e.Must("vm", "exec", "tiny1", "--", "df", "-k", "/")
		fields := strings.Fields(strings.Split(strings.TrimSpace(out), "\n")[1])
		kb, _ := strconv.Atoi(fields[1])
		if kb < 200*1024 {
			t.Fatalf("root filesystem is %d KiB, want about 256 MiB:\n%s", kb, out)
		}
		// Zombies are reaped by the agent as PID 1.
		// The orphaned sleep exits 0.1 s after its shell; until it is reaped
		// it shows as a zombie (state Z) under PID 1.
		e.Must("vm", "exec", "tiny1", "--", "sh", "-c", "sleep 0.1 & echo $! > /tmp/orphan; exit 0")
		orphan := strings.TrimSpace(e.Must("vm", "exec", "tiny1", "--", "cat", "/tmp/orphan"))
		harness.WaitFor(t, 20*time.Second, "the orphan "+orphan+" reaped (gone from /proc, not a zombie)", func() bool {
			_, _, code := e.Banger("vm", "exec", "tiny1", "--", "test", "-e", "/proc/"+orphan)
			return code == 1
		})
		if out := e.Must("vm", "exec", "tiny1", "--", "sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status || true"); strings.TrimSpace(out) != "" {
			t.Fatalf("zombies in the guest: %s", out)
		}
		e.Must("vm", "stop", "tiny1")
		if st := e.Inspect("tiny1").State; st != "stopped" {
			t.Fatalf("state after stop: %s", st)
		}
	})

	t.Run("acpi-power-button", func(t *testing.T) {
		e.T = t
		// QEMU's system_powerdown presses the ACPI power button; the agent
		// powers the guest off, with systemd as PID 1 and as PID 1 itself.
		e.Must("image", "register", "debian2", "--rootfs", filepath.Join(imageDir, "rootfs.ext4"),
			"--kernel", filepath.Join(imageDir, "vmlinuz"), "--initrd", filepath.Join(imageDir, "initrd.img"))
		e.Must("vm", "create", "--name", "acpi-sd", "--image", "debian2")
		for _, name := range []string{"tiny1", "acpi-sd"} {
			e.Must("vm", "start", name)
			vm := e.Inspect(name)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			q, err := qemu.DialQMP(ctx, filepath.Join(vm.Dir, "qmp.sock"))
			if err != nil {
				cancel()
				t.Fatal(err)
			}
			// The button's driver may still be loading right after boot:
			// press until the guest goes.
			harness.WaitFor(t, 60*time.Second, name+" to power off on the ACPI button", func() bool {
				if !harness.ProcessAlive(vm.PID) {
					return true
				}
				_ = q.Execute(ctx, "system_powerdown", nil, nil)
				time.Sleep(time.Second)
				return !harness.ProcessAlive(vm.PID)
			})
			q.Close()
			cancel()
			harness.WaitFor(t, 10*time.Second, name+" recorded as stopped", func() bool { return e.Inspect(name).State == "stopped" })
			if out := e.Must("vm", "logs", name); !strings.Contains(out, "power button pressed") {
				t.Errorf("%s: the console does not show the agent acting on the button", name)
			}
		}
	})
}
