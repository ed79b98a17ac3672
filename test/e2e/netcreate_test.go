//go:build e2e

package e2e

import (
	"fmt"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/api"
)

// TestNetCreateAddresses: 50 concurrent creates of bridged VMs get 50
// distinct addresses; an address survives a daemon restart and is not
// given again; a removed VM's address is given again only after it was
// freed. Creates make nothing on the host: no link, no rule.
func TestNetCreateAddresses(t *testing.T) {
	e := newNetEnv(t, "")
	e.RegisterImages()
	const n = 50
	var wg sync.WaitGroup
	errs := make([]string, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, errOut, code := e.Banger("vm", "create", "--name", fmt.Sprintf("c%d", i), "--image", "tiny", "--network", "bridge")
			if code != 0 {
				errs[i] = fmt.Sprintf("create c%d: exit %d: %s%s", i, code, out, errOut)
			}
		}()
	}
	wg.Wait()
	for _, s := range errs {
		if s != "" {
			t.Fatal(s)
		}
	}
	addrs := func() map[string]string {
		var vms []api.VM
		decodeJSON(t, e.Must("vm", "ls", "--json"), &vms)
		seen := map[string]string{}
		for _, v := range vms {
			if v.Network == nil || v.Network.Mode != api.NetworkBridge || v.Network.IP == "" {
				t.Fatalf("vm %s network %+v: want a bridge address", v.Name, v.Network)
			}
			if other, dup := seen[v.Network.IP]; dup {
				t.Fatalf("vms %s and %s share %s", other, v.Name, v.Network.IP)
			}
			if v.Network.IP == gatewayIP {
				t.Fatalf("vm %s has the gateway's address", v.Name)
			}
			seen[v.Network.IP] = v.Name
		}
		return seen
	}
	if got := addrs(); len(got) != n {
		t.Fatalf("%d addresses for %d VMs", len(got), n)
	}
	if l := e.Lab.Links(bridgeName); len(l) != 0 {
		t.Fatalf("creates made links: %v", l)
	}

	// Removing one frees its address (the next create gets it: lowest
	// free); a restart keeps the others.
	freed := checkBridged(t, e, "c7").IP
	e.Must("vm", "rm", "c7")
	e.StopDaemon()
	e.StartDaemon()
	e.Must("vm", "create", "--name", "after", "--image", "tiny", "--network", "bridge")
	got := addrs()
	if len(got) != n {
		t.Fatalf("%d addresses for %d VMs after a restart", len(got), n)
	}
	if ip := checkBridged(t, e, "after").IP; ip != freed {
		// The lowest free address is the one c7 had (DESIGN6): a removed
		// VM's lease is gone.
		t.Errorf("new vm got %s, want the freed %s", ip, freed)
	}
}
