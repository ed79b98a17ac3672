//go:build e2e

package e2e

import (
	"slices"
	"strings"
	"testing"
	"time"
)

// TestNetPublishAll: a --publish-all VM gets the port its guest starts
// listening on forwarded from 127.0.0.1 on the host (inside the lab's bgd
// namespace), marked (auto) in vm ls; the forward goes when the guest
// stops listening, and with the VM. User network: through the agent;
// bridge: straight to the guest's address.
func TestNetPublishAll(t *testing.T) {
	for _, mode := range []string{"user", "bridge"} {
		t.Run(mode, func(t *testing.T) { testPublishAll(t, mode) })
	}
}

func testPublishAll(t *testing.T, mode string) {
	e := newNetEnv(t, "network = \""+mode+"\"\n")
	registerNetImages(t, e)
	name := uniq("np")
	e.Must("vm", "create", "--name", name, "--image", "debian", "--publish-all", "--start")
	if n := netInfo(t, e, name); !n.PublishAll {
		t.Fatalf("network %+v: want publish-all", n)
	}
	e.InstallGuestTool(name)
	guestOK(t, e, name, tool("serve", "-d", "tcp", "18095")...)
	e.Lab.WaitExchange("tcp", "127.0.0.1:18095", "ping", "tcp:ping", 30*time.Second)
	if ls := e.Must("vm", "ls"); !strings.Contains(ls, "127.0.0.1:18095->18095/tcp(auto)") {
		t.Errorf("vm ls does not show the auto port:\n%s", ls)
	}
	listens := func() bool { return slices.Contains(e.Lab.Listeners(), "tcp 127.0.0.1:18095") }
	if !listens() {
		t.Fatalf("no listener on 127.0.0.1:18095 in bgd: %v", e.Lab.Listeners())
	}
	// Stop the guest's server (not this shell, whose command line holds
	// the pattern too: the [5] keeps it from matching itself).
	guestOK(t, e, name, "sh", "-c", `for p in /proc/[0-9]*; do case "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" in *"serve tcp 1809"[5]*) kill ${p#/proc/};; esac; done`)
	waitNo(t, 30*time.Second, "the forward to go after the guest stopped listening", listens)
	guestOK(t, e, name, tool("serve", "-d", "tcp", "18095")...)
	e.Lab.WaitExchange("tcp", "127.0.0.1:18095", "ping", "tcp:ping", 30*time.Second)
	e.Must("vm", "stop", name)
	waitNo(t, 30*time.Second, "the forward to go with the VM", listens)
	e.Must("vm", "rm", "-f", name)
}

// waitNo polls cond every 200 ms until it is false, failing after timeout.
func waitNo(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
