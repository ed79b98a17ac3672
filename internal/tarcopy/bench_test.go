package tarcopy

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// benchTree is the tree of many small files: 10,000 files of
// 1000 bytes in 100 directories.
const (
	benchDirs     = 100
	benchPerDir   = 100
	benchFileSize = 1000
)

func makeBenchTree(b *testing.B) string {
	b.Helper()
	src := filepath.Join(b.TempDir(), "tree")
	body := bytes.Repeat([]byte("0123456789"), benchFileSize/10)
	for d := range benchDirs {
		dir := filepath.Join(src, fmt.Sprintf("d%03d", d))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			b.Fatal(err)
		}
		for f := range benchPerDir {
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%03d", f)), body, 0o644); err != nil {
				b.Fatal(err)
			}
		}
	}
	return src
}

// BenchmarkWriteTree packs the tree as the guest's copy out does (with
// Announce: a counting walk, then the stream).
func BenchmarkWriteTree(b *testing.B) {
	src := makeBenchTree(b)
	for _, announce := range []bool{false, true} {
		b.Run(fmt.Sprintf("announce=%v", announce), func(b *testing.B) {
			var opts WriteOptions
			if announce {
				opts.Announce = func(int64, int64) error { return nil }
			}
			var n countWriter
			for b.Loop() {
				if err := Write(&n, src, opts); err != nil {
					b.Fatal(err)
				}
			}
			b.SetBytes(n.n / int64(b.N))
		})
	}
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// BenchmarkExtractTree unpacks the tree's stream into a new directory.
func BenchmarkExtractTree(b *testing.B) {
	src := makeBenchTree(b)
	var stream bytes.Buffer
	if err := Write(&stream, src, WriteOptions{}); err != nil {
		b.Fatal(err)
	}
	benchExtract(b, stream.Bytes(), ExtractOptions{Base: "tree"})
}

// BenchmarkExtractSparse unpacks a 2 GiB sparse file holding 8 MiB of
// data (8 runs of 1 MiB).
func BenchmarkExtractSparse(b *testing.B) {
	src := filepath.Join(b.TempDir(), "sparse")
	f, err := os.Create(src)
	if err != nil {
		b.Fatal(err)
	}
	const size = 2 << 30
	if err := f.Truncate(size); err != nil {
		b.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xa5}, 1<<20)
	for i := range int64(8) {
		if _, err := f.WriteAt(data, i*(size/8)+12345); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	var stream bytes.Buffer
	if err := Write(&stream, src, WriteOptions{}); err != nil {
		b.Fatal(err)
	}
	if stream.Len() > 9<<20 {
		b.Skipf("the filesystem keeps no holes: stream of %d bytes", stream.Len())
	}
	benchExtract(b, stream.Bytes(), ExtractOptions{Base: "sparse"})
}

func benchExtract(b *testing.B, stream []byte, opts ExtractOptions) {
	b.Helper()
	base := b.TempDir()
	b.SetBytes(int64(len(stream)))
	i := 0
	for b.Loop() {
		dest := filepath.Join(base, fmt.Sprint(i))
		i++
		if err := Extract(bytes.NewReader(stream), dest, opts); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := os.RemoveAll(dest); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}
