// Package golden holds the golden image's provisioning script, the one
// package list and set-up of the debian-bookworm image: the Dockerfile in this
// directory runs it, and banger's local build (internal/localbuild) runs the
// copy embedded here in an mmdebstrap chroot.
package golden

import _ "embed"

// ProvisionScript is images/golden/provision.sh.
//
//go:embed provision.sh
var ProvisionScript []byte

// Suite is the Debian release the golden image is built from.
const Suite = "bookworm"

// User is the golden image's default user (made by ProvisionScript).
const User = "dev"
