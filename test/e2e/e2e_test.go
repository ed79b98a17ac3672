//go:build e2e

// Package e2e runs the real bangerd and banger binaries (make build) and
// boots real VMs from the test image (scripts/make-test-image.sh) under
// QEMU. Run with `make e2e`, as root.
package e2e

import (
	"fmt"
	"os"
	"testing"

	"github.com/bangerdev/banger/test/harness"
)

var (
	binDir   string
	imageDir string
)

func TestMain(m *testing.M) {
	var err error
	binDir, imageDir, err = harness.Locate()
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

func newEnv(t *testing.T) *harness.Env {
	e := harness.New(t, binDir, imageDir)
	return e
}

func kernelRelease(t *testing.T) string { return harness.KernelRelease(t, imageDir) }
