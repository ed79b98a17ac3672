package guestagent_test

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/guestagent"
)

// buildTree creates a small tree with various modes, a symlink, a hard link
// and fixed mtimes (whole seconds, as tar keeps them).
func buildTree(t *testing.T, root string) {
	t.Helper()
	mk := func(p string, perm fs.FileMode, content string) {
		if err := os.WriteFile(filepath.Join(root, p), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(filepath.Join(root, p), perm); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"", "bin", "empty", "deep/er/est"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mk("a.txt", 0o640, "hello\n")
	mk("bin/run.sh", 0o755, "#!/bin/sh\necho run\n")
	mk("deep/er/est/f", fs.ModeSetuid|0o711, "setuid")
	mk("big", 0o600, string(bytes.Repeat([]byte("0123456789"), 300_000)))
	if err := os.Symlink("a.txt", filepath.Join(root, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(filepath.Join(root, "a.txt"), filepath.Join(root, "hard")); err != nil {
		t.Fatal(err)
	}
	chmod := map[string]fs.FileMode{"": 0o750, "empty": 0o700, "deep/er": fs.ModeSticky | 0o777}
	for p, m := range chmod {
		if err := os.Chmod(filepath.Join(root, p), m); err != nil {
			t.Fatal(err)
		}
	}
	// Times last, deepest first, so creating entries doesn't change them.
	mtime := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	for i, p := range []string{"a.txt", "bin/run.sh", "deep/er/est/f", "big", "deep/er/est", "deep/er", "deep", "bin", "empty", ""} {
		mt := mtime.Add(time.Duration(i) * time.Hour)
		if err := os.Chtimes(filepath.Join(root, p), mt, mt); err != nil {
			t.Fatal(err)
		}
	}
}

// compareTrees checks that got has the same entries, modes, contents,
// symlink targets and mtimes as want.
func compareTrees(t *testing.T, want, got string) {
	t.Helper()
	n := 0
	err := filepath.WalkDir(want, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		n++
		rel, _ := filepath.Rel(want, p)
		wfi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		gp := filepath.Join(got, rel)
		gfi, err := os.Lstat(gp)
		if err != nil {
			t.Errorf("%s: missing: %v", rel, err)
			return nil
		}
		if wfi.Mode() != gfi.Mode() {
			t.Errorf("%s: mode %v, want %v", rel, gfi.Mode(), wfi.Mode())
		}
		switch {
		case wfi.Mode()&fs.ModeSymlink != 0:
			wl, _ := os.Readlink(p)
			gl, _ := os.Readlink(gp)
			if wl != gl {
				t.Errorf("%s: link %q, want %q", rel, gl, wl)
			}
			return nil
		case wfi.Mode().IsRegular():
			wb, _ := os.ReadFile(p)
			gb, _ := os.ReadFile(gp)
			if !bytes.Equal(wb, gb) {
				t.Errorf("%s: content differs (%d bytes, want %d)", rel, len(gb), len(wb))
			}
		}
		if !wfi.ModTime().Equal(gfi.ModTime()) {
			t.Errorf("%s: mtime %v, want %v", rel, gfi.ModTime(), wfi.ModTime())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 10 {
		t.Fatalf("walked only %d entries", n)
	}
}

func TestCopyRoundTrip(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	ctx := testCtx(t)
	src := filepath.Join(t.TempDir(), "tree")
	buildTree(t, src)

	var archive bytes.Buffer
	if err := c.CopyOut(ctx, src, &archive); err != nil {
		t.Fatalf("copy out: %v", err)
	}
	hdr, err := tar.NewReader(bytes.NewReader(archive.Bytes())).Next()
	if err != nil {
		t.Fatalf("read archive: %v", err)
	}
	if hdr.Name != "tree/" || hdr.Typeflag != tar.TypeDir {
		t.Errorf("top entry %q (type %c), want directory tree/", hdr.Name, hdr.Typeflag)
	}

	// The destination and its parents are created.
	dst := filepath.Join(t.TempDir(), "new", "parent")
	if err := c.CopyIn(ctx, bytes.NewReader(archive.Bytes()), dst, agent.CopyOptions{Archive: true}); err != nil {
		t.Fatalf("copy in: %v", err)
	}
	compareTrees(t, src, filepath.Join(dst, "tree"))
	a, err := os.Stat(filepath.Join(dst, "tree", "a.txt"))
	if err != nil {
		t.Fatal(err)
	}
	hard, err := os.Stat(filepath.Join(dst, "tree", "hard"))
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(a, hard) {
		t.Errorf("hard link not preserved")
	}

	// Copying again over the existing tree works (files are replaced).
	if err := c.CopyIn(ctx, bytes.NewReader(archive.Bytes()), dst, agent.CopyOptions{Archive: true}); err != nil {
		t.Fatalf("second copy in: %v", err)
	}
	compareTrees(t, src, filepath.Join(dst, "tree"))

	// Without Archive, setuid, setgid and sticky bits are dropped.
	plain := t.TempDir()
	if err := c.CopyIn(ctx, bytes.NewReader(archive.Bytes()), plain, agent.CopyOptions{}); err != nil {
		t.Fatalf("copy in without archive: %v", err)
	}
	for name, want := range map[string]fs.FileMode{"tree/deep/er/est/f": 0o711, "tree/deep/er": fs.ModeDir | 0o777} {
		if fi, err := os.Lstat(filepath.Join(plain, name)); err != nil || fi.Mode() != want {
			t.Errorf("%s without archive: %v %v, want mode %v", name, fi.Mode(), err, want)
		}
	}

	// A single file: the archive holds just its base name.
	archive.Reset()
	if err := c.CopyOut(ctx, filepath.Join(src, "bin", "run.sh"), &archive); err != nil {
		t.Fatalf("copy out file: %v", err)
	}
	tr := tar.NewReader(&archive)
	hdr, err = tr.Next()
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(tr)
	if hdr.Name != "run.sh" || hdr.FileInfo().Mode().Perm() != 0o755 || string(body) != "#!/bin/sh\necho run\n" {
		t.Errorf("file entry %q mode %v body %q", hdr.Name, hdr.FileInfo().Mode(), body)
	}
	if _, err := tr.Next(); err != io.EOF {
		t.Errorf("more than one entry: %v", err)
	}
}

func TestCopyErrors(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	ctx := testCtx(t)
	dir := t.TempDir()

	err := c.CopyOut(ctx, filepath.Join(dir, "missing"), io.Discard)
	if !errors.Is(err, agent.ErrCopyFailed) {
		t.Errorf("copy out of missing path: %v, want ErrCopyFailed", err)
	}
	if err := c.CopyOut(ctx, "relative/path", io.Discard); err == nil {
		t.Errorf("copy out of relative path accepted")
	}
	if err := c.CopyIn(ctx, bytes.NewReader(nil), "relative", agent.CopyOptions{}); err == nil {
		t.Errorf("copy in to relative path accepted")
	}
	// The destination is a file.
	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("x"), 0o644)
	err = c.CopyIn(ctx, bytes.NewReader(tarOf(t, entry{name: "a", body: "a"})), file, agent.CopyOptions{})
	if !errors.Is(err, agent.ErrCopyFailed) {
		t.Errorf("copy in under a file: %v, want ErrCopyFailed", err)
	}
	// Garbage instead of a tar stream.
	err = c.CopyIn(ctx, bytes.NewReader(bytes.Repeat([]byte("garbage!"), 200)), filepath.Join(dir, "d"), agent.CopyOptions{})
	if !errors.Is(err, agent.ErrCopyFailed) {
		t.Errorf("copy in of garbage: %v, want ErrCopyFailed", err)
	}
	// A local read error aborts the copy.
	readErr := errors.New("disk on fire")
	err = c.CopyIn(ctx, io.MultiReader(bytes.NewReader(tarOf(t, entry{name: "a", body: "a"})[:512]), errReader{readErr}), filepath.Join(dir, "e"), agent.CopyOptions{})
	if !errors.Is(err, readErr) {
		t.Errorf("copy in with read error: %v, want %v", err, readErr)
	}
	// The connection still works afterwards.
	if code, err := c.Exec(ctx, agent.ExecOptions{Argv: []string{"true"}}); err != nil || code != 0 {
		t.Errorf("exec after copy errors: %d %v", code, err)
	}
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

type entry struct {
	name, body, link string
	typ              byte
}

func tarOf(t *testing.T, entries ...entry) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range entries {
		typ := e.typ
		if typ == 0 {
			typ = tar.TypeReg
		}
		hdr := &tar.Header{Name: e.name, Typeflag: typ, Mode: 0o644, Linkname: e.link, ModTime: time.Now()}
		if typ == tar.TypeReg {
			hdr.Size = int64(len(e.body))
		}
		if typ == tar.TypeDir {
			hdr.Mode = 0o755
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if typ == tar.TypeReg {
			io.WriteString(tw, e.body)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestCopyInRefusesEscapes(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	base := t.TempDir()
	outside := filepath.Join(base, "outside")
	if err := os.Mkdir(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(outside, "secret")
	if err := os.WriteFile(secret, []byte("original"), 0o644); err != nil {
		t.Fatal(err)
	}
	dest := filepath.Join(base, "dest")

	tests := []struct {
		name    string
		entries []entry
		// files that must not exist afterwards
		absent []string
	}{
		{"dotdot", []entry{{name: "../x", body: "pwned"}}, []string{filepath.Join(base, "x")}},
		{"nested dotdot", []entry{{name: "a/../../y", body: "pwned"}}, []string{filepath.Join(base, "y")}},
		{"absolute", []entry{{name: filepath.Join(outside, "abs"), body: "pwned"}}, []string{filepath.Join(outside, "abs")}},
		{"absolute symlink then write", []entry{
			{name: "evil", typ: tar.TypeSymlink, link: outside},
			{name: "evil/pwned", body: "pwned"},
		}, []string{filepath.Join(outside, "pwned")}},
		{"relative symlink then write", []entry{
			{name: "evil2", typ: tar.TypeSymlink, link: "../outside"},
			{name: "evil2/pwned2", body: "pwned"},
		}, []string{filepath.Join(outside, "pwned2")}},
		{"symlink then mkdir", []entry{
			{name: "evil3", typ: tar.TypeSymlink, link: outside},
			{name: "evil3/newdir/", typ: tar.TypeDir},
		}, []string{filepath.Join(outside, "newdir")}},
		{"hard link out", []entry{{name: "h", typ: tar.TypeLink, link: "../outside/secret"}}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := c.CopyIn(testCtx(t), bytes.NewReader(tarOf(t, tt.entries...)), dest, agent.CopyOptions{})
			if !errors.Is(err, agent.ErrCopyFailed) {
				t.Fatalf("copy in: %v, want ErrCopyFailed", err)
			}
			for _, p := range tt.absent {
				if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("%s exists after refused copy (%v)", p, err)
				}
			}
			if b, _ := os.ReadFile(secret); string(b) != "original" {
				t.Errorf("secret changed to %q", b)
			}
		})
	}

	// A file entry replaces a symlink of the same name rather than writing
	// through it.
	err := c.CopyIn(testCtx(t), bytes.NewReader(tarOf(t,
		entry{name: "s", typ: tar.TypeSymlink, link: secret},
		entry{name: "s", body: "replaced"},
	)), dest, agent.CopyOptions{})
	if err != nil {
		t.Fatalf("copy in over symlink: %v", err)
	}
	if b, _ := os.ReadFile(secret); string(b) != "original" {
		t.Errorf("secret changed to %q", b)
	}
	fi, err := os.Lstat(filepath.Join(dest, "s"))
	if err != nil || !fi.Mode().IsRegular() {
		t.Errorf("s: %v %v, want a regular file", fi, err)
	}
}
