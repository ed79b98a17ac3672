package guestagent

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"time"

	"golang.org/x/sys/unix"
)

// Timings of the agent-as-PID-1 supervisor.
const (
	// stopGrace is how long processes get between SIGTERM and SIGKILL at
	// power-off.
	stopGrace = 3 * time.Second
	// agentHealthy: an agent child that ran this long resets the restart
	// backoff.
	agentHealthy = 30 * time.Second
)

// setupAgentPID1 prepares the root filesystem for programs when no init
// system will: pseudo-terminals, /dev/shm, /run and /tmp (made when
// missing), the /dev/fd links, and the loopback interface. Failures are
// logged and ignored.
func setupAgentPID1(c *initConsole) {
	warn := func(err error) {
		if err != nil {
			c.logf("warning: %v", err)
		}
	}
	warn(mountIfDir("devpts", "/dev/pts", "devpts", unix.MS_NOSUID|unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5", true))
	if _, err := os.Stat("/dev/pts/ptmx"); err == nil {
		_ = os.Remove("/dev/ptmx")
		warn(os.Symlink("pts/ptmx", "/dev/ptmx"))
	}
	warn(mountIfDir("shm", "/dev/shm", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777", true))
	// Made when missing: a FROM scratch image has no /run nor /tmp, and
	// programs (and the agent's SSH agent forwarding) expect them.
	warn(mountIfDir("tmpfs", "/run", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755", true))
	warn(mountIfDir("tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777", true))
	for name, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
	} {
		if _, err := os.Lstat(name); errors.Is(err, os.ErrNotExist) {
			warn(os.Symlink(target, name))
		}
	}
	warn(loopbackUp())
}

// mountIfDir mounts fstype on dir when dir exists (create: make it first).
func mountIfDir(src, dir, fstype string, flags uintptr, data string, create bool) error {
	if create {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", dir, err)
		}
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return nil
	}
	if err := unix.Mount(src, dir, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s: %w", fstype, dir, err)
	}
	return nil
}

// loopbackUp sets the "lo" interface up (the kernel assigns 127.0.0.1).
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: get flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: set up: %w", err)
	}
	return nil
}

// runPID1 is PID 1 when the image has no init: it keeps the agent child
// running, reaps every zombie, and powers off or reboots on the usual
// signals (SIGTERM, SIGPWR, SIGRTMIN+4, SIGUSR1, SIGUSR2: power off;
// SIGINT, i.e. ctrl-alt-del: reboot). With a main process (mp not nil) it
// runs it too, restarts it per its policy, and powers off when it finally
// exits. It never returns.
func runPID1(c *initConsole, start func() (int, error), mp *mainProc) error {
	sigs := make(chan os.Signal, 32)
	signal.Notify(sigs, unix.SIGCHLD, unix.SIGTERM, unix.SIGPWR, sigRTMin4, unix.SIGUSR1, unix.SIGUSR2, unix.SIGINT, unix.SIGHUP)
	// Ctrl-alt-del sends SIGINT to PID 1 instead of an immediate reboot.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)

	var (
		agentPID   int
		agentStart time.Time
		failures   int
		restart    <-chan time.Time
	)
	launch := func() {
		pid, err := start()
		if err != nil {
			failures++
			d := restartDelay(failures)
			c.logf("error: %v; retrying in %s", err, d)
			restart = time.After(d)
			return
		}
		agentPID, agentStart = pid, time.Now()
		c.logf("agent started (pid %d)", pid)
	}
	launch()

	// The main process's final exit: once an agent passed its exit
	// status on (or after exitLinger), the VM powers off.
	mainEnded := func() {
		mp.waitAck()
		shutdownSystem(c, false, nil)
	}
	var mainRestart <-chan time.Time
	if mp != nil {
		if mp.run() {
			mainEnded()
		}
		mainRestart = mp.restart
	}

	for {
		select {
		case <-restart:
			restart = nil
			launch()
		case <-mainRestart:
			if mp.run() {
				mainEnded()
			}
			mainRestart = mp.restart
		case sig := <-sigs:
			switch sig {
			case unix.SIGCHLD:
				final := false
				reapAll(func(pid int, ws unix.WaitStatus) {
					if mp != nil && mp.pid != 0 && pid == mp.pid {
						final = mp.ended(exitCode(ws)) || final
						mainRestart = mp.restart
						return
					}
					if pid != agentPID {
						return
					}
					agentPID = 0
					if time.Since(agentStart) > agentHealthy {
						failures = 0
					}
					failures++
					d := restartDelay(failures)
					c.logf("agent exited (%s); restarting in %s", describeWait(ws), d)
					restart = time.After(d)
				})
				if final {
					mainEnded()
				}
			case unix.SIGHUP:
				// Ignored (a hung-up console must not kill PID 1).
			case unix.SIGINT:
				shutdownSystem(c, true, mp)
			default:
				c.logf("received %v", sig)
				shutdownSystem(c, false, mp)
			}
		}
	}
}

// reapAll collects every exited child without blocking.
func reapAll(exited func(pid int, ws unix.WaitStatus)) {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		if exited != nil {
			exited(pid, ws)
		}
	}
}

func describeWait(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("status %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Sprintf("signal %v", ws.Signal())
	}
	return fmt.Sprintf("wait status %#x", uint32(ws))
}

// shutdownSystem stops every process (the main process first, with its
// stop signal, when mp is not nil), syncs, remounts / read-only and
// powers off (or reboots). It does not return.
func shutdownSystem(c *initConsole, reboot bool, mp *mainProc) {
	what := "powering off"
	if reboot {
		what = "rebooting"
	}
	if mp != nil {
		mp.stop()
	}
	c.logf("%s: stopping all processes", what)
	_ = unix.Kill(-1, unix.SIGTERM)
	deadline := time.Now().Add(stopGrace)
	for time.Now().Before(deadline) && !noChildren() {
		reapAll(nil)
		time.Sleep(20 * time.Millisecond)
	}
	if !noChildren() {
		c.logf("processes still running after %s: killing them", stopGrace)
		_ = unix.Kill(-1, unix.SIGKILL)
		kdl := time.Now().Add(time.Second)
		for time.Now().Before(kdl) && !noChildren() {
			reapAll(nil)
			time.Sleep(10 * time.Millisecond)
		}
	}
	unix.Sync()
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		c.logf("warning: remount / read-only: %v", err)
	}
	unix.Sync()
	c.logf("%s", what)
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	if reboot {
		cmd = unix.LINUX_REBOOT_CMD_RESTART
		preferTripleFaultReboot()
	}
	err := unix.Reboot(cmd)
	fatal(c, fmt.Errorf("reboot(%#x): %w", cmd, err))
}

// noChildren reports whether PID 1 has no children left (reaping any that
// exited).
func noChildren() bool {
	var ws unix.WaitStatus
	pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
	return errors.Is(err, unix.ECHILD) || (err == nil && pid < 0)
}

// preferTripleFaultReboot makes the kernel reset the VM with a triple fault
// unless the kernel command line chose a method (reboot=). The default x86
// method (ACPI reset register, then the keyboard controller...) sometimes
// never completes on QEMU microvm under TCG (about 1 reboot in 6 hung after
// "reboot: machine restart"); a triple fault resets every VMM at once
// (QEMU with -no-reboot then exits).
func preferTripleFaultReboot() {
	if cl, err := os.ReadFile("/proc/cmdline"); err == nil {
		if _, ok := parseCmdline(string(cl))["reboot"]; ok {
			return
		}
	}
	_ = os.WriteFile("/sys/kernel/reboot/type", []byte("triple"), 0o644)
}
