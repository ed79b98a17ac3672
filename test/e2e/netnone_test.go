//go:build e2e

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestNetNone: a VM with --network none has no card (only loopback), is
// still reached by ssh NAME.banger (through the agent), and refuses -p.
func TestNetNone(t *testing.T) {
	e := newNetEnv(t, "")
	registerNetImages(t, e)
	e.Fails("network", "vm", "create", "--name", "nop", "--image", "tiny", "--network", "none", "-p", "18950:80")
	e.Must("vm", "create", "--name", "none", "--image", "tiny", "--memory", "256", "--network", "none", "--start")
	if n := e.Inspect("none").Network; n != nil {
		t.Errorf("inspect shows a network for --network none: %+v", n)
	}
	e.InstallGuestTool("none")
	out := guestOK(t, e, "none", tool("addrs")...)
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) == 0 || f[0] != "lo" {
			t.Errorf("a VM without a network has an address off loopback:\n%s", out)
			break
		}
	}
	if links := guestOK(t, e, "none", "ls", "/sys/class/net"); strings.TrimSpace(links) != "lo" {
		t.Errorf("a VM without a network has cards: %q", links)
	}
	if l := e.Lab.Links(bridgeName); len(l) != 0 {
		t.Errorf("--network none made links: %v", l)
	}
	if _, err := exec.LookPath("ssh"); err != nil {
		t.Skip("no ssh client")
	}
	cfg := filepath.Join(e.Dir(), "ssh_config")
	if err := os.WriteFile(cfg, []byte(e.Must("ssh-config")), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := e.NetCommand(t.Context(), "ssh", "-F", cfg, "-o", "BatchMode=yes", "none.banger", "echo", "no-network")
	if out, err := cmd.CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "no-network" {
		t.Errorf("ssh none.banger: %v, %q", err, out)
	}
}
