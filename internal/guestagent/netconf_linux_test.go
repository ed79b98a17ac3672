package guestagent

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/testenv/netns"
)

// TestConfigureNetwork applies a network configuration to a card, in
// a network namespace the test makes, as init does in a guest.
func TestConfigureNetwork(t *testing.T) {
	ns := netns.New(t, "bgtest-guestnet")
	const mac = "02:00:00:00:00:77"
	// A veth pair inside the namespace (dummy links need a module hosts may
	// lack): card0 plays the guest's card.
	ns.Run(t, "ip", "link", "add", "card0", "address", mac, "type", "veth", "peer", "name", "card0p")
	ns.Run(t, "ip", "link", "set", "card0p", "up")
	nc := &agentproto.NetworkConfig{Interfaces: []agentproto.Interface{{MAC: "02:00:00:00:00:77", Address: "10.0.2.77/24", Gateway: "10.0.2.2", MTU: 1400}}}

	var done []string
	var st, afterDel *agentproto.NetworkState
	var why []string
	err := ns.Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var err error
		if done, err = configureNetwork(ctx, nc); err != nil {
			return err
		}
		// Applying it again (the agent restarted? a second init?) works.
		if _, err = configureNetwork(ctx, nc); err != nil {
			return err
		}
		st = networkState(nc, "")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(done) != 1 || !strings.Contains(done[0], "card0") {
		t.Errorf("configureNetwork reported %q", done)
	}
	if !st.Configured || len(st.Addresses) != 1 || st.Addresses[0] != "10.0.2.77/24" || st.Error != "" {
		t.Errorf("network state %+v, want configured with 10.0.2.77/24", st)
	}
	addr := ns.Run(t, "ip", "-o", "-4", "addr", "show", "dev", "card0")
	link := ns.Run(t, "ip", "-o", "link", "show", "dev", "card0")
	route := ns.Run(t, "ip", "-4", "route", "show", "default")
	lo := ns.Run(t, "ip", "-o", "link", "show", "dev", "lo")
	if !strings.Contains(addr, "inet 10.0.2.77/24 brd 10.0.2.255") {
		t.Errorf("card0 addresses: %s", addr)
	}
	if !strings.Contains(link, "mtu 1400") || !strings.Contains(link, ",UP") {
		t.Errorf("card0: %s, want mtu 1400 and up", link)
	}
	if !strings.Contains(route, "default via 10.0.2.2 dev card0 proto static") {
		t.Errorf("default route: %s", route)
	}
	if !strings.Contains(lo, ",UP") {
		t.Errorf("lo: %s, want up", lo)
	}

	// The state is read live: a removed address shows.
	ns.Run(t, "ip", "addr", "del", "10.0.2.77/24", "dev", "card0")
	if err := ns.Do(func() error { afterDel, why = networkStateWhy(nc, ""); return nil }); err != nil {
		t.Fatal(err)
	}
	// Not configured, but no setup error: the host keeps waiting.
	if afterDel.Configured || afterDel.Error != "" || len(why) != 1 || why[0] != "card0 lacks its address 10.0.2.77/24" {
		t.Errorf("after the address was removed: %+v, %q", afterDel, why)
	}
}

func TestConfigureNetworkMissingCard(t *testing.T) {
	ns := netns.New(t, "bgtest-guestnet")
	nc := &agentproto.NetworkConfig{Interfaces: []agentproto.Interface{{MAC: "02:00:00:00:00:99", Address: "10.0.2.77/24"}}}
	var err error
	var st *agentproto.NetworkState
	nsErr := ns.Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		_, err = configureNetwork(ctx, nc)
		st = networkState(nc, "init said so")
		return nil
	})
	if nsErr != nil {
		t.Fatal(nsErr)
	}
	if !errors.Is(err, errNoLink) || !strings.Contains(err.Error(), "02:00:00:00:00:99") || !strings.Contains(err.Error(), "no network card: is virtio_net") {
		t.Errorf("err = %v, want no card with that MAC", err)
	}
	if st.Configured || st.Error != "init said so" {
		t.Errorf("state %+v", st)
	}
}
