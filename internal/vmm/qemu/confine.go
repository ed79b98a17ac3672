package qemu

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/cgroup"
	"github.com/bangerdev/banger/internal/hostfile"
	"github.com/bangerdev/banger/internal/undo"
	"github.com/bangerdev/banger/internal/vmm"
)

// Sandbox is QEMU's seccomp policy for a confined VM: QEMU's default
// deny list plus obsolete system calls, any privilege change, process
// creation (fork, exec) and changes of scheduling or resource limits.
const Sandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// LogFileName is where a confined QEMU's stderr goes, inside Spec.Dir.
const LogFileName = "qemu.log"

// Confine configures how the driver confines QEMU (Config.Confine). A
// confined QEMU:
//
//   - runs with Sandbox;
//   - starts already as UID:GID with no supplementary groups (QEMU 7.2's
//     -runas installs the seccomp filter before dropping privileges and
//     dies with elevateprivileges=deny), so it is never root;
//   - opens no host path: the driver opens every file it needs (kernel,
//     initrd, root disk and its whole backing chain, console log) and
//     creates its sockets, and passes them as inherited descriptors (-add-fd
//     and /dev/fdset/N for the block and console files, fd=N for the
//     sockets, /proc/self/fd/N for kernel and initrd, which QEMU reads
//     with fopen);
//   - starts inside its own cgroup (package cgroup) with a memory limit
//     (guest memory + overhead), a pids limit and a CPU weight from its
//     vCPU count;
//   - is not daemonized (spawn=deny forbids -daemonize's fork): the driver
//     starts it in its own session and reaps it; it outlives the daemon all
//     the same.
type Confine struct {
	// User names the unprivileged user (for display); UID and GID are its
	// credentials. UID must not be 0.
	User     string
	UID, GID int
	// UIDFirst and UIDLast, when set, replace User: each QEMU runs with
	// its own uid (and a gid of the same number) from this range, the
	// lowest no live process uses, so that QEMUs can't signal or trace
	// each other.
	UIDFirst, UIDLast int
	// Cgroups creates the VM's cgroup. Required.
	Cgroups cgroup.Backend
	// MemoryOverheadMiB is added to the guest's memory for the cgroup's
	// memory limit (QEMU's own allocations, device buffers). Under TCG
	// the translation cache (TCGCacheMiB) is added too.
	MemoryOverheadMiB int
	// Err, when set, is why confinement could not be set up on this host;
	// every Start fails with it (fail closed).
	Err error
}

// TCGCacheMiB is the translation cache QEMU 7.2 reserves under TCG
// (tb-size's default, 1 GiB); it is filled as the guest runs new code.
const TCGCacheMiB = 1024

// Limits returns the cgroup limits of a VM with cpus vCPUs and memMiB of
// memory under accel.
func (c *Confine) Limits(cpus, memMiB int, accel string) cgroup.Limits {
	mem := memMiB + c.MemoryOverheadMiB
	if accel == vmm.AccelTCG {
		mem += TCGCacheMiB
	}
	return cgroup.Limits{
		MemoryBytes: int64(mem) << 20,
		// QEMU's threads: main loop, RCU, one per vCPU, up to 64 block I/O
		// workers, and a margin.
		PIDs: int64(96 + 2*cpus),
		// One default share per vCPU thread plus one for the main loop:
		// what QEMU's busy threads get unconfined, where each competes on
		// its own.
		CPUWeight: min(100*(cpus+1), 10000),
	}
}

// confinedFiles are the descriptors a confined QEMU inherits, with their
// place on its command line.
type confinedFiles struct {
	files []*os.File // ExtraFiles: files[i] is fd 3+i in QEMU
	args  []string   // -add-fd arguments
	sets  int
	// Where each file is in QEMU.
	qmpFD, agentFD  int
	dataFDs         []int  // data port i's listening socket at index i
	tapFD           int    // the TAP device (Spec.Net NetTAP)
	kernel, initrd  string // /proc/self/fd/N
	console         string // /dev/fdset/N
	blockdevs       []string
	log             *os.File
	listeners       []*net.UnixListener
	removeOnFailure []string
	pidFile         *os.File
	pidFilePath     string
	uid, gid        int
}

func (cf *confinedFiles) close() {
	for _, f := range cf.files {
		f.Close()
	}
	for _, l := range cf.listeners {
		l.Close()
	}
	if cf.log != nil {
		cf.log.Close()
	}
}

// add passes f to QEMU and returns its descriptor number there.
func (cf *confinedFiles) add(f *os.File) int {
	cf.files = append(cf.files, f)
	return 2 + len(cf.files)
}

// addSet passes f in a new fd set, with opaque naming it on the command
// line, and returns the set's path (/dev/fdset/N).
func (cf *confinedFiles) addSet(f *os.File, opaque string) string {
	fd := cf.add(f)
	cf.sets++
	cf.args = append(cf.args, "-add-fd", fmt.Sprintf("fd=%d,set=%d,opaque=%s", fd, cf.sets, escape(opaque)))
	return "/dev/fdset/" + strconv.Itoa(cf.sets)
}

// listen creates a unix socket only root can reach (mode 0600, in the
// VM's directory, 0700, from the start) and passes its listening
// descriptor. The mode is set after the bind, not with the process's
// umask, which every goroutine of the daemon shares.
func (cf *confinedFiles) listen(path string) (int, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return 0, fmt.Errorf("create socket: %w", err)
	}
	l.SetUnlinkOnClose(false)
	cf.listeners = append(cf.listeners, l)
	cf.removeOnFailure = append(cf.removeOnFailure, path)
	if err := os.Chmod(path, 0o600); err != nil {
		return 0, fmt.Errorf("socket %s: %w", path, err)
	}
	f, err := l.File()
	if err != nil {
		return 0, fmt.Errorf("socket %s: %w", path, err)
	}
	return cf.add(f), nil
}

// readable reports whether uid:gid may read a file with fi's owner and
// mode (through an inherited descriptor, /proc/self/fd/N re-opens the
// inode with the caller's credentials).
func readable(fi os.FileInfo, uid, gid int) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	m := fi.Mode().Perm()
	switch {
	case int(st.Uid) == uid:
		return m&0o400 != 0
	case int(st.Gid) == gid:
		return m&0o040 != 0
	}
	return m&0o004 != 0
}

// readOnlyFile opens path for QEMU to read through /proc/self/fd/N. A file
// the VMM user may not read itself (the per-VM initrd, which holds the
// agent's host key, is 0600) is copied into a sealed memfd, which only the
// VM's QEMU can reach.
func (cf *confinedFiles) readOnlyFile(path string) (string, error) {
	f, err := hostfile.Open(path)
	if err != nil {
		return "", err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return "", err
	}
	if !readable(fi, cf.uid, cf.gid) {
		mf, err := sealedCopy(f, filepath.Base(path))
		f.Close()
		if err != nil {
			return "", fmt.Errorf("copy %s for the vmm user: %w", path, err)
		}
		f = mf
	}
	return "/proc/self/fd/" + strconv.Itoa(cf.add(f)), nil
}

// sealedCopy copies f into a memfd that can't be changed any more.
func sealedCopy(f *os.File, name string) (*os.File, error) {
	fd, err := unix.MemfdCreate("banger-"+name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	mf := os.NewFile(uintptr(fd), "memfd:"+name)
	if _, err := io.Copy(mf, f); err != nil {
		mf.Close()
		return nil, err
	}
	if _, err := unix.FcntlInt(mf.Fd(), unix.F_ADD_SEALS, unix.F_SEAL_SEAL|unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_WRITE); err != nil {
		mf.Close()
		return nil, fmt.Errorf("seal memfd: %w", err)
	}
	return mf, nil
}

// prepareConfined opens everything a confined QEMU needs. The caller
// closes cf after starting QEMU (QEMU keeps its own copies).
func (d *Driver) prepareConfined(spec vmm.Spec, paths Paths, uid, gid int) (_ *confinedFiles, err error) {
	cf := &confinedFiles{uid: uid, gid: gid}
	defer func() {
		if err != nil {
			cf.close()
			removeFiles(cf.removeOnFailure...)
		}
	}()
	if cf.qmpFD, err = cf.listen(paths.QMPSocket); err != nil {
		return nil, err
	}
	if cf.agentFD, err = cf.listen(paths.AgentSocket); err != nil {
		return nil, err
	}
	for _, p := range paths.DataSockets {
		fd, err := cf.listen(p)
		if err != nil {
			return nil, err
		}
		cf.dataFDs = append(cf.dataFDs, fd)
	}
	// The pid file is the driver's (QEMU can't write in Dir); its fd set
	// names it on QEMU's command line, which is how findQEMU finds the
	// QEMU of a directory.
	pf, err := os.OpenFile(paths.PIDFile, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create pid file: %w", err)
	}
	cf.removeOnFailure = append(cf.removeOnFailure, paths.PIDFile)
	cf.pidFile, cf.pidFilePath = pf, paths.PIDFile
	ro, err := os.Open(paths.PIDFile)
	if err != nil {
		return nil, fmt.Errorf("open pid file: %w", err)
	}
	cf.addSet(ro, paths.PIDFile)

	if cf.kernel, err = cf.readOnlyFile(spec.Kernel); err != nil {
		return nil, fmt.Errorf("open kernel: %w", err)
	}
	if spec.Initrd != "" {
		if cf.initrd, err = cf.readOnlyFile(spec.Initrd); err != nil {
			return nil, fmt.Errorf("open initrd: %w", err)
		}
	}
	consoleLog := spec.ConsoleLog
	if consoleLog == "" {
		consoleLog = filepath.Join(spec.Dir, "console.log")
	}
	con, err := os.OpenFile(consoleLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open console log: %w", err)
	}
	cf.console = cf.addSet(con, consoleLog)
	if n := spec.Net; n != nil && n.Mode == vmm.NetTAP {
		tap, err := dupFile(n.TAP)
		if err != nil {
			return nil, fmt.Errorf("pass tap %s: %w", n.TAPName, err)
		}
		cf.tapFD = cf.add(tap)
	}
	if cf.blockdevs, err = cf.openDisk(spec.RootDisk); err != nil {
		return nil, err
	}
	logPath := filepath.Join(spec.Dir, LogFileName)
	if cf.log, err = os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600); err != nil {
		return nil, fmt.Errorf("create qemu log: %w", err)
	}
	cf.removeOnFailure = append(cf.removeOnFailure, logPath)
	return cf, nil
}

// openDisk opens the root disk read-write and every image of its backing
// chain read-only, and returns the -blockdev arguments that describe the
// chain explicitly, so QEMU opens no backing file by name.
func (cf *confinedFiles) openDisk(disk vmm.Disk) ([]string, error) {
	var args []string
	path, format, node := disk.Path, disk.Format, "root"
	readOnly := false
	for depth := 0; ; depth++ {
		if depth > 16 {
			return nil, fmt.Errorf("root disk %s: backing chain deeper than 16", disk.Path)
		}
		// The VM's own disk is opened read-write; the images below it (the
		// image's rootfs) read-only, without following a symlink out of
		// their directory (package hostfile).
		var f *os.File
		var err error
		if readOnly {
			f, err = hostfile.Open(path)
		} else {
			f, err = os.OpenFile(path, os.O_RDWR, 0)
		}
		if err != nil {
			return nil, fmt.Errorf("open disk image: %w", err)
		}
		set := cf.addSet(f, path)
		opts := ",discard=unmap"
		if readOnly {
			opts = ",read-only=on"
		}
		args = append(args, "-blockdev", "driver=file,node-name="+node+"-file,filename="+set+opts)
		var backing, backingFmt string
		if format == vmm.FormatQcow2 {
			if backing, backingFmt, err = qcow2Backing(f); err != nil {
				return nil, fmt.Errorf("disk image %s: %w", path, err)
			}
		}
		fmtNode := "driver=" + format + ",node-name=" + node + ",file=" + node + "-file" + opts
		if backing == "" {
			args = append(args, "-blockdev", fmtNode)
			return args, nil
		}
		if !filepath.IsAbs(backing) {
			backing = filepath.Join(filepath.Dir(path), backing)
		}
		next := fmt.Sprintf("backing%d", depth)
		args = append(args, "-blockdev", fmtNode+",backing="+next)
		if backingFmt == "" {
			if backingFmt, err = probeFormat(backing); err != nil {
				return nil, fmt.Errorf("disk image %s: backing file: %w", path, err)
			}
		}
		if backingFmt != vmm.FormatQcow2 && backingFmt != vmm.FormatRaw {
			return nil, fmt.Errorf("disk image %s: backing format %q not supported (want qcow2 or raw)", path, backingFmt)
		}
		path, format, node, readOnly = backing, backingFmt, next, true
	}
}

// The -blockdev arguments come out in the order they are opened (the
// root first); QEMU needs a node defined before another refers to it.
func orderBlockdevs(args []string) []string {
	// pairs of (-blockdev, value): file node then format node per image.
	var groups [][]string
	for i := 0; i+4 <= len(args); i += 4 {
		groups = append(groups, args[i:i+4])
	}
	var out []string
	for i := len(groups) - 1; i >= 0; i-- {
		out = append(out, groups[i]...)
	}
	return out
}

// qcow2Backing reads the backing file name and format from a qcow2 header.
func qcow2Backing(f *os.File) (name, format string, err error) {
	hdr := make([]byte, 104)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		return "", "", fmt.Errorf("read qcow2 header: %w", err)
	}
	if !bytes.Equal(hdr[:4], []byte("QFI\xfb")) {
		return "", "", errors.New("not a qcow2 image")
	}
	version := binary.BigEndian.Uint32(hdr[4:])
	off := binary.BigEndian.Uint64(hdr[8:])
	size := binary.BigEndian.Uint32(hdr[16:])
	if off == 0 || size == 0 {
		return "", "", nil
	}
	if size > 1023 {
		return "", "", fmt.Errorf("qcow2 backing file name of %d bytes", size)
	}
	b := make([]byte, size)
	if _, err := f.ReadAt(b, int64(off)); err != nil {
		return "", "", fmt.Errorf("read qcow2 backing file name: %w", err)
	}
	name = string(b)
	// Header extensions follow the header (72 bytes in v2, header_length
	// in v3); type 0xe2792aca is the backing file format.
	pos := int64(72)
	if version >= 3 {
		pos = int64(binary.BigEndian.Uint32(hdr[100:]))
	}
	for range 64 {
		var eh [8]byte
		if _, err := f.ReadAt(eh[:], pos); err != nil {
			break
		}
		typ, l := binary.BigEndian.Uint32(eh[:4]), binary.BigEndian.Uint32(eh[4:])
		if typ == 0 || l > 4096 {
			break
		}
		if typ == 0xe2792aca {
			v := make([]byte, l)
			if _, err := f.ReadAt(v, pos+8); err != nil {
				return "", "", fmt.Errorf("read qcow2 backing format: %w", err)
			}
			format = string(v)
			break
		}
		pos += 8 + int64((l+7)&^7)
	}
	return name, format, nil
}

// probeFormat tells qcow2 from raw by the magic.
func probeFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var m [4]byte
	if _, err := io.ReadFull(f, m[:]); err == nil && string(m[:]) == "QFI\xfb" {
		return vmm.FormatQcow2, nil
	}
	return vmm.FormatRaw, nil
}

// BuildConfinedArgs returns the arguments of a confined QEMU: BuildArgs's
// machine, with every file and socket replaced by the descriptors of cf.
func buildConfinedArgs(spec vmm.Spec, accel string, cf *confinedFiles) []string {
	args := []string{
		"-name", "banger-" + escape(spec.ID) + ",process=banger-" + escape(spec.Name),
		"-sandbox", Sandbox,
		"-M", "microvm",
		"-accel", accel,
		"-cpu", CPUModel(accel),
		"-smp", strconv.Itoa(spec.CPUs),
		"-m", strconv.Itoa(spec.MemoryMiB),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
	}
	args = append(args, cf.args...)
	args = append(args, "-kernel", cf.kernel)
	if cf.initrd != "" {
		args = append(args, "-initrd", cf.initrd)
	}
	args = append(args, "-append", KernelCmdline(spec.Cmdline),
		"-chardev", "file,id=console,path="+cf.console+",append=on",
		"-serial", "chardev:console")
	args = append(args, orderBlockdevs(cf.blockdevs)...)
	args = append(args,
		"-device", "virtio-blk-device,drive=root",
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,fd="+strconv.Itoa(cf.agentFD)+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name="+agentproto.VirtioPortName,
	)
	for i, fd := range cf.dataFDs {
		args = append(args, dataPortArgs(i, "fd="+strconv.Itoa(fd))...)
	}
	args = append(args, netArgs(spec.Net, cf.tapFD)...)
	args = append(args,
		"-chardev", "socket,id=qmp,fd="+strconv.Itoa(cf.qmpFD)+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
	)
	return args
}

// launchConfined starts a confined QEMU (see Confine) and waits until it
// answers on QMP. The caller holds the directory lock and cleans up the
// runtime files on error; launchConfined undoes what it made (the
// descriptors it opened, the cgroup, the QEMU process) on an undo stack.
func (d *Driver) launchConfined(ctx context.Context, bin string, spec vmm.Spec, accel string, paths Paths) (_ vmm.Handle, err error) {
	c := d.cfg.Confine
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}
	if err := ctx.Err(); err != nil {
		return vmm.Handle{}, fmt.Errorf("qemu start-up: %w", err)
	}
	uid, gid := c.UID, c.GID
	if c.UIDFirst > 0 {
		// Held until QEMU runs with the uid it picked.
		d.uidMu.Lock()
		defer d.uidMu.Unlock()
		if uid, err = d.freeUID(c.UIDFirst, c.UIDLast); err != nil {
			return vmm.Handle{}, err
		}
		gid = uid
	}
	cf, err := d.prepareConfined(spec, paths, uid, gid)
	if err != nil {
		return vmm.Handle{}, err
	}
	// QEMU keeps its own copies of the descriptors: the driver's are
	// closed whether the start succeeds or not, after the undo steps.
	defer cf.close()
	defer cf.pidFile.Close()
	steps := undo.New(d.log.With("op", "start confined qemu", "vm", spec.Name))
	defer steps.Run(ctx) // no-op once released
	limits := c.Limits(spec.CPUs, spec.MemoryMiB, accel)
	group, err := c.Cgroups.CreateGroup(ctx, cgroupName(spec.ID), limits)
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("%w (turn confinement off with vmm_confine = false to debug)", err)
	}
	steps.Push("remove cgroup", func(ctx context.Context) error {
		group.Release()
		return c.Cgroups.RemoveGroup(ctx, group.Unit, group.Paths)
	})

	args := buildConfinedArgs(spec, accel, cf)
	d.log.Debug("run confined qemu", "vm", spec.Name, "binary", bin, "args", args, "uid", uid, "cgroups", group.Paths, "unit", group.Unit)
	cmd := exec.Command(bin, args...)
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = cf.log, cf.log
	cmd.ExtraFiles = cf.files
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own session: a terminal's Ctrl-C aimed at a foreground bangerd
		// must not reach QEMU.
		Setsid:     true,
		Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}},
		// QEMU dies with the daemon only if the daemon wants it to: no
		// parent-death signal.
	}
	if err := group.Start(cmd); err != nil {
		return vmm.Handle{}, fmt.Errorf("run %s as uid %d: %w", bin, uid, err)
	}
	aerr := c.Cgroups.Attach(ctx, group, cmd.Process.Pid)
	exited := make(chan struct{})
	go func() {
		// Reap QEMU when it exits (bangerd is its parent until bangerd
		// exits).
		cmd.Wait()
		close(exited)
	}()
	steps.Push("kill qemu", func(context.Context) error {
		cmd.Process.Kill()
		<-exited
		return nil
	})
	pid := cmd.Process.Pid
	if aerr != nil {
		return vmm.Handle{}, aerr
	}
	if _, err := cf.pidFile.WriteString(strconv.Itoa(pid) + "\n"); err != nil {
		return vmm.Handle{}, fmt.Errorf("write pid file: %w", err)
	}
	st, err := readProcStat(d.procRoot, pid)
	if err != nil {
		return vmm.Handle{}, fmt.Errorf("qemu exited right after start-up: %w", err)
	}
	h := newHandle(pid, st.StartTime, paths, accel)
	h.Confinement = &vmm.Confinement{
		User: c.User, UID: uid, GID: gid, Sandbox: Sandbox,
		CgroupMode: string(group.Mode), Cgroups: group.Paths, Unit: group.Unit,
		MemoryLimitBytes: limits.MemoryBytes, PIDsLimit: limits.PIDs, CPUWeight: limits.CPUWeight,
	}

	// QEMU answers on QMP once it is set up; until then the connection
	// waits in the socket's backlog. If QEMU exits instead, its log says
	// why.
	qctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-exited:
			cancel()
		case <-qctx.Done():
		}
	}()
	q, err := DialQMP(qctx, paths.QMPSocket)
	if err == nil {
		defer q.Close()
		var status string
		status, err = q.QueryStatus(qctx)
		d.log.Debug("qemu status", "vm", spec.Name, "status", status)
	}
	if err != nil {
		select {
		case <-exited:
			return vmm.Handle{}, fmt.Errorf("qemu failed: %s: %s", cmd.ProcessState, tail(readFileString(filepath.Join(spec.Dir, LogFileName)), 2000))
		default:
		}
		if ctx.Err() != nil {
			return vmm.Handle{}, fmt.Errorf("qemu start-up: %w", ctx.Err())
		}
		return vmm.Handle{}, err
	}
	steps.Release()
	return h, nil
}

// cgroupName is the VM's cgroup name.
func cgroupName(id string) string {
	return "vm-" + strings.NewReplacer("/", "_", "\x00", "_").Replace(id)
}

func readFileString(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

// removeCgroups removes the cgroups of a confined VMM that exited.
func (d *Driver) removeCgroups(h vmm.Handle) error {
	if h.Confinement == nil || len(h.Confinement.Cgroups) == 0 {
		return nil
	}
	if c := d.cfg.Confine; c != nil && c.Cgroups != nil {
		return c.Cgroups.RemoveGroup(context.Background(), h.Confinement.Unit, h.Confinement.Cgroups)
	}
	return cgroup.Remove(h.Confinement.Cgroups)
}

// recoverConfinement rebuilds the confinement record of a running QEMU
// found without a handle, from /proc.
func (d *Driver) recoverConfinement(pid int) *vmm.Confinement {
	c := d.cfg.Confine
	if c == nil || c.Cgroups == nil {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(d.procRoot, strconv.Itoa(pid), "status"))
	if err != nil {
		return nil
	}
	var uid, gid int
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Uid:"); ok {
			uid, _ = strconv.Atoi(strings.Fields(v)[0])
		}
		if v, ok := strings.CutPrefix(line, "Gid:"); ok {
			gid, _ = strconv.Atoi(strings.Fields(v)[0])
		}
	}
	if uid == 0 {
		return nil
	}
	conf := &vmm.Confinement{User: c.User, UID: uid, GID: gid, Sandbox: Sandbox}
	if g, err := c.Cgroups.GroupOf(pid); err == nil {
		conf.CgroupMode, conf.Cgroups, conf.Unit = string(g.Mode), g.Paths, g.Unit
	}
	return conf
}

// freeUID returns the lowest uid in [first, last] that no live process
// has (real, effective, saved or filesystem uid).
func (d *Driver) freeUID(first, last int) (int, error) {
	used := map[int]bool{}
	ents, err := os.ReadDir(d.procRoot)
	if err != nil {
		return 0, fmt.Errorf("pick a vmm uid: %w", err)
	}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(d.procRoot, e.Name(), "status"))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "Uid:"); ok {
				for _, f := range strings.Fields(v) {
					if u, err := strconv.Atoi(f); err == nil && u >= first && u <= last {
						used[u] = true
					}
				}
				break
			}
		}
	}
	for u := first; u <= last; u++ {
		if !used[u] {
			return u, nil
		}
	}
	return 0, fmt.Errorf("pick a vmm uid: all %d uids of vmm_uid_range %d-%d are in use: widen the range", last-first+1, first, last)
}
