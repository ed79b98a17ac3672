package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
)

func netStore(t *testing.T) *Store {
	t.Helper()
	s, _ := openTest(t)
	if err := s.InsertImage(context.Background(), Image{ID: "i1", Name: "img", Rootfs: "/r", Kernel: "/k", CreatedAt: time.Now(), DefaultUser: "dev"}); err != nil {
		t.Fatal(err)
	}
	return s
}

func bridgeVM(n int) VM {
	return VM{ID: fmt.Sprintf("id%d", n), Name: fmt.Sprintf("vm%d", n), ImageID: "i1", State: "stopped", CreatedAt: time.Now(), Network: "bridge"}
}

// Addresses are the lowest free host addresses after the gateway, never the
// broadcast address, and come back after a removal.
func TestAddressAllocation(t *testing.T) {
	ctx := context.Background()
	s := netStore(t)
	subnet := netip.MustParsePrefix("10.9.0.0/29") // .1 gateway, .2-.6 VMs, .7 broadcast
	var got []string
	for i := range 5 {
		v, err := s.InsertVMWithAddress(ctx, bridgeVM(i), subnet)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, v.IP)
	}
	if want := []string{"10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("addresses %v, want %v", got, want)
	}
	_, err := s.InsertVMWithAddress(ctx, bridgeVM(5), subnet)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("full subnet: err = %v, want ErrFailedPrecondition", err)
	}
	if _, err := s.GetVM(ctx, "vm5"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("a VM was recorded without an address: %v", err)
	}
	if err := s.DeleteVM(ctx, "id2"); err != nil {
		t.Fatal(err)
	}
	v, err := s.InsertVMWithAddress(ctx, bridgeVM(6), subnet)
	if err != nil || v.IP != "10.9.0.4" {
		t.Fatalf("after rm: ip %q, %v; want the freed 10.9.0.4", v.IP, err)
	}
	if r, err := s.GetVM(ctx, "vm6"); err != nil || r.IP != "10.9.0.4" {
		t.Fatalf("stored ip %q, %v", r.IP, err)
	}
	// The unique index is the last guard.
	dup := bridgeVM(7)
	dup.IP = "10.9.0.3"
	if err := s.InsertVM(ctx, dup); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("duplicate address: err = %v", err)
	}
	// VMs without an address don't collide.
	for i := 8; i < 10; i++ {
		v := bridgeVM(i)
		v.Network = "user"
		if err := s.InsertVM(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
}

func TestVMNetworkFieldsRoundTrip(t *testing.T) {
	ctx := context.Background()
	s := netStore(t)
	v := bridgeVM(1)
	v.MAC, v.TAP = "02:aa:bb:cc:dd:ee", "bg-id1"
	v.Allow = []string{"host", "lan"}
	v.SSHKeys = []string{"ssh-ed25519 AAAA user@host"}
	v.Ports = []Port{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 80}, {Proto: "udp", HostIP: "127.0.0.1", HostPort: 5353, GuestPort: 53}}
	v, err := s.InsertVMWithAddress(ctx, v, netip.MustParsePrefix("10.77.0.0/24"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetSSHHostKeys(ctx, v.ID, []string{"ssh-ed25519 HOST"}); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetVM(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	wantPorts := []Port{v.Ports[0], v.Ports[1]}
	if got.Network != "bridge" || got.IP != "10.77.0.2" || got.MAC != v.MAC || got.TAP != v.TAP ||
		!reflect.DeepEqual(got.Allow, v.Allow) || !reflect.DeepEqual(got.SSHKeys, v.SSHKeys) ||
		!reflect.DeepEqual(got.SSHHostKeys, []string{"ssh-ed25519 HOST"}) || !reflect.DeepEqual(got.Ports, wantPorts) {
		t.Fatalf("round trip: %+v", got)
	}
	byMAC, err := s.VMByMAC(ctx, "02:AA:BB:CC:DD:EE")
	if err != nil || byMAC.ID != v.ID {
		t.Fatalf("by mac: %+v, %v", byMAC, err)
	}
	if _, err := s.VMByMAC(ctx, "02:00:00:00:00:01"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("unknown mac: %v", err)
	}
	list, err := s.ListVMs(ctx)
	if err != nil || len(list) != 1 || !reflect.DeepEqual(list[0].Ports, wantPorts) {
		t.Fatalf("list: %+v, %v", list, err)
	}
	im, err := s.GetImage(ctx, "img")
	if err != nil || im.DefaultUser != "dev" {
		t.Fatalf("image default user: %+v, %v", im, err)
	}
	// Ports go with the VM.
	if err := s.DeleteVM(ctx, v.ID); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := s.db.QueryRow(`SELECT COUNT(*) FROM vm_ports`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("ports left after the VM's removal: %d, %v", n, err)
	}
}

// A host port is forwarded to one VM only: same address, or either side
// the wildcard; a refused insert leaves no VM.
func TestPortsAreExclusive(t *testing.T) {
	ctx := context.Background()
	s := netStore(t)
	a := bridgeVM(1)
	a.Ports = []Port{{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 80}}
	if err := s.InsertVM(ctx, a); err != nil {
		t.Fatal(err)
	}
	for i, p := range []Port{
		{Proto: "tcp", HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 81},
		{Proto: "tcp", HostIP: "0.0.0.0", HostPort: 8080, GuestPort: 81},
	} {
		b := bridgeVM(10 + i)
		b.Ports = []Port{{Proto: "udp", HostIP: "127.0.0.1", HostPort: 9000, GuestPort: 9000}, p}
		err := s.InsertVM(ctx, b)
		if !errors.Is(err, errdefs.ErrAlreadyExists) || !contains(err.Error(), `vm "vm1"`) {
			t.Fatalf("%+v: err = %v, want ErrAlreadyExists naming vm1", p, err)
		}
		if _, err := s.GetVM(ctx, b.Name); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("refused VM recorded: %v", err)
		}
	}
	ok := bridgeVM(20)
	ok.Ports = []Port{{Proto: "udp", HostIP: "127.0.0.1", HostPort: 8080, GuestPort: 80}, {Proto: "tcp", HostIP: "127.0.0.2", HostPort: 8080, GuestPort: 80}}
	if err := s.InsertVM(ctx, ok); err != nil {
		t.Fatalf("other protocol / other address: %v", err)
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// A VM made before networking had no card: it reads back as "none".
func TestMigrateVMsToNetworking(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "state.db")
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range append(append([]string{}, migrations[:4]...), `PRAGMA user_version = 4`,
		`INSERT INTO images (id, name, rootfs, kernel, created_at) VALUES ('i1', 'old', '/r', '/k', '2026-01-01T00:00:00Z')`,
		`INSERT INTO vms (id, name, image_id, state, cpus, memory_mib, disk_bytes, disk_path, disk_format, disk_strategy, vmm, accel_wanted, dir, created_at)
			VALUES ('v1', 'box', 'i1', 'stopped', 1, 128, 1, '/d', 'raw', 'copy', 'qemu', 'auto', '/x', '2026-01-01T00:00:00Z')`) {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v, err := s.GetVM(ctx, "box")
	if err != nil || v.Network != "none" || v.IP != "" || len(v.Allow) != 0 || v.Ports != nil {
		t.Fatalf("migrated vm: %+v, %v", v, err)
	}
	im, err := s.GetImage(ctx, "old")
	if err != nil || im.DefaultUser != "" {
		t.Fatalf("migrated image: %+v, %v", im, err)
	}
}

func TestReassignAddress(t *testing.T) {
	ctx := context.Background()
	s := netStore(t)
	old := netip.MustParsePrefix("10.9.0.0/24")
	a, err := s.InsertVMWithAddress(ctx, bridgeVM(1), old)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.InsertVMWithAddress(ctx, bridgeVM(2), netip.MustParsePrefix("10.10.0.0/24")); err != nil {
		t.Fatal(err)
	}
	ip, err := s.ReassignAddress(ctx, a.ID, netip.MustParsePrefix("10.10.0.0/24"))
	if err != nil || ip != "10.10.0.3" {
		t.Fatalf("reassign: %q, %v; want 10.10.0.3 (.2 is taken)", ip, err)
	}
	if v, _ := s.GetVM(ctx, a.ID); v.IP != "10.10.0.3" {
		t.Errorf("stored ip %q", v.IP)
	}
	if _, err := s.ReassignAddress(ctx, "nope", old); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("unknown vm: %v", err)
	}
}

// A VM's publish-all setting is recorded and read back.
func TestPublishAll(t *testing.T) {
	ctx := context.Background()
	s := netStore(t)
	on, off := bridgeVM(1), bridgeVM(2)
	on.PublishAll = true
	for _, v := range []VM{on, off} {
		if err := s.InsertVM(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []VM{on, off} {
		v, err := s.GetVM(ctx, want.Name)
		if err != nil {
			t.Fatal(err)
		}
		if v.PublishAll != want.PublishAll {
			t.Errorf("vm %s: PublishAll = %v, want %v", v.Name, v.PublishAll, want.PublishAll)
		}
	}
}
