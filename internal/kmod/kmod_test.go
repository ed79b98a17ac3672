package kmod

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
)

// sampleDep is a modules.dep as depmod writes it for a small virtio guest,
// with an absolute path (depmod -b with an odd base directory) at the end.
const sampleDep = `kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/fs/fuse/virtio-fs.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
/abs/kernel/drivers/md/dm-mod.ko.zst:
`

func parseSample(t *testing.T) ModulesDep {
	t.Helper()
	deps, err := ParseModulesDep(strings.NewReader(sampleDep))
	if err != nil {
		t.Fatal(err)
	}
	return deps
}

func TestModuleName(t *testing.T) {
	for in, want := range map[string]string{
		"virtio_blk":                     "virtio_blk",
		"virtio-blk":                     "virtio_blk",
		"kernel/drivers/x/virtio-fs.ko":  "virtio_fs",
		"/lib/modules/r/k/ext4.ko.zst":   "ext4",
		"kernel/net/vsock.ko.xz":         "vsock",
		"kernel/net/vmw_vsock/vsock.ko":  "vsock",
		"crc32c_generic.ko.gz":           "crc32c_generic",
		"kernel/drivers/md/dm-mod.ko.xz": "dm_mod",
	} {
		if got := ModuleName(in); got != want {
			t.Errorf("ModuleName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestIsModuleFile(t *testing.T) {
	for in, want := range map[string]bool{
		"virtio_blk":             false,
		"virtio-blk":             false,
		"dm-mod.ko":              true,
		"ext4.ko.zst":            true,
		"kernel/fs/ext4/ext4.ko": true,
		"/extra/mine.ko":         true,
		"extra/other.ko.xz":      true,
		"extra/noext":            true,
	} {
		if got := IsModuleFile(in); got != want {
			t.Errorf("IsModuleFile(%q) = %v, want %v", in, got, want)
		}
	}
}

func TestResolveOrder(t *testing.T) {
	deps := parseSample(t)
	// Names with '-' or '_', a name given twice in both spellings, an
	// unknown name given twice, an absolute path in modules.dep.
	files, missing := deps.Resolve([]string{"virtio_mmio", "virtio-blk", "virtio_console", "virtio_net", "ext4", "vmw_vsock_virtio_transport", "virtio_fs", "dm-mod", "virtio_blk", "ext4"})
	want := []string{
		"kernel/drivers/virtio/virtio_ring.ko",
		"kernel/drivers/virtio/virtio.ko",
		"kernel/drivers/virtio/virtio_mmio.ko",
		"kernel/drivers/block/virtio_blk.ko",
		"kernel/drivers/char/virtio_console.ko",
		"kernel/net/core/failover.ko",
		"kernel/drivers/net/net_failover.ko",
		"kernel/drivers/net/virtio_net.ko",
		"kernel/net/vmw_vsock/vsock.ko",
		"kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
		"kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
		"kernel/fs/fuse/virtio-fs.ko.xz",
		"/abs/kernel/drivers/md/dm-mod.ko.zst",
	}
	if !reflect.DeepEqual(files, want) {
		t.Errorf("order:\n got %v\nwant %v", files, want)
	}
	if !reflect.DeepEqual(missing, []string{"ext4"}) {
		t.Errorf("missing = %v, want [ext4]", missing)
	}
	// Every module comes after all of its dependencies.
	pos := map[string]int{}
	for i, f := range files {
		pos[f] = i
	}
	for _, f := range files {
		for _, d := range deps[ModuleName(f)].Deps {
			if pos[d] >= pos[f] {
				t.Errorf("%s loaded before its dependency %s", f, d)
			}
		}
	}
}

func TestResolvePaths(t *testing.T) {
	deps := parseSample(t)
	// Paths work too; a path modules.dep does not know is loaded as is.
	files, missing := deps.Resolve([]string{"kernel/drivers/block/virtio_blk.ko", "/extra/mine.ko", "extra/other.ko.xz"})
	if want := []string{"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko", "kernel/drivers/block/virtio_blk.ko", "/extra/mine.ko", "extra/other.ko.xz"}; !reflect.DeepEqual(files, want) || len(missing) != 0 {
		t.Errorf("paths: files %v missing %v", files, missing)
	}
}

func TestResolveDepWithoutLine(t *testing.T) {
	deps, err := ParseModulesDep(strings.NewReader("a.ko: b.ko c.ko\nc.ko:\n"))
	if err != nil {
		t.Fatal(err)
	}
	files, _ := deps.Resolve([]string{"a"})
	if want := []string{"b.ko", "c.ko", "a.ko"}; !reflect.DeepEqual(files, want) {
		t.Errorf("got %v want %v", files, want)
	}
}

func TestParseModulesDep(t *testing.T) {
	deps, err := ParseModulesDep(strings.NewReader("# comment\n\n  kernel/a.ko :  kernel/b.ko\n"))
	if err != nil {
		t.Fatal(err)
	}
	if want := (ModulesDep{"a": {Path: "kernel/a.ko", Deps: []string{"kernel/b.ko"}}}); !reflect.DeepEqual(deps, want) {
		t.Errorf("got %v want %v", deps, want)
	}
	for _, bad := range []string{"garbage line\n", "no colon here\n", ": kernel/b.ko\n"} {
		if _, err := ParseModulesDep(strings.NewReader(bad)); err == nil {
			t.Errorf("bad modules.dep %q accepted", bad)
		}
	}
}

func TestParseModulesBuiltin(t *testing.T) {
	b, err := ParseModulesBuiltin(strings.NewReader("kernel/fs/ext4/ext4.ko\nkernel/drivers/md/dm-mod.ko\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !b["ext4"] || !b["dm_mod"] || len(b) != 2 {
		t.Errorf("builtin %v", b)
	}
	boom := errors.New("boom")
	if _, err := ParseModulesBuiltin(iotest.ErrReader(boom)); !errors.Is(err, boom) {
		t.Errorf("read error: %v", err)
	}
}
