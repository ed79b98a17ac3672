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
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/cgroup"
	"github.com/bangerdev/banger/internal/kvmcheck"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/vmm/qemu"
)

var (
	hwKVM = kvmcheck.Result{DevicePresent: true, DeviceOpens: true, CreateVM: true, APIVersion: 12,
		Flavour: kvmcheck.FlavourIntel, CPUFlag: "vmx", Usable: true, Reason: "hardware KVM (kvm_intel)"}
	pvmKVM = kvmcheck.Result{DevicePresent: true, DeviceOpens: true, CreateVM: true, APIVersion: 12,
		Flavour: kvmcheck.FlavourPVM, Reason: "KVM is PVM-only here"}
	noKVM     = kvmcheck.Result{Reason: "KVM unavailable: /dev/kvm does not exist"}
	deniedKVM = kvmcheck.Result{DevicePresent: true, Flavour: kvmcheck.FlavourIntel,
		Reason: "KVM unavailable: open /dev/kvm: permission denied", Error: "open /dev/kvm: permission denied"}
)

// fakeEnv is a host where the listed binaries exist and the listed device
// nodes (relative to /dev) exist.
type fakeEnv struct {
	defaultImage func(context.Context) (DefaultImage, error)
	bins         map[string]string // name -> --version output
	devs         []string
	kvm          kvmcheck.Result
	ping         func(context.Context) (string, error)
	free         uint64 // bytes available in the state dir
	fsType       int64
	reflink      bool
	cgroups      cgroup.Info
	users        map[string]*user.User
	// Network.
	nftErr     error
	conflicts  []string
	neighbours []string
	overlaps   []netip.Prefix
	files      map[string]string // contents of some of devs
}

func (e fakeEnv) run(t *testing.T) map[string]Check {
	t.Helper()
	devRoot := t.TempDir()
	for _, d := range e.devs {
		p := filepath.Join(devRoot, d)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(e.files[d]), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	opts := Options{
		StateDir:     t.TempDir(),
		SocketPath:   "/run/banger/bangerd.sock",
		Ping:         e.ping,
		DefaultImage: e.defaultImage,
		LookPath: func(f string) (string, error) {
			if _, ok := e.bins[f]; ok {
				return "/usr/bin/" + f, nil
			}
			return "", exec.ErrNotFound
		},
		Probe: func() kvmcheck.Result { return e.kvm },
		Output: func(_ context.Context, name string, args ...string) ([]byte, error) {
			out, ok := e.bins[filepath.Base(name)]
			if !ok {
				return nil, errors.New("not found")
			}
			return []byte(out), nil
		},
		DevRoot: devRoot,
	}
	opts.defaults()
	r := runner{
		opts: opts,
		clone: func(dst, src int) error {
			if e.reflink {
				return nil
			}
			return unix.EOPNOTSUPP
		},
		cgroups: func(root string) (cgroup.Info, error) { return e.cgroups, nil },
		lookup: func(name string) (*user.User, error) {
			if u, ok := e.users[name]; ok {
				return u, nil
			}
			return nil, user.UnknownUserError(name)
		},
		statfs: func(path string, st *unix.Statfs_t) error {
			st.Bsize = 4096
			st.Bavail = e.free / 4096
			st.Type = e.fsType
			return nil
		},
		uname: func(u *unix.Utsname) error {
			copy(u.Release[:], "6.1.0-test")
			return nil
		},
		nftProbe:   func() error { return e.nftErr },
		conflicts:  func(string) []string { return e.conflicts },
		neighbours: func() []string { return e.neighbours },
		routeConflicts: func(subnet netip.Prefix, ownBridge string) ([]netip.Prefix, error) {
			if subnet != netip.MustParsePrefix("10.77.0.0/24") || ownBridge != "banger0" {
				return nil, fmt.Errorf("unexpected subnet %s or bridge %s", subnet, ownBridge)
			}
			return e.overlaps, nil
		},
	}
	checks := r.run(context.Background())
	m := map[string]Check{}
	for _, c := range checks {
		if c.Name == "" || c.Detail == "" {
			t.Errorf("check without name or detail: %+v", c)
		}
		if c.Status != OK && c.Fix == "" && c.Name != "QEMU" {
			t.Errorf("%s is %s without a fix", c.Name, c.Status)
		}
		m[c.Name] = c
	}
	return m
}

const qemuVersion = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n"

func allGood() fakeEnv {
	return fakeEnv{
		bins: map[string]string{
			"qemu-system-x86_64": qemuVersion,
			"qemu-img":           "qemu-img version 7.2.22",
			"firecracker":        "Firecracker v1.7.0\n\nSupported snapshot data format versions: v1.0.0",
			"useradd":            "",
			"mmdebstrap":         "",
			"mkfs.ext4":          "",
			"gpgv":               "",
			"chroot":             "",
		},
		cgroups: cgroup.Info{Mode: cgroup.ModeV2, Root: "/sys/fs/cgroup", Controllers: []string{"memory", "pids", "cpu"}},
		users:   map[string]*user.User{"banger-vmm": {Username: "banger-vmm", Uid: "999", Gid: "998"}},
		devs: []string{"dev/net/tun", "dev/loop-control", "dev/mapper/control",
			"sys/module/bridge/version", "proc/sys/net/ipv4/ip_forward", archiveKeyring},
		kvm:     hwKVM,
		ping:    func(context.Context) (string, error) { return "0.1.0", nil },
		free:    50 << 30,
		fsType:  unix.XFS_SUPER_MAGIC,
		reflink: true,
	}
}

func TestAllGood(t *testing.T) {
	checks := allGood().run(t)
	var list []Check
	for name, c := range checks {
		list = append(list, c)
		if c.Status != OK {
			t.Errorf("%s: %s %s", name, c.Status, c.Detail)
		}
	}
	if len(checks) != 19 {
		t.Errorf("got %d checks, want 19", len(checks))
	}
	if d := checks["cgroups"].Detail; !strings.Contains(d, "v2") {
		t.Errorf("cgroups detail %q lacks the mode", d)
	}
	if d := checks["VMM user"].Detail; !strings.Contains(d, "uid 999") {
		t.Errorf("VMM user detail %q lacks the uid", d)
	}
	if s := Summary(list); s != OK {
		t.Errorf("Summary = %s", s)
	}
	if d := checks["QEMU"].Detail; !strings.Contains(d, "QEMU 7.2.22") {
		t.Errorf("QEMU detail %q lacks version", d)
	}
	if d := checks["Firecracker"].Detail; !strings.Contains(d, "v1.7.0") {
		t.Errorf("Firecracker detail %q lacks version", d)
	}
	if d := checks["reflink"].Detail; !strings.Contains(d, "xfs") {
		t.Errorf("reflink detail %q lacks the filesystem", d)
	}
	if d := checks["daemon"].Detail; !strings.Contains(d, "0.1.0") {
		t.Errorf("daemon detail %q lacks the version", d)
	}
}

func TestPVMHost(t *testing.T) {
	e := allGood()
	e.kvm = pvmKVM
	e.fsType = unix.EXT4_SUPER_MAGIC
	e.reflink = false
	delete(e.bins, "firecracker")
	e.devs = []string{"dev/net/tun", "dev/loop-control"}
	checks := e.run(t)

	kvm := checks["KVM"]
	if kvm.Status != Warn || kvm.Detail != "KVM is PVM-only: QEMU will use TCG (slow); Firecracker cannot run here" {
		t.Errorf("KVM = %+v", kvm)
	}
	fc := checks["Firecracker"]
	if fc.Status != Warn || !strings.Contains(fc.Detail, "needed for the firecracker backend") {
		t.Errorf("Firecracker = %+v", fc)
	}
	dm := checks["device-mapper"]
	if dm.Status != Warn || !strings.Contains(dm.Detail, "dm-snapshot copy-on-write unavailable; banger uses qcow2 overlays/reflink instead") {
		t.Errorf("device-mapper = %+v", dm)
	}
	rl := checks["reflink"]
	if rl.Status != Warn || !strings.Contains(rl.Detail, "ext4") {
		t.Errorf("reflink = %+v", rl)
	}
	var list []Check
	for _, c := range checks {
		list = append(list, c)
	}
	if s := Summary(list); s != Warn {
		t.Errorf("Summary = %s, want WARN", s)
	}
}

func TestKVMVariants(t *testing.T) {
	for _, tc := range []struct {
		kvm  kvmcheck.Result
		want string
	}{
		{noKVM, "no /dev/kvm"},
		{deniedKVM, "permission denied"},
	} {
		e := allGood()
		e.kvm = tc.kvm
		checks := e.run(t)
		if c := checks["KVM"]; c.Status != Warn || !strings.Contains(c.Detail, tc.want) || !strings.Contains(c.Detail, "TCG") {
			t.Errorf("KVM = %+v, want WARN with %q", c, tc.want)
		}
		// Firecracker installed but useless without KVM.
		if c := checks["Firecracker"]; c.Status != Warn || !strings.Contains(c.Detail, "cannot boot") {
			t.Errorf("Firecracker = %+v", c)
		}
	}
}

func TestMissingTools(t *testing.T) {
	e := allGood()
	e.bins = map[string]string{}
	checks := e.run(t)
	for _, name := range []string{"QEMU", "qemu-img"} {
		if c := checks[name]; c.Status != Fail {
			t.Errorf("%s = %+v, want FAIL", name, c)
		}
	}
	if c := checks["Firecracker"]; c.Status != Warn {
		t.Errorf("Firecracker = %+v, want WARN", c)
	}
}

func TestOldQEMU(t *testing.T) {
	e := allGood()
	e.bins["qemu-system-x86_64"] = "QEMU emulator version 4.2.1 (Debian 1:4.2-3ubuntu6)"
	if c := e.run(t)["QEMU"]; c.Status != Warn || !strings.Contains(c.Detail, "4.2.1") {
		t.Errorf("QEMU = %+v", c)
	}
}

func TestFreeSpace(t *testing.T) {
	for _, tc := range []struct {
		free uint64
		want Status
	}{
		{100 << 30, OK},
		{5 << 30, OK},
		{5<<30 - 4096, Warn},
		{1 << 30, Warn},
		{1<<30 - 4096, Fail},
		{0, Fail},
	} {
		e := allGood()
		e.free = tc.free
		if c := e.run(t)["free disk"]; c.Status != tc.want {
			t.Errorf("free %d: %+v, want %s", tc.free, c, tc.want)
		}
	}
}

func TestDaemonDown(t *testing.T) {
	e := allGood()
	e.ping = func(context.Context) (string, error) {
		return "", errors.New("dial unix /run/banger/bangerd.sock: connect: no such file or directory")
	}
	c := e.run(t)["daemon"]
	if c.Status != Fail || c.Fix != "start it: sudo systemctl start bangerd, or sudo bangerd" {
		t.Errorf("daemon = %+v", c)
	}
	e.ping = nil
	if _, ok := e.run(t)["daemon"]; ok {
		t.Error("daemon checked without a Ping function")
	}
}

func TestStateDirNotCreated(t *testing.T) {
	base := t.TempDir()
	r := runner{opts: Options{StateDir: filepath.Join(base, "a", "b")}}
	dir, note, err := r.stateDir()
	if err != nil || dir != base || !strings.Contains(note, "does not exist yet") {
		t.Errorf("stateDir = %q, %q, %v", dir, note, err)
	}
}

func TestSummary(t *testing.T) {
	if Summary(nil) != OK {
		t.Error("empty summary not OK")
	}
	if Summary([]Check{{Status: OK}, {Status: Fail}, {Status: Warn}}) != Fail {
		t.Error("FAIL not worst")
	}
}

func TestParseQEMUVersion(t *testing.T) {
	for in, want := range map[string]string{
		qemuVersion:                                           "7.2.22",
		"QEMU emulator version 8.2.0 (v8.2.0)":                "8.2.0",
		"QEMU emulator version 9.1 (qemu-9.1.0-1.fc41)":       "9.1",
		"QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1)": "10.0.2",
	} {
		if _, _, v, ok := parseQEMUVersion(in); !ok || v != want {
			t.Errorf("parseQEMUVersion(%q) = %q, %v; want %q", in, v, ok, want)
		}
	}
	if _, _, _, ok := parseQEMUVersion("garbage"); ok {
		t.Error("garbage parsed")
	}
}

// TestThisHost runs the real checks. On a PVM-only host (these development
// machines) the KVM check must be a WARN.
func TestThisHost(t *testing.T) {
	checks := Run(context.Background(), Options{StateDir: t.TempDir()})
	for _, c := range checks {
		t.Logf("%-14s %-4s %s | %s", c.Name, c.Status, c.Detail, c.Fix)
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err != nil {
		t.Skip("no /sys/module/kvm_pvm: not a PVM host")
	}
	if _, err := os.Stat("/sys/module/kvm_intel"); err == nil {
		t.Skip("kvm_intel loaded next to kvm_pvm")
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("kvm_pvm without /dev/kvm (a container without the device)")
	}
	if _, err := os.Stat("/sys/module/kvm_amd"); err == nil {
		t.Skip("kvm_amd loaded next to kvm_pvm")
	}
	for _, c := range checks {
		if c.Name == "KVM" {
			if c.Status != Warn || !strings.Contains(c.Detail, "PVM-only") {
				t.Errorf("KVM check = %+v, want WARN about PVM", c)
			}
			return
		}
	}
	t.Error("no KVM check")
}

// Confinement the host can't provide fails, with a fix that also names
// the way out; a missing user is fine while bangerd can create it.
func TestConfinementChecks(t *testing.T) {
	e := allGood()
	e.cgroups = cgroup.Info{Mode: cgroup.ModeV1, Root: "/sys/fs/cgroup", Controllers: []string{"memory"}}
	e.users = nil
	checks := e.run(t)
	if c := checks["cgroups"]; c.Status != Fail || !strings.Contains(c.Detail, "pids, cpu missing") || !strings.Contains(c.Fix, "vmm_confine = false") {
		t.Errorf("cgroups without pids and cpu: %+v", c)
	}
	if c := checks["VMM user"]; c.Status != OK || !strings.Contains(c.Detail, "bangerd creates it") {
		t.Errorf("missing user with useradd: %+v", c)
	}
	delete(e.bins, "useradd")
	if c := e.run(t)["VMM user"]; c.Status != Fail || !strings.Contains(c.Fix, "useradd --system") {
		t.Errorf("missing user without useradd: %+v", c)
	}
	e.users = map[string]*user.User{"banger-vmm": {Username: "banger-vmm", Uid: "0", Gid: "0"}}
	if c := e.run(t)["VMM user"]; c.Status != Fail {
		t.Errorf("root as VMM user: %+v", c)
	}
	delete(e.bins, "qemu-system-x86_64")
	if c := e.run(t)["QEMU sandbox"]; c.Status != Fail {
		t.Errorf("no qemu: %+v", c)
	}
}

// The cgroups check says which backend the host gets.
func TestCgroupBackend(t *testing.T) {
	e := allGood()
	if c := e.run(t)["cgroups"]; c.Status != OK || !strings.Contains(c.Detail, "through cgroupfs") {
		t.Errorf("without systemd: %+v", c)
	}
	e.cgroups.Systemd = true
	if c := e.run(t)["cgroups"]; c.Status != Fail || !strings.Contains(c.Detail, "system bus") || !strings.Contains(c.Fix, "dbus") {
		t.Errorf("with systemd, without the system bus: %+v", c)
	}
	e.devs = append(e.devs, "run/dbus/system_bus_socket")
	if c := e.run(t)["cgroups"]; c.Status != OK || !strings.Contains(c.Detail, "through systemd transient scopes") {
		t.Errorf("with systemd: %+v", c)
	}
}

// doctor probes the policy the driver uses.
func TestSandboxPolicyMatchesDriver(t *testing.T) {
	if QEMUSandbox != qemu.Sandbox {
		t.Fatalf("doctor probes %q, the qemu driver uses %q", QEMUSandbox, qemu.Sandbox)
	}
}

// The probe on this host's real QEMU.
func TestSandboxProbeReal(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		testenv.Missing(t, "no qemu")
	}
	opts := Options{}
	opts.defaults()
	r := runner{opts: opts}
	if c := r.checkSandbox(context.Background()); c.Status != OK {
		t.Errorf("real QEMU: %+v", c)
	}
}

func TestNetworkChecks(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mod    func(*fakeEnv)
		check  string
		status Status
		detail string
	}{
		{"no tun", func(e *fakeEnv) {
			e.devs = slices.DeleteFunc(e.devs, func(d string) bool { return d == "dev/net/tun" })
		}, "TUN/TAP", Warn, "absent"},
		{"no bridge support", func(e *fakeEnv) { e.devs = []string{"dev/net/tun"} }, "bridge", Warn, "no bridge support"},
		{"bridge module installed", func(e *fakeEnv) {
			e.devs = []string{"dev/net/tun", "lib/modules/6.1.0-test/modules.dep"}
			e.files = map[string]string{"lib/modules/6.1.0-test/modules.dep": "kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko\n"}
		}, "bridge", OK, "installed"},
		{"bridge exists", func(e *fakeEnv) { e.devs = append(e.devs, "sys/class/net/banger0/bridge/hello_time") }, "bridge", OK, "banger0 exists"},
		{"bridge name taken", func(e *fakeEnv) { e.devs = append(e.devs, "sys/class/net/banger0/address") }, "bridge", Fail, "not a bridge"},
		{"nftables denied", func(e *fakeEnv) { e.nftErr = fmt.Errorf("list tables: %w", unix.EPERM) }, "nftables", Warn, "as this user"},
		{"nftables missing", func(e *fakeEnv) { e.nftErr = fmt.Errorf("list tables: %w", unix.EOPNOTSUPP) }, "nftables", Fail, "nf_tables unavailable"},
		{"firewall unchecked", func(e *fakeEnv) { e.nftErr = unix.EPERM }, "firewall", Warn, "not checked"},
		{"firewall conflicts", func(e *fakeEnv) { e.conflicts = []string{"ufw is active: allow it"} }, "firewall", Warn, "ufw is active"},
		{"firewall neighbours", func(e *fakeEnv) { e.neighbours = []string{"Docker's rules are present"} }, "firewall", OK, "Docker's rules"},
		{"forwarding on", func(e *fakeEnv) { e.files = map[string]string{"proc/sys/net/ipv4/ip_forward": "1\n"} }, "IPv4 forwarding", OK, "enabled"},
		{"subnet overlap", func(e *fakeEnv) { e.overlaps = []netip.Prefix{netip.MustParsePrefix("10.77.0.0/16")} }, "subnet", Fail, "overlaps the host's routes to 10.77.0.0/16"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := allGood()
			tc.mod(&e)
			c := e.run(t)[tc.check]
			if c.Status != tc.status || !strings.Contains(c.Detail, tc.detail) {
				t.Errorf("%s = %+v, want %s with %q", tc.check, c, tc.status, tc.detail)
			}
		})
	}
}

func TestFreeHint(t *testing.T) {
	p := netip.MustParsePrefix
	if got := freeHint(p("10.77.0.0/24"), []netip.Prefix{p("10.78.0.0/16")}); got != `subnet = "10.79.0.0/24"` {
		t.Errorf("freeHint = %s", got)
	}
}

func TestLocalBuildTools(t *testing.T) {
	e := allGood()
	delete(e.bins, "mmdebstrap")
	e.devs = e.devs[:len(e.devs)-1] // no archive keyring
	c := e.run(t)["local image builds"]
	if c.Status != Warn || !strings.Contains(c.Detail, "mmdebstrap") || !strings.Contains(c.Detail, archiveKeyring) ||
		c.Fix != "sudo apt-get install mmdebstrap debian-archive-keyring" {
		t.Errorf("local image builds: %+v", c)
	}
}

func TestDefaultImage(t *testing.T) {
	e := allGood()
	run := func(im DefaultImage, err error) Check {
		e.defaultImage = func(context.Context) (DefaultImage, error) { return im, err }
		c, ok := e.run(t)["default image"]
		if !ok {
			t.Fatal("no default image check")
		}
		return c
	}
	if c := run(DefaultImage{Name: "debian-bookworm", Local: true}, nil); c.Status != OK {
		t.Errorf("local: %+v", c)
	}
	c := run(DefaultImage{Name: "debian-bookworm", Entry: "debian-bookworm@2026.12.06", Build: "golden"}, nil)
	if c.Status != OK || !strings.Contains(c.Detail, "local build (golden)") {
		t.Errorf("in a catalog: %+v", c)
	}
	c = run(DefaultImage{Name: "mine", Searched: []string{"embedded", "https://x/c.json"}}, nil)
	if c.Status != Fail || !strings.Contains(c.Detail, "https://x/c.json") || c.Fix == "" {
		t.Errorf("neither: %+v", c)
	}
	if c := run(DefaultImage{Name: "x"}, errors.New("catalog https://x/c.json: 404")); c.Status != Warn {
		t.Errorf("catalogs unreadable: %+v", c)
	}
}
