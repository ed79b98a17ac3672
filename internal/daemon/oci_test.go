package daemon

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/testenv"
)

// ociTestImage is an image of one layer holding files (name → content;
// a name ending in "/" is a directory), with a Cmd.
func ociTestImage(t *testing.T, files map[string]string) v1.Image {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for n, body := range files {
		h := &tar.Header{Name: n, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))}
		if strings.HasSuffix(n, "/") {
			h = &tar.Header{Name: n, Typeflag: tar.TypeDir, Mode: 0o755}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, body)
	}
	tw.Close()
	b := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	cfg, _ := img.ConfigFile()
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	cfg.Config.Cmd = []string{"/app", "--serve"}
	cfg.Config.Env = []string{"PATH=/bin"}
	cfg.Config.ExposedPorts = map[string]struct{}{"8080/tcp": {}}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func pushOCI(t *testing.T, ref string, img v1.Image) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
}

func TestPullOCI(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: layers keep their owners")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		testenv.Missing(t, "mkfs.ext4 (e2fsprogs)")
	}
	e, _ := setup(t, func(c *config.Daemon) { c.ImageHeadroomMiB = 8 })
	dd := e.daemon.Load()
	ctx := testCtx(t)
	kernels, err := dd.store.ListKernels(ctx)
	if err != nil || len(kernels) == 0 {
		t.Fatalf("kernels of the registered image: %v %v", kernels, err)
	}
	kernel := kernels[0].Name
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	reg := strings.TrimPrefix(srv.URL, "http://")
	ref := reg + "/team/app:1.0"
	img := ociTestImage(t, map[string]string{"app": "binary", "etc/": ""})
	pushOCI(t, ref, img)
	digest, _ := img.Digest()

	var phases []string
	progress := func(p api.Progress) {
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
		}
	}
	im, err := dd.pullOCI(ctx, api.PullParams{Ref: ref, Kernel: kernel}, progress)
	if err != nil {
		t.Fatal(err)
	}
	got, err := dd.store.GetImage(ctx, "app-1-0")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != im.ID || got.Source != api.SourceOCI || got.Ref != ref || got.Digest != digest.String() || !got.Managed ||
		got.KernelID != kernels[0].ID || !strings.Contains(got.ConfigJSON, `"cmd":["/app","--serve"]`) || !strings.Contains(got.ConfigJSON, `"8080/tcp"`) {
		t.Errorf("installed image %+v", got)
	}
	if strings.Join(phases, ",") != "resolve,extract layers,mkfs" {
		t.Errorf("progress phases %v", phases)
	}
	if out, err := exec.Command("debugfs", "-R", "cat /app", got.Rootfs).Output(); err == nil && string(out) != "binary" {
		t.Errorf("/app in the rootfs: %q", out)
	}

	// Up to date: the same image back, nothing new.
	again, err := dd.pullOCI(ctx, api.PullParams{Ref: ref, Kernel: kernel}, nil)
	if err != nil || again.ID != im.ID {
		t.Errorf("second pull: %v, id %s want %s", err, again.ID, im.ID)
	}
	// A new digest under the same tag: the name is taken.
	pushOCI(t, ref, ociTestImage(t, map[string]string{"app": "binary v2"}))
	_, err = dd.pullOCI(ctx, api.PullParams{Ref: ref, Kernel: kernel}, nil)
	if !errors.Is(err, errdefs.ErrAlreadyExists) || !strings.Contains(err.Error(), "--name") {
		t.Errorf("new digest, same name: %v; want already exists suggesting --name", err)
	}
	v2, err := dd.pullOCI(ctx, api.PullParams{Ref: ref, Kernel: kernel, Name: "app-v2"}, nil)
	if err != nil || v2.Name != "app-v2" || v2.Digest == im.Digest {
		t.Errorf("pull --name app-v2: %+v, %v", v2, err)
	}

	// An OCI archive (unpacked in the staging dir while it is read): the
	// image's directory holds its rootfs only.
	lay := filepath.Join(t.TempDir(), "layout")
	lp, err := layout.Write(lay, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "3"})); err != nil {
		t.Fatal(err)
	}
	saved := filepath.Join(t.TempDir(), "saved.tar")
	if out, err := exec.Command("tar", "-C", lay, "-cf", saved, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v: %s", err, out)
	}
	sv, err := dd.pullOCI(ctx, api.PullParams{Ref: saved, Kernel: kernel}, nil)
	if err != nil || sv.Name != "saved-3" || sv.Ref != "oci-archive:"+saved {
		t.Fatalf("pull an OCI archive: %+v, %v", sv, err)
	}
	if entries, _ := os.ReadDir(filepath.Dir(sv.Rootfs)); len(entries) != 1 {
		t.Errorf("image dir of an archive pull holds %v, want only the rootfs", entries)
	}

	// A derived name that is the default image's gets "-oci".
	pushOCI(t, reg+"/library/default:latest", ociTestImage(t, map[string]string{"d": "d"}))
	if di, err := dd.pullOCI(ctx, api.PullParams{Ref: reg + "/library/default", Kernel: kernel}, nil); err != nil || di.Name != "default-oci" {
		t.Errorf("pull of an image named like the default image: %+v, %v", di, err)
	}

	// Failures register nothing and leave no staging directory.
	var hostile bytes.Buffer
	tw := tar.NewWriter(&hostile)
	tw.WriteHeader(&tar.Header{Name: "../escape", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1})
	tw.Write([]byte("x"))
	tw.Close()
	hb := hostile.Bytes()
	hl, _ := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(hb)), nil })
	himg, _ := mutate.AppendLayers(empty.Image, hl)
	pushOCI(t, reg+"/bad/escape:1", himg)
	for _, c := range []struct {
		p    api.PullParams
		kind error
	}{
		{api.PullParams{Ref: reg + "/bad/escape:1", Kernel: kernel}, nil},
		{api.PullParams{Ref: reg + "/team/app:nope", Kernel: kernel}, errdefs.ErrNotFound},
		{api.PullParams{Ref: reg + "/team/app:1.0", Kernel: "no-such-kernel", Name: "x"}, errdefs.ErrNotFound},
		{api.PullParams{Ref: reg + "/team/app:1.0", Kernel: kernel, Name: "Bad_Name"}, errdefs.ErrInvalid},
		{api.PullParams{Ref: "/nonexistent/dir", Kernel: kernel}, errdefs.ErrNotFound},
	} {
		_, err := dd.pullOCI(ctx, c.p, nil)
		if err == nil || c.kind != nil && !errors.Is(err, c.kind) {
			t.Errorf("pull %+v: %v, want %v", c.p, err, c.kind)
		}
	}
	ims, _ := dd.store.ListImages(ctx)
	if len(ims) != 5 {
		t.Errorf("%d images after the failed pulls, want 5 (default, app-1-0, app-v2, saved-3, default-oci)", len(ims))
	}
	// Flattened trees are removed in the background.
	waitFor(ctx, t, "no staging directory left", func() bool {
		entries, _ := os.ReadDir(filepath.Join(e.cfg.StateDir, "tmp"))
		return len(entries) == 0
	})
}

// vm create (not an admin method) pulls registry references only: a
// local path would be read by bangerd as root.
func TestAutoPullRegistryRefsOnly(t *testing.T) {
	for ref, want := range map[string]bool{
		"nginx:1.27": true, "ghcr.io/x/y": true, "reg:5000/x@sha256:ab": true, "debian": false,
		"/root/secret.tar": false, "oci:/srv/layout": false, "docker-archive:/x.tar": false,
		"docker-daemon:nginx": false, "oci-archive:/x.tar": false, "./x.tar": false,
	} {
		if got := isOCIRef(ref); got != want {
			t.Errorf("isOCIRef(%q) = %v, want %v", ref, got, want)
		}
	}
}
