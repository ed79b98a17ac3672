//go:build e2e

package e2e

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestNetPrivilegedPort: a caller who isn't root (a member of
// socket_group) may forward ports from 1024 up, and is refused a
// privileged host port with a clear error, nothing made.
func TestNetPrivilegedPort(t *testing.T) {
	e := newNetEnv(t, "socket_group = \"nogroup\"\n")
	e.RegisterImages()
	asNobody := func(args ...string) (string, int) {
		cmd := e.NetCommand(t.Context(), "setpriv", append([]string{"--reuid", "65534", "--regid", "65534", "--groups", "65534",
			filepath.Join(binDir, "banger"), "--socket", e.Socket()}, args...)...)
		out, err := cmd.CombinedOutput()
		code := 0
		if err != nil {
			code = 1
		}
		return string(out), code
	}
	out, code := asNobody("vm", "create", "--name", "low", "--image", "tiny", "-p", "80:8080")
	if code == 0 {
		t.Fatalf("a non-root caller forwarded host port 80:\n%s", out)
	}
	if !strings.Contains(out, "privileged") {
		t.Errorf("the refusal does not say the port is privileged:\n%s", out)
	}
	if out, code := asNobody("vm", "create", "--name", "high", "--image", "tiny", "-p", "18800:8080"); code != 0 {
		t.Fatalf("a socket_group member could not forward port 18800:\n%s", out)
	}
	if ls := strings.Fields(e.Must("vm", "ls", "-q")); len(ls) != 1 || ls[0] != "high" {
		t.Fatalf("VMs after the refused create: %v, want [high]", ls)
	}
}
