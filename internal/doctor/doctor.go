// Package doctor checks whether a host is ready to run banger, and says how
// to fix what is not.
package doctor

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/bridgenet"
	"github.com/bangerdev/banger/internal/cgroup"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/firewall"
	"github.com/bangerdev/banger/internal/kvmcheck"
)

// Status is the outcome of one check. FAIL means banger cannot work as
// configured; WARN means it works with a limitation.
type Status string

const (
	OK   Status = "OK"
	Warn Status = "WARN"
	Fail Status = "FAIL"
)

func (s Status) rank() int {
	switch s {
	case Fail:
		return 2
	case Warn:
		return 1
	default:
		return 0
	}
}

// Check is the result of one readiness check.
type Check struct {
	Name   string `json:"name"`
	Status Status `json:"status"`
	Detail string `json:"detail"`
	// Fix says what to do about a WARN or FAIL; empty for OK.
	Fix string `json:"fix,omitempty"`
}

// Summary returns the worst status of checks (OK for none).
func Summary(checks []Check) Status {
	worst := OK
	for _, c := range checks {
		if c.Status.rank() > worst.rank() {
			worst = c.Status
		}
	}
	return worst
}

// Free space thresholds of the state directory.
const (
	warnFreeBytes = 5 << 30
	failFreeBytes = 1 << 30
)

// minQEMU is the oldest QEMU whose microvm machine has ACPI, which stock
// kernels (without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) need to find the
// virtio-mmio devices.
var minQEMU = [2]int{5, 2}

// Options configure Run. StateDir should be set; the rest defaults.
type Options struct {
	// StateDir is bangerd's state directory (images, VM disks). The
	// reflink and free space checks run there, or in its nearest existing
	// parent if it does not exist yet.
	StateDir string
	// SocketPath is the daemon socket, shown in the daemon check.
	SocketPath string
	// Ping asks the daemon for its version. Nil skips the daemon check.
	Ping func(ctx context.Context) (string, error)
	// LookPath finds executables. Default exec.LookPath.
	LookPath func(file string) (string, error)
	// Probe inspects KVM. Default kvmcheck.Probe.
	Probe func() kvmcheck.Result
	// Output runs a command and returns its combined output. Default runs
	// it with exec.CommandContext.
	Output func(ctx context.Context, name string, args ...string) ([]byte, error)
	// DevRoot is where /dev, the system bus socket in /run, /sys,
	// /proc/sys and /lib/modules are looked up. Default "/".
	DevRoot string
	// CommandTimeout bounds each command and the daemon ping. Default 5s.
	CommandTimeout time.Duration
	// VMMUser is the user confined QEMU runs as. Default banger-vmm.
	VMMUser string
	// CgroupRoot is where cgroupfs is mounted. Default /sys/fs/cgroup.
	CgroupRoot string
	// Bridge and Subnet are bangerd's network (bridge_name, subnet).
	// Default banger0 and 10.77.0.0/24.
	Bridge string
	Subnet netip.Prefix
	// DefaultImage looks up the default image (vm create/run's when none
	// is named): whether it is local, else which catalog entry vm run
	// would pull. Nil skips the check.
	DefaultImage func(ctx context.Context) (DefaultImage, error)
}

// DefaultImage is where the default image would come from.
type DefaultImage struct {
	Name  string
	Local bool // an image of that name is registered
	// Entry is the catalog entry that has it (NAME@VERSION; "" when no
	// catalog has it), Build its local build recipe, URL its bundle.
	Entry, Build, URL string
	// Searched are the catalogs searched.
	Searched []string
}

func (o *Options) defaults() {
	if o.LookPath == nil {
		o.LookPath = exec.LookPath
	}
	if o.Probe == nil {
		o.Probe = kvmcheck.Probe
	}
	if o.Output == nil {
		o.Output = func(ctx context.Context, name string, args ...string) ([]byte, error) {
			return exec.CommandContext(ctx, name, args...).CombinedOutput()
		}
	}
	if o.DevRoot == "" {
		o.DevRoot = "/"
	}
	if o.CommandTimeout <= 0 {
		o.CommandTimeout = 5 * time.Second
	}
	if o.VMMUser == "" {
		o.VMMUser = "banger-vmm"
	}
	if o.CgroupRoot == "" {
		o.CgroupRoot = cgroup.DefaultRoot
	}
	if o.Bridge == "" {
		o.Bridge = config.DefaultBridgeName
	}
	if !o.Subnet.IsValid() {
		o.Subnet = netip.MustParsePrefix(config.DefaultSubnet)
	}
}

// runner holds the options and the system calls the checks use (replaced
// in tests).
type runner struct {
	opts    Options
	clone   func(dst, src int) error
	statfs  func(path string, st *unix.Statfs_t) error
	cgroups func(root string) (cgroup.Info, error)
	lookup  func(name string) (*user.User, error)
	uname   func(*unix.Utsname) error
	// Network: firewall.Probe, firewall.Conflicts, firewall.Neighbours,
	// bridgenet.RouteConflicts.
	nftProbe       func() error
	conflicts      func(bridge string) []string
	neighbours     func() []string
	routeConflicts func(subnet netip.Prefix, ownBridge string) ([]netip.Prefix, error)
}

// Run runs every check, in a fixed order.
func Run(ctx context.Context, opts Options) []Check {
	opts.defaults()
	r := runner{opts: opts, clone: unix.IoctlFileClone, statfs: unix.Statfs, cgroups: cgroup.Detect, lookup: user.Lookup,
		uname: unix.Uname, nftProbe: firewall.Probe, conflicts: firewall.Conflicts, neighbours: firewall.Neighbours,
		routeConflicts: bridgenet.RouteConflicts}
	return r.run(ctx)
}

func (r runner) run(ctx context.Context) []Check {
	kvm := r.opts.Probe()
	checks := []Check{
		r.checkKVM(kvm),
		r.checkQEMU(ctx),
		r.checkTool("qemu-img", Fail, "needed for qcow2 disk overlays", "install it: sudo apt-get install qemu-utils"),
		r.checkFirecracker(ctx, kvm),
		r.checkTUN(),
		r.checkDevice("/dev/loop-control", "loop devices", Warn, "loop devices unavailable: images cannot be mounted to be edited", "load the loop module: sudo modprobe loop"),
		r.checkDevice("/dev/mapper/control", "device-mapper", Warn, "dm-snapshot copy-on-write unavailable; banger uses qcow2 overlays/reflink instead", "optional: sudo modprobe dm_snapshot"),
	}
	checks = append(checks, r.checkSandbox(ctx), r.checkCgroups(), r.checkVMMUser())
	probe := r.nftProbe()
	checks = append(checks, r.checkBridge(), r.checkNftables(probe), r.checkFirewall(probe), r.checkForwarding(), r.checkSubnet())
	checks = append(checks, r.checkReflink(), r.checkFreeSpace(), r.checkLocalBuild())
	if r.opts.Ping != nil {
		checks = append(checks, r.checkDaemon(ctx))
	}
	if r.opts.DefaultImage != nil {
		checks = append(checks, r.checkDefaultImage(ctx))
	}
	return checks
}

// checkDefaultImage passes when the default image is local, or in a
// catalog (vm run pulls it); it fails only when it is neither.
func (r runner) checkDefaultImage(ctx context.Context) Check {
	c := Check{Name: "default image"}
	im, err := r.opts.DefaultImage(ctx)
	switch {
	case err != nil:
		c.Status = Warn
		c.Detail = fmt.Sprintf("default image %q: %v", im.Name, err)
		c.Fix = "check catalog_urls in bangerd's config, and that bangerd runs"
	case im.Local:
		c.Status, c.Detail = OK, fmt.Sprintf("%s is local", im.Name)
	case im.Entry != "":
		from := "its bundle " + im.URL
		if im.URL == "" {
			from = "a local build (" + im.Build + ")"
		} else if im.Build != "" {
			from += ", or a local build (" + im.Build + ") if it can't be fetched"
		}
		c.Status = OK
		c.Detail = fmt.Sprintf("%s is not local: vm run pulls %s from the catalog (%s)", im.Name, im.Entry, from)
	default:
		c.Status = Fail
		c.Detail = fmt.Sprintf("%s is neither local nor in the catalogs searched (%s): vm create and vm run without --image fail", im.Name, strings.Join(im.Searched, ", "))
		c.Fix = "pull or register an image (banger image pull, banger image register) and name it in default_image_name (bangerd's config) or the CLI's config"
	}
	return c
}

func (r runner) checkKVM(p kvmcheck.Result) Check {
	c := Check{Name: "KVM"}
	const consequence = ": QEMU will use TCG (slow); Firecracker cannot run here"
	switch {
	case p.Usable:
		c.Status, c.Detail = OK, p.Reason
	case p.PVMOnly():
		c.Status = Warn
		c.Detail = "KVM is PVM-only" + consequence
		c.Fix = "for fast VMs and the firecracker backend, run banger on a host with hardware virtualisation (Intel VT-x or AMD-V, with kvm_intel or kvm_amd loaded)"
	case !p.DevicePresent:
		c.Status = Warn
		c.Detail = "no /dev/kvm" + consequence
		c.Fix = "enable virtualisation (VT-x/AMD-V) in the firmware and load KVM: sudo modprobe kvm_intel (or kvm_amd)"
	case !p.DeviceOpens:
		c.Status = Warn
		c.Detail = p.Reason + consequence
		c.Fix = "run bangerd as root, or give its user access to /dev/kvm (the kvm group)"
	default:
		c.Status = Warn
		c.Detail = p.Reason + consequence
		c.Fix = "use a host with hardware virtualisation (Intel VT-x or AMD-V, with kvm_intel or kvm_amd loaded)"
	}
	return c
}

var qemuVersionRE = regexp.MustCompile(`version (\d+)\.(\d+)(?:\.(\d+))?`)

// parseQEMUVersion extracts major, minor and the version string from
// `qemu-system-x86_64 --version` output.
func parseQEMUVersion(out string) (major, minor int, version string, ok bool) {
	m := qemuVersionRE.FindStringSubmatch(out)
	if m == nil {
		return 0, 0, "", false
	}
	major, _ = strconv.Atoi(m[1])
	minor, _ = strconv.Atoi(m[2])
	version = m[1] + "." + m[2]
	if m[3] != "" {
		version += "." + m[3]
	}
	return major, minor, version, true
}

func (r runner) checkQEMU(ctx context.Context) Check {
	const bin = "qemu-system-x86_64"
	c := Check{Name: "QEMU"}
	path, err := r.opts.LookPath(bin)
	if err != nil {
		c.Status = Fail
		c.Detail = bin + " not found on PATH: the qemu backend cannot run"
		c.Fix = "install it: sudo apt-get install qemu-system-x86"
		return c
	}
	out, err := r.output(ctx, path, "--version")
	major, minor, version, ok := parseQEMUVersion(string(out))
	switch {
	case err != nil:
		c.Status = Fail
		c.Detail = fmt.Sprintf("%s --version failed: %v", path, err)
		c.Fix = "check the QEMU installation: sudo apt-get install --reinstall qemu-system-x86"
	case !ok:
		c.Status = Warn
		c.Detail = fmt.Sprintf("%s: cannot parse version from %q", path, firstLine(string(out)))
	case major < minQEMU[0] || (major == minQEMU[0] && minor < minQEMU[1]):
		c.Status = Warn
		c.Detail = fmt.Sprintf("%s is QEMU %s; banger needs %d.%d or later (microvm with ACPI)", path, version, minQEMU[0], minQEMU[1])
		c.Fix = "upgrade QEMU"
	default:
		c.Status = OK
		c.Detail = fmt.Sprintf("%s (QEMU %s)", path, version)
	}
	return c
}

// checkTool checks that an executable is on PATH.
func (r runner) checkTool(bin string, missing Status, why, fix string) Check {
	c := Check{Name: bin}
	path, err := r.opts.LookPath(bin)
	if err != nil {
		c.Status, c.Detail, c.Fix = missing, bin+" not found on PATH: "+why, fix
		return c
	}
	c.Status, c.Detail = OK, path
	return c
}

var firecrackerVersionRE = regexp.MustCompile(`v?(\d+\.\d+\.\d+)`)

func (r runner) checkFirecracker(ctx context.Context, kvm kvmcheck.Result) Check {
	c := Check{Name: "Firecracker"}
	path, err := r.opts.LookPath("firecracker")
	if err != nil {
		c.Status = Warn
		c.Detail = "firecracker not found on PATH: needed for the firecracker backend"
		c.Fix = "install firecracker (https://github.com/firecracker-microvm/firecracker/releases) into /usr/local/bin, or use the qemu backend"
		return c
	}
	version := "unknown version"
	if out, err := r.output(ctx, path, "--version"); err == nil {
		if m := firecrackerVersionRE.FindStringSubmatch(string(out)); m != nil {
			version = "v" + m[1]
		}
	}
	if !kvm.Usable {
		c.Status = Warn
		c.Detail = fmt.Sprintf("%s (%s) is installed, but KVM is not usable here, so it cannot boot VMs", path, version)
		c.Fix = "use the qemu backend on this host"
		return c
	}
	c.Status, c.Detail = OK, fmt.Sprintf("%s (%s)", path, version)
	return c
}

// checkDevice checks that a device node exists.
func (r runner) checkDevice(dev, name string, missing Status, why, fix string) Check {
	c := Check{Name: name}
	p := filepath.Join(r.opts.DevRoot, dev)
	if _, err := os.Stat(p); err != nil {
		c.Status, c.Fix = missing, fix
		if errors.Is(err, os.ErrNotExist) {
			c.Detail = dev + " absent: " + why
		} else {
			c.Detail = fmt.Sprintf("%s: %v: %s", dev, err, why)
		}
		return c
	}
	c.Status, c.Detail = OK, dev+" present"
	return c
}

// stateDir returns the directory the filesystem checks run in: StateDir or
// its nearest existing parent, and a note when they differ.
func (r runner) stateDir() (dir, note string, err error) {
	if r.opts.StateDir == "" {
		return "", "", errors.New("no state directory configured")
	}
	dir = filepath.Clean(r.opts.StateDir)
	for {
		fi, err := os.Stat(dir)
		if err == nil {
			if !fi.IsDir() {
				return "", "", fmt.Errorf("%s is not a directory", dir)
			}
			break
		}
		if !errors.Is(err, os.ErrNotExist) {
			return "", "", err
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", "", err
		}
		dir = parent
	}
	if dir != filepath.Clean(r.opts.StateDir) {
		note = fmt.Sprintf(" (%s does not exist yet; checked %s)", r.opts.StateDir, dir)
	}
	return dir, note, nil
}

func (r runner) checkReflink() Check {
	c := Check{Name: "reflink"}
	dir, note, err := r.stateDir()
	if err != nil {
		c.Status, c.Detail = Warn, "state directory: "+err.Error()
		c.Fix = "set state_dir in the bangerd configuration"
		return c
	}
	fsName := r.fsName(dir)
	if err := r.tryClone(dir); err != nil {
		c.Status = Warn
		c.Detail = fmt.Sprintf("no reflink copies in %s (%s): %v; image copies are full copies, qcow2 overlays still work%s", dir, fsName, err, note)
		c.Fix = "optional: put the state directory on XFS (mkfs.xfs -m reflink=1) or btrfs for instant raw disk copies"
		return c
	}
	c.Status = OK
	c.Detail = fmt.Sprintf("%s (%s) supports reflink copies%s", dir, fsName, note)
	return c
}

// tryClone clones a small temporary file into another with FICLONE.
func (r runner) tryClone(dir string) error {
	src, err := os.CreateTemp(dir, ".banger-doctor-*")
	if err != nil {
		return fmt.Errorf("create test file: %w", err)
	}
	defer os.Remove(src.Name())
	defer src.Close()
	if _, err := src.Write(make([]byte, 64<<10)); err != nil {
		return fmt.Errorf("write test file: %w", err)
	}
	if err := src.Sync(); err != nil {
		return fmt.Errorf("sync test file: %w", err)
	}
	dst, err := os.CreateTemp(dir, ".banger-doctor-*")
	if err != nil {
		return fmt.Errorf("create test file: %w", err)
	}
	defer os.Remove(dst.Name())
	defer dst.Close()
	if err := r.clone(int(dst.Fd()), int(src.Fd())); err != nil {
		return fmt.Errorf("FICLONE: %w", err)
	}
	return nil
}

func (r runner) fsName(dir string) string {
	var st unix.Statfs_t
	if err := r.statfs(dir, &st); err != nil {
		return "unknown filesystem"
	}
	switch int64(st.Type) {
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlayfs"
	case unix.NFS_SUPER_MAGIC:
		return "nfs"
	case unix.F2FS_SUPER_MAGIC:
		return "f2fs"
	case 0x2fc12fc1:
		return "zfs"
	case 0xca451a4e:
		return "bcachefs"
	}
	return fmt.Sprintf("filesystem 0x%x", st.Type)
}

func (r runner) checkFreeSpace() Check {
	c := Check{Name: "free disk"}
	dir, note, err := r.stateDir()
	if err != nil {
		c.Status, c.Detail = Warn, "state directory: "+err.Error()
		c.Fix = "set state_dir in the bangerd configuration"
		return c
	}
	var st unix.Statfs_t
	if err := r.statfs(dir, &st); err != nil {
		c.Status, c.Detail = Warn, fmt.Sprintf("statfs %s: %v", dir, err)
		return c
	}
	free := st.Bavail * uint64(st.Bsize)
	c.Detail = fmt.Sprintf("%s free in %s%s", humanBytes(free), dir, note)
	switch {
	case free < failFreeBytes:
		c.Status = Fail
		c.Fix = "free space on that filesystem (delete unused images and VMs) or move state_dir; banger needs at least 1 GiB"
	case free < warnFreeBytes:
		c.Status = Warn
		c.Fix = "free space on that filesystem or move state_dir: images and VM disks need several GiB"
	default:
		c.Status = OK
	}
	return c
}

func (r runner) checkDaemon(ctx context.Context) Check {
	c := Check{Name: "daemon"}
	ctx, cancel := context.WithTimeout(ctx, r.opts.CommandTimeout)
	defer cancel()
	sock := r.opts.SocketPath
	if sock == "" {
		sock = "the daemon socket"
	}
	version, err := r.opts.Ping(ctx)
	if err != nil {
		c.Status = Fail
		c.Detail = fmt.Sprintf("bangerd not reachable on %s: %v", sock, err)
		c.Fix = "start it: sudo systemctl start bangerd, or sudo bangerd"
		return c
	}
	if !strings.HasPrefix(version, "bangerd") {
		version = "bangerd " + version
	}
	c.Status = OK
	c.Detail = fmt.Sprintf("%s on %s", version, sock)
	return c
}

func (r runner) output(ctx context.Context, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, r.opts.CommandTimeout)
	defer cancel()
	return r.opts.Output(ctx, name, args...)
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}

// humanBytes formats n in binary units with one decimal.
func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// QEMUSandbox is the seccomp policy of a confined QEMU (the qemu driver's
// Sandbox; doctor must not link VMM code, a test keeps them equal).
const QEMUSandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

const confineOff = "or set vmm_confine = false in bangerd.toml to run QEMU unconfined (debugging only)"

// checkSandbox checks that QEMU accepts the seccomp policy of a confined
// VM (QEMU validates -sandbox when it parses it; -version then exits).
func (r runner) checkSandbox(ctx context.Context) Check {
	c := Check{Name: "QEMU sandbox"}
	path, err := r.opts.LookPath("qemu-system-x86_64")
	if err != nil {
		c.Status, c.Detail = Fail, "qemu-system-x86_64 not found"
		c.Fix = "install QEMU (see the QEMU check)"
		return c
	}
	if _, err := os.Stat("/proc/self/status"); err == nil {
		if b, _ := os.ReadFile("/proc/self/status"); !strings.Contains(string(b), "\nSeccomp:") {
			c.Status, c.Detail = Fail, "the kernel has no seccomp support"
			c.Fix = "use a kernel built with CONFIG_SECCOMP_FILTER, " + confineOff
			return c
		}
	}
	out, err := r.output(ctx, path, "-sandbox", QEMUSandbox, "-version")
	if err != nil {
		c.Status = Fail
		c.Detail = fmt.Sprintf("QEMU refuses -sandbox %s: %s", QEMUSandbox, strings.TrimSpace(string(out)))
		c.Fix = "install a QEMU built with seccomp (Debian's qemu-system-x86 is), " + confineOff
		return c
	}
	c.Status, c.Detail = OK, "seccomp: QEMU accepts -sandbox "+QEMUSandbox
	return c
}

// checkCgroups reports the cgroup layout and whether the controllers a
// VM's cgroup needs are there.
func (r runner) checkCgroups() Check {
	c := Check{Name: "cgroups"}
	info, err := r.cgroups(r.opts.CgroupRoot)
	if err != nil {
		c.Status, c.Detail = Fail, err.Error()
		c.Fix = "mount cgroupfs at " + r.opts.CgroupRoot + ", " + confineOff
		return c
	}
	how := "cgroupfs (no systemd as init)"
	if info.Systemd {
		how = "systemd transient scopes (banger-vm-<id>.scope, Delegate=yes) asked for on the system bus"
	}
	if info.Mode == cgroup.ModeNone || len(info.Missing()) > 0 {
		c.Status = Fail
		c.Detail = fmt.Sprintf("%s at %s: controllers %s missing (have %s)", info.Mode, info.Root,
			strings.Join(info.Missing(), ", "), strings.Join(info.Controllers, ", "))
		c.Fix = "enable the memory, pids and cpu controllers, " + confineOff
		return c
	}
	if info.Systemd {
		// cgroup.SystemBusAddress
		sock := filepath.Join(r.opts.DevRoot, "run/dbus/system_bus_socket")
		if _, err := os.Stat(sock); err != nil {
			c.Status = Fail
			c.Detail = "systemd is init, so each VM's cgroup is a transient scope asked for on the system bus, but its socket is missing: " + err.Error()
			c.Fix = "start D-Bus (sudo apt-get install dbus; sudo systemctl start dbus), " + confineOff
			return c
		}
	}
	c.Status = OK
	c.Detail = fmt.Sprintf("%s at %s, controllers %s; per-VM limits through %s", info.Mode, info.Root, strings.Join(info.Controllers, ", "), how)
	return c
}

// checkVMMUser reports the user confined QEMU runs as.
func (r runner) checkVMMUser() Check {
	c := Check{Name: "VMM user"}
	u, err := r.lookup(r.opts.VMMUser)
	var unknown user.UnknownUserError
	switch {
	case errors.As(err, &unknown):
		if _, err := r.opts.LookPath("useradd"); err != nil {
			c.Status, c.Detail = Fail, r.opts.VMMUser+" does not exist and useradd is missing, so bangerd can't create it"
			c.Fix = "create it: sudo useradd --system --user-group --no-create-home --shell /usr/sbin/nologin " + r.opts.VMMUser
			return c
		}
		c.Status, c.Detail = OK, r.opts.VMMUser+" does not exist yet: bangerd creates it (system user, no login) when it starts"
		return c
	case err != nil:
		c.Status, c.Detail, c.Fix = Fail, fmt.Sprintf("look up %s: %v", r.opts.VMMUser, err), "check /etc/passwd and NSS"
		return c
	case u.Uid == "0" || u.Gid == "0":
		c.Status, c.Detail = Fail, fmt.Sprintf("%s has uid %s gid %s: QEMU would run as root", u.Username, u.Uid, u.Gid)
		c.Fix = "set vmm_user to an unprivileged user"
		return c
	}
	c.Status, c.Detail = OK, fmt.Sprintf("QEMU runs as %s (uid %s, gid %s)", u.Username, u.Uid, u.Gid)
	return c
}
