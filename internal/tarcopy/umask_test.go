package tarcopy

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// umaskOnRead sets the process's umask at its first Read: a umask changed
// by another goroutine after Extract started.
type umaskOnRead struct {
	r    io.Reader
	mask int
	old  int
	set  bool
}

func (u *umaskOnRead) Read(p []byte) (int, error) {
	if !u.set {
		u.set, u.old = true, unix.Umask(u.mask)
	}
	return u.r.Read(p)
}

// TestExtractUmaskMayChange: with UmaskMayChange, a umask changed during
// Extract doesn't change the modes of the files it creates; without it,
// it does (the creation takes the final mode through the umask read at
// the start).
func TestExtractUmaskMayChange(t *testing.T) {
	var stream bytes.Buffer
	tw := tar.NewWriter(&stream)
	tw.WriteHeader(&tar.Header{Name: "f", Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
	tw.Write([]byte("x"))
	tw.Close()
	for _, mayChange := range []bool{true, false} {
		dest := filepath.Join(t.TempDir(), "d")
		r := &umaskOnRead{r: bytes.NewReader(stream.Bytes()), mask: 0o177}
		err := Extract(r, dest, ExtractOptions{UmaskMayChange: mayChange})
		if r.set {
			unix.Umask(r.old)
		}
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(filepath.Join(dest, "f"))
		if err != nil {
			t.Fatal(err)
		}
		want := os.FileMode(0o644)
		if !mayChange {
			if processUmask()&0o644 != 0 {
				continue // the umask at the start already asks for a chmod
			}
			want = 0o600 // the trap the option avoids
		}
		if fi.Mode().Perm() != want {
			t.Errorf("UmaskMayChange %v: mode %v, want %v", mayChange, fi.Mode().Perm(), want)
		}
	}
}
