//go:build e2e

package bench

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/bangerdev/banger/internal/ociimport"
	"github.com/bangerdev/banger/test/harness"
)

// BenchmarkOCIImport is issue 7's OCI goal: importing a ~300 MB
// multi-layer image from a registry (banger's ociimport: download,
// decompress, flatten, mkfs.ext4 -d) against extracting the image's
// flattened layers with `tar -x` into a directory plus `mkfs.ext4 -d` by
// hand, the same run; goal: ratio <= 1.1. The image is the test image's
// root file system (290 MB, ~9500 entries) in four gzip layers: /usr/lib,
// the rest of /usr, the rest, and a layer of whiteouts and an opaque
// directory. Also reported: `tar -xzf` of each compressed layer in turn
// (the same decompression work as the import) plus mkfs, and the CPU
// time of each (the machines are shared: wall times swing with the load).
// BANGER_OCI_CPUPROFILE=FILE writes a CPU profile of the first import.
func BenchmarkOCIImport(b *testing.B) {
	_, imageDir, err := harness.Locate()
	if err != nil {
		b.Fatal(err)
	}
	for _, tool := range []string{"mkfs.ext4", "tar", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Fatalf("%s is needed", tool)
		}
	}
	work := b.TempDir()
	layers := buildLayers(b, filepath.Join(imageDir, "rootfs.ext4"), work)

	img := empty.Image
	var blobs []string
	for i, p := range layers {
		l, err := tarball.LayerFromFile(p, tarball.WithCompressionLevel(gzip.BestSpeed), tarball.WithCompressedCaching)
		if err != nil {
			b.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			b.Fatal(err)
		}
		// The compressed blob, for the tar -xzf baseline.
		rc, err := l.Compressed()
		if err != nil {
			b.Fatal(err)
		}
		blob := filepath.Join(work, fmt.Sprintf("layer%d.tar.gz", i))
		writeFile(b, blob, rc)
		blobs = append(blobs, blob)
	}
	cfg, _ := img.ConfigFile()
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		b.Fatal(err)
	}
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	ref := strings.TrimPrefix(srv.URL, "http://") + "/bench/rootfs:1"
	r, _ := name.ParseReference(ref)
	if err := remote.Write(r, img); err != nil {
		b.Fatal(err)
	}
	flat := filepath.Join(work, "flat.tar")
	rc := mutate.Extract(img)
	writeFile(b, flat, rc)
	var compressed int64
	for _, blob := range blobs {
		fi, _ := os.Stat(blob)
		compressed += fi.Size()
	}
	fi, _ := os.Stat(flat)
	b.Logf("image: %d layers, %d MB compressed, flattened tar %d MB", len(layers), compressed>>20, fi.Size()>>20)

	const n = 3
	var imports, flats, perLayer []time.Duration
	var importCPU, flatCPU, perLayerCPU []time.Duration
	for i := 0; i < n; i++ {
		cpu0 := cpuTime(syscall.RUSAGE_SELF) + cpuTime(syscall.RUSAGE_CHILDREN)
		dir := filepath.Join(work, fmt.Sprintf("import%d", i))
		must(b, os.Mkdir(dir, 0o700))
		if prof := os.Getenv("BANGER_OCI_CPUPROFILE"); prof != "" && i == 0 {
			f, err := os.Create(prof)
			must(b, err)
			must(b, pprof.StartCPUProfile(f))
		}
		start := time.Now()
		s, err := ociimport.Resolve(context.Background(), ref, ociimport.Options{})
		if err != nil {
			b.Fatal(err)
		}
		// As bangerd does: the flattened tree is moved aside and removed
		// in the background (waited for before the next measure).
		removed := make(chan struct{})
		built, err := s.Build(context.Background(), dir, ociimport.BuildOptions{HeadroomMiB: 512, DiscardTree: func(tree string) {
			trash := filepath.Join(work, fmt.Sprintf("trash%d", i))
			if err := os.Rename(tree, trash); err != nil {
				b.Fatal(err)
			}
			go func() { os.RemoveAll(trash); close(removed) }()
		}})
		if err != nil {
			b.Fatal(err)
		}
		imports = append(imports, time.Since(start))
		importCPU = append(importCPU, cpuTime(syscall.RUSAGE_SELF)+cpuTime(syscall.RUSAGE_CHILDREN)-cpu0)
		if os.Getenv("BANGER_OCI_CPUPROFILE") != "" && i == 0 {
			pprof.StopCPUProfile()
		}
		<-removed
		st, _ := os.Stat(built.Rootfs)
		size := st.Size()
		os.RemoveAll(dir)

		c0 := cpuTime(syscall.RUSAGE_CHILDREN)
		flats = append(flats, byHand(b, work, size, func(root string) []string {
			return []string{"tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xf", flat, "-C", root}
		}))
		c1 := cpuTime(syscall.RUSAGE_CHILDREN)
		flatCPU = append(flatCPU, c1-c0)
		perLayer = append(perLayer, byHand(b, work, size, func(root string) []string {
			var cmds []string
			for _, blob := range blobs {
				cmds = append(cmds, "tar --numeric-owner --xattrs --xattrs-include='*' -xzf "+blob+" -C "+root)
			}
			return []string{"sh", "-c", strings.Join(cmds, " && ")}
		}))
		perLayerCPU = append(perLayerCPU, cpuTime(syscall.RUSAGE_CHILDREN)-c1)
	}
	mi, mf, ml := median(imports), median(flats), median(perLayer)
	b.Logf("OCI import (registry on 127.0.0.1, %d MB in %d layers): median %v (samples %v)", compressed>>20, len(layers), mi, imports)
	b.Logf("tar -xf flattened tar + mkfs.ext4 -d:                  median %v (samples %v)", mf, flats)
	b.Logf("tar -xzf each layer + mkfs.ext4 -d:                    median %v (samples %v)", ml, perLayer)
	b.Logf("ratio import / (tar -x flattened + mkfs) = %.2f (goal <= 1.10); against per-layer tar -xzf + mkfs: %.2f",
		mi.Seconds()/mf.Seconds(), mi.Seconds()/ml.Seconds())
	// The machines are shared: wall time swings with the load, CPU time
	// (user + system, of this process and its children; the import's
	// includes the in-process registry serving the layers) much less.
	ci, cf, cl := median(importCPU), median(flatCPU), median(perLayerCPU)
	b.Logf("CPU time: import %v, tar -xf flattened + mkfs %v, tar -xzf layers + mkfs %v; ratio import / flattened %.2f, / per-layer %.2f",
		ci, cf, cl, ci.Seconds()/cf.Seconds(), ci.Seconds()/cl.Seconds())
	b.ReportMetric(mi.Seconds()/mf.Seconds(), "ratio")
	b.ReportMetric(ci.Seconds()/cf.Seconds(), "cpu-ratio")
}

// cpuTime is the user + system time of who (RUSAGE_SELF, RUSAGE_CHILDREN).
func cpuTime(who int) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(who, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// byHand times the extraction command plus mkfs.ext4 -d of an image of
// size bytes, in a fresh directory.
func byHand(b *testing.B, work string, size int64, cmd func(root string) []string) time.Duration {
	b.Helper()
	dir, err := os.MkdirTemp(work, "hand-")
	must(b, err)
	defer os.RemoveAll(dir)
	root := filepath.Join(dir, "root")
	must(b, os.Mkdir(root, 0o755))
	out := filepath.Join(dir, "rootfs.ext4")
	start := time.Now()
	argv := cmd(root)
	if o, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
		b.Fatalf("%v: %v: %s", argv, err, o)
	}

	f, err := os.Create(out)
	must(b, err)
	must(b, f.Truncate(size))
	f.Close()
	if o, err := exec.Command("mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-E", "root_owner=0:0", "-d", root, out).CombinedOutput(); err != nil {
		b.Fatalf("mkfs.ext4: %v: %s", err, o)
	}
	return time.Since(start)
}

// buildLayers makes the benchmark's layer tars from the test image's
// root file system (mounted read-only through a loop device).
func buildLayers(b *testing.B, rootfs, work string) []string {
	b.Helper()
	mnt := filepath.Join(work, "mnt")
	must(b, os.Mkdir(mnt, 0o755))
	if o, err := exec.Command("mount", "-o", "ro,loop", rootfs, mnt).CombinedOutput(); err != nil {
		b.Fatalf("mount %s: %v: %s", rootfs, err, o)
	}
	defer exec.Command("umount", mnt).Run()
	tarOf := func(out string, args ...string) string {
		p := filepath.Join(work, out)
		argv := append([]string{"--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", mnt, "-cf", p}, args...)
		if o, err := exec.Command("tar", argv...).CombinedOutput(); err != nil {
			b.Fatalf("tar %v: %v: %s", argv, err, o)
		}
		return p
	}
	l1 := tarOf("l1.tar", "./usr/lib")
	l2 := tarOf("l2.tar", "--exclude=./usr/lib", "./usr")
	l3 := tarOf("l3.tar", "--exclude=./usr", "--exclude=./lost+found", ".")
	// A last layer of whiteouts: the docs go (opaque), a file goes, one
	// comes.
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range []*tar.Header{
		{Name: "usr/share/doc/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "usr/share/doc/.wh..wh..opq", Typeflag: tar.TypeReg},
		{Name: "etc/.wh.motd", Typeflag: tar.TypeReg},
		{Name: "etc/motd", Typeflag: tar.TypeReg, Mode: 0o644, Size: 6},
	} {
		h.ModTime = time.Now()
		must(b, tw.WriteHeader(h))
		if h.Size > 0 {
			tw.Write([]byte("hello\n"))
		}
	}
	must(b, tw.Close())
	l4 := filepath.Join(work, "l4.tar")
	must(b, os.WriteFile(l4, buf.Bytes(), 0o644))
	return []string{l1, l2, l3, l4}
}

func writeFile(b *testing.B, p string, rc io.ReadCloser) {
	b.Helper()
	defer rc.Close()
	f, err := os.Create(p)
	must(b, err)
	if _, err := io.Copy(f, rc); err != nil {
		b.Fatal(err)
	}
	must(b, f.Close())
}

func must(b *testing.B, err error) {
	b.Helper()
	if err != nil {
		b.Fatal(err)
	}
}
