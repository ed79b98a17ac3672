package imagefile

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/kmod/kmodtest"
)

const mib = int64(1) << 20

// fakeBzImage returns bytes that pass the bzImage header check, for
// kernel release 6.1.0-test.
func fakeBzImage(size int) []byte {
	b := bytes.Repeat([]byte{0x90}, size)
	copy(b, kmodtest.Kernel("6.1.0-test"))
	return b
}

func writeFile(t *testing.T, path string, data []byte, mode os.FileMode) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

// sparseFile makes a file of size bytes with 1 MiB of data at each offset.
func sparseFile(t *testing.T, path string, size int64, dataAt ...int64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for i, off := range dataAt {
		if _, err := f.WriteAt(bytes.Repeat([]byte{byte(i + 1), 0xa5}, int(mib/2)), off); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// extMagic stamps an ext2/3/4 superblock magic into the file at path.
func extMagic(t *testing.T, path string) string {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte{0x53, 0xef}, 0x438); err != nil {
		t.Fatal(err)
	}
	return path
}

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func sameContent(t *testing.T, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(x, y) {
		t.Errorf("%s and %s differ", a, b)
	}
}

// fixture is a valid set of artifacts in a temporary directory.
type fixture struct {
	dir string
	a   Artifacts
}

func newFixture(t *testing.T) fixture {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	mods := filepath.Join(src, "lib", "modules", "6.1.0-test")
	writeFile(t, filepath.Join(mods, "kernel", "drivers", "virtio", "virtio_mmio.ko"), bytes.Repeat([]byte("mmio"), 5000), 0o644)
	writeFile(t, filepath.Join(mods, "kernel", "drivers", "block", "virtio_blk.ko"), bytes.Repeat([]byte("blk"), 3000), 0o600)
	writeFile(t, filepath.Join(mods, "modules.dep"), []byte("kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_mmio.ko\n"), 0o644)
	writeFile(t, filepath.Join(mods, "tool.sh"), []byte("#!/bin/sh\n"), 0o755)
	if err := os.Symlink("kernel/drivers/virtio/virtio_mmio.ko", filepath.Join(mods, "mmio-link.ko")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/nonexistent/build", filepath.Join(mods, "build")); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(mods, "kernel", "drivers", "block"), 0o555); err != nil {
		t.Fatal(err)
	}
	a := Artifacts{
		Rootfs:     extMagic(t, sparseFile(t, filepath.Join(src, "rootfs.ext4"), 64*mib, 0, 20*mib, 40*mib)),
		Kernel:     writeFile(t, filepath.Join(src, "vmlinuz"), fakeBzImage(300_000), 0o644),
		Initrd:     writeFile(t, filepath.Join(src, "initrd.img"), bytes.Repeat([]byte("initrd"), 100_000), 0o644),
		ModulesDir: mods,
	}
	return fixture{dir: dir, a: a}
}

func TestValidateArtifactsOK(t *testing.T) {
	f := newFixture(t)
	if err := ValidateArtifacts(f.a); err != nil {
		t.Fatal(err)
	}
	// Optional parts may be left out.
	if err := ValidateArtifacts(Artifacts{Rootfs: f.a.Rootfs, Kernel: f.a.Kernel}); err != nil {
		t.Fatal(err)
	}
	// An ELF vmlinux (Firecracker) is a kernel too, and symlinks are followed.
	elf := writeFile(t, filepath.Join(f.dir, "vmlinux"), append([]byte("\x7fELF\x02\x01\x01"), make([]byte, 100)...), 0o644)
	link := filepath.Join(f.dir, "vmlinux-link")
	if err := os.Symlink(elf, link); err != nil {
		t.Fatal(err)
	}
	if err := ValidateArtifacts(Artifacts{Rootfs: f.a.Rootfs, Kernel: link}); err != nil {
		t.Fatal(err)
	}
	// Unclean absolute paths are fine.
	if err := ValidateArtifacts(Artifacts{Rootfs: f.a.Rootfs, Kernel: filepath.Dir(f.a.Kernel) + "/./x/../vmlinuz"}); err != nil {
		t.Fatal(err)
	}
}

func TestValidateArtifactsErrors(t *testing.T) {
	f := newFixture(t)
	ok := f.a
	notKernel := writeFile(t, filepath.Join(f.dir, "notakernel"), bytes.Repeat([]byte("text"), 1000), 0o644)
	tiny := writeFile(t, filepath.Join(f.dir, "tiny"), []byte("HdrS"), 0o644)
	empty := writeFile(t, filepath.Join(f.dir, "empty.img"), nil, 0o644)
	dangling := filepath.Join(f.dir, "dangling")
	if err := os.Symlink(filepath.Join(f.dir, "gone"), dangling); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(f.dir, "x", "vmlinuz")

	with := func(mod func(*Artifacts)) Artifacts { a := ok; mod(&a); return a }
	cases := []struct {
		name   string
		a      Artifacts
		want   string // exact message
		target error
	}{
		{"missing kernel", with(func(a *Artifacts) { a.Kernel = missing }), `kernel "` + missing + `": no such file`, fs.ErrNotExist},
		{"no rootfs", with(func(a *Artifacts) { a.Rootfs = "" }), `rootfs: required`, ErrInvalid},
		{"no kernel", with(func(a *Artifacts) { a.Kernel = "" }), `kernel: required`, ErrInvalid},
		{"relative kernel", with(func(a *Artifacts) { a.Kernel = "boot/vmlinuz" }), `kernel "boot/vmlinuz": path must be absolute`, ErrInvalid},
		{"relative modules", with(func(a *Artifacts) { a.ModulesDir = "./lib/modules" }), `modules "./lib/modules": path must be absolute`, ErrInvalid},
		{"directory kernel", with(func(a *Artifacts) { a.Kernel = f.dir }), `kernel "` + f.dir + `": not a regular file (a directory)`, ErrInvalid},
		{"device rootfs", with(func(a *Artifacts) { a.Rootfs = "/dev/null" }), `rootfs "/dev/null": not a regular file (a character device)`, ErrInvalid},
		{"device initrd", with(func(a *Artifacts) { a.Initrd = "/dev/zero" }), `initrd "/dev/zero": not a regular file (a character device)`, ErrInvalid},
		{"not a kernel", with(func(a *Artifacts) { a.Kernel = notKernel }), `kernel "` + notKernel + `": not a Linux kernel image (no bzImage header, not ELF)`, ErrInvalid},
		{"tiny kernel", with(func(a *Artifacts) { a.Kernel = tiny }), `kernel "` + tiny + `": not a Linux kernel image (no bzImage header, not ELF)`, ErrInvalid},
		{"empty rootfs", with(func(a *Artifacts) { a.Rootfs = empty }), `rootfs "` + empty + `": empty file`, ErrInvalid},
		{"modules is a file", with(func(a *Artifacts) { a.ModulesDir = ok.Kernel }), `modules "` + ok.Kernel + `": not a directory (a regular file)`, ErrInvalid},
		{"missing initrd", with(func(a *Artifacts) { a.Initrd = missing }), `initrd "` + missing + `": no such file`, fs.ErrNotExist},
		{"dangling symlink", with(func(a *Artifacts) { a.Initrd = dangling }), `initrd "` + dangling + `": dangling symlink`, fs.ErrNotExist},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateArtifacts(tc.a)
			if err == nil {
				t.Fatal("want an error")
			}
			if err.Error() != tc.want {
				t.Errorf("error = %q\n      want %q", err, tc.want)
			}
			if !errors.Is(err, tc.target) {
				t.Errorf("errors.Is(%v, %v) = false", err, tc.target)
			}
			var ae *ArtifactError
			if !errors.As(err, &ae) {
				t.Errorf("want an *ArtifactError, got %T", err)
			}
		})
	}

	// Every problem is reported at once.
	err := ValidateArtifacts(Artifacts{Kernel: notKernel, Initrd: "rel"})
	for _, want := range []string{"rootfs: required", "not a Linux kernel", `initrd "rel": path must be absolute`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("joined error %v lacks %q", err, want)
		}
	}
}

func TestPromote(t *testing.T) {
	f := newFixture(t)
	images := filepath.Join(f.dir, "images")
	if err := os.Mkdir(images, 0o755); err != nil {
		t.Fatal(err)
	}
	dest := filepath.Join(images, "debian")

	var reports []Progress
	got, err := Promote(t.Context(), f.a, dest, func(p Progress) { reports = append(reports, p) })
	if err != nil {
		t.Fatal(err)
	}
	want := Artifacts{
		Rootfs:     filepath.Join(dest, RootfsName),
		Kernel:     filepath.Join(dest, KernelName),
		Initrd:     filepath.Join(dest, InitrdName),
		ModulesDir: filepath.Join(dest, ModulesName),
	}
	if got != want {
		t.Fatalf("Promote = %+v, want %+v", got, want)
	}
	if err := ValidateArtifacts(got); err != nil {
		t.Errorf("promoted artifacts don't validate: %v", err)
	}
	if st, err := os.Stat(dest); err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("dest dir: %v, %v; want mode 0755", st, err)
	}
	sameContent(t, f.a.Rootfs, got.Rootfs)
	sameContent(t, f.a.Kernel, got.Kernel)
	sameContent(t, f.a.Initrd, got.Initrd)
	if a := allocated(t, got.Rootfs); a > 4*mib {
		t.Errorf("promoted rootfs allocates %d bytes; want about 3 MiB (sparse)", a)
	}

	// Modules: content, modes, symlinks.
	for _, rel := range []string{"kernel/drivers/virtio/virtio_mmio.ko", "kernel/drivers/block/virtio_blk.ko", "modules.dep", "tool.sh"} {
		sameContent(t, filepath.Join(f.a.ModulesDir, rel), filepath.Join(got.ModulesDir, rel))
		s1, _ := os.Stat(filepath.Join(f.a.ModulesDir, rel))
		s2, _ := os.Stat(filepath.Join(got.ModulesDir, rel))
		if s1.Mode() != s2.Mode() {
			t.Errorf("%s: mode %v, want %v", rel, s2.Mode(), s1.Mode())
		}
	}
	if st, _ := os.Stat(filepath.Join(got.ModulesDir, "kernel/drivers/block")); st.Mode().Perm() != 0o555 {
		t.Errorf("read-only dir mode = %v, want 0555", st.Mode().Perm())
	}
	for link, target := range map[string]string{"mmio-link.ko": "kernel/drivers/virtio/virtio_mmio.ko", "build": "/nonexistent/build"} {
		if l, err := os.Readlink(filepath.Join(got.ModulesDir, link)); err != nil || l != target {
			t.Errorf("symlink %s = %q, %v; want %q", link, l, err, target)
		}
	}
	srcSize, err := DirSize(f.a.ModulesDir)
	if err != nil {
		t.Fatal(err)
	}
	if dstSize, err := DirSize(got.ModulesDir); err != nil || dstSize != srcSize {
		t.Errorf("DirSize(modules copy) = %d, %v; want %d", dstSize, err, srcSize)
	}

	// Progress: phases in order, monotonic, each ending at its total.
	totals := map[string]int64{FieldRootfs: 64 * mib, FieldKernel: 300_000, FieldInitrd: 600_000, FieldModules: srcSize}
	var phases []string
	last := map[string]int64{}
	for _, p := range reports {
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
		}
		if p.Total != totals[p.Phase] {
			t.Errorf("%s: total %d, want %d", p.Phase, p.Total, totals[p.Phase])
		}
		if p.Done < last[p.Phase] || p.Done > p.Total {
			t.Errorf("%s: done %d after %d (total %d)", p.Phase, p.Done, last[p.Phase], p.Total)
		}
		last[p.Phase] = p.Done
	}
	if strings.Join(phases, ",") != "rootfs,kernel,initrd,modules" {
		t.Errorf("phases = %v", phases)
	}
	for phase, total := range totals {
		if last[phase] != total {
			t.Errorf("%s: progress ended at %d, want %d", phase, last[phase], total)
		}
	}
	noLeftovers(t, images, "debian")

	// Promoting again onto the same name fails and leaves the image alone.
	if _, err := Promote(t.Context(), f.a, dest, nil); !errors.Is(err, fs.ErrExist) {
		t.Errorf("second Promote: err = %v, want fs.ErrExist", err)
	}
	sameContent(t, f.a.Kernel, got.Kernel)
	noLeftovers(t, images, "debian")
}

func TestPromoteMinimal(t *testing.T) {
	f := newFixture(t)
	dest := filepath.Join(f.dir, "img")
	got, err := Promote(t.Context(), Artifacts{Rootfs: f.a.Rootfs, Kernel: f.a.Kernel}, dest, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.Initrd != "" || got.ModulesDir != "" {
		t.Errorf("optional artifacts should stay empty: %+v", got)
	}
	entries, _ := os.ReadDir(dest)
	if len(entries) != 2 {
		t.Errorf("dest has %d entries, want 2", len(entries))
	}
}

// noLeftovers checks that dir holds only the given names (no temporary
// directories).
func noLeftovers(t *testing.T, dir string, names ...string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	if strings.Join(got, ",") != strings.Join(names, ",") {
		t.Errorf("%s holds %v, want %v", dir, got, names)
	}
}

func TestPromoteCancel(t *testing.T) {
	f := newFixture(t)
	images := filepath.Join(f.dir, "images")
	if err := os.Mkdir(images, 0o755); err != nil {
		t.Fatal(err)
	}
	dest := filepath.Join(images, "img")

	t.Run("during rootfs copy", func(t *testing.T) {
		// Enough data for several copy steps.
		big := extMagic(t, sparseFile(t, filepath.Join(f.dir, "big.img"), 64*mib, 0, 8*mib, 16*mib, 24*mib, 32*mib, 40*mib, 48*mib, 56*mib))
		a := f.a
		a.Rootfs = big
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		var phases []string
		_, err := Promote(ctx, a, dest, func(p Progress) {
			phases = append(phases, p.Phase)
			if p.Phase == FieldRootfs && p.Done < p.Total {
				cancel()
			}
		})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
		for _, p := range phases {
			if p != FieldRootfs {
				t.Errorf("phase %s reported after cancel", p)
			}
		}
		noLeftovers(t, images)
	})
	t.Run("during modules copy", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		_, err := Promote(ctx, f.a, dest, func(p Progress) {
			if p.Phase == FieldInitrd && p.Done == p.Total {
				cancel()
			}
		})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
		noLeftovers(t, images)
	})
	t.Run("before start", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		if _, err := Promote(ctx, f.a, dest, nil); !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
		noLeftovers(t, images)
	})
}

func TestPromoteBadInput(t *testing.T) {
	f := newFixture(t)
	images := filepath.Join(f.dir, "images")
	if err := os.Mkdir(images, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Promote(t.Context(), f.a, "images/x", nil); err == nil || !strings.Contains(err.Error(), "absolute") {
		t.Errorf("relative dest: err = %v", err)
	}
	if _, err := Promote(t.Context(), f.a, filepath.Join(images, "no", "parent"), nil); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing parent: err = %v", err)
	}
	bad := f.a
	bad.Kernel = "/dev/null"
	if _, err := Promote(t.Context(), bad, filepath.Join(images, "x"), nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("invalid artifacts: err = %v", err)
	}
	// An existing empty directory is not overwritten either.
	existing := filepath.Join(images, "existing")
	if err := os.Mkdir(existing, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := Promote(t.Context(), f.a, existing, nil); !errors.Is(err, fs.ErrExist) {
		t.Errorf("existing dest: err = %v", err)
	}
	noLeftovers(t, images, "existing")

	// A FIFO in the modules tree is refused, and nothing is left behind.
	if err := syscall.Mkfifo(filepath.Join(f.a.ModulesDir, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Promote(t.Context(), f.a, filepath.Join(images, "y"), nil); err == nil || !strings.Contains(err.Error(), "named pipe") {
		t.Errorf("fifo in modules: err = %v", err)
	}
	noLeftovers(t, images, "existing")
}

func TestRenameNoReplace(t *testing.T) {
	dir := t.TempDir()
	from, to := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, d := range []string{from, to} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := renameNoReplace(from, to); !errors.Is(err, fs.ErrExist) {
		t.Errorf("rename onto an empty dir: err = %v, want fs.ErrExist", err)
	}
}

func TestRemovePartial(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{".debian.promote-123", "debian", ".hidden", "x.promote-1"} {
		if err := os.MkdirAll(filepath.Join(dir, d, "sub"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	removed, err := RemovePartial(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || filepath.Base(removed[0]) != ".debian.promote-123" {
		t.Errorf("removed %v", removed)
	}
	noLeftovers(t, dir, ".hidden", "debian", "x.promote-1")
	if r, err := RemovePartial(filepath.Join(dir, "missing")); err != nil || r != nil {
		t.Errorf("missing dir: %v, %v", r, err)
	}
}

func TestDirSize(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "a"), make([]byte, 1000), 0o644)
	writeFile(t, filepath.Join(dir, "sub", "b"), make([]byte, 234), 0o644)
	if err := os.Symlink("a", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if n, err := DirSize(dir); err != nil || n != 1234 {
		t.Errorf("DirSize = %d, %v; want 1234", n, err)
	}
	if _, err := DirSize(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing dir: err = %v", err)
	}
}

func TestReporterThrottles(t *testing.T) {
	now := time.Unix(1000, 0)
	var got []Progress
	r := &reporter{fn: func(p Progress) { got = append(got, p) }, now: func() time.Time { return now }}
	step := func(d time.Duration, done int64) { now = now.Add(d); r.update(FieldRootfs, done, 100) }
	step(0, 10)                     // first report goes out
	step(50*time.Millisecond, 20)   // too soon
	step(60*time.Millisecond, 30)   // 110 ms after the first: out
	step(100*time.Millisecond, 25)  // going back is clamped
	step(100*time.Millisecond, 500) // beyond total is clamped
	r.end(FieldRootfs, 100)
	now = now.Add(time.Millisecond)
	r.update(FieldKernel, 5, 50) // too soon after the end of the last phase
	r.end(FieldKernel, 50)
	want := []Progress{
		{FieldRootfs, 10, 100}, {FieldRootfs, 30, 100}, {FieldRootfs, 30, 100}, {FieldRootfs, 100, 100}, {FieldRootfs, 100, 100},
		{FieldKernel, 50, 50},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("report %d = %v, want %v", i, got[i], want[i])
		}
	}
}

func TestRootfsFormatRefused(t *testing.T) {
	f := newFixture(t)
	dir := t.TempDir()
	mk := func(name string, off int64, magic []byte) string {
		p := sparseFile(t, filepath.Join(dir, name), 1*mib)
		g, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		if _, err := g.WriteAt(magic, off); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, c := range []struct {
		path, format, want string
	}{
		{mk("disk.qcow2", 0, []byte("QFI\xfb")), FormatQcow2, "qemu-img convert -O raw"},
		{mk("root.xfs", 0, []byte("XFSB")), FormatXFS, "ext4 root filesystems only"},
		{mk("disk.img", 0x1fe, []byte{0x55, 0xaa}), FormatPartitioned, "not a disk with a partition table"},
		{mk("random.bin", 0, []byte("hello")), FormatUnknown, "no ext2/3/4 superblock"},
	} {
		if got, err := RootfsFormat(c.path); err != nil || got != c.format {
			t.Errorf("RootfsFormat(%s) = %q, %v; want %q", filepath.Base(c.path), got, err, c.format)
		}
		err := ValidateArtifacts(Artifacts{Rootfs: c.path, Kernel: f.a.Kernel})
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want ErrInvalid mentioning %q", filepath.Base(c.path), err, c.want)
		}
	}
	if got, _ := RootfsFormat(f.a.Rootfs); got != FormatExt {
		t.Errorf("fixture rootfs detected as %q", got)
	}
}
