//go:build e2e

package e2e

import (
	"testing"
	"time"

	"github.com/bangerdev/banger/test/harness"
)

// TestNetStopStart: vm stop removes a bridged VM's TAP, rules and
// forwarded port; vm start brings them back with the same address, MAC
// and TAP name (its lease stays with the VM).
func TestNetStopStart(t *testing.T) {
	e := newNetEnv(t, "")
	registerNetImages(t, e)
	e.Must("vm", "create", "--name", "ss", "--image", "tiny", "--memory", "256", "-p", "18960:8080", "--start")
	before := checkBridged(t, e, "ss")
	id := e.Inspect("ss").ID
	e.InstallGuestTool("ss")
	guestOK(t, e, "ss", tool("serve", "-d", "tcp", "8080")...)
	e.Lab.WaitExchange("tcp", "127.0.0.1:18960", "one", "tcp:one", 30*time.Second)
	if len(leftovers(e, id, "18960")) < 3 {
		t.Fatalf("a running VM's TAP, rules and port: %v", leftovers(e, id, "18960"))
	}

	e.Must("vm", "stop", "ss")
	if l := leftovers(e, id, "18960"); len(l) != 0 {
		t.Fatalf("vm stop left %v", l)
	}

	e.Must("vm", "start", "ss")
	after := checkBridged(t, e, "ss")
	if after.IP != before.IP || after.MAC != before.MAC || after.TAP != before.TAP {
		t.Errorf("network changed across a stop: %+v, then %+v", before, after)
	}
	guestOK(t, e, "ss", tool("serve", "-d", "tcp", "8080")...)
	e.Lab.WaitExchange("tcp", "127.0.0.1:18960", "two", "tcp:two", 30*time.Second)
	if out := waitGuest(t, e, "ss", 30*time.Second, tool("get", harness.InternetIP+":80")...); out != harness.InternetBody {
		t.Errorf("NAT after a restart of the VM = %q", out)
	}
}
