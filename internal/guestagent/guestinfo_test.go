package guestagent

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/bangerdev/banger/internal/agentproto"
)

func TestParseProcNetAddr(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string
		port uint16
	}{
		{"0100007F:0016", "127.0.0.1", 22},
		{"00000000:1F90", "0.0.0.0", 8080},
		{"00000000000000000000000000000000:0016", "::", 22},
		{"00000000000000000000000001000000:0016", "::1", 22},
		{"0000000000000000FFFF00000100007F:0016", "127.0.0.1", 22}, // ::ffff:127.0.0.1
	} {
		addr, port, ok := parseProcNetAddr(tc.in)
		if !ok || addr != netip.MustParseAddr(tc.want) || port != tc.port {
			t.Errorf("parseProcNetAddr(%q) = %v %d %v, want %s %d", tc.in, addr, port, ok, tc.want, tc.port)
		}
	}
	for _, bad := range []string{"", "0100007F", "0100007:0016", "0100007F:zz"} {
		if _, _, ok := parseProcNetAddr(bad); ok {
			t.Errorf("parseProcNetAddr(%q) accepted", bad)
		}
	}
}

func TestListeningTCP(t *testing.T) {
	const header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
	row := func(local, remote, st string) string {
		return "   0: " + local + " " + remote + " " + st + " 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n"
	}
	for _, tc := range []struct {
		name, table string
		want        bool
	}{
		{"any address", row("00000000:0016", "00000000:0000", "0A"), true},
		{"loopback", row("0100007F:0016", "00000000:0000", "0A"), true},
		{"other address only", row("0500000A:0016", "00000000:0000", "0A"), false},
		{"another port", row("00000000:0017", "00000000:0000", "0A"), false},
		{"established, not listening", row("0100007F:0016", "0100007F:C350", "01"), false},
		{"IPv6 any", row("00000000000000000000000000000000:0016", "00000000000000000000000000000000:0000", "0A"), true},
	} {
		p := filepath.Join(t.TempDir(), "tcp")
		if err := os.WriteFile(p, []byte(header+tc.table), 0o644); err != nil {
			t.Fatal(err)
		}
		if got := listeningTCP(p, 22); got != tc.want {
			t.Errorf("%s: listeningTCP = %v, want %v", tc.name, got, tc.want)
		}
	}
	if listeningTCP(filepath.Join(t.TempDir(), "missing"), 22) {
		t.Errorf("a missing table lists a listener")
	}
}

func TestListeningPorts(t *testing.T) {
	const header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
	row := func(local, remote, st string) string {
		return "   0: " + local + " " + remote + " " + st + " 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n"
	}
	const any4, any6 = "00000000:0000", "00000000000000000000000000000000:0000"
	dir := t.TempDir()
	tcp, tcp6 := filepath.Join(dir, "tcp"), filepath.Join(dir, "tcp6")
	if err := os.WriteFile(tcp, []byte(header+
		row("00000000:1F90", any4, "0A")+ // 0.0.0.0:8080
		row("0100007F:0CEA", any4, "0A")+ // 127.0.0.1:3306: loopback only
		row("0500000A:0016", any4, "0A")+ // 10.0.0.5:22
		row("0500000A:0016", "0200000A:C350", "01")+ // an established connection
		row("0200007F:1388", any4, "0A")+ // 127.0.0.2:5000: loopback
		"garbage\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tcp6, []byte(header+
		row("00000000000000000000000000000000:1F90", any6, "0A")+ // [::]:8080: the IPv4 one came first
		row("00000000000000000000000001000000:2382", any6, "0A")+ // [::1]:9090: loopback
		row("0000000000000000FFFF00000100007F:0050", any6, "0A")+ // [::ffff:127.0.0.1]:80: loopback
		row("00000000000000000000000000000000:0BB8", any6, "0A")), 0o644); err != nil { // [::]:3000
		t.Fatal(err)
	}
	got := listeningPorts(tcp, tcp6, filepath.Join(dir, "missing"))
	want := []agentproto.PortListen{
		{Proto: "tcp", Addr: "10.0.0.5", Port: 22},
		{Proto: "tcp", Addr: "::", Port: 3000},
		{Proto: "tcp", Addr: "0.0.0.0", Port: 8080},
	}
	if !slices.Equal(got, want) {
		t.Errorf("listeningPorts = %+v, want %+v", got, want)
	}
	if got := listeningPorts(filepath.Join(dir, "missing")); len(got) != 0 {
		t.Errorf("listeningPorts of a missing table = %+v", got)
	}
}
