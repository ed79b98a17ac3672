//go:build e2e

package e2e

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// TestCopySparseAndSetuid copies a sparse file and a setuid file into a VM
// and back out with the real agent: sparse files stay sparse on both sides,
// setuid bits and ownership are kept only with -a, and without -a the host
// copy belongs to the invoking (sudo) user.
func TestCopySparseAndSetuid(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	e.Must("vm", "create", "--name", "cpvm", "--image", "tiny", "--accel", "tcg", "--memory", "256", "--start")

	src := filepath.Join(t.TempDir(), "files")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	const sparseSize = 256 << 20
	f, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(sparseSize)
	f.WriteAt([]byte("data at 1M"), 1<<20)
	f.WriteAt([]byte("data at 200M"), 200<<20)
	f.Close()
	suid := filepath.Join(src, "suid")
	os.WriteFile(suid, []byte("#!/bin/sh\necho hi\n"), 0o755)
	if err := os.Chmod(suid, fs.ModeSetuid|0o755); err != nil {
		t.Fatal(err)
	}
	// Owned by someone else, to see -a keep the owner both ways.
	owner := 0
	if os.Geteuid() == 0 {
		owner = 1234
		if err := os.Lchown(suid, owner, owner); err != nil {
			t.Fatal(err)
		}
		os.Chmod(suid, fs.ModeSetuid|0o755) // chown cleared it
	}
	if a := allocatedBytes(t, filepath.Join(src, "sparse")); a > 1<<20 {
		t.Skipf("the host's temporary filesystem doesn't keep holes (%d bytes allocated)", a)
	}
	want, _ := os.ReadFile(filepath.Join(src, "sparse"))

	// Copy in: with -a the setuid bit stays, without it it goes; the
	// sparse file stays sparse in the guest.
	e.Must("vm", "cp", "-a", src, "cpvm:/root")
	e.Must("vm", "cp", src, "cpvm:/root/plain")
	guestStat := func(format, p string) string {
		return strings.TrimSpace(e.Must("vm", "exec", "cpvm", "--", "stat", "-c", format, p))
	}
	if m := guestStat("%a", "/root/files/suid"); m != "4755" {
		t.Errorf("guest mode after cp -a: %s, want 4755", m)
	}
	if m := guestStat("%a", "/root/plain/files/suid"); m != "755" {
		t.Errorf("guest mode after cp: %s, want 755", m)
	}
	if o := guestStat("%u:%g", "/root/files/suid"); o != fmt.Sprintf("%d:%d", owner, owner) {
		t.Errorf("guest owner after cp -a: %s, want %d:%d", o, owner, owner)
	}
	if o := guestStat("%u:%g", "/root/plain/files/suid"); o != "0:0" {
		t.Errorf("guest owner after cp: %s, want root's", o)
	}
	if s := guestStat("%s", "/root/files/sparse"); s != strconv.Itoa(sparseSize) {
		t.Errorf("guest size %s, want %d", s, sparseSize)
	}
	du := strings.Fields(e.Must("vm", "exec", "cpvm", "--", "du", "-k", "/root/files/sparse"))
	if kib, err := strconv.Atoi(du[0]); err != nil || kib > 1024 {
		t.Errorf("guest: the sparse file occupies %v KiB, want about its data size", du)
	}

	// Copy out without -a, as root under sudo: the copy belongs to the
	// sudo user and loses its setuid bit.
	t.Run("out", func(t *testing.T) {
		e.T = t
		t.Setenv("SUDO_UID", "4321")
		t.Setenv("SUDO_GID", "4322")
		dst := t.TempDir()
		e.Must("vm", "cp", "cpvm:/root/files", dst)
		checkSparse(t, filepath.Join(dst, "files", "sparse"), want)
		checkFile(t, filepath.Join(dst, "files", "suid"), 0o755, 4321, 4322)
		checkFile(t, filepath.Join(dst, "files"), fs.ModeDir|0o755, 4321, 4322)
	})
	t.Run("out-archive", func(t *testing.T) {
		e.T = t
		t.Setenv("SUDO_UID", "4321")
		t.Setenv("SUDO_GID", "4322")
		dst := t.TempDir()
		e.Must("vm", "cp", "-a", "cpvm:/root/files", dst)
		checkSparse(t, filepath.Join(dst, "files", "sparse"), want)
		checkFile(t, filepath.Join(dst, "files", "suid"), fs.ModeSetuid|0o755, owner, owner)
	})
	t.Run("out-limit", func(t *testing.T) {
		e.T = t
		dst := filepath.Join(t.TempDir(), "new")
		e.Fails("--max-file-size", "vm", "cp", "--max-file-size", "1M", "cpvm:/root/files", dst)
		if _, err := os.Lstat(dst); err == nil {
			t.Errorf("refused copy left %s", dst)
		}
	})
}

func allocatedBytes(t *testing.T, p string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func checkSparse(t *testing.T, p string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(p)
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("%s: content differs (%d bytes, want %d): %v", p, len(got), len(want), err)
	}
	if a := allocatedBytes(t, p); a > 1<<20 {
		t.Errorf("%s: %d bytes allocated on the host, want about its data size", p, a)
	}
}

func checkFile(t *testing.T, p string, mode fs.FileMode, uid, gid int) {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != mode {
		t.Errorf("%s: mode %v, want %v", p, fi.Mode(), mode)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if os.Geteuid() == 0 && (int(st.Uid) != uid || int(st.Gid) != gid) {
		t.Errorf("%s: owner %d:%d, want %d:%d", p, st.Uid, st.Gid, uid, gid)
	}
}
