//go:build e2e

package e2e

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/test/harness"
)

// netConfig is the daemon config of the network tests: banger's DNS
// forwarder asks the lab's outside DNS server, and boots get the time a
// busy TCG host needs.
const netConfig = "dns_servers = [\"" + harness.InternetIP + "\"]\nready_timeout = \"5m\"\n"

// The default bridge and subnet (DESIGN6: docs/config.md).
const (
	bridgeName = "banger0"
	subnet     = "10.77.0.0/24"
	gatewayIP  = "10.77.0.1"
)

// newNetEnv is a daemon running inside its own lab (harness.Lab) with
// netConfig and extra config lines.
func newNetEnv(t *testing.T, extra string) *harness.Env {
	t.Helper()
	return harness.NewWithOptions(t, binDir, imageDir, harness.Options{Config: netConfig + extra, Net: true})
}

// checkBridged checks a bridged VM's recorded network: an address in the
// subnet (not the gateway), the gateway, a locally administered MAC and
// the TAP named after its id.
func checkBridged(t *testing.T, e *harness.Env, name string) *api.NetworkInfo {
	t.Helper()
	vm := e.Inspect(name)
	n := vm.Network
	if n == nil || n.Mode != api.NetworkBridge {
		t.Fatalf("vm %s network = %+v, want bridge", name, n)
	}
	ip, err := netip.ParseAddr(n.IP)
	if err != nil || !netip.MustParsePrefix(subnet).Contains(ip) || n.IP == gatewayIP {
		t.Fatalf("vm %s address %q: want one in %s other than the gateway", name, n.IP, subnet)
	}
	if n.Gateway != gatewayIP {
		t.Fatalf("vm %s gateway %q, want %s", name, n.Gateway, gatewayIP)
	}
	if !strings.HasPrefix(n.MAC, "02:") || len(n.MAC) != 17 {
		t.Fatalf("vm %s mac %q: want 02:xx:xx:xx:xx:xx", name, n.MAC)
	}
	if want := "bg-" + vm.ID[:12]; n.TAP != want {
		t.Fatalf("vm %s tap %q, want %s", name, n.TAP, want)
	}
	return n
}

func decodeJSON(t *testing.T, s string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(s), v); err != nil {
		t.Fatalf("decode %q: %v", s, err)
	}
}
