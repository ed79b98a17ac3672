package daemon

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/kmod/kmodtest"
)

const modRel = "6.1.0-57-cloud-amd64"

// TestImageRegisterRenamedModules registers a kernel of release modRel with
// a copy of /lib/modules/<modRel> named build/modules: the release comes
// from the kernel, and the VM's initramfs holds the modules under it.
func TestImageRegisterRenamedModules(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	kernel := writeFile(t, filepath.Join(e.dir, "k", "vmlinuz"), kmodtest.Kernel(modRel))
	mods := filepath.Join(e.dir, "build", "modules")
	kmodtest.WriteRelease(t, mods, modRel)
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "renamed", Rootfs: e.rootfs, Kernel: kernel, ModulesDir: mods}); err != nil {
		t.Fatalf("register with a renamed modules dir: %v", err)
	}
	// A /lib/modules-like parent whose release directory is a symlink.
	parent := filepath.Join(e.dir, "libmodules")
	os.MkdirAll(parent, 0o755)
	if err := os.Symlink(mods, filepath.Join(parent, modRel)); err != nil {
		t.Fatal(err)
	}
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "parent", Rootfs: e.rootfs, Kernel: kernel, ModulesDir: parent}); err != nil {
		t.Fatalf("register with a symlinked release dir: %v", err)
	}

	for _, im := range []string{"renamed", "parent"} {
		name := "vm-" + im
		if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: name, Image: im}, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := d.c.VMStart(ctx, api.VMStartParams{Name: name}, nil); err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
		fv := e.fake.byName(name)
		for _, f := range []string{"modules.dep", "kernel/drivers/block/virtio_blk.ko"} {
			if _, ok := fv.initramfs["lib/modules/"+modRel+"/"+f]; !ok {
				t.Errorf("%s: initramfs lacks lib/modules/%s/%s", name, modRel, f)
			}
		}
		for p := range fv.initramfs {
			if strings.HasPrefix(p, "lib/modules/modules/") || strings.HasPrefix(p, "lib/modules/libmodules/") {
				t.Errorf("%s: modules packed under a directory name: %s", name, p)
			}
		}
	}
}

// TestImageRegisterWrongModules: modules of another release are refused at
// register, naming both releases, and nothing is registered.
func TestImageRegisterWrongModules(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	kernel := writeFile(t, filepath.Join(e.dir, "k", "vmlinuz"), kmodtest.Kernel(modRel))
	const other = "6.1.0-27-cloud-amd64"
	for _, mods := range []string{filepath.Join(e.dir, "build", "modules"), filepath.Join(e.dir, "lm", other)} {
		kmodtest.WriteRelease(t, mods, other)
	}
	for _, dir := range []string{filepath.Join(e.dir, "build", "modules"), filepath.Join(e.dir, "lm")} {
		_, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "wrong", Rootfs: e.rootfs, Kernel: kernel, ModulesDir: dir})
		wireErr(t, "register with modules of another release", err, errdefs.ErrInvalid)
		for _, want := range []string{modRel, other} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("%s: %q does not name %s", dir, err, want)
			}
		}
	}
	// The right release, but one of the modules a VM gets is another's.
	mixed := filepath.Join(e.dir, "mixed", "modules")
	kmodtest.WriteRelease(t, mixed, modRel)
	writeFile(t, filepath.Join(mixed, "kernel", "drivers", "block", "virtio_blk.ko"), kmodtest.Module("virtio_blk", other))
	_, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "wrong", Rootfs: e.rootfs, Kernel: kernel, ModulesDir: mixed})
	wireErr(t, "register with one module of another release", err, errdefs.ErrInvalid)
	for _, want := range []string{"virtio_blk.ko", modRel, other} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("mixed: %q does not name %s", err, want)
		}
	}
	if names := imageNames(t, d); len(names) != 1 {
		t.Errorf("images after refused registers: %v", names)
	}
}

// TestStartModulesChanged: modules replaced by another release's after
// register make vm start fail with a failed precondition, before any VMM
// starts.
func TestStartModulesChanged(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	kernel := writeFile(t, filepath.Join(e.dir, "k", "vmlinuz"), kmodtest.Kernel(modRel))
	mods := filepath.Join(e.dir, "build", "modules")
	kmodtest.WriteRelease(t, mods, modRel)
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "m", Rootfs: e.rootfs, Kernel: kernel, ModulesDir: mods}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "changed", Image: "m"}, nil); err != nil {
		t.Fatal(err)
	}
	kmodtest.WriteRelease(t, mods, "6.1.0-99-cloud-amd64") // rebuilt for another kernel
	_, err := d.c.VMStart(ctx, api.VMStartParams{Name: "changed"}, nil)
	wireErr(t, "start with changed modules", err, errdefs.ErrFailedPrecondition)
	for _, want := range []string{modRel, "6.1.0-99-cloud-amd64"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not name %s", err, want)
		}
	}
	if ops := e.fake.callsFor("changed"); len(ops) != 0 {
		t.Errorf("driver calls %v; want none", ops)
	}
}

// TestStartReportsGuestModuleFailure: when the guest's init reports that
// modules failed to load and the agent never answers, the error says so.
func TestStartReportsGuestModuleFailure(t *testing.T) {
	t.Parallel()
	e, d := setup(t, func(c *config.Daemon) { c.ReadyTimeout = config.Duration{Duration: time.Second} })
	line := "banger-init: [0.912] error: " + agentproto.ModulesFailedMarker + " kernel " + modRel + " could not load virtio_blk: exec format error (built for kernel 6.1.0-27-cloud-amd64)\n"
	e.fake.setBehaviour("nomods", fakeBehaviour{AgentSilent: true, Console: line +
		"banger-init: [10.95] FATAL: root device: /dev/vda did not appear within 10s (block devices: none)\n"})
	ctx := testCtx(t)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "nomods"}, nil); err != nil {
		t.Fatal(err)
	}
	_, err := d.c.VMStart(ctx, api.VMStartParams{Name: "nomods"}, nil)
	if err == nil {
		t.Fatal("start succeeded")
	}
	for _, want := range []string{"kernel module loading failed in the guest", "could not load virtio_blk: exec format error (built for kernel 6.1.0-27-cloud-amd64)", "modules directory"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("start error %q lacks %q", err, want)
		}
	}
}

func TestGuestModulesFailure(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "console.log")
	if got := guestModulesFailure(p); got != "" {
		t.Errorf("missing file: %q", got)
	}
	os.WriteFile(p, []byte("boot\nbanger-init: loaded 16 modules\nroot device did not appear\n"), 0o600)
	if got := guestModulesFailure(p); got != "" {
		t.Errorf("no failure: %q", got)
	}
	// The report is found far from the end, and only its line is taken.
	body := "banger-init: [1.0] error: " + agentproto.ModulesFailedMarker + " first\r\n" +
		"banger-init: [1.1] error: " + agentproto.ModulesFailedMarker + " no modules.dep for kernel X in the initramfs\r\n" +
		strings.Repeat("systemd noise\n", 1000)
	os.WriteFile(p, []byte(body), 0o600)
	if got := guestModulesFailure(p); got != "no modules.dep for kernel X in the initramfs" {
		t.Errorf("got %q", got)
	}
	if modulesHint(p) == "" || modulesHint(filepath.Join(dir, "none")) != "" {
		t.Error("modulesHint")
	}
	// initramfsErr keeps other errors as they are.
	plain := errors.New("disk full")
	if initramfsErr(plain) != plain {
		t.Error("initramfsErr changed an unrelated error")
	}
}
