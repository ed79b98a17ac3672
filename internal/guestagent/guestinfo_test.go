package guestagent

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"
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
