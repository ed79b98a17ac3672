//go:build e2e

package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/test/harness"
)

// TestNetUser: with user-mode networking (the daemon's default here) a VM
// needs no bridge or firewall; vm ssh and ssh NAME.banger reach its sshd
// through the agent, a forwarded port answers on 127.0.0.1, and it
// reaches the outside.
func TestNetUser(t *testing.T) {
	e := newNetEnv(t, "network = \"user\"\n")
	registerNetImages(t, e)
	name := uniq("nu")
	e.Must("vm", "create", "--name", name, "--image", "debian", "-p", "18090:8080", "-p", "18091:8081/udp", "--start")
	if n := netInfo(t, e, name); n.Mode != api.NetworkUser || len(n.Ports) != 2 {
		t.Fatalf("network %+v: want user with 2 ports", n)
	}
	e.InstallGuestTool(name)
	guestOK(t, e, name, tool("serve", "-d", "tcp", "8080")...)
	guestOK(t, e, name, tool("serve", "-d", "udp", "8081")...)
	e.Lab.WaitExchange("tcp", "127.0.0.1:18090", "ping", "tcp:ping", 30*time.Second)
	e.Lab.WaitExchange("udp", "127.0.0.1:18091", "ping", "udp:ping", 30*time.Second)
	if out := e.Must("vm", "ssh", name, "--", "id", "-un"); strings.TrimSpace(out) != "dev" {
		t.Errorf("vm ssh id -un = %q, want dev", out)
	}
	// ssh NAME.banger through the generated config: no address to reach
	// the guest at, so the ProxyCommand tunnels through the daemon.
	cfg := filepath.Join(e.Dir(), "ssh_config")
	if err := os.WriteFile(cfg, []byte(e.Must("ssh-config")), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := e.NetCommand(t.Context(), "ssh", "-F", cfg, "-o", "BatchMode=yes", name+".banger", "id", "-un")
	if out, err := cmd.CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "dev" {
		t.Errorf("ssh %s.banger id -un: %v, %q", name, err, out)
	}
	if out := waitGuest(t, e, name, 30*time.Second, "curl", "-sS", "--max-time", "10", "http://"+harness.InternetIP+"/"); out != harness.InternetBody {
		t.Errorf("curl through user-mode NAT = %q", out)
	}
	if l := e.Lab.Links(bridgeName); len(l) != 0 {
		t.Errorf("user-mode networking made links: %v", l)
	}
	if r := e.Lab.NFT(); len(r) != 0 {
		t.Errorf("user-mode networking made nftables tables: %v", r)
	}
	e.Must("vm", "rm", "-f", name)
	for _, l := range e.Lab.Listeners() {
		if strings.HasSuffix(l, ":18090") || strings.HasSuffix(l, ":18091") {
			t.Errorf("listener %s left after vm rm", l)
		}
	}
}
