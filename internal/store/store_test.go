package store

import (
	"context"
	"database/sql"
	"errors"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
)

func openTest(t *testing.T) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

func TestMigrateAndReopen(t *testing.T) {
	ctx := context.Background()
	s, path := openTest(t)
	v, err := s.SchemaVersion(ctx)
	if err != nil || v != len(migrations) {
		t.Fatalf("schema version = %d, %v; want %d", v, err, len(migrations))
	}
	var mode string
	if err := s.db.QueryRow(`PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode = %q, %v; want wal", mode, err)
	}
	if err := s.InsertImage(ctx, Image{ID: "i1", Name: "img", Rootfs: "/r", Kernel: "/k", CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s2, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := s2.GetImage(ctx, "img"); err != nil {
		t.Fatalf("image lost across reopen: %v", err)
	}
}

func TestRefusesNewerSchema(t *testing.T) {
	ctx := context.Background()
	s, path := openTest(t)
	if _, err := s.db.Exec(`PRAGMA user_version = 99`); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := Open(ctx, path); err == nil {
		t.Fatal("opened a database with a newer schema")
	}
}

func TestImagesAndVMs(t *testing.T) {
	ctx := context.Background()
	s, _ := openTest(t)
	now := time.Now().Truncate(time.Millisecond)
	if err := s.InsertImage(ctx, Image{ID: "i1", Name: "img", Rootfs: "/r", Kernel: "/k", CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	err := s.InsertImage(ctx, Image{ID: "i2", Name: "img", Rootfs: "/r", Kernel: "/k", CreatedAt: now})
	if !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("duplicate image name: err = %v, want ErrAlreadyExists", err)
	}
	if _, err := s.GetImage(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("missing image: err = %v", err)
	}
	vm := VM{ID: "v1", Name: "box", ImageID: "i1", State: "stopped", CPUs: 2, MemoryMiB: 512, DiskBytes: 1 << 30,
		DiskPath: "/d", DiskFormat: "qcow2", DiskStrategy: "qcow2-overlay", VMM: "qemu", AccelWanted: "auto", Dir: "/x", CreatedAt: now}
	if err := s.InsertVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if err := s.InsertVM(ctx, VM{ID: "v2", Name: "box", ImageID: "i1", State: "stopped", CreatedAt: now}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("duplicate vm name: err = %v", err)
	}
	if err := s.InsertVM(ctx, VM{ID: "v3", Name: "other", ImageID: "missing", State: "stopped", CreatedAt: now}); err == nil {
		t.Fatal("VM with unknown image id accepted (foreign keys off?)")
	}
	if err := s.DeleteImage(ctx, "i1"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("delete image in use: err = %v", err)
	}
	vm.State, vm.Handle, vm.StartedAt = "running", `{"pid":1}`, now
	if err := s.UpdateVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetVM(ctx, "v1")
	if err != nil {
		t.Fatal(err)
	}
	if got.State != "running" || got.Handle != `{"pid":1}` || !got.StartedAt.Equal(now) || got.DiskBytes != 1<<30 || got.ImageName != "img" {
		t.Fatalf("vm round trip: %+v", got)
	}
	vms, err := s.ListVMs(ctx)
	if err != nil || len(vms) != 1 {
		t.Fatalf("list = %v, %v", vms, err)
	}
	if !taken(s, "box") || taken(s, "free") {
		t.Fatal("VMNameTaken wrong")
	}
	if err := s.DeleteVM(ctx, "v1"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteImage(ctx, "i1"); err != nil {
		t.Fatalf("delete unused image: %v", err)
	}
}

func taken(s *Store, name string) bool {
	t, err := s.VMNameTaken(context.Background(), name)
	if err != nil {
		panic(err)
	}
	return t
}

func TestVMNamesAndIDsDoNotMix(t *testing.T) {
	ctx := context.Background()
	s, _ := openTest(t)
	now := time.Now()
	if err := s.InsertImage(ctx, Image{ID: "i1", Name: "img", Rootfs: "/r", Kernel: "/k", CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	// An old row whose name is another VM's id (before names were checked).
	for _, v := range []VM{{ID: "0123456789abcdef", Name: "abcdef0123456789"}, {ID: "abcdef0123456789", Name: "first"}} {
		v.ImageID, v.State, v.CreatedAt = "i1", "stopped", now
		if err := s.InsertVM(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	if !taken(s, "0123456789abcdef") {
		t.Fatal("a name equal to another VM's id is reported free")
	}
	got, err := s.GetVM(ctx, "abcdef0123456789")
	if err != nil || got.Name != "first" {
		t.Fatalf("GetVM(id) = %q, %v; want the VM with that id (first)", got.Name, err)
	}
}

func TestMarkStoppedOnlyWithTheSameHandle(t *testing.T) {
	ctx := context.Background()
	s, _ := openTest(t)
	now := time.Now()
	if err := s.InsertImage(ctx, Image{ID: "i1", Name: "img", Rootfs: "/r", Kernel: "/k", CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	if err := s.InsertVM(ctx, VM{ID: "v1", Name: "box", ImageID: "i1", State: "running", Handle: `{"pid":2}`, CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	if changed, err := s.MarkStopped(ctx, "v1", `{"pid":1}`); err != nil || changed {
		t.Fatalf("MarkStopped with a stale handle = %v, %v; want no change", changed, err)
	}
	if v, _ := s.GetVM(ctx, "v1"); v.State != "running" || v.Handle != `{"pid":2}` {
		t.Fatalf("after a stale MarkStopped: %+v", v)
	}
	if changed, err := s.MarkStopped(ctx, "v1", `{"pid":2}`); err != nil || !changed {
		t.Fatalf("MarkStopped with the recorded handle = %v, %v; want a change", changed, err)
	}
	if v, _ := s.GetVM(ctx, "v1"); v.State != "stopped" || v.Handle != "" {
		t.Fatalf("after MarkStopped: %+v", v)
	}
}

// A failing query is an error, not "the name is free".
func TestVMNameTakenReportsErrors(t *testing.T) {
	s, _ := openTest(t)
	s.Close()
	if taken, err := s.VMNameTaken(context.Background(), "x"); err == nil {
		t.Fatalf("VMNameTaken on a closed store = %v, nil; want an error", taken)
	}
}

// Image files are written with the image, replaced on update, read back
// whole, and go with the image.
func TestImageFiles(t *testing.T) {
	ctx := context.Background()
	s, _ := openTest(t)
	files := []ImageFile{
		{Path: "/img/kernel", Role: "kernel", Size: 10, MTimeNS: 1_700_000_000_123_456_789, CTimeNS: 1_700_000_001_000_000_007, Inode: 1 << 40, Dev: 2049},
		{Path: "/img/mods/a.ko", Role: "modules", Rel: "a.ko", Link: true, Size: 3, MTimeNS: 5, Inode: 7, Dev: 8, SHA256: "ab"},
	}
	im := Image{ID: "i1", Name: "img", Rootfs: "/img/rootfs", Kernel: "/img/kernel", CreatedAt: time.Now(), Files: files}
	if err := s.InsertImage(ctx, im); err != nil {
		t.Fatal(err)
	}
	got, err := s.ImageFiles(ctx, "i1")
	if err != nil || !reflect.DeepEqual(got, files) {
		t.Fatalf("files = %+v, %v; want %+v", got, err, files)
	}
	// An update without Files keeps them; with Files replaces them.
	im.Files = nil
	im.Managed, im.PromotedFrom = true, "/img/rootfs"
	if err := s.UpdateImage(ctx, im); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.ImageFiles(ctx, "i1"); len(got) != 2 {
		t.Errorf("files after an update without Files: %+v", got)
	}
	if back, err := s.GetImage(ctx, "i1"); err != nil || back.PromotedFrom != "/img/rootfs" || !back.Managed {
		t.Errorf("image after update: %+v, %v", back, err)
	}
	im.Files = files[:1]
	if err := s.UpdateImage(ctx, im); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.ImageFiles(ctx, "i1"); !reflect.DeepEqual(got, files[:1]) {
		t.Errorf("files after replacing: %+v", got)
	}
	if err := s.DeleteImage(ctx, "i1"); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := s.db.QueryRow(`SELECT COUNT(*) FROM image_files`).Scan(&n); err != nil || n != 0 {
		t.Errorf("%d file rows left after the image was deleted (%v)", n, err)
	}
	if err := s.UpdateImage(ctx, im); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("update of a deleted image: %v, want ErrNotFound", err)
	}
}

// A database made by the first schema is migrated: its images keep their
// fields and have no recorded files yet.
func TestMigrateFromVersion1(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "state.db")
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{migrations[0], `PRAGMA user_version = 1`,
		`INSERT INTO images (id, name, rootfs, kernel, created_at) VALUES ('i1', 'old', '/r', '/k', '2026-01-01T00:00:00Z')`} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	im, err := s.GetImage(ctx, "old")
	if err != nil || im.Rootfs != "/r" || im.PromotedFrom != "" {
		t.Fatalf("migrated image: %+v, %v", im, err)
	}
	if files, err := s.ImageFiles(ctx, "i1"); err != nil || len(files) != 0 {
		t.Errorf("migrated image files: %+v, %v", files, err)
	}
}

func TestGetImagePrefersID(t *testing.T) {
	ctx := context.Background()
	s, _ := openTest(t)
	now := time.Now()
	// The row named like the other's id comes first in the table.
	for _, im := range []Image{{ID: "0123456789abcdef", Name: "abcdef0123456789"}, {ID: "abcdef0123456789", Name: "first"}} {
		im.Rootfs, im.Kernel, im.CreatedAt = "/r", "/k", now
		if err := s.InsertImage(ctx, im); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.GetImage(ctx, "abcdef0123456789")
	if err != nil || got.Name != "first" {
		t.Fatalf("GetImage(id) = %q, %v; want the image with that id (first)", got.Name, err)
	}
}
