package guestagent

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/bangerdev/banger/internal/agentproto"
)

func TestScanDataPorts(t *testing.T) {
	sysfs := t.TempDir()
	port := func(dev, name string) {
		dir := filepath.Join(sysfs, "class", "virtio-ports", dev)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "name"), []byte(name+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got := scanDataPorts(sysfs); len(got) != 0 {
		t.Fatalf("no ports: got %v", got)
	}
	port("vport0p1", agentproto.VirtioPortName)
	port("vport0p3", agentproto.DataPortName(1))
	if got := scanDataPorts(sysfs); len(got) != 0 {
		t.Fatalf("port 1 without port 0: got %v, want none", got)
	}
	port("vport0p2", agentproto.DataPortName(0))
	port("vport0p5", agentproto.DataPortName(3)) // not consecutive: not counted
	port("vport0p6", agentproto.DataPortPrefix+"01")
	port("vport0p7", agentproto.DataPortPrefix+"x")
	if got, want := scanDataPorts(sysfs), []string{"vport0p2", "vport0p3"}; !slices.Equal(got, want) {
		t.Fatalf("scan = %v, want %v", got, want)
	}

	d := newDataPorts(Hooks{})
	d.sysfs, d.dev = sysfs, "/devroot"
	if n := d.count(); n != 2 {
		t.Fatalf("count = %d, want 2", n)
	}
	// A port that appears later is found when a request names it.
	port("vport0p4", agentproto.DataPortName(2))
	dev, err := d.device(2)
	if err != nil || dev != "/devroot/vport0p4" {
		t.Fatalf("device(2) = %q, %v", dev, err)
	}
	if _, err := d.device(5); err == nil {
		t.Fatalf("device(5) of 4 ports: no error")
	}
}
