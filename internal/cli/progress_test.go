package cli

import (
	"bytes"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/api"
)

func TestProgressPlain(t *testing.T) {
	var b bytes.Buffer
	p := &progress{w: &b}
	p.update(api.Progress{Phase: "kernel generic-6.1"})
	for i := int64(0); i <= 100; i += 5 {
		p.update(api.Progress{Phase: "download", Done: i << 20, Total: 100 << 20, Unit: "bytes"})
	}
	p.update(api.Progress{Phase: "extract", Done: 3, Total: 4, Unit: "files"})
	p.done()
	want := "==> kernel generic-6.1\n==> download\n    0 B / 100.0 MiB (0%)\n    25.0 MiB / 100.0 MiB (25%)\n" +
		"    50.0 MiB / 100.0 MiB (50%)\n    75.0 MiB / 100.0 MiB (75%)\n    100.0 MiB / 100.0 MiB (100%)\n==> extract\n    3 files / 4 files (75%)\n"
	if b.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", b.String(), want)
	}
}

// The terminal renderer (mpb) ends each bar at a phase change and at
// done, without blocking, whatever the frames.
func TestProgressBars(t *testing.T) {
	var b bytes.Buffer
	p := &progress{w: &b, tty: true}
	p.update(api.Progress{Phase: "resolve"})
	p.update(api.Progress{Phase: "download", Done: 10, Total: 100})
	p.update(api.Progress{Phase: "download", Done: 100, Total: 100})
	p.update(api.Progress{Phase: "verify", Done: 1, Total: 200})
	p.update(api.Progress{Phase: "verify", Done: 300, Total: 250}) // a grown total, past it
	p.update(api.Progress{Phase: "install"})
	p.update(api.Progress{Phase: "files", Done: 1, Total: 9, Unit: "files"})
	p.done()
	p.done()
	out := b.String()
	for _, want := range []string{"==> resolve\n", "==> install\n", "==> download", "100.0 b / 100.0 b", "100 %", "==> files", "1 / 9 files"} {
		if !strings.Contains(out, want) {
			t.Errorf("output %q lacks %q", out, want)
		}
	}
	if p.bar != nil || p.bars != nil {
		t.Error("a bar is left after done")
	}
}
