package daemon

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/kmod/kmodtest"
	"github.com/bangerdev/banger/internal/store"
)

// State written before kernels were objects (an image holding its kernel
// files, a VM made from it) migrates: the image gets a kernel object of
// its own, and the VM boots the same files.
func TestMigratedStateBoots(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "old", MemoryMiB: 128, CPUs: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	im, err := d.c.ImageInspect(ctx, "default")
	if err != nil {
		t.Fatal(err)
	}
	d.close()

	// Rewrite the state as the previous schema held it: the image with
	// its kernel's files, no kernels table.
	dbPath := filepath.Join(e.cfg.StateDir, "state.db")
	for _, suffix := range []string{"", "-wal", "-shm"} {
		os.Remove(dbPath + suffix)
	}
	os.RemoveAll(filepath.Join(e.cfg.StateDir, "kernels"))
	db, err := store.CreateAtVersion(ctx, dbPath, store.Version()-1)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{`INSERT INTO images (id, name, managed, rootfs, kernel, initrd, modules_dir, size_bytes, created_at) VALUES (?, 'default', 0, ?, ?, ?, '', ?, ?)`,
			[]any{im.ID, e.rootfs, e.kernel, e.initrd, im.SizeBytes, time.Now().UTC().Format(time.RFC3339Nano)}},
		{`INSERT INTO vms (id, name, image_id, state, cpus, memory_mib, disk_bytes, disk_path, disk_format, disk_strategy, vmm, accel_wanted, dir, created_at, network)
			VALUES (?, 'old', ?, 'stopped', 1, 128, ?, ?, ?, ?, 'fake', 'auto', ?, ?, 'none')`,
			[]any{vm.ID, im.ID, vm.DiskBytes, vm.DiskPath, vm.DiskFormat, vm.DiskStrategy, vm.Dir, time.Now().UTC().Format(time.RFC3339Nano)}},
	} {
		if _, err := db.ExecContext(ctx, q.sql, q.args...); err != nil {
			t.Fatalf("%s: %v", q.sql, err)
		}
	}
	db.Close()

	d = e.start()
	got, err := d.c.ImageInspect(ctx, "default")
	if err != nil || got.KernelName != "default" || got.Kernel != e.kernel || got.Initrd != e.initrd || got.Source != api.SourceRegistered || got.InUse != 1 {
		t.Fatalf("migrated image: %+v, %v", got, err)
	}
	k, err := d.c.KernelInspect(ctx, "default")
	if err != nil || k.Kernel != e.kernel || k.Managed || !slices.Equal(k.Images, []string{"default"}) {
		t.Fatalf("migrated kernel: %+v, %v", k, err)
	}
	started, err := d.c.VMStart(ctx, api.VMStartParams{Name: "old"}, nil)
	if err != nil {
		t.Fatalf("start a migrated vm: %v", err)
	}
	if started.Kernel != "default" {
		t.Errorf("migrated vm boots kernel %q, want default", started.Kernel)
	}
	if f := e.fake.byName("old"); f == nil || f.spec.Kernel != e.kernel {
		t.Fatalf("migrated vm booted %+v, want kernel %s", f, e.kernel)
	}
}

// Kernels are shared objects: image register makes one for kernel files
// (or shares the one of the same files), names one with KernelName, vm
// create --kernel boots another, and kernel rm is refused while used.
func TestKernelObjects(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	// Same files as "default": the kernel object is shared.
	two, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "two", Rootfs: e.rootfs, Kernel: e.kernel, Initrd: e.initrd})
	if err != nil || two.KernelName != "default" {
		t.Fatalf("register with the same kernel files: %+v, %v", two, err)
	}
	// Other files: a kernel object of its own, named as the image.
	other := writeFile(t, filepath.Join(e.dir, "src", "other-vmlinux"), append([]byte("\x7fELF"), make([]byte, 2044)...))
	three, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "three", Rootfs: e.rootfs, Kernel: other})
	if err != nil || three.KernelName != "three" || three.Kernel != other {
		t.Fatalf("register with other kernel files: %+v, %v", three, err)
	}
	// By name.
	four, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "four", Rootfs: e.rootfs, KernelName: "three"})
	if err != nil || four.KernelName != "three" || four.Kernel != other || four.KernelID != three.KernelID {
		t.Fatalf("register with a kernel name: %+v, %v", four, err)
	}
	_, err = d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "five", Rootfs: e.rootfs, KernelName: "three", Kernel: other})
	wireErr(t, "register with a kernel name and files", err, errdefs.ErrInvalid)
	_, err = d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "five", Rootfs: e.rootfs, KernelName: "nope"})
	wireErr(t, "register with a missing kernel", err, errdefs.ErrNotFound)

	ks, err := d.c.KernelList(ctx)
	if err != nil || len(ks) != 2 || ks[0].Name != "default" || !slices.Equal(ks[0].Images, []string{"default", "two"}) ||
		ks[1].Name != "three" || !slices.Equal(ks[1].Images, []string{"four", "three"}) || ks[1].SizeBytes != 2048 || ks[1].Source != api.SourceRegistered {
		t.Fatalf("kernels = %+v, %v", ks, err)
	}
	err = d.c.KernelRemove(ctx, "three")
	wireErr(t, "rm a kernel images use", err, errdefs.ErrFailedPrecondition)
	if !strings.Contains(err.Error(), "four, three") {
		t.Errorf("refusal %q does not name the images", err)
	}

	// vm create --kernel boots that kernel with the image's rootfs.
	_, err = d.c.VMCreate(ctx, api.VMCreateParams{Name: "k", Kernel: "nope"}, nil)
	wireErr(t, "create with a missing kernel", err, errdefs.ErrNotFound)
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "k", Image: "two", Kernel: "three", Start: true, MemoryMiB: 128, CPUs: 1, Cmd: []string{"x"}, Restart: api.RestartAlways}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if vm.Kernel != "three" || vm.Image != "two" || vm.Restart != api.RestartAlways {
		t.Errorf("vm = %+v, want kernel three, image two, restart always", vm)
	}
	if f := e.fake.byName("k"); f == nil || f.spec.Kernel != other {
		t.Errorf("vm booted %+v, want kernel %s", f, other)
	}
	_, err = d.c.VMCreate(ctx, api.VMCreateParams{Name: "r", Restart: "sometimes"}, nil)
	wireErr(t, "create with a bad restart policy", err, errdefs.ErrInvalid)
	for _, n := range []string{"three", "four"} {
		if err := d.c.ImageRemove(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	err = d.c.KernelRemove(ctx, "three")
	wireErr(t, "rm a kernel a VM boots", err, errdefs.ErrFailedPrecondition)
	if !strings.Contains(err.Error(), "VM(s) k") {
		t.Errorf("refusal %q does not name the VM", err)
	}
	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "k", Force: true}); err != nil {
		t.Fatal(err)
	}
	if err := d.c.KernelRemove(ctx, "three"); err != nil {
		t.Fatalf("rm an unused kernel: %v", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("rm of an unmanaged kernel removed its file: %v", err)
	}
	_, err = d.c.KernelInspect(ctx, "three")
	wireErr(t, "inspect a removed kernel", err, errdefs.ErrNotFound)

	// The kernel object image register made goes with its last image.
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "six", Rootfs: e.rootfs, Kernel: other}); err != nil {
		t.Fatal(err)
	}
	if err := d.c.ImageRemove(ctx, "six"); err != nil {
		t.Fatal(err)
	}
	_, err = d.c.KernelInspect(ctx, "six")
	wireErr(t, "inspect the kernel of a removed image", err, errdefs.ErrNotFound)
	if ks, _ := d.c.KernelList(ctx); len(ks) != 1 || ks[0].Name != "default" {
		t.Errorf("kernels left: %+v", ks)
	}
}

// A changed kernel file makes every image using the kernel unusable,
// with an error naming the kernel.
func TestChangedKernelRefused(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	if err := os.WriteFile(e.kernel, append([]byte("\x7fELF"), make([]byte, 10)...), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "x"}, nil)
	wireErr(t, "create with a changed kernel", err, errdefs.ErrFailedPrecondition)
	if !strings.Contains(err.Error(), `kernel "default"`) {
		t.Errorf("error %q does not name the kernel", err)
	}
}

// installImage and installKernel register a staged directory's files, or
// nothing (and the directory is gone).
func TestInstall(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	// A leftover of an interrupted pull is removed at start.
	left := filepath.Join(e.cfg.StateDir, "tmp", "image-123.partial")
	writeFile(t, filepath.Join(left, "rootfs.img"), []byte("half"))
	td := e.start()
	if _, err := os.Stat(left); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover staging dir after start: %v", err)
	}
	dd := e.daemon.Load()
	ctx := testCtx(t)
	stage := func(kind string, files map[string][]byte) string {
		dir, err := dd.stagingDir(kind)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasSuffix(dir, ".partial") || filepath.Dir(dir) != filepath.Join(e.cfg.StateDir, "tmp") {
			t.Fatalf("staging dir %s", dir)
		}
		for n, b := range files {
			writeFile(t, filepath.Join(dir, n), b)
		}
		return dir
	}
	kernelBytes, _ := os.ReadFile(e.kernel)
	rootfsBytes, _ := os.ReadFile(e.rootfs)
	kdir := stage("kernel", map[string][]byte{"vmlinuz": kernelBytes})
	k, err := dd.installKernel(ctx, stagedKernel{Name: "k1", Source: api.SourceCatalog, Version: "1.0", Dir: kdir, Kernel: filepath.Join(kdir, "vmlinuz"),
		SHA256: map[string]string{"vmlinuz": "AB12"}})
	if err != nil {
		t.Fatal(err)
	}
	if !k.Managed || filepath.Dir(k.Kernel) != filepath.Join(e.cfg.StateDir, "kernels", k.ID) || k.Version != "1.0" {
		t.Fatalf("installed kernel %+v", k)
	}
	if files, _ := dd.store.KernelFiles(ctx, k.ID); len(files) != 1 || files[0].SHA256 != "ab12" {
		t.Errorf("kernel files %+v, want one with the known sum", files)
	}
	if _, err := os.Stat(kdir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("staging dir after install: %v", err)
	}
	cfg := &api.ImageConfig{Cmd: []string{"nginx"}}
	idir := stage("image", map[string][]byte{"rootfs.img": rootfsBytes})
	im, err := dd.installImage(ctx, stagedImage{Name: "i1", Source: api.SourceOCI, Ref: "nginx:latest", Digest: "sha256:x", Dir: idir,
		Rootfs: filepath.Join(idir, "rootfs.img"), KernelID: k.ID, User: "dev", Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	got, err := dd.store.GetImage(ctx, "i1")
	if err != nil || !got.Managed || got.KernelName != "k1" || got.ConfigJSON != `{"cmd":["nginx"]}` || got.Ref != "nginx:latest" ||
		filepath.Dir(got.Rootfs) != filepath.Join(e.cfg.StateDir, "images", im.ID) {
		t.Fatalf("installed image %+v, %v", got, err)
	}
	// A VM boots it with its kernel.
	if _, err := td.c.VMCreate(ctx, api.VMCreateParams{Name: "v", Image: "i1", Start: true, MemoryMiB: 128, CPUs: 1}, nil); err != nil {
		t.Fatal(err)
	}
	if f := e.fake.byName("v"); f == nil || f.spec.Kernel != k.Kernel {
		t.Errorf("vm booted %+v, want kernel %s", f, k.Kernel)
	}

	// Failures register nothing and leave no directory.
	for _, tc := range []struct {
		name string
		s    func(dir string) stagedImage
		kind error
	}{
		{"name taken", func(dir string) stagedImage {
			return stagedImage{Name: "i1", Dir: dir, Rootfs: filepath.Join(dir, "rootfs.img"), KernelID: k.ID}
		}, errdefs.ErrAlreadyExists},
		{"missing kernel", func(dir string) stagedImage {
			return stagedImage{Name: "i2", Dir: dir, Rootfs: filepath.Join(dir, "rootfs.img"), KernelID: "nope"}
		}, errdefs.ErrNotFound},
		{"rootfs outside", func(dir string) stagedImage {
			return stagedImage{Name: "i2", Dir: dir, Rootfs: e.rootfs, KernelID: k.ID}
		}, errdefs.ErrInvalid},
		{"not a rootfs", func(dir string) stagedImage {
			return stagedImage{Name: "i2", Dir: dir, Rootfs: filepath.Join(dir, "empty"), KernelID: k.ID}
		}, errdefs.ErrInvalid},
	} {
		dir := stage("image", map[string][]byte{"rootfs.img": rootfsBytes, "empty": nil})
		_, err := dd.installImage(ctx, tc.s(dir))
		if !errors.Is(err, tc.kind) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.kind)
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: staging dir left: %v", tc.name, err)
		}
	}
	kd := stage("kernel", map[string][]byte{"vmlinuz": []byte("not a kernel")})
	if _, err := dd.installKernel(ctx, stagedKernel{Name: "k2", Dir: kd, Kernel: filepath.Join(kd, "vmlinuz")}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("install a bad kernel: %v, want invalid", err)
	}
	ims, _ := dd.store.ListImages(ctx)
	ks, _ := dd.store.ListKernels(ctx)
	if len(ims) != 1 || len(ks) != 1 {
		t.Errorf("after failed installs: %d images, %d kernels; want 1 each", len(ims), len(ks))
	}
	for _, sub := range []string{"images", "kernels", "tmp"} {
		entries, _ := os.ReadDir(filepath.Join(e.cfg.StateDir, sub))
		if len(entries) != 1 && sub != "tmp" || sub == "tmp" && len(entries) != 0 {
			t.Errorf("%s after failed installs: %d entries", sub, len(entries))
		}
	}
}

// kernel import copies kernel files, or a Debian package's kernel and
// modules, into banger's storage; failures leave nothing.
func TestKernelImport(t *testing.T) {
	t.Parallel()
	e, d := setup(t, nil)
	ctx := testCtx(t)
	mods := filepath.Join(e.dir, "src", "mods")
	kmodtest.WriteRelease(t, filepath.Join(mods, "6.1.0-test"), "6.1.0-test")
	kernel := writeFile(t, filepath.Join(e.dir, "src", "vmlinuz"), kmodtest.Kernel("6.1.0-test"))
	var ph phases
	// Kernel names may hold dots, as the catalogs' do (generic-6.1).
	dotted, err := d.c.KernelImport(ctx, api.KernelImportParams{Name: "generic-6.1", Kernel: e.kernel}, nil)
	if err != nil || dotted.Name != "generic-6.1" {
		t.Fatalf("import generic-6.1: %+v, %v", dotted, err)
	}
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "dotted", Kernel: "generic-6.1"}, nil); err != nil {
		t.Fatalf("create with kernel generic-6.1: %v", err)
	}
	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "dotted"}); err != nil {
		t.Fatal(err)
	}
	if err := d.c.KernelRemove(ctx, "generic-6.1"); err != nil {
		t.Fatal(err)
	}
	k, err := d.c.KernelImport(ctx, api.KernelImportParams{Name: "files", Kernel: kernel, Initrd: e.initrd, ModulesDir: mods}, ph.add)
	if err != nil {
		t.Fatal(err)
	}
	kdir := filepath.Join(e.cfg.StateDir, "kernels", k.ID)
	if !k.Managed || k.Source != api.SourceImported || k.Release != "6.1.0-test" || !strings.HasPrefix(k.Kernel, kdir+"/") ||
		!strings.HasPrefix(k.ModulesDir, kdir+"/") || !strings.HasPrefix(k.Initrd, kdir+"/") {
		t.Fatalf("imported kernel %+v", k)
	}
	if !slices.Contains(ph.names(), "copy kernel") {
		t.Errorf("phases %v", ph.names())
	}
	// An image boots it.
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "withk", Rootfs: e.rootfs, KernelName: "files"}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "v", Image: "withk", Start: true, MemoryMiB: 128, CPUs: 1}, nil); err != nil {
		t.Fatal(err)
	}
	if f := e.fake.byName("v"); f == nil || f.spec.Kernel != k.Kernel {
		t.Errorf("vm booted %+v, want %s", f, k.Kernel)
	}

	for _, tc := range []struct {
		name string
		p    api.KernelImportParams
		kind error
	}{
		{"taken", api.KernelImportParams{Name: "files", Kernel: kernel}, errdefs.ErrAlreadyExists},
		{"nothing", api.KernelImportParams{Name: "x"}, errdefs.ErrInvalid},
		{"both", api.KernelImportParams{Name: "x", Kernel: kernel, Deb: kernel}, errdefs.ErrInvalid},
		{"relative", api.KernelImportParams{Name: "x", Kernel: "vmlinuz"}, errdefs.ErrInvalid},
		{"not a kernel", api.KernelImportParams{Name: "x", Kernel: e.rootfs}, errdefs.ErrInvalid},
		{"wrong modules", api.KernelImportParams{Name: "x", Kernel: e.kernel, ModulesDir: mods}, errdefs.ErrInvalid},
		{"not a deb", api.KernelImportParams{Name: "x", Deb: kernel}, errdefs.ErrInvalid},
		{"missing deb", api.KernelImportParams{Name: "x", Deb: "/nonexistent.deb"}, errdefs.ErrInvalid},
		{"bad name", api.KernelImportParams{Name: "X Y", Kernel: kernel}, errdefs.ErrInvalid},
		{"dots", api.KernelImportParams{Name: "a..b", Kernel: kernel}, errdefs.ErrInvalid},
	} {
		_, err := d.c.KernelImport(ctx, tc.p, nil)
		wireErr(t, tc.name, err, tc.kind)
	}
	if ks, _ := d.c.KernelList(ctx); len(ks) != 2 {
		t.Errorf("kernels after failed imports: %+v", ks)
	}
	for _, sub := range []string{"tmp", "kernels"} {
		ents, _ := os.ReadDir(filepath.Join(e.cfg.StateDir, sub))
		if want := map[string]int{"tmp": 0, "kernels": 1}[sub]; len(ents) != want {
			t.Errorf("%s after failed imports: %d entries, want %d", sub, len(ents), want)
		}
	}
}

// image prune removes unused managed images and kernels that can be had
// again (catalog, OCI, local builds; with --all promoted and imported
// ones too), and interrupted pulls, never what is used, unmanaged, or
// being staged.
func TestImagePrune(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	d := e.start()
	ctx := testCtx(t)
	dd := e.daemon.Load()
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "default", Rootfs: e.rootfs, Kernel: e.kernel}); err != nil {
		t.Fatal(err)
	}
	kernelBytes, _ := os.ReadFile(e.kernel)
	rootfsBytes, _ := os.ReadFile(e.rootfs)
	stage := func(kind, file string, b []byte) string {
		dir, err := dd.stagingDir(kind)
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, file), b)
		return dir
	}
	kernelOf := func(name, source string) store.Kernel {
		dir := stage("kernel", "vmlinuz", kernelBytes)
		k, err := dd.installKernel(ctx, stagedKernel{Name: name, Source: source, Dir: dir, Kernel: filepath.Join(dir, "vmlinuz")})
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	imageOf := func(name, source string, k store.Kernel) {
		dir := stage("image", "rootfs.img", rootfsBytes)
		if _, err := dd.installImage(ctx, stagedImage{Name: name, Source: source, Dir: dir, Rootfs: filepath.Join(dir, "rootfs.img"), KernelID: k.ID}); err != nil {
			t.Fatal(err)
		}
	}
	cat := kernelOf("catk", api.SourceCatalog)
	imp := kernelOf("impk", api.SourceImported)
	kernelOf("unusedcat", api.SourceCatalog)
	imageOf("cat", api.SourceCatalog, cat)
	imageOf("oci", api.SourceOCI, cat)
	imageOf("used", api.SourceOCI, imp)
	imageOf("built", api.SourceLocalBuild, imp)
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "v", Image: "used"}, nil); err != nil {
		t.Fatal(err)
	}
	// A promoted image: managed, source registered.
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "promo", Rootfs: e.rootfs, Kernel: e.initrd}); err == nil {
		t.Fatal("registered an initrd as a kernel")
	}
	other := writeFile(t, filepath.Join(e.dir, "src", "k2"), append([]byte("\x7fELF"), make([]byte, 100)...))
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "promo", Rootfs: e.rootfs, Kernel: other}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.c.ImagePromote(ctx, "promo", nil); err != nil {
		t.Fatal(err)
	}
	left := filepath.Join(e.cfg.StateDir, "tmp", "image-1.partial")
	writeFile(t, filepath.Join(left, "rootfs.img"), make([]byte, 8192))
	busy := stage("image", "rootfs.img", rootfsBytes) // a pull in progress

	res, err := d.c.ImagePrune(ctx, api.PruneParams{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Images, []string{"built", "cat", "oci"}) || !slices.Equal(res.Kernels, []string{"catk", "unusedcat"}) ||
		!slices.Equal(res.PartialFiles, []string{left}) || res.ReclaimedBytes < 3*int64(len(rootfsBytes)) {
		t.Fatalf("prune = %+v", res)
	}
	if _, err := os.Stat(busy); err != nil {
		t.Errorf("prune removed a running pull's staging dir: %v", err)
	}
	names := imageNames(t, d)
	if !slices.Equal(names, []string{"default", "promo", "used"}) {
		t.Errorf("images after prune: %v", names)
	}
	res, err = d.c.ImagePrune(ctx, api.PruneParams{All: true})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Images, []string{"promo"}) || !slices.Equal(res.Kernels, []string{"promo"}) {
		t.Fatalf("prune --all = %+v", res)
	}
	if names := imageNames(t, d); !slices.Equal(names, []string{"default", "used"}) {
		t.Errorf("images after prune --all: %v", names)
	}
	if ks, _ := d.c.KernelList(ctx); len(ks) != 2 {
		t.Errorf("kernels after prune --all: %+v (want default's and impk, used)", ks)
	}
	dd.discardStaging(busy)
}

// A promoted image of the previous schema had its kernel in its own
// directory; its kernel object's files move to kernels/<id> at start, so
// removing the image leaves the kernel whole.
func TestMigratedPromotedKernelMoves(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	ctx := testCtx(t)
	const id = "1234567890abcdef"
	imDir := filepath.Join(e.cfg.StateDir, "images", id)
	copyTo := func(src, name string) string {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		return writeFile(t, filepath.Join(imDir, name), b)
	}
	rootfs, initrd := copyTo(e.rootfs, "rootfs.img"), copyTo(e.initrd, "initrd")
	kernel := writeFile(t, filepath.Join(imDir, "kernel"), kmodtest.Kernel("6.1.0-mig"))
	if err := os.MkdirAll(e.cfg.StateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	db, err := store.CreateAtVersion(ctx, filepath.Join(e.cfg.StateDir, "state.db"), store.Version()-1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `INSERT INTO images (id, name, managed, rootfs, kernel, initrd, modules_dir, size_bytes, created_at, promoted_from)
		VALUES (?, 'old', 1, ?, ?, ?, '', 65536, '2026-01-01T00:00:00Z', '/h/rootfs')`, id, rootfs, kernel, initrd); err != nil {
		t.Fatal(err)
	}
	db.Close()
	d := e.start()
	k, err := d.c.KernelInspect(ctx, "old")
	if err != nil {
		t.Fatal(err)
	}
	kdir := filepath.Join(e.cfg.StateDir, "kernels", k.ID)
	if !k.Managed || k.Kernel != filepath.Join(kdir, "kernel") || k.Initrd != filepath.Join(kdir, "initrd") || k.Release != "6.1.0-mig" {
		t.Fatalf("migrated kernel %+v, want its files in %s", k, kdir)
	}
	if len(k.Files) != 2 || k.Files[0].SHA256 == "" {
		t.Errorf("moved kernel's files %+v, want recorded with sha256", k.Files)
	}
	if err := d.c.ImageRemove(ctx, "old"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(imDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("image dir after rm: %v", err)
	}
	// The kernel still boots an image.
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "again", Rootfs: e.rootfs, KernelName: "old"}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "v", Image: "again", Start: true, MemoryMiB: 128, CPUs: 1}, nil); err != nil {
		t.Fatal(err)
	}
	if f := e.fake.byName("v"); f == nil || f.spec.Kernel != k.Kernel {
		t.Errorf("vm booted %+v, want %s", f, k.Kernel)
	}
}
