package daemon

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
	waitFor(ctx, t, "the console log to be capped", func() bool {
		st, err := os.Stat(vm.ConsoleLog)
		return err == nil && st.Size() <= 1<<20
	})
	b, _ := os.ReadFile(vm.ConsoleLog)
	if !strings.HasPrefix(string(b), truncatedNote) || !strings.HasSuffix(string(b), "the newest line\n") {
		t.Fatalf("capped log does not keep the newest output behind the note (%d bytes)", len(b))
	}
	f.Write([]byte("after the cut\n"))
	waitFor(ctx, t, "vm logs -f to show output written after the cut", func() bool {
		return strings.Contains(followed.String(), "after the cut")
	})
}
