package guestagent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/kmod"
)

// ext4IocResizeFS is EXT4_IOC_RESIZE_FS, _IOW('f', 16, __u64).
const ext4IocResizeFS = 0x40086610

const newRoot = "/newroot"

// initConsole writes init's progress to the console (PID 1's stderr is
// /dev/console), each line prefixed with "banger-init:" and the time since
// boot.
type initConsole struct{ w io.Writer }

func (c *initConsole) logf(format string, args ...any) {
	var ts unix.Timespec
	up := ""
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) == nil {
		up = fmt.Sprintf("[%d.%03d] ", ts.Sec, ts.Nsec/1e6)
	}
	fmt.Fprintf(c.w, "banger-init: %s%s\n", up, fmt.Sprintf(format, args...))
}

// runInit is init mode. It never returns: it execs the image's init, or
// supervises the agent as PID 1 until power-off, or powers off on error.
// args are the kernel's arguments to init; those after the program name
// are passed on to the image's init (e.g. "single").
func runInit(args []string) int {
	c := &initConsole{w: os.Stderr}
	if os.Getpid() != 1 {
		// Init mode mounts, switches root and powers off on error: never
		// do that to a running system by accident.
		c.logf("refusing to run as init: not PID 1 (use \"serve\" to run the agent by hand)")
		return 2
	}
	defer func() {
		if r := recover(); r != nil {
			fatal(c, fmt.Errorf("panic: %v\n%s", r, debug.Stack()))
		}
	}()
	err := initSystem(c, args)
	fatal(c, err)
	return 1
}

// fatal reports err on the console and powers the VM off. PID 1 must never
// exit (the kernel would panic) nor hang silently.
func fatal(c *initConsole, err error) {
	if err == nil {
		err = errors.New("init ended unexpectedly")
	}
	c.logf("FATAL: %v", err)
	c.logf("the VM cannot continue; powering off")
	time.Sleep(500 * time.Millisecond) // let the serial console drain
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	// No power-off support: restart (QEMU -no-reboot then exits).
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	for {
		time.Sleep(time.Hour)
	}
}

// initSystem runs the boot steps. It returns only on error (or when the
// final exec fails).
func initSystem(c *initConsole, args []string) error {
	if err := mountEarly(); err != nil {
		return err
	}
	ensureStdio()
	c.logf("started (agent %s)", Version)

	b, err := os.ReadFile(agentproto.ConfigPath)
	if err != nil {
		return fmt.Errorf("read agent config: %w", err)
	}
	var cfg agentproto.Config
	if err := json.Unmarshal(b, &cfg); err != nil {
		return fmt.Errorf("parse agent config %s: %w", agentproto.ConfigPath, err)
	}
	if cl, err := os.ReadFile("/proc/cmdline"); err == nil {
		cfg = applyCmdline(cfg, parseCmdline(string(cl)))
	}
	cfg = withDefaults(cfg)

	modsProblem := loadModules(c, cfg.Modules, cfg.ModulesRelease)

	if err := waitForDevice(cfg.RootDevice, rootWaitTimeout); err != nil {
		if modsProblem != "" {
			return fmt.Errorf("root device: %w (block devices: %s); %s", err, listBlockDevices(), modulesFailedLine(modsProblem))
		}
		return fmt.Errorf("root device: %w (block devices: %s)", err, listBlockDevices())
	}
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", newRoot, err)
	}
	if err := unix.Mount(cfg.RootDevice, newRoot, cfg.RootFSType, 0, ""); err != nil {
		return fmt.Errorf("mount root %s (%s) on %s: %w", cfg.RootDevice, cfg.RootFSType, newRoot, err)
	}
	c.logf("mounted %s (%s) read-write", cfg.RootDevice, cfg.RootFSType)

	if strings.HasPrefix(cfg.RootFSType, "ext") {
		if err := growRoot(c, cfg.RootDevice, newRoot); err != nil {
			c.logf("warning: grow root filesystem: %v", err)
		}
	}

	if err := switchRoot(newRoot); err != nil {
		return fmt.Errorf("switch root: %w", err)
	}

	if cfg.Hostname != "" {
		if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
			c.logf("warning: set hostname %q: %v", cfg.Hostname, err)
		}
	}

	initPath, resolved, mode, err := decideInit(cfg.Init, lookupInit)
	if err != nil {
		c.logf("warning: %v; the agent stays PID 1", err)
	}

	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("encode agent config: %w", err)
	}
	if initPath == "" {
		// The agent stays PID 1 (pid1_linux.go).
		setupAgentPID1(c)
		env := agentEnv(InitModeAgent, "", prepareGuest(c, cfg, InitModeAgent))
		c.logf("no init to hand over to: the agent stays PID 1")
		if cfg.Process == nil || len(cfg.Process.Argv) == 0 {
			return runPID1(c, func() (int, error) { return startAgent(cfgJSON, env, "serve-fd") }, nil)
		}
		// The main process (mainproc_linux.go): each agent server gets a
		// link to its supervisor, as descriptor mainFD.
		mp := newMainProc(c, cfg.Process, cfg.Hostname)
		env = append(env, envMainFD+"="+strconv.Itoa(mainFD))
		return runPID1(c, func() (int, error) {
			ours, theirs, err := socketPair()
			if err != nil {
				return 0, err
			}
			pid, err := startAgent(cfgJSON, env, "serve-fd", theirs)
			theirs.Close()
			if err != nil {
				ours.Close()
				return pid, err
			}
			mp.serveLink(ours)
			return pid, nil
		}, mp)
	}

	if cfg.Hostname != "" {
		// systemd sets the hostname from /etc/hostname: make it agree.
		writeHostnameFile(c, cfg.Hostname)
	}
	if mode == InitModeSystemd {
		if err := installEarlyBootUnit(); err != nil {
			c.logf("warning: early boot signal: %v; the agent will ask systemd instead", err)
		}
	}
	env := agentEnv(mode, resolved, prepareGuest(c, cfg, mode))
	// The image's init does not know the agent: a supervisor restarts it.
	pid, err := startAgent(cfgJSON, env, "supervise-fd")
	if err != nil {
		// Without the agent the host cannot reach the VM; still boot the
		// image's init so the console shows what happened.
		c.logf("error: start agent: %v", err)
	} else {
		c.logf("agent started (pid %d)", pid)
	}
	c.logf("handing PID 1 to %s (%s)", initPath, resolved)
	argv := []string{initPath}
	if len(args) > 1 {
		argv = append(argv, args[1:]...)
	}
	err = syscall.Exec(initPath, argv, os.Environ())
	return fmt.Errorf("exec %s: %w", initPath, err)
}

// mountEarly mounts /proc, /sys and /dev in the initramfs.
func mountEarly() error {
	const noexec = unix.MS_NOSUID | unix.MS_NOEXEC | unix.MS_NODEV
	for _, m := range []struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}{
		{"proc", "/proc", "proc", noexec, ""},
		{"sysfs", "/sys", "sysfs", noexec, ""},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", m.dst, err)
		}
		err := unix.Mount(m.src, m.dst, m.fstype, m.flags, m.data)
		if err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.dst, err)
		}
	}
	return nil
}

// ensureStdio opens /dev/console as fds 0-2 when the kernel could not give
// PID 1 a console (no /dev/console node in the initramfs).
func ensureStdio() {
	if _, err := unix.FcntlInt(2, unix.F_GETFD, 0); err == nil {
		return
	}
	fd, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return
	}
	for i := 0; i < 3; i++ {
		if _, err := unix.FcntlInt(uintptr(i), unix.F_GETFD, 0); err != nil {
			_ = unix.Dup2(fd, i)
		}
	}
	if fd > 2 {
		unix.Close(fd)
	}
}

// loadModules loads the named modules and their dependencies. wantRelease
// is the release the host packed modules for ("" if none). Failures are
// not fatal here (a driver the root disk does not need may fail): they are
// reported on the console with agentproto.ModulesFailedMarker, and
// returned, so that a missing root device can say why.
func loadModules(c *initConsole, names []string, wantRelease string) (problem string) {
	if len(names) == 0 {
		return ""
	}
	defer func() {
		if problem != "" {
			c.logf("%s", modulesFailedLine(problem))
		}
	}()
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		c.logf("warning: uname: %v; not loading modules", err)
		return ""
	}
	release := unix.ByteSliceToString(uts.Release[:])
	if wantRelease != "" && wantRelease != release {
		return modulesProblem(wantRelease, release, false, nil)
	}
	var relDir string
	var deps kmod.ModulesDep
	for _, d := range []string{"/lib/modules/" + release, "/usr/lib/modules/" + release} {
		f, err := os.Open(d + "/modules.dep")
		if err != nil {
			continue
		}
		deps, err = kmod.ParseModulesDep(f)
		f.Close()
		if err != nil {
			c.logf("warning: %s: %v", d, err)
			continue
		}
		relDir = d
		break
	}
	if relDir == "" {
		if wantRelease != "" {
			return modulesProblem(wantRelease, release, false, nil)
		}
		c.logf("no modules.dep for kernel %s: assuming %s are built in", release, strings.Join(names, " "))
		return ""
	}
	builtin := map[string]bool{}
	if f, err := os.Open(relDir + "/modules.builtin"); err == nil {
		builtin, err = kmod.ParseModulesBuiltin(f)
		f.Close()
		if err != nil {
			c.logf("warning: %s/modules.builtin: %v", relDir, err)
		}
	}
	files, missing := deps.Resolve(names)
	start := time.Now()
	var loaded, present, failed []string
	for _, p := range files {
		name := kmod.ModuleName(p)
		mp := modulePath(relDir, p)
		err := loadModule(mp)
		switch {
		case err == nil:
			loaded = append(loaded, name)
		case errors.Is(err, unix.EEXIST):
			present = append(present, name)
		default:
			reason := err.Error()
			// A module built for another kernel: say for which.
			if r := moduleRelease(mp); r != "" && r != release {
				reason += " (built for kernel " + r + ")"
			}
			failed = append(failed, name+": "+reason)
		}
	}
	c.logf("loaded %d modules in %s: %s", len(loaded), time.Since(start).Round(time.Millisecond), strings.Join(loaded, " "))
	if len(present) > 0 {
		c.logf("already loaded: %s", strings.Join(present, " "))
	}
	for _, m := range missing {
		if !builtin[kmod.ModuleName(m)] && len(builtin) > 0 {
			c.logf("warning: module %s: not in modules.dep nor modules.builtin; assuming built in", m)
		}
	}
	return modulesProblem(wantRelease, release, true, failed)
}

// moduleRelease is the release an uncompressed module file was built for,
// or "".
func moduleRelease(p string) string {
	if !strings.HasSuffix(p, ".ko") {
		return ""
	}
	f, err := os.Open(p)
	if err != nil {
		return ""
	}
	defer f.Close()
	r, err := kmod.ModuleRelease(f)
	if err != nil {
		return ""
	}
	return r
}

func loadModule(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	flags := 0
	if strings.HasSuffix(p, ".xz") || strings.HasSuffix(p, ".zst") || strings.HasSuffix(p, ".gz") {
		flags |= unix.MODULE_INIT_COMPRESSED_FILE
	}
	return unix.FinitModule(int(f.Fd()), "", flags)
}

// waitForDevice waits until the block device node exists.
func waitForDevice(dev string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		st, err := os.Stat(dev)
		if err == nil {
			if st.Mode()&os.ModeDevice == 0 {
				return fmt.Errorf("%s is not a device", dev)
			}
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %s", dev, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func listBlockDevices() string {
	ents, err := os.ReadDir("/sys/class/block")
	if err != nil || len(ents) == 0 {
		return "none"
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return strings.Join(names, " ")
}

// growRoot grows the mounted ext4 filesystem at mnt to fill dev, online.
func growRoot(c *initConsole, dev, mnt string) error {
	f, err := os.Open(dev)
	if err != nil {
		return err
	}
	defer f.Close()
	var devBytes uint64
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&devBytes))); e != 0 {
		return fmt.Errorf("BLKGETSIZE64 %s: %w", dev, e)
	}
	sb := make([]byte, ext4SuperblockSize)
	if _, err := f.ReadAt(sb, ext4SuperblockOffset); err != nil {
		return fmt.Errorf("read superblock of %s: %w", dev, err)
	}
	blocks, bs, err := parseExt4Superblock(sb)
	if err != nil {
		return fmt.Errorf("%s: %w", dev, err)
	}
	target, grow := growTarget(devBytes, bs, blocks)
	if !grow {
		return nil
	}
	d, err := os.Open(mnt)
	if err != nil {
		return err
	}
	defer d.Close()
	start := time.Now()
	n := target
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, d.Fd(), ext4IocResizeFS, uintptr(unsafe.Pointer(&n))); e != 0 {
		return fmt.Errorf("EXT4_IOC_RESIZE_FS to %d blocks: %w", target, e)
	}
	c.logf("grew root filesystem %s -> %s (%d -> %d blocks) in %s",
		humanBytes(blocks*bs), humanBytes(target*bs), blocks, target, time.Since(start).Round(time.Millisecond))
	return nil
}

// switchRoot makes newroot the root filesystem, like switch_root(8): it
// frees the initramfs, moves /dev, /proc and /sys, and chroots.
func switchRoot(newroot string) error {
	var rootSt unix.Stat_t
	if err := unix.Stat("/", &rootSt); err != nil {
		return fmt.Errorf("stat /: %w", err)
	}
	var nrSt unix.Stat_t
	if err := unix.Stat(newroot, &nrSt); err != nil {
		return fmt.Errorf("stat %s: %w", newroot, err)
	}
	if nrSt.Dev == rootSt.Dev {
		return fmt.Errorf("%s is not a mount point", newroot)
	}
	// Free the initramfs's memory; never cross into another filesystem.
	removeOnDevice("/", rootSt.Dev, newroot)

	for _, m := range []string{"/dev", "/proc", "/sys"} {
		dst := newroot + m
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", dst, err)
		}
		if err := unix.Mount(m, dst, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s to %s: %w", m, dst, err)
		}
	}
	if err := unix.Chdir(newroot); err != nil {
		return fmt.Errorf("chdir %s: %w", newroot, err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move %s to /: %w", newroot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("chdir /: %w", err)
	}
	return nil
}

// removeOnDevice removes everything under dir that lives on device dev,
// except skip. Directories on other devices (mount points) are left alone.
// Errors are ignored: this only frees memory.
func removeOnDevice(dir string, dev uint64, skip string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if p == skip {
			continue
		}
		var st unix.Stat_t
		if unix.Lstat(p, &st) != nil || st.Dev != dev {
			continue
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			removeOnDevice(p, dev, skip)
			_ = unix.Rmdir(p)
		} else {
			_ = unix.Unlink(p)
		}
	}
}

// lookupInit resolves an init path in the current root.
func lookupInit(p string) (string, error) {
	r, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", fmt.Errorf("%w: %w", errNoInit, err)
	}
	fi, err := os.Stat(r)
	if err != nil {
		return "", fmt.Errorf("%w: %w", errNoInit, err)
	}
	if err := checkInitFile(fi); err != nil {
		return "", err
	}
	return r, nil
}

func writeHostnameFile(c *initConsole, name string) {
	const p = "/etc/hostname"
	if b, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(b)) == name {
		return
	}
	if _, err := os.Stat("/etc"); err != nil {
		return
	}
	if err := os.WriteFile(p, []byte(name+"\n"), 0o644); err != nil {
		c.logf("warning: write %s: %v", p, err)
	}
}

// startAgent starts the agent as a child: /proc/self/exe <command> 3
// (serve-fd: the server; supervise-fd: a supervisor that keeps one
// running), with the JSON configuration on an inherited pipe and env
// (agentEnv); extra files follow as descriptors 4 and up. The binary is no
// longer on any filesystem after the root switch, but /proc/self/exe
// still is.
func startAgent(cfgJSON []byte, env []string, command string, extra ...*os.File) (int, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return 0, fmt.Errorf("pipe: %w", err)
	}
	defer w.Close()
	p, err := os.StartProcess("/proc/self/exe", []string{"banger-agent", command, "3"}, &os.ProcAttr{
		Dir:   "/",
		Env:   env,
		Files: append([]*os.File{os.Stdin, os.Stdout, os.Stderr, r}, extra...),
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
	r.Close()
	if err != nil {
		return 0, fmt.Errorf("start agent: %w", err)
	}
	pid := p.Pid
	// PID 1 reaps with wait4(-1); the handle is not needed.
	_ = p.Release()
	if _, err := w.Write(cfgJSON); err != nil {
		return pid, fmt.Errorf("send config to agent: %w", err)
	}
	return pid, nil
}
