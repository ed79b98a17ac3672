//go:build e2e

package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/test/harness"
)

// uniq names VMs of the SSH tests: banger's ssh files (known_hosts, the
// config blocks) are the invoking user's, shared by every test on the
// machine, so names must not collide.
func uniq(prefix string) string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// netInfo is the VM's network from vm inspect; it fails the test when
// there is none.
func netInfo(t *testing.T, e *harness.Env, name string) *api.NetworkInfo {
	t.Helper()
	vm := e.Inspect(name)
	if vm.Network == nil {
		t.Fatalf("vm %s has no network in inspect", name)
	}
	return vm.Network
}

// guestOK runs argv in the guest and fails unless it exits 0; it returns
// stdout.
func guestOK(t *testing.T, e *harness.Env, name string, argv ...string) string {
	t.Helper()
	out, errOut, code := e.Exec(name, argv...)
	if code != 0 {
		t.Fatalf("in %s: %v: exit %d\nstdout: %s\nstderr: %s", name, argv, code, out, errOut)
	}
	return out
}

// guestFails runs argv in the guest and fails the test if it exits 0.
func guestFails(t *testing.T, e *harness.Env, name string, argv ...string) {
	t.Helper()
	out, _, code := e.Exec(name, argv...)
	if code == 0 {
		t.Fatalf("in %s: %v succeeded, want failure\nstdout: %s", name, argv, out)
	}
}

// tool is argv of the guest tool (harness.InstallGuestTool).
func tool(args ...string) []string { return append([]string{harness.GuestToolPath}, args...) }

// leftovers lists what banger left in the lab for the VM with id: its TAP,
// its nftables chains, and listeners on the host ports.
func leftovers(e *harness.Env, id string, hostPorts ...string) []string {
	var out []string
	id12 := id
	if len(id12) > 12 {
		id12 = id12[:12]
	}
	for _, l := range e.Lab.Links(bridgeName) {
		if strings.Contains(l, id12) {
			out = append(out, "link "+l)
		}
	}
	for _, r := range e.Lab.NFT() {
		if strings.Contains(r, id12) {
			out = append(out, "nft "+r)
		}
	}
	for _, l := range e.Lab.Listeners() {
		for _, p := range hostPorts {
			if strings.HasSuffix(l, ":"+p) {
				out = append(out, "listener "+l)
			}
		}
	}
	return out
}

// waitGuest retries argv in the guest until it exits 0 (a network that
// comes up right after ready), bounded by timeout.
func waitGuest(t *testing.T, e *harness.Env, name string, timeout time.Duration, argv ...string) string {
	t.Helper()
	var out, errOut string
	var code int
	deadline := time.Now().Add(timeout)
	for {
		out, errOut, code = e.Exec(name, argv...)
		if code == 0 {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("in %s: %v: exit %d after %s\nstdout: %s\nstderr: %s", name, argv, code, timeout, out, errOut)
		}
		time.Sleep(time.Second)
	}
}
