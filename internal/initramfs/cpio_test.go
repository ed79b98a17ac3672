package initramfs

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/testenv"
)

// extract unpacks a newc archive with the system cpio tool into a new temp
// dir and returns it.
func extract(t *testing.T, archive []byte) string {
	t.Helper()
	if _, err := exec.LookPath("cpio"); err != nil {
		testenv.Missing(t, "cpio tool not installed (apt-get install cpio)")
	}
	dir := t.TempDir()
	cmd := exec.Command("cpio", "-idm", "--quiet", "--no-absolute-filenames")
	if os.Geteuid() != 0 {
		cmd.Args = append(cmd.Args, "--no-preserve-owner")
	}
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(archive)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -idm: %v\n%s", err, out)
	}
	return dir
}

func TestWriterRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(w.WriteDir("etc", 0o755))
	must(w.WriteFile("/etc/hello.txt", 0o644, []byte("hello\n")))
	must(w.WriteFile("./bin/tool", 0o755, []byte("#!/bin/sh\necho odd-length\n")))
	must(w.WriteFileFrom("deep/a/b/c.bin", 0o600, 5, strings.NewReader("12345")))
	must(w.WriteFile("empty", 0o640, nil))
	must(w.WriteSymlink("bin/sh", "tool"))
	must(w.WriteDir("tmp", 0o1777))
	must(w.Close())

	if buf.Len()%512 != 0 {
		t.Errorf("archive length %d is not a multiple of 512", buf.Len())
	}
	if !bytes.Contains(buf.Bytes(), []byte("TRAILER!!!")) {
		t.Error("no trailer")
	}
	if err := w.WriteFile("late", 0o644, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("write after close: got %v, want ErrClosed", err)
	}

	dir := extract(t, buf.Bytes())
	checkFile := func(name string, mode fs.FileMode, data string) {
		t.Helper()
		p := filepath.Join(dir, name)
		st, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if !st.Mode().IsRegular() || st.Mode().Perm() != mode {
			t.Errorf("%s: mode %v, want regular %v", name, st.Mode(), mode)
		}
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != data {
			t.Errorf("%s: content %q, want %q", name, got, data)
		}
	}
	checkFile("etc/hello.txt", 0o644, "hello\n")
	checkFile("bin/tool", 0o755, "#!/bin/sh\necho odd-length\n")
	checkFile("deep/a/b/c.bin", 0o600, "12345")
	checkFile("empty", 0o640, "")
	if tgt, err := os.Readlink(filepath.Join(dir, "bin/sh")); err != nil || tgt != "tool" {
		t.Errorf("bin/sh: readlink = %q, %v; want tool", tgt, err)
	}
	for name, mode := range map[string]fs.FileMode{"etc": 0o755, "deep/a/b": 0o755, "bin": 0o755} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil || !st.IsDir() || st.Mode().Perm() != mode {
			t.Errorf("dir %s: %v %v", name, st, err)
		}
	}
	if st, err := os.Stat(filepath.Join(dir, "tmp")); err != nil || st.Mode()&fs.ModeSticky == 0 {
		t.Errorf("tmp: want sticky dir, got %v %v", st, err)
	}
}

func TestWriterListing(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		testenv.Missing(t, "cpio tool not installed (apt-get install cpio)")
	}
	var buf bytes.Buffer
	w := NewWriter(&buf)
	if err := w.WriteFile("a/b/c", 0o644, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteDir("a", 0o700); err != nil { // explicit dir after implicit one
		t.Fatal(err)
	}
	if err := w.WriteCharDevice("dev/console", 0o600, 5, 1); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("cpio", "-it", "--quiet")
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Fields(string(out))
	want := []string{"a", "a/b", "a/b/c", "a", "dev", "dev/console"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("listing %v, want %v", got, want)
	}
	cmd = exec.Command("cpio", "-itv", "--quiet")
	cmd.Stdin = bytes.NewReader(buf.Bytes())
	out, err = cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "crw-------") || !strings.Contains(string(out), "5,") {
		t.Errorf("dev/console not a 5,1 char device:\n%s", out)
	}
}

func TestWriterRejects(t *testing.T) {
	w := NewWriter(&bytes.Buffer{})
	if err := w.WriteFile("/", 0o644, nil); err == nil {
		t.Error("empty name accepted")
	}
	if err := w.WriteFile("TRAILER!!!", 0o644, nil); err == nil {
		t.Error("trailer name accepted")
	}
	if err := w.WriteFileFrom("short", 0o644, 10, strings.NewReader("abc")); err == nil {
		t.Error("short reader accepted")
	}
	if err := w.Close(); err == nil {
		t.Error("Close after a failed write returned nil")
	}
	// "../x" is cleaned to "x": nothing escapes the archive root.
	if n, err := cleanName("../../etc/x"); err != nil || n != "etc/x" {
		t.Errorf("cleanName = %q, %v", n, err)
	}
}
