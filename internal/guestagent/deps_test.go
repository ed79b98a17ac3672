package guestagent

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestDependencies keeps the guest agent small and static: it must build
// without cgo and link no banger package other than agentproto, tarcopy and
// kmod.
func TestDependencies(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not found")
	}
	const self = "github.com/bangerdev/banger/internal/guestagent"
	cmd := exec.Command(goBin, "list", "-deps", "-f", "{{.ImportPath}}", self)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	allowed := map[string]bool{
		self: true,
		"github.com/bangerdev/banger/internal/agentproto": true,
		"github.com/bangerdev/banger/internal/tarcopy":    true,
		"github.com/bangerdev/banger/internal/kmod":       true,
	}
	for _, pkg := range strings.Fields(string(out)) {
		if strings.HasPrefix(pkg, "github.com/bangerdev/banger/") && !allowed[pkg] {
			t.Errorf("guest agent imports %s", pkg)
		}
		if pkg == "runtime/cgo" {
			t.Errorf("guest agent links runtime/cgo")
		}
	}
}
