// Package kerneldebtest finds Debian's cloud kernel package for tests:
// the cached copy in /var/cache/banger/kernel-deb (BANGER_KERNEL_DEB_DIR),
// else one `apt-get download` puts there. Only tests import it.
package kerneldebtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/testenv"
)

// Dir is where the package is cached.
func Dir() string {
	if d := os.Getenv("BANGER_KERNEL_DEB_DIR"); d != "" {
		return d
	}
	return "/var/cache/banger/kernel-deb"
}

var mu sync.Mutex

// Deb returns the path of linux-image-<abi>-cloud-amd64's .deb, downloading
// it with apt-get when it isn't cached. Without apt or the archive, the
// test is skipped (failed under CI: testenv.Missing).
func Deb(t testing.TB) string {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	if p := cached(); p != "" {
		return p
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		testenv.Missing(t, "no cached Debian kernel package in %s and no apt-get to download one", Dir())
		return ""
	}
	out, err := exec.Command("apt-cache", "depends", "linux-image-cloud-amd64").CombinedOutput()
	pkg := regexp.MustCompile(`Depends: (linux-image-[0-9][^ \n]*-cloud-amd64)`).FindSubmatch(out)
	if err != nil || pkg == nil {
		testenv.Missing(t, "apt-cache knows no linux-image-cloud-amd64 (run apt-get update): %v: %s", err, out)
		return ""
	}
	if err := os.MkdirAll(Dir(), 0o755); err != nil {
		t.Fatal(err)
	}
	tmp, err := os.MkdirTemp(Dir(), ".download-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	cmd := exec.Command("apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", string(pkg[1]))
	cmd.Dir = tmp
	if out, err := cmd.CombinedOutput(); err != nil {
		testenv.Missing(t, "apt-get download %s: %v: %s", pkg[1], err, out)
		return ""
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "linux-image-*-cloud-amd64_*.deb"))
	if len(debs) != 1 {
		t.Fatalf("apt-get download %s made %v", pkg[1], debs)
	}
	dst := filepath.Join(Dir(), filepath.Base(debs[0]))
	if err := os.Rename(debs[0], dst); err != nil {
		t.Fatal(err)
	}
	return dst
}

func cached() string {
	debs, _ := filepath.Glob(filepath.Join(Dir(), "linux-image-*-cloud-amd64_*.deb"))
	if len(debs) == 0 {
		return ""
	}
	return debs[len(debs)-1]
}
