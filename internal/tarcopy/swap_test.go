package tarcopy

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestWriteFileSwappedBetweenWalks: a regular file replaced between
// Announce's counting walk and the writing walk (Announce runs between
// them) fails the copy with ErrSourceChanged: a FIFO doesn't block the
// open, and another file of the same size isn't taken for it.
func TestWriteFileSwappedBetweenWalks(t *testing.T) {
	for name, swap := range map[string]func(p string) error{
		"fifo": func(p string) error {
			os.Remove(p)
			return unix.Mkfifo(p, 0o644)
		},
		"another file": func(p string) error {
			tmp := p + ".new"
			if err := os.WriteFile(tmp, []byte("HELLO"), 0o644); err != nil {
				return err
			}
			return os.Rename(tmp, p)
		},
	} {
		t.Run(name, func(t *testing.T) {
			src := filepath.Join(t.TempDir(), "tree")
			os.Mkdir(src, 0o755)
			f := filepath.Join(src, "f")
			if err := os.WriteFile(f, []byte("hello"), 0o644); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() {
				done <- Write(io.Discard, src, WriteOptions{Announce: func(int64, int64) error { return swap(f) }})
			}()
			select {
			case err := <-done:
				if !errors.Is(err, ErrSourceChanged) {
					t.Errorf("write: %v, want ErrSourceChanged", err)
				}
			case <-time.After(30 * time.Second):
				// Unblock the open so the goroutine ends.
				if w, err := os.OpenFile(f, os.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
					w.Close()
				}
				t.Fatalf("write still blocked after 30 s")
			}
		})
	}
}
