//go:build e2e

package e2e

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/test/harness"
)

// TestNetDockerUfw: on a host where Docker made its DOCKER-USER chain and
// set iptables' FORWARD policy to DROP, and ufw set INPUT's to DROP
// (loopback and replies accepted), before bangerd starts, a bridged VM
// still reaches the outside, banger's DNS and DHCP, and its forwarded
// port works; banger's accept goes into DOCKER-USER, no policy changes,
// and doctor names Docker.
func TestNetDockerUfw(t *testing.T) {
	e := newNetEnv(t, "")
	registerNetImages(t, e)
	e.StopDaemon()
	ipt := "iptables-nft"
	if _, err := exec.LookPath(ipt); err != nil {
		ipt = "iptables"
	}
	for _, args := range [][]string{
		{"-N", "DOCKER-USER"},
		{"-A", "DOCKER-USER", "-j", "RETURN"},
		{"-I", "FORWARD", "-j", "DOCKER-USER"},
		{"-P", "FORWARD", "DROP"},
		{"-A", "INPUT", "-i", "lo", "-j", "ACCEPT"},
		{"-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"},
		{"-P", "INPUT", "DROP"},
	} {
		e.Lab.BGD.Run(t, ipt, args...)
	}
	e.StartDaemon()
	name := "dk"
	e.Must("vm", "create", "--name", name, "--image", "tiny", "--memory", "256", "-p", "18900:8080", "--start")
	ip := checkBridged(t, e, name).IP
	e.InstallGuestTool(name)
	if out := waitGuest(t, e, name, 30*time.Second, tool("get", harness.InternetIP+":80")...); out != harness.InternetBody {
		t.Errorf("NAT = %q", out)
	}
	if out := waitGuest(t, e, name, 20*time.Second, tool("lookup", harness.OutsideName)...); strings.TrimSpace(out) != harness.InternetIP {
		t.Errorf("DNS through banger's forwarder with INPUT DROP = %q", out)
	}
	if out := guestOK(t, e, name, "sh", "-c", "udhcpc -i eth0 -n -q -t 3 -T 2 -s /bin/true 2>&1"); !strings.Contains(out, "lease of "+ip) {
		t.Errorf("DHCP with INPUT DROP:\n%s", out)
	}
	guestOK(t, e, name, tool("serve", "-d", "tcp", "8080")...)
	e.Lab.WaitExchange("tcp", "127.0.0.1:18900", "dk", "tcp:dk", 30*time.Second)
	if out := e.Lab.BGD.Run(t, ipt, "-S", "DOCKER-USER"); !strings.Contains(out, "-i "+bridgeName+" -j ACCEPT") {
		t.Errorf("banger's accept is not in DOCKER-USER:\n%s", out)
	}
	out := e.Lab.BGD.Run(t, ipt, "-S")
	for _, want := range []string{"-P INPUT DROP", "-P FORWARD DROP"} {
		if !strings.Contains(out, want) {
			t.Errorf("a policy changed (want %s):\n%s", want, out)
		}
	}
	if out, _, _ := e.Banger("doctor"); !strings.Contains(out, "Docker") {
		t.Errorf("doctor does not report Docker's rules:\n%s", out)
	}
}
