//go:build e2e

package bench

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkCopy measures vm cp through the real agent: a 16 MiB file of
// random data in and out (against the 52–71 MB/s the virtio-serial channel
// carries under TCG, docs/dev), and a 1 GiB sparse file with two small data
// regions out (only its data travels).
func BenchmarkCopy(b *testing.B) {
	e, _ := setup(b)
	e.RegisterImages()
	e.Must("vm", "create", "--name", "cp", "--image", "tiny", "--memory", "512", "--disk-size", "1G", "--start")
	src := filepath.Join(b.TempDir(), "files")
	if err := os.Mkdir(src, 0o755); err != nil {
		b.Fatal(err)
	}
	const denseSize = 16 << 20
	data := make([]byte, denseSize)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(src, "dense"), data, 0o644); err != nil {
		b.Fatal(err)
	}
	f, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		b.Fatal(err)
	}
	f.Truncate(1 << 30)
	f.WriteAt([]byte("head"), 4096)
	f.WriteAt([]byte("tail"), 1<<30-4096)
	f.Close()

	var in, out, sparse []time.Duration
	for i := 0; i < 3; i++ {
		start := time.Now()
		e.Must("vm", "cp", filepath.Join(src, "dense"), "cp:/root")
		in = append(in, time.Since(start))
		start = time.Now()
		e.Must("vm", "cp", "cp:/root/dense", b.TempDir())
		out = append(out, time.Since(start))
	}
	e.Must("vm", "cp", filepath.Join(src, "sparse"), "cp:/root")
	for i := 0; i < 3; i++ {
		start := time.Now()
		e.Must("vm", "cp", "cp:/root/sparse", b.TempDir())
		sparse = append(sparse, time.Since(start))
	}
	mbps := func(d time.Duration) float64 { return float64(denseSize) / 1e6 / d.Seconds() }
	b.ReportMetric(mbps(median(in)), "cp-in-MB/s")
	b.ReportMetric(mbps(median(out)), "cp-out-MB/s")
	b.ReportMetric(float64(median(sparse).Milliseconds()), "cp-out-1GiB-sparse-ms")
	fmt.Printf("vm cp: 16 MiB in %v (%.1f MB/s), out %v (%.1f MB/s); 1 GiB sparse file out %v\n",
		median(in), mbps(median(in)), median(out), mbps(median(out)), median(sparse))
}
