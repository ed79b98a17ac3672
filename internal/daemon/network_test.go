package daemon

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/config"
	"github.com/bangerdev/banger/internal/errdefs"
)

const testSSHKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGtQUDZWhs8k/cZcykMkaUX8E2LgjE0/aBf8Dz0s2Tb6 user@host"

func bridged(c *config.Daemon) {
	c.Network = api.NetworkBridge
	c.Subnet = "10.77.0.0/24"
}

// 50 concurrent creates get 50 distinct addresses, the lowest of the
// subnet after the gateway; they survive a daemon restart (they are in
// the database) and a removed VM's address is the next one given.
func TestBridgeAddressesUnderConcurrentCreates(t *testing.T) {
	t.Parallel()
	e, d := setup(t, bridged)
	ctx := testCtx(t)
	const n = 50
	vms := make([]api.VM, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			vms[i], errs[i] = d.c.VMCreate(ctx, api.VMCreateParams{Name: fmt.Sprintf("vm%d", i)}, nil)
		})
	}
	wg.Wait()
	seen := map[string]string{}
	for i, err := range errs {
		if err != nil {
			t.Fatalf("create vm%d: %v", i, err)
		}
		nw := vms[i].Network
		if nw == nil || nw.Mode != api.NetworkBridge || nw.Gateway != "10.77.0.1" {
			t.Fatalf("vm%d network = %+v", i, nw)
		}
		if other, dup := seen[nw.IP]; dup {
			t.Fatalf("vm%d and %s share %s", i, other, nw.IP)
		}
		seen[nw.IP] = vms[i].Name
		if !strings.HasPrefix(nw.TAP, "bg-") || len(nw.TAP) > 15 || !strings.HasPrefix(nw.MAC, "02:") {
			t.Errorf("vm%d tap %q mac %q", i, nw.TAP, nw.MAC)
		}
	}
	for i := 2; i < 2+n; i++ { // exactly .2 to .51
		if _, ok := seen[fmt.Sprintf("10.77.0.%d", i)]; !ok {
			t.Fatalf("10.77.0.%d not given; got %v", i, seen)
		}
	}
	d.close()
	d = e.start()
	for _, v := range vms {
		if got := inspect(t, d, v.Name); got.Network == nil || got.Network.IP != v.Network.IP || got.Network.MAC != v.Network.MAC {
			t.Fatalf("after restart %s: %+v, want ip %s", v.Name, got.Network, v.Network.IP)
		}
	}
	freed := vms[7].Network.IP
	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: vms[7].Name}); err != nil {
		t.Fatal(err)
	}
	again, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "again"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if again.Network.IP != freed {
		t.Errorf("after rm: new VM got %s, want the freed %s", again.Network.IP, freed)
	}
}

func TestCreateNetworkModes(t *testing.T) {
	t.Parallel()
	_, d := setup(t, bridged)
	ctx := testCtx(t)
	u, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "u", Network: api.NetworkUser, SSHKeys: []string{testSSHKey, testSSHKey}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if u.Network == nil || u.Network.Mode != api.NetworkUser || u.Network.IP != "" || u.Network.TAP != "" || u.Network.MAC == "" {
		t.Errorf("user-mode vm network = %+v", u.Network)
	}
	n, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "n", Network: api.NetworkNone}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n.Network != nil {
		t.Errorf("network none: %+v", n.Network)
	}
	b, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "b", Allow: []string{"lan,host", "host"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b.Network == nil || !slices.Equal(b.Network.Allow, []string{"host", "lan"}) || b.Network.IP != "10.77.0.2" {
		t.Errorf("bridged vm network = %+v", b.Network)
	}
	// Only bridged VMs take addresses.
	if list, err := d.c.VMList(ctx); err != nil || len(list) != 3 {
		t.Fatalf("list: %v, %v", list, err)
	}
}

func TestCreateRejectsBadNetworkAndLeavesNothing(t *testing.T) {
	t.Parallel()
	e, d := setup(t, bridged)
	ctx := testCtx(t)
	tests := []struct {
		name string
		p    api.VMCreateParams
		hint string
	}{
		{"unknown mode", api.VMCreateParams{Network: "nat"}, "want bridge, user or none"},
		{"unknown allow", api.VMCreateParams{Allow: []string{"host,internet"}}, `allow "internet"`},
		{"allow without bridge", api.VMCreateParams{Network: api.NetworkUser, Allow: []string{"host"}}, "bridge networking only"},
		{"ports without network", api.VMCreateParams{Network: api.NetworkNone, Ports: []string{"8080:80"}}, "without a network"},
		{"bad ssh key", api.VMCreateParams{SSHKeys: []string{"ssh-ed25519 notbase64"}}, "ssh key 1"},
		{"two-line ssh key", api.VMCreateParams{SSHKeys: []string{testSSHKey + "\n" + testSSHKey}}, "one authorized_keys line"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.p.Name = "x"
			_, err := d.c.VMCreate(ctx, tc.p, nil)
			wireErr(t, "create", err, errdefs.ErrInvalid)
			if !strings.Contains(err.Error(), tc.hint) {
				t.Errorf("error %q does not contain %q", err, tc.hint)
			}
			if got := vmNames(t, d); len(got) != 0 {
				t.Errorf("vms after failed create = %v", got)
			}
			if got := vmDirs(t, e); len(got) != 0 {
				t.Errorf("vm dirs after failed create = %v", got)
			}
		})
	}
}

// freePort returns a TCP port free on 127.0.0.1 now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func TestCreatePorts(t *testing.T) {
	t.Parallel()
	e, d := setup(t, bridged)
	ctx := testCtx(t)
	p1, p2 := freePort(t), freePort(t)
	spec := fmt.Sprintf("%d:80", p1)
	a, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "a", Network: api.NetworkUser, Ports: []string{spec, fmt.Sprintf("%d:53/udp", p2)}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []api.PortForward{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: p1, GuestPort: 80}, {Proto: "udp", HostIP: "127.0.0.1", HostPort: p2, GuestPort: 53}}
	if got := inspect(t, d, "a").Network; got == nil || !slices.Equal(got.Ports, want) || !slices.Equal(a.Network.Ports, want) {
		t.Fatalf("ports = %+v, want %+v", got, want)
	}
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldPort := held.Addr().(*net.TCPAddr).Port
	tests := []struct {
		name string
		p    api.VMCreateParams
		kind error
		hint string
	}{
		{"port of another vm", api.VMCreateParams{Ports: []string{spec}}, errdefs.ErrAlreadyExists, `forwarded to vm "a"`},
		{"port of another vm, wildcard", api.VMCreateParams{Ports: []string{"0.0.0.0:" + spec}}, errdefs.ErrAlreadyExists, `forwarded to vm "a"`},
		{"port in use", api.VMCreateParams{Ports: []string{fmt.Sprintf("%d:80", heldPort)}}, errdefs.ErrAlreadyExists, "already in use"},
		{"malformed", api.VMCreateParams{Ports: []string{"80"}}, errdefs.ErrInvalid, "port forward"},
		{"twice", api.VMCreateParams{Ports: []string{fmt.Sprintf("%d:80", p2), fmt.Sprintf("%d:81", p2)}}, errdefs.ErrInvalid, "twice"},
		{"ipv6 in user mode", api.VMCreateParams{Network: api.NetworkUser, Ports: []string{fmt.Sprintf("[::1]:%d:80", p2)}}, errdefs.ErrInvalid, "IPv4 host addresses only"},
		{"privileged in user mode", api.VMCreateParams{Network: api.NetworkUser, Ports: []string{"80:80"}}, errdefs.ErrPermissionDenied, "unprivileged user"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.p.Name = "x"
			_, err := d.c.VMCreate(ctx, tc.p, nil)
			wireErr(t, "create", err, tc.kind)
			if !strings.Contains(err.Error(), tc.hint) {
				t.Errorf("error %q does not contain %q", err, tc.hint)
			}
			if got := vmNames(t, d); !slices.Equal(got, []string{"a"}) {
				t.Errorf("vms after failed create = %v", got)
			}
			if got := vmDirs(t, e); len(got) != 1 {
				t.Errorf("vm dirs after failed create = %v", got)
			}
		})
	}
	// Removing the VM frees its ports.
	if err := d.c.VMRemove(ctx, api.VMRemoveParams{Name: "a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.c.VMCreate(ctx, api.VMCreateParams{Name: "b", Ports: []string{spec}}, nil); err != nil {
		t.Fatalf("port of a removed vm: %v", err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
