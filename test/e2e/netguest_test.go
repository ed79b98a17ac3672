//go:build e2e

package e2e

import (
	"strings"
	"testing"

	"github.com/bangerdev/banger/test/harness"
)

// TestNetGuestBridged: a bridged VM's agent configures the guest at boot
// (docs/agent.md, "Network at boot"): the card has the address bangerd
// recorded, the default route goes through the bridge, the resolver asks
// banger's forwarder on the gateway; through them the guest reaches the
// lab's outside server by name (Debian; the busybox image by address),
// through NAT. Both init modes: the Debian
// image (systemd) and the busybox one (the agent stays PID 1).
func TestNetGuestBridged(t *testing.T) {
	e := newNetEnv(t, "")
	e.RegisterImages()
	for _, tc := range []struct {
		image, fetch string
	}{
		{"debian", "getent hosts " + harness.OutsideName + " && curl -sS --max-time 30 http://" + harness.OutsideName + "/"},
		// busybox-static's resolver (static glibc, no NSS) crashes, and
		// so does its wget with -q or -T: by address, plainly.
		{"tiny", "echo " + harness.InternetIP + " && wget -O - http://" + harness.InternetIP + "/"},
	} {
		t.Run(tc.image, func(t *testing.T) {
			e.T = t
			name := "g-" + tc.image
			e.Must("vm", "create", "--name", name, "--image", tc.image, "--network", "bridge")
			defer e.Banger("vm", "rm", "-f", name)
			e.Must("vm", "start", name)
			n := checkBridged(t, e, name)

			addrs := e.MustExec(name, "ip", "-4", "addr", "show")
			if !strings.Contains(addrs, "inet "+n.IP+"/24") {
				t.Errorf("guest addresses lack %s/24:\n%s", n.IP, addrs)
			}
			if route := e.MustExec(name, "ip", "-4", "route", "show", "default"); !strings.Contains(route, "default via "+gatewayIP) {
				t.Errorf("guest default route %q, want via %s", route, gatewayIP)
			}
			if rc := e.MustExec(name, "cat", "/etc/resolv.conf"); !strings.Contains(rc, "nameserver "+gatewayIP+"\n") {
				t.Errorf("guest /etc/resolv.conf:\n%s", rc)
			}
			out, errOut, code := e.Exec(name, "sh", "-c", tc.fetch)
			if code != 0 || !strings.Contains(out, harness.InternetIP) || !strings.Contains(out, harness.InternetBody) {
				t.Errorf("fetch from the outside server by name: exit %d\n%s%s", code, out, errOut)
			}
		})
	}
}
