package daemon

import (
	"errors"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/kmod/kmodtest"
	"github.com/bangerdev/banger/internal/rpc"
)

func imageNames(t *testing.T, d *testDaemon) []string {
	t.Helper()
	ims, err := d.c.ImageList(testCtx(t))
	if err != nil {
		t.Fatalf("image list: %v", err)
	}
	var out []string
	for _, im := range ims {
		out = append(out, im.Name)
	}
	return out
}

func TestImageRemoveInUse(t *testing.T) {
	t.Parallel()
	_, d := setup(t, nil)
	ctx := testCtx(t)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "user1"}, nil); err != nil {
		t.Fatal(err)
	}
	err := d.c.ImageRemove(ctx, "default")
	wireErr(t, "rm of an image in use", err, errdefs.ErrFailedPrecondition)
	if !strings.Contains(err.Error(), "user1") {
		t.Errorf("error %q does not name the vm using the image", err)
	}
	im, err := d.c.ImageInspect(ctx, "default")
	if err != nil {
		t.Fatalf("inspect after refused rm: %v", err)
	}
	if !slices.Equal(im.UsedBy, []string{"user1"}) {
		t.Errorf("used by = %v, want [user1]", im.UsedBy)
	}

	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "user1"}); err != nil {
		t.Fatal(err)
	}
	if err := d.c.ImageRemove(ctx, "default"); err != nil {
		t.Fatalf("rm of an unused image: %v", err)
	}
	_, err = d.c.ImageInspect(ctx, "default")
	wireErr(t, "inspect after rm", err, errdefs.ErrNotFound)
}

// The image's default user is recorded and shown; root when not given.
func TestImageDefaultUser(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	im, err := d.c.ImageRegister(testCtx(t), api.ImageRegisterParams{Name: "withuser", Rootfs: e.rootfs, Kernel: e.kernel, User: "dev"})
	if err != nil {
		t.Fatal(err)
	}
	if im.User != "dev" {
		t.Errorf("register answered user %q, want dev", im.User)
	}
	for name, want := range map[string]string{"withuser": "dev", "default": "root"} {
		got, err := d.c.ImageInspect(testCtx(t), name)
		if err != nil || got.User != want {
			t.Errorf("inspect %s: user %q, %v; want %q", name, got.User, err, want)
		}
	}
}

func TestImageRegisterRejectsBadArtifacts(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	bad := filepath.Join(e.dir, "bad")
	notKernel := writeFile(t, filepath.Join(bad, "not-a-kernel"), []byte("just some text, no kernel header"))
	empty := writeFile(t, filepath.Join(bad, "empty.img"), nil)

	tests := []struct {
		name string
		p    api.ImageRegisterParams
		kind error
		hint string
	}{
		{"not a kernel", api.ImageRegisterParams{Name: "x", Rootfs: e.rootfs, Kernel: notKernel}, errdefs.ErrInvalid, "not a Linux kernel"},
		{"empty rootfs", api.ImageRegisterParams{Name: "x", Rootfs: empty, Kernel: e.kernel}, errdefs.ErrInvalid, "empty file"},
		{"missing rootfs", api.ImageRegisterParams{Name: "x", Rootfs: filepath.Join(bad, "nope.img"), Kernel: e.kernel}, errdefs.ErrInvalid, "no such file"},
		{"relative kernel", api.ImageRegisterParams{Name: "x", Rootfs: e.rootfs, Kernel: "vmlinux"}, errdefs.ErrInvalid, "must be absolute"},
		{"modules not a dir", api.ImageRegisterParams{Name: "x", Rootfs: e.rootfs, Kernel: e.kernel, ModulesDir: e.kernel}, errdefs.ErrInvalid, "not a directory"},
		{"bad name", api.ImageRegisterParams{Name: "Not OK", Rootfs: e.rootfs, Kernel: e.kernel}, errdefs.ErrInvalid, "invalid image name"},
		{"duplicate name", api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel}, errdefs.ErrAlreadyExists, "default"},
		{"bad user", api.ImageRegisterParams{Name: "x", Rootfs: e.rootfs, Kernel: e.kernel, User: "dev/../root"}, errdefs.ErrInvalid, "want a login name"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := d.c.ImageRegister(testCtx(t), tc.p)
			wireErr(t, "register", err, tc.kind)
			if !strings.Contains(err.Error(), tc.hint) {
				t.Errorf("error %q does not contain %q", err, tc.hint)
			}
			if got := imageNames(t, d); !slices.Equal(got, []string{"default"}) {
				t.Errorf("images after failed register = %v, want [default]", got)
			}
		})
	}
}

func TestImagePromote(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	mods := filepath.Join(e.dir, "src", "modules")
	writeFile(t, filepath.Join(mods, "kernel", "virtio_blk.ko"), []byte("module"))
	writeFile(t, filepath.Join(mods, "modules.dep"), []byte("kernel/virtio_blk.ko:\n"))
	// Modules need a kernel that says its release.
	kernel := writeFile(t, filepath.Join(e.dir, "src", "vmlinuz"), kmodtest.Kernel("6.1.0-test"))
	reg, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "promo", Rootfs: e.rootfs, Kernel: kernel, Initrd: e.initrd, ModulesDir: mods})
	if err != nil {
		t.Fatal(err)
	}
	if reg.Managed {
		t.Fatalf("registered image is managed")
	}

	var ph phases
	im, err := d.c.ImagePromote(ctx, "promo", ph.add)
	if err != nil {
		t.Fatalf("promote: %v", err)
	}
	dir := filepath.Join(e.cfg.StateDir, "images", reg.ID)
	if !im.Managed || im.ID != reg.ID {
		t.Errorf("promoted image = %+v, want managed, same id", im)
	}
	// The image's own kernel object is promoted with it, into kernels/<id>.
	kdir := filepath.Join(e.cfg.StateDir, "kernels", reg.KernelID)
	if reg.KernelName != "promo" || im.KernelID != reg.KernelID {
		t.Errorf("registered kernel %q (%s), promoted image's %s", reg.KernelName, reg.KernelID, im.KernelID)
	}
	for _, p := range []struct{ got, src, dir string }{{im.Rootfs, e.rootfs, dir}, {im.Kernel, kernel, kdir}, {im.Initrd, e.initrd, kdir}} {
		if filepath.Dir(p.got) != p.dir {
			t.Errorf("promoted file %s is not in %s", p.got, p.dir)
		}
		a, _ := os.ReadFile(p.got)
		b, _ := os.ReadFile(p.src)
		if len(a) == 0 || string(a) != string(b) {
			t.Errorf("promoted %s differs from %s", p.got, p.src)
		}
	}
	if m, err := os.ReadFile(filepath.Join(im.ModulesDir, "kernel", "virtio_blk.ko")); err != nil || string(m) != "module" || filepath.Dir(im.ModulesDir) != kdir {
		t.Errorf("promoted modules %s: %q, %v", im.ModulesDir, m, err)
	}
	// Each copy phase reports its end (done == total).
	ph.mu.Lock()
	ended := map[string]bool{}
	for _, p := range ph.ps {
		if p.Total > 0 && p.Done == p.Total {
			ended[p.Phase] = true
		}
	}
	ph.mu.Unlock()
	for _, want := range []string{"copy rootfs", "copy kernel", "copy initrd", "copy modules"} {
		if !ended[want] {
			t.Errorf("no final progress frame for %q (got %v)", want, ph.names())
		}
	}
	if got, _ := d.c.ImageInspect(ctx, "promo"); got.Rootfs != im.Rootfs || !got.Managed {
		t.Errorf("stored image after promote = %+v", got)
	}

	_, err = d.c.ImagePromote(ctx, "promo", nil)
	wireErr(t, "second promote", err, errdefs.ErrFailedPrecondition)

	// VMs are made from the managed copy; removing the image removes it.
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "frompromo", Image: "promo"}, nil)
	if err != nil || vm.Image != "promo" {
		t.Fatalf("create from promoted image: %+v, %v", vm, err)
	}
	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "frompromo"}); err != nil {
		t.Fatal(err)
	}
	if err := d.c.ImageRemove(ctx, "promo"); err != nil {
		t.Fatalf("rm promoted image: %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("managed image dir after rm: %v, want gone", err)
	}
	if _, err := os.Stat(e.rootfs); err != nil {
		t.Errorf("the original rootfs is gone after rm of the promoted image: %v", err)
	}
	// The kernel stays (another image may use it) until removed.
	k, err := d.c.KernelInspect(ctx, "promo")
	if err != nil || !k.Managed || k.Kernel != im.Kernel || len(k.Images) != 0 {
		t.Fatalf("kernel after the image's rm: %+v, %v", k, err)
	}
	if err := d.c.KernelRemove(ctx, "promo"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(kdir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("managed kernel dir after rm: %v, want gone", err)
	}
	if _, err := os.Stat(kernel); err != nil {
		t.Errorf("the original kernel is gone after rm of the promoted kernel: %v", err)
	}
}

func TestAuthorize(t *testing.T) {
	t.Parallel()
	const uid, gid, socketGID = 61234, 61234, 64321
	d := &Daemon{socketGID: -1}
	if err := d.authorize(rpc.Peer{PID: 1, UID: uid, GID: gid}, rpc.PermRead); err != nil {
		t.Errorf("read by any uid: %v", err)
	}
	if err := d.authorize(rpc.Peer{PID: 1, UID: 0, GID: 0}, rpc.PermWrite); err != nil {
		t.Errorf("write by root: %v", err)
	}
	if err := d.authorize(rpc.Peer{PID: 1, UID: uint32(os.Getuid()), GID: gid}, rpc.PermWrite); err != nil {
		t.Errorf("write by the daemon's own uid: %v", err)
	}
	err := d.authorize(rpc.Peer{PID: 1, UID: uid, GID: gid}, rpc.PermWrite)
	if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "use sudo") {
		t.Errorf("write by uid %d without a socket group: %v; want ErrPermissionDenied saying to use sudo", uid, err)
	}

	d.socketGID = socketGID
	if err := d.authorize(rpc.Peer{PID: 1, UID: uid, GID: socketGID}, rpc.PermWrite); err != nil {
		t.Errorf("write by a peer whose primary group is the socket group: %v", err)
	}
	if err := d.authorize(rpc.Peer{PID: 1, UID: uid, GID: gid}, rpc.PermWrite); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("write by a peer outside the socket group: %v; want ErrPermissionDenied", err)
	}

	if err := d.authorize(rpc.Peer{PID: 1, UID: uid, GID: gid, Groups: []uint32{gid + 1, socketGID}}, rpc.PermWrite); err != nil {
		t.Errorf("write by a peer with the socket group as a supplementary group: %v", err)
	}
	if err := d.authorize(rpc.Peer{PID: 1, UID: uid, GID: gid, Groups: []uint32{gid + 1}}, rpc.PermWrite); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("write by a peer with other supplementary groups: %v; want ErrPermissionDenied", err)
	}

	// Admin methods (image register, promote, rm) are root's alone.
	for _, p := range []rpc.Peer{{PID: 1, UID: 0, GID: 0}, {PID: 1, UID: uint32(os.Getuid()), GID: gid}} {
		if err := d.authorize(p, rpc.PermAdmin); err != nil {
			t.Errorf("admin call by uid %d: %v", p.UID, err)
		}
	}
	if os.Getuid() != 0 {
		return
	}
	for _, p := range []rpc.Peer{{PID: 1, UID: uid, GID: socketGID}, {PID: 1, UID: uid, GID: gid, Groups: []uint32{socketGID, 0}}} {
		err := d.authorize(p, rpc.PermAdmin)
		if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "needs root") && !strings.Contains(err.Error(), "need root") {
			t.Errorf("admin call by socket group member %+v: %v; want ErrPermissionDenied saying it needs root", p, err)
		}
	}
}

// An unmanaged image whose files went away gives a clear error at vm create,
// and nothing is left behind.
func TestCreateFromVanishedImage(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	if err := os.Rename(e.kernel, e.kernel+".moved"); err != nil {
		t.Fatal(err)
	}
	_, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "orphan"}, nil)
	wireErr(t, "create from an image without its kernel", err, errdefs.ErrFailedPrecondition)
	if !strings.Contains(err.Error(), "moved or removed") || !strings.Contains(err.Error(), e.kernel) {
		t.Errorf("error %q does not explain the missing kernel", err)
	}
	if vms, _ := d.c.VMList(ctx); len(vms) != 0 {
		t.Errorf("vm recorded: %+v", vms)
	}
}

// The socket is mode 0660 and owned by socket_group, so that group's
// members can use banger without sudo.
func TestSocketModeAndGroup(t *testing.T) {
	t.Parallel()
	g, err := user.LookupGroup("daemon")
	if err != nil {
		t.Skip("no group named daemon on this host")
	}
	e, _ := setup(t, func(c *config.Daemon) { c.SocketGroup = "daemon" })
	st, err := os.Stat(e.cfg.SocketPath)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o660 || st.Mode()&os.ModeSocket == 0 {
		t.Errorf("socket mode %v, want a socket with 0660", st.Mode())
	}
	if gid := st.Sys().(*syscall.Stat_t).Gid; strconv.Itoa(int(gid)) != g.Gid {
		t.Errorf("socket gid %d, want %s (daemon)", gid, g.Gid)
	}
}
