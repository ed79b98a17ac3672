package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
)

// A database of the previous schema (images holding their kernel's files) migrates to
// kernel objects: each image gets a kernel of its own with the kernel,
// initrd and modules fingerprints, keeps its rootfs ones, and its VMs
// boot the same files.
func TestMigrateImagesToKernels(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "state.db")
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	stmts := append([]string{}, migrations[:len(migrations)-1]...)
	stmts = append(stmts, fmt.Sprintf(`PRAGMA user_version = %d`, len(migrations)-1),
		`INSERT INTO images (id, name, managed, rootfs, kernel, initrd, modules_dir, size_bytes, created_at, promoted_from, default_user)
			VALUES ('1a', 'old', 1, '/s/images/1a/rootfs.img', '/s/images/1a/kernel', '/s/images/1a/initrd', '/s/images/1a/modules', 100, '2026-01-01T00:00:00Z', '/h/rootfs', 'dev')`,
		`INSERT INTO image_files (image_id, path, role, rel, link, size, mtime_ns, inode, dev, sha256, ctime_ns) VALUES
			('1a', '/s/images/1a/rootfs.img', 'rootfs', '', 0, 100, 1, 2, 3, 'r', 4),
			('1a', '/s/images/1a/kernel', 'kernel', '', 0, 10, 1, 2, 3, 'k', 4),
			('1a', '/s/images/1a/initrd', 'initrd', '', 0, 5, 1, 2, 3, 'i', 4),
			('1a', '/s/images/1a/modules/a.ko', 'modules', 'a.ko', 0, 7, 1, 2, 3, 'm', 4),
			('1a', '/s/images/1a/modules/l', 'modules', 'l', 1, 3, 1, 2, 3, 'l', 4)`,
		`INSERT INTO vms (id, name, image_id, state, cpus, memory_mib, disk_bytes, disk_path, disk_format, disk_strategy, vmm, accel_wanted, dir, created_at)
			VALUES ('2b', 'box', '1a', 'stopped', 1, 512, 1024, '/d', 'qcow2', 'qcow2-overlay', 'qemu', 'auto', '/x', '2026-01-01T00:00:00Z')`)
	for _, q := range stmts {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	db.Close()
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	im, err := s.GetImage(ctx, "old")
	if err != nil {
		t.Fatal(err)
	}
	if im.KernelID != "1a" || im.KernelName != "old" || im.Kernel != "/s/images/1a/kernel" || im.Initrd != "/s/images/1a/initrd" ||
		im.ModulesDir != "/s/images/1a/modules" || im.Source != "registered" || !im.Managed || im.DefaultUser != "dev" || im.PromotedFrom != "/h/rootfs" {
		t.Fatalf("migrated image: %+v", im)
	}
	k, err := s.GetKernel(ctx, "old")
	if err != nil {
		t.Fatal(err)
	}
	if !k.Managed || k.Kernel != im.Kernel || k.SizeBytes != 10+5+7 || k.Source != "registered" {
		t.Fatalf("migrated kernel: %+v", k)
	}
	imFiles, _ := s.ImageFiles(ctx, "1a")
	if len(imFiles) != 1 || imFiles[0].Role != "rootfs" {
		t.Fatalf("image files after migration: %+v", imFiles)
	}
	kFiles, _ := s.KernelFiles(ctx, "1a")
	roles := []string{}
	for _, f := range kFiles {
		roles = append(roles, f.Role)
	}
	if strings.Join(roles, ",") != "initrd,kernel,modules,modules" || kFiles[0].SHA256 != "i" || kFiles[0].CTimeNS != 4 {
		t.Fatalf("kernel files after migration: %+v", kFiles)
	}
	v, err := s.GetVM(ctx, "box")
	if err != nil {
		t.Fatal(err)
	}
	if v.KernelID != "" || v.KernelName != "old" || v.ImageName != "old" || v.Cmd == nil || len(v.Cmd) != 0 || v.Restart != "" {
		t.Fatalf("migrated vm: %+v", v)
	}
	if err := s.DeleteKernel(ctx, "1a"); !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "image(s) old") {
		t.Fatalf("delete a kernel in use: %v", err)
	}
}

func TestKernels(t *testing.T) {
	ctx := context.Background()
	s, _ := openTest(t)
	now := time.Now().Truncate(time.Millisecond)
	files := []ImageFile{{Path: "/k/vmlinuz", Role: "kernel", Size: 10, MTimeNS: 1, Inode: 2, Dev: 3, SHA256: "ab"}}
	k := Kernel{ID: "1k", Name: "deb", Managed: true, Source: "imported", Version: "1", Release: "6.1.0-9-cloud-amd64",
		Kernel: "/k/vmlinuz", ModulesDir: "/k/modules", Ref: "r", Digest: "d", SizeBytes: 10, CreatedAt: now, Files: files}
	if err := s.InsertKernel(ctx, k); err != nil {
		t.Fatal(err)
	}
	if err := s.InsertKernel(ctx, Kernel{ID: "2k", Name: "deb", Kernel: "/x", CreatedAt: now}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("duplicate kernel name: %v", err)
	}
	got, err := s.GetKernel(ctx, "deb")
	if err != nil {
		t.Fatal(err)
	}
	want := k
	want.Files = nil
	if !got.CreatedAt.Equal(now) || func() bool { got.CreatedAt = now; return !reflect.DeepEqual(got, want) }() {
		t.Fatalf("kernel round trip: %+v, want %+v", got, want)
	}
	if fs, _ := s.KernelFiles(ctx, "1k"); !reflect.DeepEqual(fs, files) {
		t.Fatalf("kernel files: %+v", fs)
	}
	if _, err := s.GetKernel(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("missing kernel: %v", err)
	}
	// An image naming a missing kernel is refused; image and kernel go in together.
	if err := s.InsertImage(ctx, Image{ID: "1i", Name: "img", Rootfs: "/r", KernelID: "nope", CreatedAt: now}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("image with a missing kernel: %v", err)
	}
	bad := Kernel{ID: "3k", Name: "deb", Kernel: "/x", CreatedAt: now}
	if err := s.InsertImageAndKernel(ctx, Image{ID: "1i", Name: "img", Rootfs: "/r", KernelID: "3k", CreatedAt: now}, &bad); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("image with a kernel of a taken name: %v", err)
	}
	if _, err := s.GetImage(ctx, "img"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("image inserted although its kernel failed: %v", err)
	}
	im := Image{ID: "1i", Name: "img", Rootfs: "/r", KernelID: "1k", CreatedAt: now, Source: "oci", Version: "v", Ref: "debian:bookworm",
		Digest: "sha256:x", ConfigJSON: `{"cmd":["sh"]}`}
	if err := s.InsertImage(ctx, im); err != nil {
		t.Fatal(err)
	}
	gotIm, err := s.GetImage(ctx, "img")
	if err != nil || gotIm.KernelName != "deb" || gotIm.Kernel != "/k/vmlinuz" || gotIm.ModulesDir != "/k/modules" || gotIm.Source != "oci" ||
		gotIm.Version != "v" || gotIm.Ref != "debian:bookworm" || gotIm.Digest != "sha256:x" || gotIm.ConfigJSON != `{"cmd":["sh"]}` {
		t.Fatalf("image round trip: %+v, %v", gotIm, err)
	}
	other := Kernel{ID: "4k", Name: "other", Kernel: "/o", CreatedAt: now}
	if err := s.InsertKernel(ctx, other); err != nil {
		t.Fatal(err)
	}
	vm := VM{ID: "1v", Name: "box", ImageID: "1i", KernelID: "4k", State: "stopped", CreatedAt: now, Cmd: []string{"nginx", "-g"}, Restart: "always"}
	if err := s.InsertVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	gotVM, err := s.GetVM(ctx, "box")
	if err != nil || gotVM.KernelID != "4k" || gotVM.KernelName != "other" || !reflect.DeepEqual(gotVM.Cmd, vm.Cmd) || gotVM.Restart != "always" {
		t.Fatalf("vm round trip: %+v, %v", gotVM, err)
	}
	if err := s.InsertVM(ctx, VM{ID: "2v", Name: "b2", ImageID: "1i", KernelID: "nope", State: "stopped", CreatedAt: now}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("vm with a missing kernel: %v", err)
	}
	ims, vms, err := s.KernelUsers(ctx, "4k")
	if err != nil || len(ims) != 0 || !reflect.DeepEqual(vms, []string{"box"}) {
		t.Fatalf("users of other = %v, %v, %v", ims, vms, err)
	}
	if err := s.DeleteKernel(ctx, "4k"); !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "VM(s) box") {
		t.Fatalf("delete a kernel a VM boots: %v", err)
	}
	if err := s.DeleteKernel(ctx, "1k"); !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "image(s) img") {
		t.Fatalf("delete a kernel an image boots: %v", err)
	}
	if err := s.DeleteVM(ctx, "1v"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteKernel(ctx, "4k"); err != nil {
		t.Fatalf("delete an unused kernel: %v", err)
	}
	// Promote: image and kernel updated at once.
	gotIm.Managed, gotIm.Rootfs = true, "/s/rootfs.img"
	k.Managed, k.Kernel, k.Files = true, "/s/kernel", []ImageFile{}
	if err := s.UpdateImageAndKernel(ctx, gotIm, &k); err != nil {
		t.Fatal(err)
	}
	if back, _ := s.GetImage(ctx, "img"); back.Kernel != "/s/kernel" || back.Rootfs != "/s/rootfs.img" {
		t.Fatalf("after UpdateImageAndKernel: %+v", back)
	}
	if fs, _ := s.KernelFiles(ctx, "1k"); len(fs) != 0 {
		t.Fatalf("kernel files not replaced: %+v", fs)
	}
	ks, err := s.ListKernels(ctx)
	if err != nil || len(ks) != 1 || ks[0].Name != "deb" {
		t.Fatalf("list kernels = %+v, %v", ks, err)
	}
	if err := s.DeleteImage(ctx, "1i"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteKernel(ctx, "1k"); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := s.db.QueryRow(`SELECT COUNT(*) FROM kernel_files`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("%d kernel file rows left (%v)", n, err)
	}
}
