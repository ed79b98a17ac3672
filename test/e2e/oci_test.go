//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/bangerdev/banger/internal/api"
)

// busyboxOCIImage makes an OCI image of the busybox test rootfs (mounted
// read-only, tarred as the first layer) with a second layer adding
// /etc/os-release and /srv, and a config: Env, WorkingDir, Cmd.
func busyboxOCIImage(t *testing.T) v1.Image {
	t.Helper()
	work := t.TempDir()
	mnt := filepath.Join(work, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "ro,loop", filepath.Join(imageDir, "busybox-rootfs.ext4"), mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount the busybox rootfs: %v: %s", err, out)
	}
	base := filepath.Join(work, "base.tar")
	out, err := exec.Command("tar", "--numeric-owner", "--xattrs", "--exclude=./lost+found", "-C", mnt, "-cf", base, ".").CombinedOutput()
	if uerr := exec.Command("umount", mnt).Run(); uerr != nil {
		t.Errorf("umount: %v", uerr)
	}
	if err != nil {
		t.Fatalf("tar the busybox rootfs: %v: %s", err, out)
	}
	l1, err := tarball.LayerFromFile(base)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	osRelease := "ID=banger-oci-test\nPRETTY_NAME=\"busybox from an OCI registry\"\n"
	for _, h := range []*tar.Header{
		{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "etc/os-release", Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(osRelease))},
		{Name: "srv/", Typeflag: tar.TypeDir, Mode: 0o755},
	} {
		h.ModTime = time.Now()
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			io.WriteString(tw, osRelease)
		}
	}
	tw.Close()
	b := buf.Bytes()
	l2, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, l1, l2)
	if err != nil {
		t.Fatal(err)
	}
	cfg, _ := img.ConfigFile()
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	cfg.Config.Env = []string{"PATH=/bin", "GREETING=hello-from-oci"}
	cfg.Config.WorkingDir = "/srv"
	cfg.Config.Cmd = []string{"sh", "-c", "echo main process up; exec sleep 3600"}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// TestOCIPullAndRun: an image pushed to a registry on 127.0.0.1 is pulled
// with `banger image pull` (plain HTTP: loopback), boots with the test
// kernel and runs commands with the image's Env and WorkingDir.
func TestOCIPullAndRun(t *testing.T) {
	e := newEnv(t)
	// The test kernel (with its modules) as a kernel object: registering
	// the busybox image makes one named after it.
	e.Must("image", "register", "tiny", "--rootfs", filepath.Join(imageDir, "busybox-rootfs.ext4"),
		"--kernel", filepath.Join(imageDir, "vmlinuz"), "--modules", filepath.Join(imageDir, "modules"))
	var tiny api.Image
	if err := json.Unmarshal([]byte(e.Must("image", "inspect", "tiny")), &tiny); err != nil {
		t.Fatal(err)
	}

	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	ref := strings.TrimPrefix(srv.URL, "http://") + "/oci/busybox:1.0"
	img := busyboxOCIImage(t)
	r, _ := name.ParseReference(ref)
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	digest, _ := img.Digest()

	e.Must("image", "pull", ref, "--kernel", tiny.KernelName)
	var im api.Image
	if err := json.Unmarshal([]byte(e.Must("image", "inspect", "busybox-1-0")), &im); err != nil {
		t.Fatal(err)
	}
	if im.Source != api.SourceOCI || im.Ref != ref || im.Digest != digest.String() || im.Config == nil || im.Config.WorkingDir != "/srv" || !im.Managed {
		t.Fatalf("pulled image: %+v", im)
	}
	// Pulling again is a no-op.
	e.Must("image", "pull", ref, "--kernel", tiny.KernelName)

	out := e.Must("vm", "run", "--rm", "--image", "busybox-1-0", "--accel", "tcg", "--memory", "256", "--",
		"sh", "-c", "cat /etc/os-release; pwd; echo $GREETING")
	for _, want := range []string{"ID=banger-oci-test", "/srv", "hello-from-oci"} {
		if !strings.Contains(out, want) {
			t.Errorf("vm run output lacks %q:\n%s", want, out)
		}
	}
}
