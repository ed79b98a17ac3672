package daemon

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/bundle"
	"github.com/bangerdev/banger/internal/catalog"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
)

// bundleServer serves catalogs and bundles on 127.0.0.1, counting the
// requests of each path and the bytes written.
type bundleServer struct {
	*httptest.Server
	t     testing.TB
	mu    sync.Mutex
	files map[string][]byte
	reqs  map[string][]string // path -> Range headers
	// status answers a path with this status instead of its bytes.
	status map[string]int
	// cutAfter cuts the first response of a path after that many body
	// bytes (the connection is dropped).
	cutAfter map[string]int64
	// downAfterCut: once a path's response was cut, the path answers 503
	// (the server went down mid-download).
	downAfterCut map[string]bool
	// gate, when set, holds a path's body after its first gateAt bytes
	// until it is closed.
	gate   chan struct{}
	gateAt int64
	served atomic.Int64
}

func newBundleServer(t testing.TB) *bundleServer {
	s := &bundleServer{t: t, files: map[string][]byte{}, reqs: map[string][]string{}, status: map[string]int{}, cutAfter: map[string]int64{}, downAfterCut: map[string]bool{}}
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

func (s *bundleServer) url(p string) string { return s.URL + p }

// hold makes the bundles' bodies stop after gateAt bytes until release is
// called (at the latest when the test ends).
func (s *bundleServer) hold(t testing.TB) (release func()) {
	gate := make(chan struct{})
	s.mu.Lock()
	s.gate, s.gateAt = gate, gateAt
	s.mu.Unlock()
	var once sync.Once
	release = func() { once.Do(func() { close(gate) }) }
	t.Cleanup(release)
	return release
}

func (s *bundleServer) put(p string, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.files[p] = b
}

func (s *bundleServer) requests(p string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.reqs[p]...)
}

type limitedWriter struct {
	http.ResponseWriter
	s       *bundleServer
	n, cut  int64
	gate    chan struct{}
	gateAt  int64
	stopped bool
}

func (w *limitedWriter) Write(p []byte) (int, error) {
	if w.gate != nil && w.n+int64(len(p)) > w.gateAt {
		k := w.gateAt - w.n
		n, err := w.ResponseWriter.Write(p[:k])
		w.n += int64(n)
		w.s.served.Add(int64(n))
		if err != nil {
			return n, err
		}
		w.ResponseWriter.(http.Flusher).Flush()
		<-w.gate
		w.gate = nil
		m, err := w.Write(p[k:])
		return n + m, err
	}
	if w.cut > 0 && w.n+int64(len(p)) > w.cut {
		n, _ := w.ResponseWriter.Write(p[:w.cut-w.n])
		w.n += int64(n)
		w.s.served.Add(int64(n))
		w.stopped = true
		return n, errors.New("cut")
	}
	n, err := w.ResponseWriter.Write(p)
	w.n += int64(n)
	w.s.served.Add(int64(n))
	return n, err
}

func (s *bundleServer) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.reqs[r.URL.Path] = append(s.reqs[r.URL.Path], r.Header.Get("Range"))
	b, ok := s.files[r.URL.Path]
	status := s.status[r.URL.Path]
	cut := s.cutAfter[r.URL.Path]
	delete(s.cutAfter, r.URL.Path)
	gate, gateAt := s.gate, s.gateAt
	s.mu.Unlock()
	if status != 0 {
		http.Error(w, http.StatusText(status), status)
		return
	}
	if !ok {
		http.NotFound(w, r)
		return
	}
	lw := &limitedWriter{ResponseWriter: w, s: s, cut: cut}
	if strings.HasSuffix(r.URL.Path, ".tar.zst") && gate != nil {
		lw.gate, lw.gateAt = gate, gateAt
	}
	http.ServeContent(lw, r, filepath.Base(r.URL.Path), time.Unix(0, 0), bytes.NewReader(b))
	if lw.stopped {
		s.mu.Lock()
		if s.downAfterCut[r.URL.Path] {
			s.status[r.URL.Path] = http.StatusServiceUnavailable
		}
		s.mu.Unlock()
		if hj, ok := w.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				c.Close()
			}
		}
	}
}

// randomBytes is incompressible content (zstd can't shrink it, so
// compressed offsets are content offsets).
func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 7))
	for i := 0; i+8 <= len(b); i += 8 {
		v := r.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// pullFixture is a bundle server with a kernel bundle "tk" and an image
// bundle "timg" (booting tk) and the catalog naming them.
type pullFixture struct {
	srv          *bundleServer
	kernel       catalog.Entry
	image        catalog.Entry
	imageBundle  []byte
	kernelBundle []byte
	rootfs       []byte
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func makeBundle(t testing.TB, m bundle.Manifest, files map[string][]byte) []byte {
	t.Helper()
	dir := t.TempDir()
	for p, b := range files {
		writeFile(t, filepath.Join(dir, p), b)
	}
	var out bytes.Buffer
	if err := bundle.Write(context.Background(), &out, &m, dir); err != nil {
		t.Fatalf("write bundle %s: %v", m.Name, err)
	}
	return out.Bytes()
}

// newPullFixture serves the bundles of the env's files: a kernel bundle
// of its kernel and initrd, an image bundle of a rootfs of rootfsSize
// bytes (the env's ext4 head, then random bytes).
func newPullFixture(t testing.TB, e *testEnv, rootfsSize int) *pullFixture {
	t.Helper()
	f := &pullFixture{srv: newBundleServer(t)}
	kernel, _ := os.ReadFile(e.kernel)
	initrd, _ := os.ReadFile(e.initrd)
	head, _ := os.ReadFile(e.rootfs)
	f.rootfs = append(head, randomBytes(rootfsSize-len(head), 1)...)
	f.kernelBundle = makeBundle(t, bundle.Manifest{Schema: bundle.Schema, Kind: bundle.KindKernel, Name: "tk", Version: "1.0", Arch: runtime.GOARCH,
		Files: []bundle.File{{Path: "vmlinux", Role: bundle.RoleKernel}, {Path: "initrd.img", Role: bundle.RoleInitrd}}},
		map[string][]byte{"vmlinux": kernel, "initrd.img": initrd})
	f.imageBundle = makeBundle(t, bundle.Manifest{Schema: bundle.Schema, Kind: bundle.KindImage, Name: "timg", Version: "2.0", Arch: runtime.GOARCH,
		Kernel: "tk", User: "dev", Files: []bundle.File{{Path: "rootfs.ext4", Role: bundle.RoleRootfs}}},
		map[string][]byte{"rootfs.ext4": f.rootfs})
	f.srv.put("/tk.tar.zst", f.kernelBundle)
	f.srv.put("/timg.tar.zst", f.imageBundle)
	f.kernel = catalog.Entry{Name: "tk", Version: "1.0", Arch: runtime.GOARCH, URL: f.srv.url("/tk.tar.zst"), Size: int64(len(f.kernelBundle)), SHA256: sha(f.kernelBundle)}
	f.image = catalog.Entry{Name: "timg", Version: "2.0", Arch: runtime.GOARCH, URL: f.srv.url("/timg.tar.zst"), Size: int64(len(f.imageBundle)), SHA256: sha(f.imageBundle), Kernel: "tk", User: "dev"}
	f.publish(t)
	return f
}

// publish serves the catalog of f's entries.
func (f *pullFixture) publish(t testing.TB, extraImages ...catalog.Entry) {
	t.Helper()
	b, err := json.Marshal(catalog.File{Schema: catalog.Schema, Images: append([]catalog.Entry{f.image}, extraImages...), Kernels: []catalog.Entry{f.kernel}})
	if err != nil {
		t.Fatal(err)
	}
	f.srv.put("/catalog.json", b)
}

// withCatalog points the daemon at the fixture's catalog.
func (f *pullFixture) withCatalog(c *config.Daemon) {
	c.CatalogURLs = []string{f.srv.url("/catalog.json")}
}

// setupPull starts a daemon with no image and the fixture's catalog.
func setupPull(t testing.TB, rootfsSize int) (*testEnv, *testDaemon, *pullFixture) {
	t.Helper()
	e := newEnv(t, nil)
	f := newPullFixture(t, e, rootfsSize)
	f.withCatalog(&e.cfg)
	return e, e.start(), f
}

// partials lists what a pull left in the staging root.
func partials(t testing.TB, e *testEnv) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(e.cfg.StateDir, "tmp"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var out []string
	for _, d := range ents {
		out = append(out, d.Name())
	}
	return out
}

// assertNothingPulled checks that no image (and no kernel but keep) is
// registered and no staging directory is left.
func assertNothingPulled(t testing.TB, e *testEnv, d *testDaemon, keepKernels ...string) {
	t.Helper()
	ims, err := d.c.ImageList(testCtx(t))
	if err != nil || len(ims) != 0 {
		t.Errorf("images after a failed pull: %v, %v", ims, err)
	}
	ks, err := d.c.KernelList(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range ks {
		if !slicesContains(keepKernels, k.Name) {
			t.Errorf("kernel %s registered after a failed pull", k.Name)
		}
	}
	if p := partials(t, e); len(p) != 0 {
		t.Errorf("staging directories left: %v", p)
	}
	ents, _ := os.ReadDir(filepath.Join(e.cfg.StateDir, "images"))
	if len(ents) != 0 {
		t.Errorf("image directories left: %d", len(ents))
	}
}

func slicesContains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// progressLog records progress frames.
type progressLog struct {
	mu     sync.Mutex
	frames []api.Progress
	first  chan struct{}
	once   sync.Once
}

func newProgressLog() *progressLog { return &progressLog{first: make(chan struct{})} }

func (l *progressLog) add(p api.Progress) {
	l.mu.Lock()
	l.frames = append(l.frames, p)
	l.mu.Unlock()
	if p.Total > 0 && p.Done > 0 && strings.Contains(p.Phase, "image") {
		l.once.Do(func() { close(l.first) })
	}
}

// waitFirst waits for the first progress of an image download.
func (l *progressLog) waitFirst(t testing.TB) {
	t.Helper()
	select {
	case <-l.first:
	case <-time.After(20 * time.Second):
		l.mu.Lock()
		frames := fmt.Sprint(l.frames)
		l.mu.Unlock()
		t.Fatalf("no download progress after 20s; frames: %s", frames)
	}
}

func (l *progressLog) phases() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, p := range l.frames {
		if len(out) == 0 || out[len(out)-1] != p.Phase {
			out = append(out, p.Phase)
		}
	}
	return out
}

func TestPullImageFromCatalog(t *testing.T) {
	e, d, f := setupPull(t, 3<<20)
	ctx := testCtx(t)
	pl := newProgressLog()
	im, err := d.c.ImagePull(ctx, api.PullParams{Ref: "timg"}, pl.add)
	if err != nil {
		t.Fatal(err)
	}
	if im.Name != "timg" || im.Source != api.SourceCatalog || im.Version != "2.0" || im.Digest != "sha256:"+f.image.SHA256 ||
		im.Ref != f.image.URL || im.KernelName != "tk" || im.User != "dev" || !im.Managed {
		t.Fatalf("pulled image %+v", im)
	}
	got, err := os.ReadFile(im.Rootfs)
	if err != nil || !bytes.Equal(got, f.rootfs) {
		t.Fatalf("rootfs: %d bytes (%v), want the bundle's %d", len(got), err, len(f.rootfs))
	}
	k, err := d.c.KernelInspect(ctx, "tk")
	if err != nil || k.Source != api.SourceCatalog || k.Version != "1.0" || k.Initrd == "" {
		t.Fatalf("kernel: %+v, %v", k, err)
	}
	phases := strings.Join(pl.phases(), "|")
	for _, want := range []string{"download kernel tk@1.0", "download image timg@2.0", "install image timg"} {
		if !strings.Contains(phases, want) {
			t.Errorf("phases %s lack %q", phases, want)
		}
	}
	if p := partials(t, e); len(p) != 0 {
		t.Errorf("staging directories left: %v", p)
	}
	// A second pull of the same version is a no-op; the bundle was read once.
	if _, err := d.c.ImagePull(ctx, api.PullParams{Ref: "timg@2.0"}, nil); err != nil {
		t.Fatalf("second pull: %v", err)
	}
	if n := len(f.srv.requests("/timg.tar.zst")); n != 1 {
		t.Errorf("%d requests of the bundle, want 1", n)
	}
	// The image boots with its kernel.
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "box", Image: "timg", Start: true, MemoryMiB: 128, CPUs: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if vm.State != api.StateRunning || vm.Image != "timg" || vm.Kernel != "tk" {
		t.Errorf("vm %+v: want image timg with kernel tk", vm)
	}
}

func TestPullKernel(t *testing.T) {
	_, d, f := setupPull(t, 1<<20)
	k, err := d.c.KernelPull(testCtx(t), api.PullParams{Ref: "tk"}, nil)
	if err != nil || k.Name != "tk" || k.Source != api.SourceCatalog || k.Digest != "sha256:"+f.kernel.SHA256 {
		t.Fatalf("kernel pull: %+v, %v", k, err)
	}
	_, err = d.c.KernelPull(testCtx(t), api.PullParams{Ref: "nosuch"}, nil)
	wireErr(t, "kernel pull nosuch", err, errdefs.ErrNotFound)
	if !strings.Contains(err.Error(), f.srv.url("/catalog.json")) {
		t.Errorf("error %q does not list the catalogs searched", err)
	}
}

// Each broken pull fails with a clear error and leaves nothing: no image,
// no staging directory.
func TestPullFailures(t *testing.T) {
	e := newEnv(t, nil)
	f := newPullFixture(t, e, 2<<20)
	f.withCatalog(&e.cfg)

	// A bundle whose manifest names a file the archive lacks.
	var missing bytes.Buffer
	zw, _ := zstd.NewWriter(&missing)
	tw := tar.NewWriter(zw)
	man, _ := json.Marshal(bundle.Manifest{Schema: bundle.Schema, Kind: bundle.KindImage, Name: "lacking", Version: "1", Arch: runtime.GOARCH,
		Files: []bundle.File{{Path: "rootfs.ext4", Role: bundle.RoleRootfs, Size: int64(len(f.rootfs)), SHA256: sha(f.rootfs)},
			{Path: "seed.img", Role: bundle.RoleWorkSeed, Size: 5, SHA256: sha([]byte("seed\n"))}}})
	tw.WriteHeader(&tar.Header{Name: bundle.ManifestName, Mode: 0o644, Size: int64(len(man)), Typeflag: tar.TypeReg})
	tw.Write(man)
	tw.WriteHeader(&tar.Header{Name: "rootfs.ext4", Mode: 0o644, Size: int64(len(f.rootfs)), Typeflag: tar.TypeReg})
	tw.Write(f.rootfs)
	tw.Close()
	zw.Close()
	f.srv.put("/lacking.tar.zst", missing.Bytes())

	// Bundles of their own for the cases whose manifest must match the
	// entry: a catalog sha256 that is wrong, an archive cut in half
	// (catalog size and sha256 of the half: the archive itself ends
	// early), a server holding half of what the catalog says.
	img := func(name string) []byte {
		return makeBundle(t, bundle.Manifest{Schema: bundle.Schema, Kind: bundle.KindImage, Name: name, Version: "1", Arch: runtime.GOARCH,
			Files: []bundle.File{{Path: "rootfs.ext4", Role: bundle.RoleRootfs}}}, map[string][]byte{"rootfs.ext4": f.rootfs})
	}
	badsum, truncated, short := img("badsum"), img("truncated"), img("short")
	truncated = truncated[:len(truncated)/2]
	f.srv.put("/badsum.tar.zst", badsum)
	f.srv.put("/truncated.tar.zst", truncated)
	f.srv.put("/short.tar.zst", short[:len(short)/2])
	f.srv.status["/gone.tar.zst"] = http.StatusNotFound
	midway := img("midway")
	f.srv.put("/midway.tar.zst", midway)
	f.srv.cutAfter["/midway.tar.zst"] = int64(len(midway) / 2)
	f.srv.downAfterCut["/midway.tar.zst"] = true
	f.srv.status["/broken.tar.zst"] = http.StatusInternalServerError
	entry := func(name, path string, size int64, sum string) catalog.Entry {
		return catalog.Entry{Name: name, Version: "1", Arch: runtime.GOARCH, URL: f.srv.url(path), Size: size, SHA256: sum, Kernel: "tk"}
	}
	sz := int64(len(f.imageBundle))
	f.publish(t,
		entry("badsum", "/badsum.tar.zst", int64(len(badsum)), strings.Repeat("ab", 32)),
		entry("truncated", "/truncated.tar.zst", int64(len(truncated)), sha(truncated)),
		entry("short", "/short.tar.zst", int64(len(short)), sha(short)),
		entry("gone", "/gone.tar.zst", sz, f.image.SHA256),
		entry("broken", "/broken.tar.zst", sz, f.image.SHA256),
		entry("lacking", "/lacking.tar.zst", int64(missing.Len()), sha(missing.Bytes())),
		// A bundle that can't be fetched, with a recipe: the local build
		// is tried (one this banger doesn't have: no build runs here).
		withBuild(entry("fallback", "/gone.tar.zst", sz, f.image.SHA256), "no-such-recipe"),
		// One whose server goes down after part of the bundle arrived:
		// an error of the pull, no local build started over.
		withBuild(entry("midway", "/midway.tar.zst", int64(len(midway)), sha(midway)), "no-such-recipe"),
		withBuild(catalog.Entry{Name: "buildonly", Version: "1", Arch: runtime.GOARCH, Kernel: "tk"}, "no-such-recipe"),
	)
	// The kernel is pulled first, and kept: the cases are the image's.
	d := e.start()
	if _, err := d.c.KernelPull(testCtx(t), api.PullParams{Ref: "tk"}, nil); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ref, want string
	}{
		{"badsum", "sha256"},
		{"truncated", "truncated"},
		{"short", "expected"},
		{"gone", "404"},
		{"broken", "500"},
		{"lacking", "seed.img"},
		{"fallback", `no local build recipe "no-such-recipe" (this banger builds "golden"): invalid argument (after the bundle was unavailable: `},
		{"buildonly", `no local build recipe "no-such-recipe"`},
		{"midway", "503"},
	} {
		t.Run(tc.ref, func(t *testing.T) {
			_, err := d.c.ImagePull(testCtx(t), api.PullParams{Ref: tc.ref}, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("pull %s: %v, want an error mentioning %q", tc.ref, err, tc.want)
			}
			t.Logf("pull %s: %v", tc.ref, err)
			if tc.ref == "midway" {
				if strings.Contains(err.Error(), "local build") {
					t.Errorf("pull midway: a local build was tried after part of the bundle arrived: %v", err)
				}
				// Kept for a resume (TestPullResumesAcrossPulls); removed here so the
				// next cases start clean.
				kept := filepath.Join(e.cfg.StateDir, "tmp", "image-sha256-"+sha(midway)[:16]+".partial")
				if _, err := os.Stat(kept); err != nil {
					t.Errorf("the staging dir of a pull that failed on the network was not kept: %v", err)
				}
				os.RemoveAll(kept)
			}
			assertNothingPulled(t, e, d, "tk")
		})
	}

	// A catalog with a bad entry: every pull says which catalog and entry.
	bad := `{"schema": 1, "images": [{"name": "nosum", "version": "1", "arch": "` + runtime.GOARCH + `", "url": "` + f.srv.url("/timg.tar.zst") + `", "size": 10}]}`
	f.srv.put("/bad.json", []byte(bad))
	d.close()
	e.cfg.CatalogURLs = append(e.cfg.CatalogURLs, f.srv.url("/bad.json"))
	d = e.start()
	_, err := d.c.ImagePull(testCtx(t), api.PullParams{Ref: "timg"}, nil)
	if err == nil || !strings.Contains(err.Error(), f.srv.url("/bad.json")) || !strings.Contains(err.Error(), "nosum") {
		t.Fatalf("pull with a bad catalog: %v, want the catalog and the entry named", err)
	}
	assertNothingPulled(t, e, d, "tk")
}

func withBuild(e catalog.Entry, recipe string) catalog.Entry {
	e.Build = recipe
	return e
}

// A download cut short resumes with a Range request; the bytes served
// stay well under twice the bundle.
func TestPullResumes(t *testing.T) {
	_, d, f := setupPull(t, 6<<20)
	f.srv.mu.Lock()
	f.srv.cutAfter["/timg.tar.zst"] = 2 << 20
	f.srv.mu.Unlock()
	before := f.srv.served.Load()
	im, err := d.c.ImagePull(testCtx(t), api.PullParams{Ref: "timg"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(im.Rootfs); !bytes.Equal(got, f.rootfs) {
		t.Fatal("resumed rootfs differs")
	}
	r := f.srv.requests("/timg.tar.zst")
	if len(r) != 2 || r[0] != "" || !strings.HasPrefix(r[1], "bytes=") {
		t.Fatalf("bundle requests' Range headers %q: want a whole request then a Range request", r)
	}
	served := f.srv.served.Load() - before - int64(len(f.kernelBundle))
	if served >= 2*int64(len(f.imageBundle)) {
		t.Errorf("served %d bytes for a %d byte bundle", served, len(f.imageBundle))
	}
}

// The gated tests hold the image's download after its first frame (the
// installer reports progress frame by frame; a frame holds at most
// bundle.FrameSize of a file): a rootfs of 1.5 frames, held at 1.25.
const (
	gatedRootfs = bundle.FrameSize * 3 / 2
	gateAt      = bundle.FrameSize * 5 / 4
)

// Two pulls of one image at once download it once and get the same image.
func TestPullConcurrentShared(t *testing.T) {
	_, d, f := setupPull(t, gatedRootfs)
	if _, err := d.c.KernelPull(testCtx(t), api.PullParams{Ref: "tk"}, nil); err != nil {
		t.Fatal(err)
	}
	release := f.srv.hold(t)
	var wg sync.WaitGroup
	ids := make([]string, 2)
	logs := []*progressLog{newProgressLog(), newProgressLog()}
	for i, ref := range []string{"timg", "timg@2.0"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			im, err := d.c.ImagePull(testCtx(t), api.PullParams{Ref: ref}, logs[i].add)
			if err != nil {
				t.Errorf("pull %s: %v", ref, err)
			}
			ids[i] = im.ID
		}()
		if i == 0 {
			logs[0].waitFirst(t) // the first pull is downloading
		}
	}
	// Both watch the download before it ends.
	waitFor(testCtx(t), t, "the second pull to get progress", func() bool {
		select {
		case <-logs[1].first:
			return true
		default:
			return false
		}
	})
	release()
	wg.Wait()
	if ids[0] == "" || ids[0] != ids[1] {
		t.Fatalf("image ids %q: want one image", ids)
	}
	if n := len(f.srv.requests("/timg.tar.zst")); n != 1 {
		t.Fatalf("%d requests of the bundle, want 1", n)
	}
}

// A pull whose client goes away goes on and registers the image.
func TestPullOutlivesClient(t *testing.T) {
	_, d, f := setupPull(t, gatedRootfs)
	release := f.srv.hold(t)
	ctx, cancel := context.WithCancel(context.Background())
	pl := newProgressLog()
	done := make(chan error, 1)
	go func() {
		_, err := d.c.ImagePull(ctx, api.PullParams{Ref: "timg"}, pl.add)
		done <- err
	}()
	pl.waitFirst(t)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("client's pull: %v, want its cancellation", err)
	}
	release()
	waitFor(testCtx(t), t, "the image to be registered", func() bool {
		_, err := d.c.ImageInspect(testCtx(t), "timg")
		return err == nil
	})
}

// pull cancel stops a running pull: its callers get a cancellation, and
// nothing is left.
func TestPullCancel(t *testing.T) {
	e, d, f := setupPull(t, gatedRootfs)
	if _, err := d.c.KernelPull(testCtx(t), api.PullParams{Ref: "tk"}, nil); err != nil {
		t.Fatal(err)
	}
	f.srv.hold(t)
	pl := newProgressLog()
	done := make(chan error, 1)
	go func() {
		_, err := d.c.ImagePull(testCtx(t), api.PullParams{Ref: "timg"}, pl.add)
		done <- err
	}()
	pl.waitFirst(t)
	if err := d.c.PullCancel(testCtx(t), "image", "timg"); err != nil {
		t.Fatal(err)
	}
	err := <-done
	wireErr(t, "cancelled pull", err, context.Canceled)
	assertNothingPulled(t, e, d, "tk")
	err = d.c.PullCancel(testCtx(t), "image", "timg")
	wireErr(t, "cancel with no pull", err, errdefs.ErrNotFound)
}

// vm create with an image that is not local pulls it (progress frames to
// the create), and one in no catalog is not found, naming the catalogs.
func TestCreateAutoPulls(t *testing.T) {
	_, d, f := setupPull(t, 1<<20)
	ctx := testCtx(t)
	pl := newProgressLog()
	vm, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "auto", Image: "timg", MemoryMiB: 128, CPUs: 1}, pl.add)
	if err != nil {
		t.Fatal(err)
	}
	if vm.Image != "timg" {
		t.Fatalf("vm image %s", vm.Image)
	}
	if phases := strings.Join(pl.phases(), "|"); !strings.Contains(phases, "download image timg@2.0") {
		t.Errorf("create's progress phases %s: no download", phases)
	}
	_, err = d.c.VMCreate(ctx, api.VMCreateParams{Name: "none", Image: "nosuch"}, nil)
	wireErr(t, "create with an unknown image", err, errdefs.ErrNotFound)
	// The harness turns the embedded catalogs off: only catalog_urls are searched.
	if !strings.Contains(err.Error(), f.srv.url("/catalog.json")) || strings.Contains(err.Error(), catalog.EmbeddedName) {
		t.Errorf("error %q does not list the catalogs searched", err)
	}
	if n := len(f.srv.requests("/timg.tar.zst")); n != 1 {
		t.Errorf("%d requests of the bundle, want 1", n)
	}
	_ = fmt.Sprint()
}

// Cancelling an image pull cancels the pull of its kernel that it started
// (nothing else waits for it), instead of leaving it running.
func TestPullCancelNestedKernel(t *testing.T) {
	e, d, f := setupPull(t, 1<<20)
	gate := make(chan struct{})
	f.srv.mu.Lock()
	f.srv.gate, f.srv.gateAt = gate, 100 // every bundle, the kernel's too, stalls
	f.srv.mu.Unlock()
	var once sync.Once
	release := func() { once.Do(func() { close(gate) }) }
	t.Cleanup(release)
	done := make(chan error, 1)
	go func() {
		_, err := d.c.ImagePull(testCtx(t), api.PullParams{Ref: "timg"}, nil)
		done <- err
	}()
	dm := e.daemon.Load()
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	waitFor(ctx, t, "the image's kernel pull", func() bool { return dm.pulls.find("kernel", "tk") != nil })
	if err := d.c.PullCancel(testCtx(t), "image", "timg"); err != nil {
		t.Fatal(err)
	}
	wireErr(t, "cancelled pull", <-done, context.Canceled)
	waitFor(ctx, t, "the nested kernel pull to stop", func() bool { return dm.pulls.find("kernel", "tk") == nil })
	release()
	assertNothingPulled(t, e, d)
}

// A pull that fails on the network after part of the bundle arrived keeps
// its staging dir (keyed by the bundle's sha256) with the bundle's
// checkpoint; the next pull of the same entry resumes from it with a Range
// request instead of downloading it all again. Checksum failures and
// cancels don't keep it (TestPullFailures, TestPullCancel); image prune
// removes it.
func TestPullResumesAcrossPulls(t *testing.T) {
	e, d, f := setupPull(t, 4*bundle.FrameSize)
	ctx := testCtx(t)
	if _, err := d.c.KernelPull(ctx, api.PullParams{Ref: "tk"}, nil); err != nil {
		t.Fatal(err)
	}
	size := int64(len(f.imageBundle))
	f.srv.mu.Lock()
	f.srv.cutAfter["/timg.tar.zst"] = size * 3 / 4
	f.srv.downAfterCut["/timg.tar.zst"] = true
	f.srv.mu.Unlock()
	before := f.srv.served.Load()
	_, err := d.c.ImagePull(ctx, api.PullParams{Ref: "timg"}, nil)
	if err == nil {
		t.Fatal("pull with the server down midway succeeded")
	}
	kept := filepath.Join(e.cfg.StateDir, "tmp", "image-sha256-"+f.image.SHA256[:16]+".partial")
	if _, err := os.Stat(kept); err != nil {
		t.Fatalf("staging dir not kept after a network failure (%v): %v", err, partials(t, e))
	}
	// The server is back: the pull resumes.
	f.srv.mu.Lock()
	delete(f.srv.status, "/timg.tar.zst")
	f.srv.mu.Unlock()
	firstReqs := len(f.srv.requests("/timg.tar.zst"))
	im, err := d.c.ImagePull(ctx, api.PullParams{Ref: "timg"}, nil)
	if err != nil {
		t.Fatalf("pull after the server came back: %v", err)
	}
	if im.Name != "timg" {
		t.Fatalf("pulled %+v", im)
	}
	reqs := f.srv.requests("/timg.tar.zst")[firstReqs:]
	if len(reqs) == 0 || !strings.HasPrefix(reqs[0], "bytes=") || strings.HasPrefix(reqs[0], "bytes=0-") {
		t.Errorf("the second pull's requests %q: want a Range request from past the start", reqs)
	}
	served := f.srv.served.Load() - before
	if served >= size*3/2 {
		t.Errorf("%d bytes served for a %d-byte bundle: no resume", served, size)
	}
	t.Logf("bundle %d bytes, served %d over both pulls (%.2fx), second pull's requests %q", size, served, float64(served)/float64(size), reqs)
	if p := partials(t, e); len(p) != 0 {
		t.Errorf("staging directories left after the install: %v", p)
	}
}
