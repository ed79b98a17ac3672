package initramfs

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/kmod"
	"github.com/bangerdev/banger/internal/kmod/kmodtest"
)

// sampleDep is the modules.dep of the fake release directory fakeModules
// creates.
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
`

// fakeModules creates root/lib/modules/<release> with fake .ko files and
// the sample modules.dep, and returns root.
func fakeModules(t *testing.T, release string) string {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, "lib", "modules", release)
	for _, line := range strings.Split(strings.TrimSpace(sampleDep), "\n") {
		p, _, _ := strings.Cut(line, ":")
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte("fake module "+kmod.ModuleName(p)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(sampleDep), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

func TestReleaseDir(t *testing.T) {
	root := fakeModules(t, "6.1.0-test")
	rd := filepath.Join(root, "lib", "modules", "6.1.0-test")
	for _, in := range []string{root, filepath.Join(root, "lib", "modules"), rd} {
		dir, err := ReleaseDir(in, "6.1.0-test")
		if err != nil || dir != rd {
			t.Errorf("ReleaseDir(%s) = %s, %v", in, dir, err)
		}
	}
	if _, err := ReleaseDir(root, "5.10"); !errors.Is(err, kmod.ErrWrongRelease) {
		t.Errorf("wrong release: %v", err)
	}
	// Two releases: the kernel's is chosen.
	if err := os.MkdirAll(filepath.Join(root, "lib", "modules", "6.2"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "lib", "modules", "6.2", "modules.dep"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if dir, err := ReleaseDir(root, "6.2"); err != nil || filepath.Base(dir) != "6.2" {
		t.Errorf("release 6.2: %s %v", dir, err)
	}
	if dir, err := ReleaseDir(root, "6.1.0-test"); err != nil || dir != rd {
		t.Errorf("release 6.1.0-test beside 6.2: %s %v", dir, err)
	}
	if _, err := ReleaseDir(t.TempDir(), "6.2"); !errors.Is(err, kmod.ErrWrongRelease) {
		t.Errorf("empty dir: %v", err)
	}
	for _, bad := range []string{"", "..", "a/b"} {
		if _, err := ReleaseDir(root, bad); err == nil {
			t.Errorf("release %q accepted", bad)
		}
	}
}

func TestResolveModules(t *testing.T) {
	root := fakeModules(t, "6.1.0-test")
	set, err := ResolveModules(root, "6.1.0-test", []string{"virtio_blk", "ext4", "nonexistent"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko", "kernel/drivers/block/virtio_blk.ko"}; !reflect.DeepEqual(set.Files, want) {
		t.Errorf("files %v", set.Files)
	}
	if !reflect.DeepEqual(set.Builtin, []string{"ext4"}) || !reflect.DeepEqual(set.Unknown, []string{"nonexistent"}) {
		t.Errorf("builtin %v unknown %v", set.Builtin, set.Unknown)
	}
	got := string(FormatModulesDep(set.Files, set.Deps))
	want := "kernel/drivers/virtio/virtio_ring.ko:\n" +
		"kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n" +
		"kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
	if got != want {
		t.Errorf("modules.dep:\n%s\nwant:\n%s", got, want)
	}
	// A module file path unknown to modules.dep is not packed: like an
	// unknown name, it is looked up in modules.builtin or assumed built in.
	set, err = ResolveModules(root, "6.1.0-test", []string{"extra/mine.ko", "virtio_blk", "kernel/fs/ext4/ext4.ko", "/abs/other.ko.xz"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko", "kernel/drivers/block/virtio_blk.ko"}; !reflect.DeepEqual(set.Files, want) {
		t.Errorf("paths: files %v", set.Files)
	}
	if !reflect.DeepEqual(set.Builtin, []string{"kernel/fs/ext4/ext4.ko"}) || !reflect.DeepEqual(set.Unknown, []string{"extra/mine.ko", "/abs/other.ko.xz"}) {
		t.Errorf("paths: builtin %v unknown %v", set.Builtin, set.Unknown)
	}
	// A module file listed in modules.dep but absent is an error.
	os.Remove(filepath.Join(set.ReleaseDir, "kernel/drivers/block/virtio_blk.ko"))
	if _, err := ResolveModules(root, "6.1.0-test", []string{"virtio_blk"}); err == nil {
		t.Error("missing .ko accepted")
	}
}

func TestRelModulePath(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/a.ko":                            "kernel/a.ko",
		"/lib/modules/6.1/kernel/a.ko":           "kernel/a.ko",
		"tmp/x/lib/modules/6.1/kernel/b/a.ko.xz": "kernel/b/a.ko.xz",
	} {
		got, err := relModulePath("/somewhere/6.1", "6.1", in)
		if err != nil || got != want {
			t.Errorf("relModulePath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := relModulePath("/d/6.1", "6.1", "../../etc/passwd"); err == nil {
		t.Error("escaping path accepted")
	}
}

// TestResolveModulesChecksEachModule: one module built for another kernel
// in an otherwise right tree is refused, naming it and both releases.
func TestResolveModulesChecksEachModule(t *testing.T) {
	const rel = "6.1.0-57-cloud-amd64"
	dir := filepath.Join(t.TempDir(), "modules")
	kmodtest.WriteRelease(t, dir, rel)
	if _, err := ResolveModules(dir, rel, []string{"virtio_blk"}); err != nil {
		t.Fatal(err)
	}
	blk := filepath.Join(dir, "kernel/drivers/block/virtio_blk.ko")
	if err := os.WriteFile(blk, kmodtest.Module("virtio_blk", "6.1.0-1-other"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := ResolveModules(dir, rel, []string{"virtio_blk"})
	if !errors.Is(err, kmod.ErrWrongRelease) {
		t.Fatalf("err = %v, want kmod.ErrWrongRelease", err)
	}
	for _, want := range []string{"kernel/drivers/block/virtio_blk.ko", rel, "6.1.0-1-other"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q lacks %q", err, want)
		}
	}
	// A module that can't be read (not ELF here) is left to the guest.
	if err := os.WriteFile(blk, []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ResolveModules(dir, rel, []string{"virtio_blk"}); err != nil {
		t.Errorf("unreadable module: %v", err)
	}
}
