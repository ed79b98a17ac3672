package doctor

import (
	"os"
	"path/filepath"
	"strings"
)

// localBuildTools are the host programs a local build of the default image
// and kernel runs (internal/localbuild), with their Debian packages.
var localBuildTools = []struct{ bin, pkg string }{
	{"mmdebstrap", "mmdebstrap"},
	{"mkfs.ext4", "e2fsprogs"},
	{"gpgv", "gpgv"},
	{"chroot", "coreutils"},
}

// archiveKeyring verifies Debian's archive for local builds.
const archiveKeyring = "usr/share/keyrings/debian-archive-keyring.gpg"

// checkLocalBuild: can the default image and kernel be built on this host
// when their catalog bundles can't be fetched (docs/golden-image.md)? A
// WARN: pulls of bundles work without it.
func (r runner) checkLocalBuild() Check {
	c := Check{Name: "local image builds"}
	var missing, pkgs []string
	for _, t := range localBuildTools {
		if _, err := r.opts.LookPath(t.bin); err != nil {
			missing, pkgs = append(missing, t.bin), append(pkgs, t.pkg)
		}
	}
	if _, err := os.Stat(filepath.Join(r.opts.DevRoot, archiveKeyring)); err != nil {
		missing, pkgs = append(missing, "/"+archiveKeyring), append(pkgs, "debian-archive-keyring")
	}
	if len(missing) > 0 {
		c.Status = Warn
		c.Detail = "missing " + strings.Join(missing, ", ") + ": when a catalog bundle can't be downloaded, the default image and kernel can't be built from Debian's archive instead"
		c.Fix = "sudo apt-get install " + strings.Join(pkgs, " ")
		return c
	}
	c.Status, c.Detail = OK, "mmdebstrap, mkfs.ext4, gpgv and Debian's archive keyring found: the default image and kernel can be built from Debian's archive"
	return c
}
