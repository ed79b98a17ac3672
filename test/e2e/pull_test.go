//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/test/harness"
)

// TestRunAutoPulls: a bangerd with an empty state directory, whose
// default image is in a catalog served on 127.0.0.1 (bundles made from
// the test image), runs `vm run --rm -- cat /etc/os-release`: it pulls the
// image's kernel and the image from the catalog, boots, and runs the
// command.
func TestRunAutoPulls(t *testing.T) {
	b := harness.MakeBundles(t, imageDir, "catdeb", "catkernel")
	var mu sync.Mutex
	reqs := map[string]int{}
	catalogURL := harness.ServeBundles(t, b, func(p string) {
		mu.Lock()
		reqs[p]++
		mu.Unlock()
	}) + "/catalog.json"
	e := harness.NewWithConfig(t, binDir, imageDir, fmt.Sprintf("default_image_name = %q\ncatalog_urls = [%q]\n", "catdeb", catalogURL))
	if out := e.Must("image", "ls", "--json"); strings.TrimSpace(out) != "[]" && strings.TrimSpace(out) != "null" {
		t.Fatalf("images before the run: %s", out)
	}

	out, errOut, code := e.Banger("vm", "run", "--rm", "--memory", "512", "--", "cat", "/etc/os-release")
	if code != 0 {
		t.Fatalf("vm run: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	if !strings.Contains(out, "Debian GNU/Linux 12 (bookworm)") {
		t.Fatalf("vm run output %q: want Debian's os-release", out)
	}
	for _, want := range []string{"download kernel catkernel@1.0", "download image catdeb@1.0"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("vm run's progress lacks %q:\n%s", want, errOut)
		}
	}

	var ims []api.Image
	if err := json.Unmarshal([]byte(e.Must("image", "ls", "--json")), &ims); err != nil {
		t.Fatal(err)
	}
	if len(ims) != 1 || ims[0].Name != "catdeb" || ims[0].Source != api.SourceCatalog || ims[0].Version != "1.0" ||
		ims[0].KernelName != "catkernel" || ims[0].Digest != "sha256:"+b.Image.SHA256 {
		t.Fatalf("images after the run: %+v", ims)
	}
	if ls := e.Must("image", "ls"); !strings.Contains(ls, "catalog") {
		t.Errorf("image ls does not show the source:\n%s", ls)
	}
	mu.Lock()
	defer mu.Unlock()
	if reqs["/kernel.tar.zst"] != 1 || reqs["/image.tar.zst"] != 1 {
		t.Errorf("bundle requests %v: want one of each", reqs)
	}
}
