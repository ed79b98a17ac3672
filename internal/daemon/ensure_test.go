package daemon

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
)

// vm create refuses before pulling: a taken name (no bundle fetched), a
// local OCI source (bangerd would read it as root: image pull only), a
// kernel NAME@VERSION whose NAME is local at another version, and a bare
// name neither local nor in a catalog with registry_fallback off.
func TestCreateRefusesBeforePulling(t *testing.T) {
	e, d, f := setupPull(t, 1<<20)
	ctx := testCtx(t)
	if _, err := d.c.ImageRegister(ctx, api.ImageRegisterParams{Name: "local", Rootfs: e.rootfs, Kernel: e.kernel}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "taken", Image: "local"}, nil); err != nil {
		t.Fatal(err)
	}
	_, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "taken", Image: "timg"}, nil)
	wireErr(t, "create with a taken name", err, errdefs.ErrAlreadyExists)
	if n := len(f.srv.requests("/timg.tar.zst")); n != 0 {
		t.Errorf("a create with a taken name fetched the bundle %d times", n)
	}

	// The test's client is root: a local source is imported (here: a
	// missing file, so the import fails, but not with permission denied);
	// a writer who is not admin is refused before anything is read.
	dm := e.daemon.Load()
	missing := filepath.Join(e.dir, "no-such-image.tar")
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Image: missing}, nil); err == nil || errors.Is(err, errdefs.ErrPermissionDenied) || strings.Contains(err.Error(), "permission denied") {
		t.Errorf("admin create from a local source: %v, want an import error", err)
	}
	for _, ref := range []string{"/root/x.tar", "oci:/srv/layout", "oci-archive:/root/x.tar", "docker-daemon:nginx:latest"} {
		_, err := dm.ensureImage(ctx, ref, false, func(api.Progress) {})
		if !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Errorf("writer's create from local source %s: %v, want permission denied", ref, err)
		}
	}

	if _, err := d.c.KernelImport(ctx, api.KernelImportParams{Name: "tk", Kernel: e.kernel}, nil); err != nil {
		t.Fatal(err)
	}
	_, err = d.c.VMCreate(ctx, api.VMCreateParams{Image: "local", Kernel: "tk@1.0"}, nil)
	wireErr(t, "create with a pinned kernel local at another version", err, errdefs.ErrFailedPrecondition)
	if err != nil && !strings.Contains(err.Error(), "banger kernel rm tk") {
		t.Errorf("pinned kernel error %q does not say what to do", err)
	}
	if n := len(f.srv.requests("/tk.tar.zst")); n != 0 {
		t.Errorf("the kernel bundle was fetched %d times", n)
	}

	_, err = d.c.VMCreate(ctx, api.VMCreateParams{Image: "nginx"}, nil)
	wireErr(t, "create from a bare name", err, errdefs.ErrNotFound)
	if err != nil && (!strings.Contains(err.Error(), "registry_fallback = false") || !strings.Contains(err.Error(), f.srv.url("/catalog.json"))) {
		t.Errorf("bare name error %q: want the catalogs searched and registry_fallback", err)
	}
}
