package hostfile

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func write(t *testing.T, p, body string) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func symlink(t *testing.T, target, p string) {
	t.Helper()
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}

// tree: root/{a.ko, sub/b.ko, same -> a.ko, up -> ../secret, abs -> /ABS/secret, subdir -> sub}
func tree(t *testing.T) (root, secret string) {
	t.Helper()
	dir := t.TempDir()
	secret = write(t, filepath.Join(dir, "secret"), "root only")
	root = filepath.Join(dir, "root")
	write(t, filepath.Join(root, "a.ko"), "module a")
	write(t, filepath.Join(root, "sub", "b.ko"), "module b")
	symlink(t, "a.ko", filepath.Join(root, "same"))
	symlink(t, "../secret", filepath.Join(root, "up"))
	symlink(t, secret, filepath.Join(root, "abs"))
	symlink(t, "sub", filepath.Join(root, "subdir"))
	symlink(t, "../up", filepath.Join(root, "sub", "up2"))
	if err := unix.Mkfifo(filepath.Join(root, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	return root, secret
}

func check(t *testing.T, open func(dir, rel string) (*os.File, error), followsInside bool) {
	root, _ := tree(t)
	for rel, want := range map[string]string{"a.ko": "module a", "sub/b.ko": "module b"} {
		f, err := open(root, rel)
		if err != nil {
			t.Errorf("%s: %v", rel, err)
			continue
		}
		b, _ := io.ReadAll(f)
		f.Close()
		if string(b) != want {
			t.Errorf("%s: read %q, want %q", rel, b, want)
		}
	}
	for _, rel := range []string{"same", "subdir/b.ko"} {
		f, err := open(root, rel)
		if followsInside {
			if err != nil {
				t.Errorf("%s (a symlink inside the directory): %v", rel, err)
			} else {
				f.Close()
			}
		} else if !errors.Is(err, ErrOutside) {
			t.Errorf("%s without openat2: %v, want ErrOutside", rel, err)
		}
	}
	for _, rel := range []string{"up", "abs", "sub/up2", "../secret", "sub/../../secret"} {
		f, err := open(root, rel)
		if err == nil {
			f.Close()
			t.Errorf("%s leads out of the directory but was opened", rel)
		} else if !errors.Is(err, ErrOutside) {
			t.Errorf("%s: %v, want ErrOutside", rel, err)
		}
	}
	if _, err := open(root, "fifo"); !errors.Is(err, ErrNotRegular) {
		t.Errorf("fifo: %v, want ErrNotRegular (and no blocking)", err)
	}
	if _, err := open(root, "sub"); err == nil {
		t.Error("a directory was opened as a file")
	}
	if _, err := open(root, "missing"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing: %v, want ErrNotExist", err)
	}
}

func TestOpenBeneath(t *testing.T) {
	check(t, OpenBeneath, true)
}

// The fallback for kernels without openat2 refuses every symlink.
func TestWalkNoFollow(t *testing.T) {
	check(t, func(dir, rel string) (*os.File, error) {
		if filepath.IsAbs(rel) || !filepath.IsLocal(rel) {
			return nil, ErrOutside
		}
		d, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		if err != nil {
			return nil, err
		}
		defer unix.Close(d)
		fd, err := walkNoFollow(d, rel)
		if errors.Is(err, unix.ELOOP) {
			return nil, ErrOutside
		}
		if err != nil {
			return nil, err
		}
		f := os.NewFile(uintptr(fd), rel)
		if st, _ := f.Stat(); !st.Mode().IsRegular() {
			f.Close()
			return nil, ErrNotRegular
		}
		return f, nil
	}, false)
}

func TestOpen(t *testing.T) {
	root, secret := tree(t)
	symlink(t, filepath.Join(root, "sub", "b.ko"), filepath.Join(root, "abs-inside"))
	for _, name := range []string{"same", "abs-inside"} {
		if f, err := Open(filepath.Join(root, name)); err != nil {
			t.Errorf("%s, a symlink to a file in the same directory: %v", name, err)
		} else {
			f.Close()
		}
	}
	if _, err := Open(filepath.Join(root, "up")); !errors.Is(err, ErrOutside) {
		t.Errorf("relative symlink out: %v, want ErrOutside", err)
	}
	if _, err := Open(filepath.Join(root, "abs")); !errors.Is(err, ErrOutside) {
		t.Errorf("symlink to %s: %v, want ErrOutside", secret, err)
	}
}
