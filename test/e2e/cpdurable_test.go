//go:build e2e

package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCopyInSurvivesKill copies a file into a VM, kills the VM at once
// and starts it again: the file is whole. A copy in that reports success
// has its data on the VM's disk, not only in the guest's page cache (a
// kill lost the file's tail: a 200 MB copy came back as its first
// 188 MB, with the source's mtime).
func TestCopyInSurvivesKill(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	e.Must("vm", "create", "--name", "durable", "--image", "tiny", "--accel", "tcg", "--memory", "256", "--start")

	// Small enough to stay below the guest's dirty thresholds: without a
	// sync nothing writes it back for 30 s. Large enough for the agent to
	// write it with O_DIRECT (tarcopy.DirectMin), with an unaligned tail
	// written through the page cache.
	const size = 8<<20 + 1234
	data := make([]byte, size)
	rand.Read(data)
	src := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	want := hex.EncodeToString(sum[:])

	e.Must("vm", "cp", src, "durable:/root")
	e.Must("vm", "kill", "durable")
	e.Must("vm", "start", "durable")
	out, errOut, code := e.Exec("durable", "sh", "-c", "wc -c < /root/blob && sha256sum /root/blob")
	f := strings.Fields(out)
	if code != 0 || len(f) < 2 || f[0] != "8389842" || f[1] != want {
		t.Fatalf("after a kill, /root/blob in the guest: %q %q (exit %d), want 8389842 bytes with sha256 %s", out, errOut, code, want)
	}
}
