package bundle

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// memSource serves a bundle from memory; failAt > 0 makes a reader fail
// after that many bytes of the bundle, once.
type memSource struct {
	data   []byte
	failAt int64
	opens  []int64
}

func (s *memSource) Size() int64 { return int64(len(s.data)) }

func (s *memSource) Open(ctx context.Context, off int64) (io.ReadCloser, error) {
	s.opens = append(s.opens, off)
	r := io.Reader(bytes.NewReader(s.data[off:]))
	if s.failAt > off {
		r = io.MultiReader(io.LimitReader(r, s.failAt-off), errReader{})
		s.failAt = 0
	}
	return io.NopCloser(r), nil
}

var errNetwork = errors.New("connection reset")

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errNetwork }

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func random(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// kernelBundle writes a kernel bundle of a few files, with frames of
// frameSize bytes.
func kernelBundle(t *testing.T, frameSize int) (*Manifest, []byte, string) {
	t.Helper()
	src := t.TempDir()
	kernel := append(random(300<<10), make([]byte, 200<<10)...)
	kernel = append(kernel, random(5000)...)
	writeFile(t, filepath.Join(src, "vmlinuz"), kernel)
	writeFile(t, filepath.Join(src, "initrd.img"), random(1000))
	writeFile(t, filepath.Join(src, "modules/lib/modules/6.1.0/modules.dep"), []byte("kernel/x.ko:\n"))
	writeFile(t, filepath.Join(src, "modules/lib/modules/6.1.0/kernel/"+strings.Repeat("long-name-", 12)+".ko"), random(70000))
	writeFile(t, filepath.Join(src, "modules/lib/modules/6.1.0/empty"), nil)
	m := &Manifest{Schema: 1, Kind: KindKernel, Name: "generic-6.1", Version: "1.0", Arch: runtime.GOARCH, Release: "6.1.0",
		Files: []File{
			{Path: "vmlinuz", Role: RoleKernel},
			{Path: "initrd.img", Role: RoleInitrd, Mode: 0o600},
			{Path: "modules/lib/modules/6.1.0/modules.dep", Role: RoleModules},
			{Path: "modules/lib/modules/6.1.0/kernel/" + strings.Repeat("long-name-", 12) + ".ko", Role: RoleModules},
			{Path: "modules/lib/modules/6.1.0/empty", Role: RoleModules},
		}}
	var buf bytes.Buffer
	if err := writeDir(context.Background(), &buf, m, src, frameSize); err != nil {
		t.Fatal(err)
	}
	return m, buf.Bytes(), src
}

func sameTree(t *testing.T, m *Manifest, src, dst string) {
	t.Helper()
	for _, f := range m.Files {
		want, _ := os.ReadFile(filepath.Join(src, f.Path))
		got, err := os.ReadFile(filepath.Join(dst, f.Path))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s differs (%v)", f.Path, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dst, checkpointName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("checkpoint left behind: %v", err)
	}
}

func TestRoundTrip(t *testing.T) {
	m, data, src := kernelBundle(t, 64<<10)
	if m.Files[0].Size != 517000 || len(m.Files[0].SHA256) != 64 || m.Files[1].Mode != 0o600 || m.Files[2].Mode != 0o644 {
		t.Fatalf("Write didn't fill the manifest: %+v", m.Files[:3])
	}
	dst := t.TempDir()
	var last, total int64
	got, err := Install(context.Background(), &memSource{data: data}, dst, InstallOptions{Kind: KindKernel, Name: "generic-6.1", SHA256: sha(data),
		Progress: func(done, t int64) { last, total = done, t }})
	if err != nil {
		t.Fatal(err)
	}
	if got.Release != "6.1.0" || len(got.Files) != 5 {
		t.Errorf("manifest %+v", got)
	}
	if last != int64(len(data)) || total != int64(len(data)) {
		t.Errorf("progress ended at %d/%d, want %d", last, total, len(data))
	}
	sameTree(t, m, src, dst)
	if st, _ := os.Stat(filepath.Join(dst, "initrd.img")); st.Mode().Perm() != 0o600 {
		t.Errorf("initrd mode %v", st.Mode())
	}
}

type failWriter struct{ n int }

func (w *failWriter) Write(p []byte) (int, error) {
	if w.n += len(p); w.n > 100<<10 {
		return 0, errNetwork
	}
	return len(p), nil
}

func TestWriteReportsWriterErrors(t *testing.T) {
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "rootfs.ext4"), random(1<<20))
	m := &Manifest{Schema: 1, Kind: KindImage, Name: "x", Version: "1", Arch: runtime.GOARCH, Files: []File{{Path: "rootfs.ext4", Role: RoleRootfs}}}
	if err := writeDir(context.Background(), &failWriter{}, m, src, 64<<10); !errors.Is(err, errNetwork) {
		t.Fatalf("error %v, want the writer's", err)
	}
}
