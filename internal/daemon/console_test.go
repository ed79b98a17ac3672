package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
)

func init() { consoleCheckInterval = 50 * time.Millisecond }

func TestTrimFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "console.log")
	os.WriteFile(p, []byte("0123456789"), 0o600)
	if n, err := trimFile(p, 10, 4); n != 0 || err != nil {
		t.Fatalf("at the cap: dropped %d, %v", n, err)
	}
	os.WriteFile(p, []byte("0123456789ab"), 0o600)
	n, err := trimFile(p, 10, 4)
	if err != nil || n != 8 {
		t.Fatalf("dropped %d, %v; want 8", n, err)
	}
	b, _ := os.ReadFile(p)
	if string(b) != truncatedNote+"89ab" {
		t.Fatalf("after trim: %q", b)
	}
	if n, err := trimFile(filepath.Join(t.TempDir(), "none"), 1, 1); n != 0 || err != nil {
		t.Fatalf("missing file: %d, %v", n, err)
	}
}

// Where the filesystem collapses ranges, output appended while the log is
// cut is never lost: the lines after the note run on without a gap.
func TestTrimFileKeepsConcurrentAppends(t *testing.T) {
	p := filepath.Join(t.TempDir(), "console.log")
	w, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var fs unix.Statfs_t
	if err := unix.Fstatfs(int(w.Fd()), &fs); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(int(w.Fd()), unix.FALLOC_FL_COLLAPSE_RANGE, 0, 0); errors.Is(err, unix.EOPNOTSUPP) {
		t.Skip("this filesystem can't collapse ranges: trimFile falls back to rewriting")
	}
	const lines = 200000
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < lines; i++ {
			fmt.Fprintf(w, "line %07d\n", i)
		}
	}()
	cuts := 0
	for finished := false; !finished; {
		select {
		case <-done:
			finished = true
		default:
		}
		n, err := trimFile(p, 64<<10, 16<<10)
		if err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			cuts++
		}
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if cuts == 0 || !strings.HasPrefix(string(b), truncatedNote) {
		t.Fatalf("%d cuts; log starts %q", cuts, b[:min(len(b), 80)])
	}
	// Skip the line the note overwrote; every later line follows its predecessor.
	rest := strings.Split(strings.TrimSuffix(string(b[len(truncatedNote):]), "\n"), "\n")[1:]
	prev := -1
	for _, l := range rest {
		var i int
		if _, err := fmt.Sscanf(l, "line %d", &i); err != nil {
			t.Fatalf("garbled line %q", l)
		}
		if prev >= 0 && i != prev+1 {
			t.Fatalf("line %d follows line %d: output written during a cut was lost", i, prev)
		}
		prev = i
	}
	if prev != lines-1 {
		t.Fatalf("last line %d, want %d", prev, lines-1)
	}
}

// A guest flooding its console does not fill the host's disk.
func TestConsoleLogCapped(t *testing.T) {
	t.Parallel()
	_, d := setup(t, func(c *config.Daemon) { c.ConsoleLogMaxMiB = 1 })
	vm := createStarted(t, d, "chatty")
	ctx := testCtx(t)
	// A follower started before the flood keeps following across the cut.
	var followed syncBuffer
	go d.c.VMLogs(ctx, api.VMLogsParams{Name: "chatty", Follow: true}, &followed)
	// Append like QEMU does (O_APPEND) while the daemon watches.
	f, err := os.OpenFile(vm.ConsoleLog, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	line := bytes.Repeat([]byte("x"), 1023)
	for i := 0; i < 3<<10; i++ { // 3 MiB
		f.Write(append(line, '\n'))
	}
	f.Write([]byte("the newest line\n"))
	// The cut is two steps (drop the head, write the note): wait for both.
	waitFor(ctx, t, "the console log capped, keeping the newest output behind the note", func() bool {
		b, err := os.ReadFile(vm.ConsoleLog)
		return err == nil && len(b) <= 1<<20 && strings.HasPrefix(string(b), truncatedNote) && strings.HasSuffix(string(b), "the newest line\n")
	})
	f.Write([]byte("after the cut\n"))
	waitFor(ctx, t, "vm logs -f to show output written after the cut", func() bool {
		return strings.Contains(followed.String(), "after the cut")
	})
}
