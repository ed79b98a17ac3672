package bundle

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// httpSource reads a bundle over HTTP with Range requests.
type httpSource struct {
	url  string
	size int64
}

func (s httpSource) Size() int64 { return s.size }

func (s httpSource) Open(ctx context.Context, off int64) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-", off))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusPartialContent {
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s", s.url, resp.Status)
	}
	return resp.Body, nil
}

// benchBundle is BANGER_BENCH_BUNDLE, or a bundle of a 256 MiB
// mostly-zero rootfs and 64 MB of random data.
func benchBundle(b *testing.B) string {
	if p := os.Getenv("BANGER_BENCH_BUNDLE"); p != "" {
		return p
	}
	src := b.TempDir()
	rootfs := make([]byte, 256<<20)
	for off := 0; off < len(rootfs); off += 1 << 20 {
		copy(rootfs[off:], random(8192))
	}
	if err := os.WriteFile(filepath.Join(src, "rootfs.ext4"), rootfs, 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "work-seed.ext4"), random(64e6), 0o644); err != nil {
		b.Fatal(err)
	}
	p := filepath.Join(b.TempDir(), "b.tar.zst")
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	m := imageManifest(File{Path: "rootfs.ext4", Role: RoleRootfs}, File{Path: "work-seed.ext4", Role: RoleWorkSeed})
	if err := Write(context.Background(), f, m, src); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	return p
}

// BenchmarkInstall installs a bundle served from 127.0.0.1 and, when curl
// and zstd are installed, times `curl -s URL | zstd -d > file` on it too:
// the goal is Install at least 0.9 of its speed (ratio reported).
func BenchmarkInstall(b *testing.B) {
	path := benchBundle(b)
	st, err := os.Stat(path)
	if err != nil {
		b.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.ServeFile(w, r, path) }))
	defer srv.Close()
	_, errCurl := exec.LookPath("curl")
	_, errZstd := exec.LookPath("zstd")
	var ours, theirs time.Duration
	for i := 0; i < b.N; i++ {
		dst := b.TempDir()
		start := time.Now()
		if _, err := Install(context.Background(), httpSource{srv.URL, st.Size()}, dst, InstallOptions{}); err != nil {
			b.Fatal(err)
		}
		ours += time.Since(start)
		if errCurl == nil && errZstd == nil {
			out := filepath.Join(dst, "plain.tar")
			start = time.Now()
			cmd := exec.Command("sh", "-c", `curl -s "$1" | zstd -q -d > "$2"`, "sh", srv.URL, out)
			if out, err := cmd.CombinedOutput(); err != nil {
				b.Fatalf("curl | zstd -d: %v: %s", err, out)
			}
			theirs += time.Since(start)
		}
		os.RemoveAll(dst)
	}
	b.ReportMetric(float64(st.Size())/1e6/ours.Seconds()*float64(b.N), "MB/s-compressed")
	if theirs > 0 {
		b.ReportMetric(theirs.Seconds()/ours.Seconds(), "speed-vs-zstd")
	}
}
