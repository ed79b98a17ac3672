// Package testenv decides what a test does when something it needs from the
// host (QEMU, a tool, the test image) is missing: outside CI it is skipped,
// with the reason; when the CI environment variable is set it fails, so a CI
// run can't pass by skipping the tests that boot VMs. Only tests import it.
package testenv

import (
	"fmt"
	"os"
	"testing"
)

// Missing skips tb, or fails it when CI is set, with the message format
// and args make.
func Missing(tb testing.TB, format string, args ...any) {
	tb.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") != "" {
		tb.Fatalf("%s (CI is set: a test can't be skipped for lack of what CI installs)", msg)
		return
	}
	tb.Skip(msg)
}
