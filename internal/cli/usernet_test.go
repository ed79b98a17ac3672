package cli

import (
	"bytes"
	"io"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/sshcfg"
)

// --network user warns, in one line on stderr, that the guest isn't
// isolated; other modes don't.
func TestUserNetworkWarning(t *testing.T) {
	for _, mode := range []string{api.NetworkUser, api.NetworkBridge, api.NetworkNone, ""} {
		var stderr bytes.Buffer
		home := t.TempDir()
		a := &app{stdout: io.Discard, stderr: &stderr, sshUser: &sshcfg.User{Home: home, UID: -1, GID: -1}}
		if _, err := a.createParams(&createFlags{network: mode}); err != nil {
			t.Fatalf("%q: %v", mode, err)
		}
		warned := strings.Contains(stderr.String(), "no isolation") && strings.Contains(stderr.String(), "10.0.2.2")
		if warned != (mode == api.NetworkUser) || strings.Count(stderr.String(), "\n") > 1 {
			t.Errorf("--network %q: stderr %q", mode, stderr.String())
		}
	}
}
