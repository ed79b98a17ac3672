//go:build e2e

package e2e

import (
	"strings"
	"testing"
)

// TestNetSubnetOverlap: a subnet overlapping a route of the host (the
// lab's LAN, 192.168.77.0/24) is refused at daemon start or when a
// bridged VM is created, naming the conflict, with nothing made (no VM,
// link or rule).
func TestNetSubnetOverlap(t *testing.T) {
	e := newNetEnv(t, "")
	e.RegisterImages()
	e.StopDaemon()
	e.SetConfig(netConfig + "subnet = \"192.168.77.0/24\"\n")
	if err := e.TryStartDaemon(); err != nil {
		if !strings.Contains(err.Error(), "192.168.77.0/24") {
			t.Errorf("overlap refused at daemon start without naming the route: %v", err)
		}
	} else {
		_, errOut, code := e.Banger("vm", "create", "--name", "ov", "--image", "tiny", "--network", "bridge")
		if code == 0 {
			t.Fatalf("a bridged VM was created on a subnet overlapping the host's route 192.168.77.0/24")
		}
		if !strings.Contains(errOut, "192.168.77.0/24") {
			t.Errorf("overlap error does not name the route: %s", errOut)
		}
		if out, errOut, code := e.Banger("vm", "ls", "-q"); code != 0 || strings.TrimSpace(out) != "" {
			t.Errorf("vm ls -q after a refused create: %q (%s, exit %d), want nothing", out, errOut, code)
		}
	}
	if l := e.Lab.Links(bridgeName); len(l) != 0 {
		t.Errorf("a refused subnet left links: %v", l)
	}
	if r := e.Lab.NFT(); len(r) != 0 {
		t.Errorf("a refused subnet left nftables tables: %v", r)
	}
}
