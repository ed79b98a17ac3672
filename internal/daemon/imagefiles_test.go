package daemon

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/disk"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/kmod/kmodtest"
	"github.com/bangerdev/banger/internal/testenv"
	"github.com/bangerdev/banger/internal/vmm"
)

// An unmanaged image's files are fingerprinted at register: once one
// changes, no VM is created or started from the image, and the error names
// the file, what changed, and what to do.
func TestChangedImageFileRefusesCreateAndStart(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name, want string
		change     func(t *testing.T, e *testEnv)
	}{
		{"appended", "size 65536 → 65540 bytes", func(t *testing.T, e *testEnv) {
			f, err := os.OpenFile(e.rootfs, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteString("more"); err != nil {
				t.Fatal(err)
			}
		}},
		{"touched", "modified at", func(t *testing.T, e *testEnv) {
			later := time.Now().Add(time.Hour)
			if err := os.Chtimes(e.rootfs, later, later); err != nil {
				t.Fatal(err)
			}
		}},
		{"written-in-place-mtime-restored", "written to or its metadata changed", func(t *testing.T, e *testEnv) {
			st, err := os.Stat(e.rootfs)
			if err != nil {
				t.Fatal(err)
			}
			f, err := os.OpenFile(e.rootfs, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt([]byte("EDIT"), 4096); err != nil {
				t.Fatal(err)
			}
			f.Close()
			if err := os.Chtimes(e.rootfs, st.ModTime(), st.ModTime()); err != nil {
				t.Fatal(err)
			}
		}},
		{"replaced", "replaced by another file", func(t *testing.T, e *testEnv) {
			b, err := os.ReadFile(e.rootfs)
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, e.rootfs+".new", b)
			if err := os.Rename(e.rootfs+".new", e.rootfs); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e, d := setup(t, nil)
			ctx := testCtx(t)
			if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "older"}, nil); err != nil {
				t.Fatal(err)
			}
			c.change(t, e)
			dirs := vmDirs(t, e)
			_, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "newer"}, nil)
			wireErr(t, "create from a changed image", err, errdefs.ErrFailedPrecondition)
			for _, want := range []string{"rootfs " + e.rootfs, c.want, "image promote", "image register"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("create error %q does not say %q", err, want)
				}
			}
			if got := vmDirs(t, e); len(got) != len(dirs) {
				t.Errorf("vm dirs %v after the refused create, want %v", got, dirs)
			}
			_, err = d.c.VMStart(ctx, api.VMStartParams{Name: "older"}, nil)
			wireErr(t, "start of a VM whose image changed", err, errdefs.ErrFailedPrecondition)
			if !strings.Contains(err.Error(), e.rootfs) {
				t.Errorf("start error %q does not name the rootfs", err)
			}
			if calls := e.fake.callsFor("older"); len(calls) != 0 {
				t.Errorf("the VMM was called: %v", calls)
			}
		})
	}
}

// A file changed in the image's modules tree is noticed too.
func TestChangedModuleRefusesStart(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	mods := filepath.Join(e.dir, "src", "modules")
	ko := writeFile(t, filepath.Join(mods, "kernel", "virtio_blk.ko"), []byte("module"))
	writeFile(t, filepath.Join(mods, "modules.dep"), []byte("kernel/virtio_blk.ko:\n"))
	kernel := writeFile(t, filepath.Join(e.dir, "src", "vmlinuz"), kmodtest.Kernel("6.1.0-test"))
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "mods", Rootfs: e.rootfs, Kernel: kernel, ModulesDir: mods}); err != nil {
		t.Fatal(err)
	}
	// A create first, so that the image's files are known usable (and
	// kept in memory): the change is still noticed.
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "m0", Image: "mods"}, nil); err != nil {
		t.Fatal(err)
	}
	writeFile(t, ko, []byte("another module"))
	_, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "m", Image: "mods"}, nil)
	wireErr(t, "create with a changed module", err, errdefs.ErrFailedPrecondition)
	if !strings.Contains(err.Error(), "modules "+ko) {
		t.Errorf("error %q does not name the module", err)
	}
}

// qcow2Env is a daemon whose (fake) VMM takes qcow2 disks, made with the
// real qemu-img.
func qcow2Env(t *testing.T) (*testEnv, *testDaemon) {
	t.Helper()
	qemuImg, err := exec.LookPath("qemu-img")
	if err != nil {
		testenv.Missing(t, "qemu-img not installed")
	}
	e := newEnv(t, func(c *config.Daemon) { c.QEMUImgBinary = qemuImg })
	e.fake.formats = []string{vmm.FormatQcow2, vmm.FormatRaw}
	d := e.start()
	if _, err := d.c.ImageRegister(testCtx(t), api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd}); err != nil {
		t.Fatalf("register image: %v", err)
	}
	return e, d
}

func backing(t *testing.T, v api.VM) string {
	t.Helper()
	b, err := disk.BackingFile(v.DiskPath)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Promote moves the disks of the image's stopped VMs onto the managed copy
// at once, and those of running VMs at their next start; then the original
// files can be deleted and every VM still starts.
func TestPromoteMovesDisksOntoTheCopy(t *testing.T) {
	t.Parallel()
	e, d := qcow2Env(t)
	ctx := testCtx(t)
	stopped, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "stopped"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	running := createStarted(t, d, "running")
	if b := backing(t, stopped); b != e.rootfs || stopped.DiskFormat != vmm.FormatQcow2 {
		t.Fatalf("disk %s (%s) backed by %q, want a qcow2 disk on %s", stopped.DiskPath, stopped.DiskFormat, b, e.rootfs)
	}

	var ph phases
	im, err := d.c.ImagePromote(ctx, "default", ph.add)
	if err != nil {
		t.Fatalf("promote: %v", err)
	}
	if b := backing(t, stopped); b != im.Rootfs {
		t.Errorf("stopped VM's disk backed by %q after promote, want the copy %s", b, im.Rootfs)
	}
	if b := backing(t, running); b != e.rootfs {
		t.Errorf("running VM's disk backed by %q during promote, want it left on %s (QEMU has it open)", b, e.rootfs)
	}
	got, err := d.c.ImageInspect(ctx, "default")
	if err != nil {
		t.Fatal(err)
	}
	orig, err := os.ReadFile(e.rootfs)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(orig)
	if got.PromotedFrom != e.rootfs || len(got.Files) != 3 || got.Files[0].Role != "rootfs" || got.Files[0].Path != im.Rootfs ||
		got.Files[0].SHA256 != hex.EncodeToString(sum[:]) || got.Files[0].Size != int64(len(orig)) {
		t.Errorf("image inspect after promote: promoted from %q, files %+v; want the copy's fingerprints with the original's sha256 %x", got.PromotedFrom, got.Files, sum)
	}
	if names := strings.Join(ph.names(), "\n"); !strings.Contains(names, "verify copy") || !strings.Contains(names, "vm running runs") {
		t.Errorf("promote's phases don't report the hash check and the running VM: %s", names)
	}

	for _, f := range []string{e.rootfs, e.kernel, e.initrd} {
		if err := os.Remove(f); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.c.VMStart(ctx, api.VMStartParams{Name: "stopped"}, nil); err != nil {
		t.Fatalf("start a VM after its image was promoted and the originals deleted: %v", err)
	}
	if _, err := d.c.VMStop(ctx, api.VMStopParams{Name: "running"}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := d.c.VMStart(ctx, api.VMStartParams{Name: "running"}, nil); err != nil {
		t.Fatalf("restart the VM that ran during promote, originals deleted: %v", err)
	}
	if b := backing(t, running); b != im.Rootfs {
		t.Errorf("the VM that ran during promote is backed by %q after its restart, want %s", b, im.Rootfs)
	}
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "fresh"}, nil); err != nil {
		t.Errorf("create from the promoted image: %v", err)
	}
}

// A promote whose source changed is refused while VMs use the image (their
// disks were made from the old content); without VMs it copies the files
// as they are.
func TestPromoteOfChangedImage(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "user"}, nil); err != nil {
		t.Fatal(err)
	}
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(e.kernel, later, later); err != nil {
		t.Fatal(err)
	}
	_, err := d.c.ImagePromote(ctx, "default", nil)
	wireErr(t, "promote of a changed image with VMs", err, errdefs.ErrFailedPrecondition)
	if entries, _ := os.ReadDir(filepath.Join(e.cfg.StateDir, "images")); len(entries) != 0 {
		t.Errorf("refused promote left %d entries in images/", len(entries))
	}
	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "user"}); err != nil {
		t.Fatal(err)
	}
	im, err := d.c.ImagePromote(ctx, "default", nil)
	if err != nil || !im.Managed {
		t.Fatalf("promote of a changed image without VMs: %+v, %v", im, err)
	}
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "after"}, nil); err != nil {
		t.Errorf("create after promote: %v", err)
	}
}

// A promote interrupted by a crash is undone (before its row was updated)
// or completed (after) when the daemon starts again.
func TestInterruptedPromoteRepairedAtStart(t *testing.T) {
	t.Parallel()
	e, d := qcow2Env(t)
	ctx := testCtx(t)
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "box"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	reg, err := d.c.ImageInspect(ctx, "default")
	if err != nil {
		t.Fatal(err)
	}
	images := filepath.Join(e.cfg.StateDir, "images")

	// Crash after the copy was renamed into place, before the row named it.
	copyDir := filepath.Join(images, reg.ID)
	writeFile(t, filepath.Join(copyDir, "rootfs.img"), []byte("a complete copy"))
	// And the files of an image whose rm was interrupted.
	writeFile(t, filepath.Join(images, "0123456789abcdef", "rootfs.img"), []byte("removed image"))
	d.close()
	d = e.start()
	for _, dir := range []string{copyDir, filepath.Join(images, "0123456789abcdef")} {
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after restart: %v, want it removed", dir, err)
		}
	}
	if im, _ := d.c.ImageInspect(ctx, "default"); im.Managed || im.Rootfs != e.rootfs {
		t.Errorf("image after an undone promote: %+v", im)
	}

	// Crash after the row was updated, before the disk was moved: promote,
	// then put the disk back on the original.
	im, err := d.c.ImagePromote(ctx, "default", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := disk.NewCloner(nil, e.cfg.QEMUImgBinary).Rebase(ctx, vm.DiskPath, e.rootfs); err != nil {
		t.Fatal(err)
	}
	d.close()
	d = e.start()
	if b := backing(t, vm); b != im.Rootfs {
		t.Errorf("disk backed by %q after restart, want the copy %s (promote completed)", b, im.Rootfs)
	}
	if _, err := d.c.VMStart(ctx, api.VMStartParams{Name: "box"}, nil); err != nil {
		t.Errorf("start after the repaired promote: %v", err)
	}
}
