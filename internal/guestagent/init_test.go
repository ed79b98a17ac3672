package guestagent

import (
	"encoding/binary"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
)

// Module resolution itself is tested in package kmod.
func TestModulePath(t *testing.T) {
	if got := modulePath("/lib/modules/6.1", "kernel/drivers/virtio/virtio_ring.ko"); got != "/lib/modules/6.1/kernel/drivers/virtio/virtio_ring.ko" {
		t.Errorf("modulePath relative: %s", got)
	}
	if got := modulePath("/lib/modules/6.1", "/abs/kernel/fs/fuse/virtio-fs.ko.zst"); got != "/abs/kernel/fs/fuse/virtio-fs.ko.zst" {
		t.Errorf("modulePath absolute: %s", got)
	}
}

func TestDecideInit(t *testing.T) {
	fsys := map[string]string{ // path -> resolved
		"/sbin/init":    "/usr/lib/systemd/systemd",
		"/bin/busybox":  "/bin/busybox",
		"/usr/bin/tini": "/usr/bin/tini",
	}
	lookup := func(p string) (string, error) {
		if r, ok := fsys[p]; ok {
			return r, nil
		}
		return "", errNoInit
	}
	none := func(string) (string, error) { return "", errNoInit }
	for _, tc := range []struct {
		name, cfg            string
		lookup               initLookup
		path, resolved, mode string
		wantErr              bool
	}{
		{"auto systemd", "", lookup, "/sbin/init", "/usr/lib/systemd/systemd", InitModeSystemd, false},
		{"auto word", "auto", lookup, "/sbin/init", "/usr/lib/systemd/systemd", InitModeSystemd, false},
		{"auto no init", "", none, "", "", InitModeAgent, false},
		{"none", "none", lookup, "", "", InitModeAgent, false},
		{"explicit other", "/usr/bin/tini", lookup, "/usr/bin/tini", "/usr/bin/tini", InitModeOther, false},
		{"explicit missing", "/nope", lookup, "", "", InitModeAgent, true},
		{"relative", "sbin/init", lookup, "", "", InitModeAgent, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, r, m, err := decideInit(tc.cfg, tc.lookup)
			if p != tc.path || r != tc.resolved || m != tc.mode || (err != nil) != tc.wantErr {
				t.Errorf("decideInit(%q) = %q, %q, %q, %v", tc.cfg, p, r, m, err)
			}
		})
	}
	if _, _, _, err := decideInit("/nope", lookup); !errors.Is(err, errNoInit) {
		t.Errorf("error %v does not wrap errNoInit", err)
	}
}

func TestParseCmdline(t *testing.T) {
	got := parseCmdline(`console=ttyS0 rdinit=/banger/init quiet banger.init=none foo="a b c" x=`)
	want := map[string]string{"console": "ttyS0", "rdinit": "/banger/init", "quiet": "", "banger.init": "none", "foo": "a b c", "x": ""}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v", got)
	}
	cfg := applyCmdline(agentproto.Config{Init: "auto"}, got)
	if cfg.Init != "none" {
		t.Errorf("banger.init override: %q", cfg.Init)
	}
	if cfg := applyCmdline(agentproto.Config{Init: "/x"}, parseCmdline("console=ttyS0")); cfg.Init != "/x" {
		t.Errorf("no override: %q", cfg.Init)
	}
	d := withDefaults(agentproto.Config{})
	if d.RootDevice != "/dev/vda" || d.RootFSType != "ext4" {
		t.Errorf("defaults %+v", d)
	}
}

func makeSuperblock(blocks uint64, logBS uint32, is64 bool) []byte {
	sb := make([]byte, 1024)
	le := binary.LittleEndian
	le.PutUint32(sb[0x4:], uint32(blocks))
	le.PutUint32(sb[0x18:], logBS)
	le.PutUint16(sb[0x38:], 0xEF53)
	if is64 {
		le.PutUint32(sb[0x60:], 0x80|0x2|0x40)
		le.PutUint32(sb[0x150:], uint32(blocks>>32))
	}
	return sb
}

func TestExt4Superblock(t *testing.T) {
	blocks, bs, err := parseExt4Superblock(makeSuperblock(262144, 2, true))
	if err != nil || blocks != 262144 || bs != 4096 {
		t.Errorf("got %d %d %v", blocks, bs, err)
	}
	blocks, _, err = parseExt4Superblock(makeSuperblock(5<<32|7, 2, true))
	if err != nil || blocks != 5<<32|7 {
		t.Errorf("64-bit count: %d %v", blocks, err)
	}
	// Without the 64bit feature the high word is ignored.
	sb := makeSuperblock(100, 0, false)
	binary.LittleEndian.PutUint32(sb[0x150:], 9)
	blocks, bs, err = parseExt4Superblock(sb)
	if err != nil || blocks != 100 || bs != 1024 {
		t.Errorf("32-bit: %d %d %v", blocks, bs, err)
	}
	bad := makeSuperblock(1, 2, false)
	bad[0x38] = 0
	if _, _, err := parseExt4Superblock(bad); err == nil {
		t.Error("bad magic accepted")
	}
	if _, _, err := parseExt4Superblock(make([]byte, 10)); err == nil {
		t.Error("short superblock accepted")
	}
}

func TestGrowTarget(t *testing.T) {
	const GiB = 1 << 30
	for _, tc := range []struct {
		dev, bs, cur, want uint64
		grow               bool
	}{
		{GiB + 512<<20, 4096, GiB / 4096, (GiB + 512<<20) / 4096, true}, // +512 MiB
		{GiB, 4096, GiB / 4096, GiB / 4096, false},                      // same size
		{GiB + 4096*10, 4096, GiB / 4096, GiB / 4096, false},            // < 1 MiB more
		{GiB + 4095, 4096, GiB / 4096, GiB / 4096, false},               // partial block
		{GiB / 2, 4096, GiB / 4096, GiB / 4096, false},                  // device smaller: never shrink
		{3*GiB + 1000, 1024, GiB / 1024, (3*GiB + 1000) / 1024, true},   // 1 KiB blocks
		{GiB, 0, 5, 5, false},
	} {
		got, grow := growTarget(tc.dev, tc.bs, tc.cur)
		if got != tc.want || grow != tc.grow {
			t.Errorf("growTarget(%d, %d, %d) = %d, %v; want %d, %v", tc.dev, tc.bs, tc.cur, got, grow, tc.want, tc.grow)
		}
	}
	if s := humanBytes(1536 << 20); s != "1.5GiB" {
		t.Errorf("humanBytes = %s", s)
	}
	if s := humanBytes(512); s != "512B" {
		t.Errorf("humanBytes = %s", s)
	}
}

func TestRestartDelay(t *testing.T) {
	want := []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 10 * time.Second, 10 * time.Second}
	for i, w := range want {
		if got := restartDelay(i + 1); got != w {
			t.Errorf("restartDelay(%d) = %v, want %v", i+1, got, w)
		}
	}
}

func TestIsInitInvocation(t *testing.T) {
	for _, tc := range []struct {
		args []string
		pid  int
		want bool
	}{
		{[]string{"/banger/init"}, 1, true},
		{[]string{"/banger/init", "single"}, 1, true},
		{[]string{"/banger/init"}, 42, true},
		{[]string{"/init"}, 1, true},
		{[]string{"banger-agent", "serve-fd", "3"}, 57, false},
		{[]string{"agent", "serve", "--config", "x"}, 1, false}, // e.g. in a container
		{[]string{"agent", "version"}, 7, false},
	} {
		if got := isInitInvocation(tc.args, tc.pid); got != tc.want {
			t.Errorf("isInitInvocation(%v, %d) = %v", tc.args, tc.pid, got)
		}
	}
	env := agentEnv(InitModeSystemd, "/lib/systemd/systemd", "eth0: no carrier")
	if !contains(env, "BANGER_INIT_MODE=systemd") || !contains(env, "BANGER_INIT=/lib/systemd/systemd") || !contains(env, "BANGER_NETWORK_ERROR=eth0: no carrier") {
		t.Errorf("env %v", env)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestModulesProblem(t *testing.T) {
	const rel = "6.1.0-57-cloud-amd64"
	for _, tc := range []struct {
		name        string
		want        string
		haveDep     bool
		failed      []string
		wantProblem string // substring; "" = no problem
	}{
		{"all loaded", rel, true, nil, ""},
		{"no modules packed, none found", "", false, nil, ""},
		{"base initrd modules loaded", "", true, nil, ""},
		{"packed for another kernel", "6.1.0-27-cloud-amd64", false, nil, "modules for kernel 6.1.0-27-cloud-amd64 but this kernel is " + rel},
		{"packed but no modules.dep", rel, false, nil, "no modules.dep for kernel " + rel},
		{"load failures", rel, true, []string{"virtio_blk: exec format error (built for kernel 6.1.0-27-cloud-amd64)", "virtio_net: no such file"},
			"could not load virtio_blk: exec format error (built for kernel 6.1.0-27-cloud-amd64); virtio_net: no such file"},
		{"base initrd load failure", "", true, []string{"virtio_blk: invalid argument"}, "could not load virtio_blk"},
	} {
		got := modulesProblem(tc.want, rel, tc.haveDep, tc.failed)
		if (got == "") != (tc.wantProblem == "") || !strings.Contains(got, tc.wantProblem) {
			t.Errorf("%s: modulesProblem = %q, want %q", tc.name, got, tc.wantProblem)
		}
	}
	// The console line carries the marker the host looks for.
	line := modulesFailedLine("x")
	if !strings.Contains(line, agentproto.ModulesFailedMarker+" x") {
		t.Errorf("line %q lacks the marker", line)
	}
}
