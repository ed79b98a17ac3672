package cli

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencies keeps the CLI a thin client: it reaches the daemon only
// through the typed client and links no VMM, state or daemon code.
func TestDependencies(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not found")
	}
	out, err := exec.Command(goBin, "list", "-deps", "-f", "{{.ImportPath}}", "github.com/bangerdev/banger/cmd/banger").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	forbidden := []string{"internal/vmm", "internal/daemon", "internal/store", "internal/disk", "internal/initramfs", "internal/agent", "internal/guestagent", "modernc.org/sqlite"}
	for _, pkg := range strings.Fields(string(out)) {
		for _, f := range forbidden {
			if strings.Contains(pkg, f) && !strings.HasSuffix(pkg, "internal/agentproto") {
				t.Errorf("the CLI links %s", pkg)
			}
		}
	}
}
