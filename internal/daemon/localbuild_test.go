package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/imagecat"
	"github.com/bangerdev/banger/internal/kernelcat"
)

// Local builds refuse what they can't build before making anything: an
// unknown recipe, an image whose kernel isn't installed.
func TestLocalBuildRefusals(t *testing.T) {
	e, _ := setup(t, func(c *config.Daemon) { c.LocalBuilds = true })
	d := e.daemon.Load()
	ctx := testCtx(t)
	_, err := d.buildImageLocally(ctx, imagecat.Entry{Name: "x", Version: "1", Build: "nosuch"}, "x", nil)
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("unknown image recipe: %v", err)
	}
	_, err = d.buildKernelLocally(ctx, kernelcat.Entry{Name: "k", Version: "1", Build: "golden"}, "k", nil)
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("an image recipe for a kernel: %v", err)
	}
	_, err = d.buildImageLocally(ctx, imagecat.Entry{Name: "debian-bookworm", Version: "1", Build: RecipeGolden, Kernel: "nosuch-kernel@2"}, "debian-bookworm", nil)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "banger kernel pull nosuch-kernel") {
		t.Errorf("kernel not installed: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.cfg.StateDir, "tmp")); len(ents) != 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("refused builds left %v", names)
	}
}

// One local build at a time; a waiting one gives up with its context.
func TestBuildTurns(t *testing.T) {
	var b buildTurns
	release, err := b.acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := b.acquire(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second build while the first runs: %v", err)
	}
	release()
	release2, err := b.acquire(context.Background())
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	release2()
}

// local_builds = false (the test harness's setting): a build is refused
// before anything is made, saying which setting to change.
func TestLocalBuildsOff(t *testing.T) {
	e, _ := setup(t, nil)
	d := e.daemon.Load()
	ctx := testCtx(t)
	_, err := d.buildImageLocally(ctx, imagecat.Entry{Name: "debian-bookworm", Version: "1", Build: RecipeGolden}, "debian-bookworm", nil)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "local_builds = false") {
		t.Errorf("image build with local builds off: %v", err)
	}
	_, err = d.buildKernelLocally(ctx, kernelcat.Entry{Name: "generic-6.1", Version: "1", Build: RecipeDebianCloud}, "generic-6.1", nil)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "local_builds = false") {
		t.Errorf("kernel build with local builds off: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.cfg.StateDir, "tmp")); len(ents) != 0 {
		t.Errorf("refused builds left %d entries in tmp", len(ents))
	}
}

// embedded_catalogs = false (the test harness's setting): the catalogs
// compiled into banger are not read, so their names resolve nowhere.
func TestEmbeddedCatalogsOff(t *testing.T) {
	for _, on := range []bool{false, true} {
		e, _ := setup(t, func(c *config.Daemon) { c.EmbeddedCatalogs = on })
		images, kernels, err := e.daemon.Load().catalogs(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if got := images.Has(config.DefaultImageName) || kernels.Has(config.DefaultKernelName); got != on {
			t.Errorf("embedded_catalogs = %v: the embedded entries resolve: %v", on, got)
		}
	}
}
