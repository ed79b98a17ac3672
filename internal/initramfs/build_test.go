package initramfs

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/kmod"
	"github.com/bangerdev/banger/internal/kmod/kmodtest"
	"github.com/bangerdev/banger/internal/testenv"
)

func writeFakeAgent(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(p, []byte("\x7fELF fake agent"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBuildLayout(t *testing.T) {
	root := fakeModules(t, "6.1.0-test")
	agent := writeFakeAgent(t)
	dst := filepath.Join(t.TempDir(), "initrd.img")
	cfg := agentproto.Config{Transport: "virtio-serial", PortName: agentproto.VirtioPortName, HostKey: "KEY", AuthorizedKey: "ssh-ed25519 AAAA", Hostname: "vm1"}
	if err := Build(context.Background(), dst, Options{AgentBinary: agent, ModulesDir: root, KernelRelease: "6.1.0-test", Config: cfg}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dst + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("temporary file left behind: %v", err)
	}
	data, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if len(data)%512 != 0 {
		t.Errorf("size %d not a multiple of 512", len(data))
	}
	dir := extract(t, data)

	st, err := os.Stat(filepath.Join(dir, "banger/init"))
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("banger/init: %v %v", st, err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "banger/init")); string(b) != "\x7fELF fake agent" {
		t.Errorf("banger/init content %q", b)
	}
	st, err = os.Stat(filepath.Join(dir, "banger/agent.json"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("banger/agent.json: %v %v", st, err)
	}
	var got agentproto.Config
	b, _ := os.ReadFile(filepath.Join(dir, "banger/agent.json"))
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	want := cfg
	want.Modules = DefaultModules
	want.ModulesRelease = "6.1.0-test"
	if !reflect.DeepEqual(got, want) {
		t.Errorf("config %+v, want %+v", got, want)
	}
	for _, d := range []string{"proc", "sys", "dev", "newroot", "root"} {
		if st, err := os.Stat(filepath.Join(dir, d)); err != nil || !st.IsDir() {
			t.Errorf("dir %s: %v", d, err)
		}
	}
	if os.Geteuid() == 0 {
		if st, err := os.Stat(filepath.Join(dir, "dev/console")); err != nil || st.Mode()&os.ModeCharDevice == 0 {
			t.Errorf("dev/console: %v %v", st, err)
		}
	}

	rel := filepath.Join(dir, "lib/modules/6.1.0-test")
	dep, err := os.ReadFile(filepath.Join(rel, "modules.dep"))
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, line := range strings.Split(strings.TrimSpace(string(dep)), "\n") {
		p, _, _ := strings.Cut(line, ":")
		order = append(order, p)
		if b, err := os.ReadFile(filepath.Join(rel, p)); err != nil || string(b) != "fake module "+kmod.ModuleName(p) {
			t.Errorf("module %s: %q %v", p, b, err)
		}
	}
	wantOrder := []string{
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
	}
	if !reflect.DeepEqual(order, wantOrder) {
		t.Errorf("module order\n got %v\nwant %v", order, wantOrder)
	}
	// Only the wanted modules (and deps) are packed: virtio-fs is not.
	if _, err := os.Stat(filepath.Join(rel, "kernel/fs/fuse/virtio-fs.ko.xz")); !os.IsNotExist(err) {
		t.Errorf("unwanted module packed: %v", err)
	}
	if _, err := os.Stat(filepath.Join(rel, "modules.builtin")); err != nil {
		t.Errorf("modules.builtin: %v", err)
	}
	// The guest can parse what we wrote and gets the same order.
	deps, err := kmod.ParseModulesDep(bytes.NewReader(dep))
	if err != nil {
		t.Fatal(err)
	}
	if files, _ := deps.Resolve(DefaultModules); !reflect.DeepEqual(files, wantOrder) {
		t.Errorf("guest-side order %v", files)
	}
}

func TestBuildWithBaseInitrd(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		testenv.Missing(t, "cpio tool not installed (apt-get install cpio)")
	}
	// A base archive made by the system tool, with a file banger overrides.
	src := t.TempDir()
	if err := os.MkdirAll(filepath.Join(src, "banger"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(src, "base-file"), []byte("from base"), 0o644)
	os.WriteFile(filepath.Join(src, "banger/agent.json"), []byte("old"), 0o644)
	cmd := exec.Command("sh", "-c", "find . | cpio -o -H newc --quiet")
	cmd.Dir = src
	base, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	basePath := filepath.Join(t.TempDir(), "base.img")
	if err := os.WriteFile(basePath, base, 0o644); err != nil {
		t.Fatal(err)
	}

	dst := filepath.Join(t.TempDir(), "out.img")
	cfg := agentproto.Config{Transport: "vsock", VsockPort: 1024, Modules: []string{"virtio_blk"}}
	if err := Build(context.Background(), dst, Options{AgentBinary: writeFakeAgent(t), BaseInitrd: basePath, Config: cfg}); err != nil {
		t.Fatal(err)
	}
	out, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(out, base) {
		t.Fatal("output does not start with the base initrd bytes")
	}
	// cpio stops at the first trailer; extract the two parts in order, as
	// the kernel does.
	dir := extract(t, out[:len(base)])
	rest := out[len(base):]
	cmd = exec.Command("cpio", "-idmu", "--quiet", "--no-absolute-filenames")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(rest)
	if o, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, o)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "base-file")); string(b) != "from base" {
		t.Errorf("base-file %q", b)
	}
	b, _ := os.ReadFile(filepath.Join(dir, "banger/agent.json"))
	var got agentproto.Config
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("agent.json %q: %v", b, err)
	}
	if got.VsockPort != 1024 || !reflect.DeepEqual(got.Modules, []string{"virtio_blk"}) {
		t.Errorf("config %+v", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "lib")); !os.IsNotExist(err) {
		t.Errorf("modules packed without ModulesDir: %v", err)
	}
}

func TestBuildErrors(t *testing.T) {
	dst := filepath.Join(t.TempDir(), "x.img")
	if err := Build(context.Background(), dst, Options{}); err == nil {
		t.Error("no agent: no error")
	}
	if err := Build(context.Background(), dst, Options{AgentBinary: writeFakeAgent(t), ModulesDir: t.TempDir(), KernelRelease: "6.1"}); err == nil {
		t.Error("modules dir without modules.dep: no error")
	}
	if err := Build(context.Background(), dst, Options{AgentBinary: writeFakeAgent(t), ModulesDir: fakeModules(t, "6.1")}); err == nil {
		t.Error("modules dir without a kernel to take the release from: no error")
	}
	if err := Build(context.Background(), dst, Options{AgentBinary: writeFakeAgent(t), BaseInitrd: "/nonexistent"}); err == nil {
		t.Error("missing base initrd: no error")
	}
	if _, err := os.Stat(dst); !os.IsNotExist(err) {
		t.Error("failed Build left output")
	}
	if _, err := os.Stat(dst + ".tmp"); !os.IsNotExist(err) {
		t.Error("failed Build left tmp file")
	}
}

// TestBuildRenamedModulesDir: a copy of /lib/modules/<release> under
// another name is packed under the kernel's release, read from the kernel.
func TestBuildRenamedModulesDir(t *testing.T) {
	const rel = "6.1.0-57-cloud-amd64"
	mods := filepath.Join(t.TempDir(), "build", "modules")
	kmodtest.WriteRelease(t, mods, rel)
	dst := filepath.Join(t.TempDir(), "initrd.img")
	opts := Options{AgentBinary: writeFakeAgent(t), ModulesDir: mods, Kernel: kmodtest.WriteKernel(t, rel), Config: agentproto.Config{Modules: []string{"virtio_blk"}}}
	if err := Build(context.Background(), dst, opts); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	dir := extract(t, data)
	for _, f := range []string{"modules.dep", "kernel/drivers/block/virtio_blk.ko", "kernel/drivers/virtio/virtio.ko"} {
		if _, err := os.Stat(filepath.Join(dir, "lib/modules", rel, f)); err != nil {
			t.Errorf("%s not packed under the kernel's release: %v", f, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "lib/modules/modules")); !os.IsNotExist(err) {
		t.Errorf("modules packed under the directory's name: %v", err)
	}
	var cfg agentproto.Config
	b, _ := os.ReadFile(filepath.Join(dir, "banger/agent.json"))
	if err := json.Unmarshal(b, &cfg); err != nil || cfg.ModulesRelease != rel {
		t.Errorf("agent.json modules_release %q (%v), want %q", cfg.ModulesRelease, err, rel)
	}

	// Modules of another release are refused, naming both.
	opts.Kernel = kmodtest.WriteKernel(t, "6.1.0-58-cloud-amd64")
	err = Build(context.Background(), dst, opts)
	if !errors.Is(err, kmod.ErrWrongRelease) || !strings.Contains(err.Error(), rel) || !strings.Contains(err.Error(), "6.1.0-58-cloud-amd64") {
		t.Errorf("wrong release: %v", err)
	}
}

// TestBuildTestImageModules packs the test image's real modules, reached
// through a symlink named "modules", for its real kernel.
func TestBuildTestImageModules(t *testing.T) {
	img := os.Getenv("BANGER_TESTIMAGE_DIR")
	if img == "" {
		img = "/var/cache/banger/testimage"
	}
	b, err := os.ReadFile(filepath.Join(img, "kernel-release"))
	if err != nil {
		testenv.Missing(t, "no test image: %v", err)
	}
	rel := strings.TrimSpace(string(b))
	link := filepath.Join(t.TempDir(), "modules")
	if err := os.Symlink(filepath.Join(img, "modules", "lib", "modules", rel), link); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "initrd.img")
	if err := Build(context.Background(), dst, Options{AgentBinary: writeFakeAgent(t), ModulesDir: link, Kernel: filepath.Join(img, "vmlinuz")}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	dir := extract(t, data)
	for _, f := range []string{"modules.dep", "kernel/drivers/block/virtio_blk.ko"} {
		if _, err := os.Stat(filepath.Join(dir, "lib/modules", rel, f)); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}

// A cancelled build stops at its next write and leaves nothing behind.
func TestBuildCancelled(t *testing.T) {
	dir := t.TempDir()
	dst := filepath.Join(dir, "initrd.img")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := Build(ctx, dst, Options{AgentBinary: writeFakeAgent(t)})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Build with a cancelled context = %v, want context.Canceled", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("a cancelled build left %v", ents)
	}
}
