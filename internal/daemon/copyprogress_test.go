package daemon

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/bangerdev/banger/internal/api"
)

// A copy out tells the client the size the guest announced, as a progress
// frame before the first byte of the stream: the CLI's progress bar.
func TestCopyOutAnnouncesSize(t *testing.T) {
	_, d := setup(t, nil)
	createStarted(t, d, "cp")
	src := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(src, bytes.Repeat([]byte("x"), 100_000), 0o644); err != nil {
		t.Fatal(err)
	}
	var stream bytes.Buffer
	var frames []api.Progress
	var before []int // stream bytes received when each frame came
	err := d.c.VMCopyOutProgress(testCtx(t), api.VMCopyParams{Name: "cp", Path: src}, &stream, func(p api.Progress) {
		frames = append(frames, p)
		before = append(before, stream.Len())
	})
	if err != nil {
		t.Fatalf("copy out: %v", err)
	}
	if len(frames) != 1 {
		t.Fatalf("progress frames %+v, want one", frames)
	}
	want := api.Progress{Phase: "copy", Total: int64(stream.Len()), Unit: "bytes"}
	if frames[0] != want || before[0] != 0 {
		t.Errorf("progress frame %+v after %d bytes of the stream; want %+v before it", frames[0], before[0], want)
	}
	if stream.Len() < 100_000 {
		t.Errorf("stream of %d bytes, want a tar of the 100000-byte file", stream.Len())
	}
}
