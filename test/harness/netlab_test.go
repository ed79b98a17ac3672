package harness

import (
	"net"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/testenv"
)

// TestLab checks the lab the networked e2e tests stand on: from bgd, the
// outside servers answer, the outside DNS server resolves the test name,
// and the listings see what is there.
func TestLab(t *testing.T) {
	l := NewLab(t)
	for addr, want := range map[string]string{
		InternetIP + ":80": InternetBody,
		MetadataIP + ":80": MetadataBody,
		LANHostIP + ":80":  LANBody,
	} {
		if got, err := l.Get(addr, 5*time.Second); err != nil || got != want {
			t.Errorf("GET %s = %q, %v; want %q", addr, got, err, want)
		}
	}
	if n := l.Hits("internet"); n != 1 {
		t.Errorf("internet hits = %d, want 1", n)
	}

	for _, network := range []string{"udp", "tcp"} {
		addrs, err := l.Lookup(network, InternetIP+":53", OutsideName, 5*time.Second)
		if err != nil || !slices.Contains(addrs, InternetIP) {
			t.Errorf("resolve %s over %s from bgd: %v, %v", OutsideName, network, addrs, err)
		}
	}
	if _, err := l.Lookup("udp", InternetIP+":53", "other.test", 5*time.Second); err == nil || !strings.Contains(err.Error(), "NameError") {
		t.Errorf("resolve other.test: %v, want NXDOMAIN", err)
	}
	if n := l.Hits("dns"); n != 3 {
		t.Errorf("dns hits = %d, want 3", n)
	}

	port := l.ListenHost("host", UplinkBGD+":0")
	if got, err := l.Exchange("tcp", net.JoinHostPort(UplinkBGD, itoa(port)), "", 3*time.Second); err != nil || got != HostBody {
		t.Errorf("host listener: %q, %v", got, err)
	}
	if n := l.Hits("host"); n != 1 {
		t.Errorf("host hits = %d", n)
	}
	ls := l.Listeners()
	if !slices.Contains(ls, "tcp "+UplinkBGD+":"+itoa(port)) {
		t.Errorf("listeners %v lack the host listener on port %d", ls, port)
	}

	if got := l.Links("banger0"); len(got) != 0 {
		t.Errorf("banger links in a fresh lab: %v", got)
	}
	l.BGD.Run(t, "ip", "link", "add", "bg-0123456789a", "type", "bridge")
	l.BGD.Run(t, "ip", "link", "add", "banger0", "type", "bridge")
	if got := l.Links("banger0"); strings.Join(got, ",") != "banger0,bg-0123456789a" {
		t.Errorf("links = %v", got)
	}
	if got := l.NFT(); len(got) != 0 {
		t.Errorf("banger tables in a fresh lab: %v", got)
	}
	if _, err := exec.LookPath("nft"); err != nil {
		testenv.Missing(t, "nft (Debian's nftables) to check the nftables listing")
	}
	l.BGD.Run(t, "nft", "add table inet banger; add chain inet banger vm-0123456789ab")
	if got := l.NFT(); strings.Join(got, ",") != "inet banger,inet banger vm-0123456789ab" {
		t.Errorf("nft = %v", got)
	}
	// Per-VM elements carry the VM's id as their comment.
	l.BGD.Run(t, "nft", `add set inet banger vm_ips { type ipv4_addr; }; add element inet banger vm_ips { 10.77.0.2 comment "0123456789abcdef", 10.77.0.3 }`)
	if got := l.NFT(); strings.Join(got, ",") != "inet banger,inet banger vm-0123456789ab,inet banger vm_ips element 0123456789abcdef" {
		t.Errorf("nft with a set = %v", got)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
