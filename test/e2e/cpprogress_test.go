//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/creack/pty"
)

// TestCopyProgress copies a 16 MiB file into a VM and back out with the
// real binaries: on a terminal, `vm cp` shows a progress bar (bytes and
// percentage) in both directions; with stderr a pipe it writes nothing
// there; the file arrives intact both ways.
func TestCopyProgress(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	e.Must("vm", "create", "--name", "cpbar", "--image", "tiny", "--accel", "tcg", "--memory", "256",
		"--disk-size", "128M", "--start")

	const size = 16 << 20
	dir := t.TempDir()
	src := filepath.Join(dir, "big")
	data := make([]byte, size)
	rand.Read(data)
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}

	// onTerminal runs banger with a pseudo-terminal for its stdin, stdout
	// and stderr, and returns what it showed.
	onTerminal := func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		cmd := e.Command(ctx, args...)
		ptmx, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 40, Cols: 120})
		if err != nil {
			t.Fatal(err)
		}
		defer ptmx.Close()
		var out syncBuf
		copied := make(chan struct{})
		go func() { io.Copy(&out, ptmx); close(copied) }()
		err = cmd.Wait()
		ptmx.Close()
		<-copied
		if err != nil {
			t.Fatalf("banger %s: %v\n%s", strings.Join(args, " "), err, out.String())
		}
		return out.String()
	}
	// The bar's counters ("16.0 MiB / 16.0 MiB"), percentage and rate, at
	// its end.
	bar := []string{"==> copy big", "16.0 MiB / 16.0 MiB", "100 %", "B/s"}

	s := onTerminal("vm", "cp", src, "cpbar:/root")
	for _, want := range bar {
		if !strings.Contains(s, want) {
			t.Errorf("vm cp in on a terminal: output lacks %q:\n%q", want, s)
		}
	}
	out1 := filepath.Join(dir, "out1")
	s = onTerminal("vm", "cp", "cpbar:/root/big", out1)
	for _, want := range bar {
		if !strings.Contains(s, want) {
			t.Errorf("vm cp out on a terminal: output lacks %q:\n%q", want, s)
		}
	}
	if got, err := os.ReadFile(filepath.Join(out1, "big")); err != nil || !bytes.Equal(got, data) {
		t.Errorf("the file copied in and out differs from the original (%d bytes, %v)", len(got), err)
	}

	// Piped: stderr stays empty.
	for _, args := range [][]string{
		{"vm", "cp", src, "cpbar:/root/again"},
		{"vm", "cp", "cpbar:/root/again/big", filepath.Join(dir, "out2")},
	} {
		_, stderr, code := e.Banger(args...)
		if code != 0 || stderr != "" {
			t.Errorf("banger %s with stderr piped: exit %d, stderr %q; want 0 and nothing", strings.Join(args, " "), code, stderr)
		}
	}
	if got, err := os.ReadFile(filepath.Join(dir, "out2", "big")); err != nil || !bytes.Equal(got, data) {
		t.Errorf("the file copied piped differs from the original (%d bytes, %v)", len(got), err)
	}

	// A source that can't be read to its size (a sysfs file claims 4096
	// bytes and has fewer) fails the copy in, with the reason.
	const short = "/sys/kernel/mm/transparent_hugepage/enabled"
	if _, err := os.Stat(short); err == nil {
		_, stderr, code := e.Banger("vm", "cp", short, "cpbar:/root/sys")
		if code == 0 || !strings.Contains(stderr, "the copy was stopped") {
			t.Errorf("vm cp of a file shorter than its size: exit %d, stderr %q; want a failure saying the copy stopped", code, stderr)
		}
		if out, _, code := e.Exec("cpbar", "ls", "/root/sys/enabled"); code == 0 {
			t.Errorf("the guest kept part of the failed copy: %s", out)
		}
	}
}
