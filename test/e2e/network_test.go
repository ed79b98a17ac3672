//go:build e2e

package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/test/harness"
)

// registerNetImages registers the test images with their default users:
// debian (systemd, sshd) logs in as dev, tiny (busybox, no init, no
// sshd) as root.
func registerNetImages(t *testing.T, e *harness.Env) {
	t.Helper()
	e.Must("image", "register", "debian", "--user", "dev", "--rootfs", filepath.Join(imageDir, "rootfs.ext4"),
		"--kernel", filepath.Join(imageDir, "vmlinuz"), "--initrd", filepath.Join(imageDir, "initrd.img"))
	e.Must("image", "register", "tiny", "--rootfs", filepath.Join(imageDir, "busybox-rootfs.ext4"),
		"--kernel", filepath.Join(imageDir, "vmlinuz"), "--modules", filepath.Join(imageDir, "modules"))
}

// startAll runs each create command (argv after "vm create") at once and
// fails on the first error.
func startAll(t *testing.T, e *harness.Env, creates ...[]string) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make([]string, len(creates))
	for i, c := range creates {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, errOut, code := e.Banger(append([]string{"vm", "create", "--start"}, c...)...)
			if code != 0 {
				errs[i] = fmt.Sprintf("vm create --start %v: exit %d\n%s%s", c, code, out, errOut)
			}
		}()
	}
	wg.Wait()
	for _, s := range errs {
		if s != "" {
			t.Fatal(s)
		}
	}
}

// TestNetBridge boots three bridged VMs in one lab and checks, in order:
// addresses, NAT to the outside, DNS through banger's forwarder, forwarded
// TCP and UDP ports, isolation by default and what --allow opens, ssh
// NAME.banger with and without an sshd in the guest, a changed host key,
// anti-spoofing of IP and MAC, daemon restarts (SIGTERM, SIGKILL) while
// VMs run, an iptables FORWARD policy of DROP, and removal leaving nothing.
//
//	a: debian (systemd, sshd), -p 18080:8080 -p 18081:8081/udp -p UPLINK:18083:8080
//	b: tiny (busybox, no sshd), --allow vm, serves TCP 8080
//	c: tiny, --allow host,vm,lan,link-local
func TestNetBridge(t *testing.T) {
	e := newNetEnv(t, "")
	registerNetImages(t, e)
	lab := e.Lab
	a, b, c := uniq("na"), uniq("nb"), uniq("nc")
	startAll(t, e,
		[]string{"--name", a, "--image", "debian", "-p", "18080:8080", "-p", "18081:8081/udp", "-p", harness.UplinkBGD + ":18083:8080"},
		[]string{"--name", b, "--image", "tiny", "--memory", "256", "--allow", "vm"},
		[]string{"--name", c, "--image", "tiny", "--memory", "256", "--allow", "host,vm,lan,link-local"},
	)
	for _, n := range []string{a, b, c} {
		e.InstallGuestTool(n)
	}
	na, nb, nc := checkBridged(t, e, a), checkBridged(t, e, b), checkBridged(t, e, c)
	idA := e.Inspect(a).ID
	hostPort := strconv.Itoa(lab.ListenHost("host", "0.0.0.0:0"))

	t.Run("address", func(t *testing.T) {
		e.T = t
		if na.IP == nb.IP || na.IP == nc.IP || nb.IP == nc.IP {
			t.Fatalf("shared addresses: %s %s %s", na.IP, nb.IP, nc.IP)
		}
		for name, n := range map[string]string{a: na.IP + "/24", b: nb.IP + "/24", c: nc.IP + "/24"} {
			if out := guestOK(t, e, name, tool("addrs")...); !strings.Contains(out, n) {
				t.Errorf("%s's addresses lack %s:\n%s", name, n, out)
			}
		}
		if out := guestOK(t, e, a, tool("addrs")...); !strings.Contains(out, na.MAC) {
			t.Errorf("%s's card lacks mac %s:\n%s", a, na.MAC, out)
		}
		links := lab.Links(bridgeName)
		for _, tap := range []string{bridgeName, na.TAP, nb.TAP, nc.TAP} {
			if !contains(links, tap) {
				t.Errorf("links %v lack %s", links, tap)
			}
		}
	})

	t.Run("nat", func(t *testing.T) {
		e.T = t
		before := lab.Hits("internet")
		if out := waitGuest(t, e, a, 30*time.Second, "curl", "-sS", "--max-time", "10", "http://"+harness.InternetIP+"/"); out != harness.InternetBody {
			t.Errorf("curl from %s = %q", a, out)
		}
		if out := waitGuest(t, e, b, 30*time.Second, tool("get", harness.InternetIP+":80")...); out != harness.InternetBody {
			t.Errorf("get from %s (no init) = %q", b, out)
		}
		if n := lab.Hits("internet") - before; n < 2 {
			t.Errorf("the outside server saw %d requests, want 2", n)
		}
	})

	t.Run("dns", func(t *testing.T) {
		e.T = t
		if out := guestOK(t, e, a, "cat", "/etc/resolv.conf"); !strings.Contains(out, "nameserver "+gatewayIP) {
			t.Errorf("%s's resolv.conf does not name banger's forwarder %s:\n%s", a, gatewayIP, out)
		}
		if out := waitGuest(t, e, a, 20*time.Second, "getent", "hosts", harness.OutsideName); !strings.HasPrefix(out, harness.InternetIP) {
			t.Errorf("getent hosts %s in %s = %q", harness.OutsideName, a, out)
		}
		if out := waitGuest(t, e, b, 20*time.Second, tool("lookup", harness.OutsideName)...); strings.TrimSpace(out) != harness.InternetIP {
			t.Errorf("lookup %s in %s = %q", harness.OutsideName, b, out)
		}
		if lab.Hits("dns") == 0 {
			t.Errorf("the outside DNS server was never asked")
		}
	})

	t.Run("dhcp", func(t *testing.T) {
		e.T = t
		// An image's own DHCP client gets the VM's address from banger
		// (busybox's udhcpc; -s /bin/true leaves the card as it is).
		out := guestOK(t, e, b, "sh", "-c", "udhcpc -i eth0 -n -q -t 3 -T 2 -s /bin/true 2>&1")
		if !strings.Contains(out, "lease of "+nb.IP+" obtained") {
			t.Errorf("udhcpc in %s did not get %s:\n%s", b, nb.IP, out)
		}
	})

	t.Run("ports", func(t *testing.T) {
		e.T = t
		guestOK(t, e, a, tool("serve", "-d", "tcp", "8080")...)
		guestOK(t, e, a, tool("serve", "-d", "udp", "8081")...)
		lab.WaitExchange("tcp", "127.0.0.1:18080", "ping", "tcp:ping", 30*time.Second)
		lab.WaitExchange("udp", "127.0.0.1:18081", "ping", "udp:ping", 30*time.Second)
		lab.WaitExchange("tcp", harness.UplinkBGD+":18083", "up", "tcp:up", 30*time.Second)
		ls := lab.Listeners()
		for _, want := range []string{"tcp 127.0.0.1:18080", "udp 127.0.0.1:18081", "tcp " + harness.UplinkBGD + ":18083"} {
			if !contains(ls, want) {
				t.Errorf("listeners %v lack %s", ls, want)
			}
		}
		if n := netInfo(t, e, a); len(n.Ports) != 3 {
			t.Errorf("inspect shows ports %+v, want 3", n.Ports)
		}
		if out := e.Must("vm", "ls"); !strings.Contains(out, "127.0.0.1:18080->8080/tcp") || !strings.Contains(out, "127.0.0.1:18081->8081/udp") {
			t.Errorf("vm ls does not show the ports:\n%s", out)
		}
	})

	t.Run("isolation-default", func(t *testing.T) {
		e.T = t
		guestOK(t, e, b, tool("serve", "-d", "tcp", "8080")...)
		// c may reach b: the server is up.
		if out := waitGuest(t, e, c, 20*time.Second, tool("dial", "tcp", nb.IP+":8080", "x")...); out != "tcp:x" {
			t.Fatalf("%s -> %s:8080 = %q", c, b, out)
		}
		hits := map[string]int64{}
		for _, s := range []string{"host", "metadata", "lan"} {
			hits[s] = lab.Hits(s)
		}
		targets := []string{
			nb.IP + ":8080",                    // another VM
			gatewayIP + ":" + hostPort,         // the host on the bridge address
			harness.UplinkBGD + ":" + hostPort, // the host on another address
			harness.LANBGD + ":" + hostPort,    // the host on its LAN address
			harness.MetadataIP + ":80",         // cloud metadata
			harness.LANHostIP + ":80",          // the host's LAN
		}
		// All at once (each waits out its timeout): a line per target
		// reached or per dial that didn't run.
		script := "for t in " + strings.Join(targets, " ") + "; do (" + harness.GuestToolPath +
			` dial -t 3 tcp $t x >/dev/null 2>&1; r=$?; [ $r = 1 ] || echo "$t: exit $r") & done; wait`
		if out := guestOK(t, e, a, "sh", "-c", script); out != "" {
			t.Errorf("%s reached what it may not (exit 0) or a dial failed to run:\n%s", a, out)
		}
		guestFails(t, e, b, tool("get", "-t", "3", harness.MetadataIP+":80")...)
		for s, n := range hits {
			if got := lab.Hits(s); got != n {
				t.Errorf("server %s was reached from a VM that may not (%d -> %d)", s, n, got)
			}
		}
	})

	t.Run("isolation-allowed", func(t *testing.T) {
		e.T = t
		for target, want := range map[string]string{
			gatewayIP + ":" + hostPort:         harness.HostBody,
			harness.UplinkBGD + ":" + hostPort: harness.HostBody,
		} {
			if out := guestOK(t, e, c, tool("dial", "tcp", target, "x")...); out != want {
				t.Errorf("%s -> %s = %q, want %q", c, target, out, want)
			}
		}
		if out := guestOK(t, e, c, tool("get", harness.MetadataIP+":80")...); out != harness.MetadataBody {
			t.Errorf("%s -> metadata = %q", c, out)
		}
		if out := guestOK(t, e, c, tool("get", harness.LANHostIP+":80")...); out != harness.LANBody {
			t.Errorf("%s -> lan = %q", c, out)
		}
	})

	sshConfig := filepath.Join(e.Dir(), "ssh_config")
	ssh := func(host string, argv ...string) (string, string, int) {
		ctx := t.Context()
		args := append([]string{"-F", sshConfig, "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", host}, argv...)
		cmd := e.NetCommand(ctx, "ssh", args...)
		var so, se strings.Builder
		cmd.Stdout, cmd.Stderr = &so, &se
		err := cmd.Run()
		code := 0
		if err != nil {
			code = -1
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
		}
		return so.String(), se.String(), code
	}

	t.Run("ssh", func(t *testing.T) {
		e.T = t
		if _, err := exec.LookPath("ssh"); err != nil {
			t.Skip("no ssh client")
		}
		if err := os.WriteFile(sshConfig, []byte(e.Must("ssh-config")), 0o600); err != nil {
			t.Fatal(err)
		}
		// a's sshd, as the image's user; b has no sshd (the agent's SSH
		// server) and no passwd file: root, uid 0.
		for name, argv := range map[string][]string{a: {"id", "-un"}, b: {"id", "-u"}} {
			want := map[string]string{a: "dev", b: "0"}[name]
			out, errOut, code := ssh(name+".banger", argv...)
			if code != 0 || strings.TrimSpace(out) != want {
				t.Errorf("ssh %s.banger %v: exit %d, %q, want %q\n%s", name, argv, code, out, want, errOut)
			}
		}
		if out := e.Must("vm", "ssh", a, "--", "echo", "via-vm-ssh"); strings.TrimSpace(out) != "via-vm-ssh" {
			t.Errorf("vm ssh %s = %q", a, out)
		}
		// scp (the SFTP protocol in this OpenSSH): the guest's sshd's
		// sftp server, and the agent's where there is no sshd.
		payload := make([]byte, 200<<10)
		rand.Read(payload)
		src := filepath.Join(e.Dir(), "payload")
		if err := os.WriteFile(src, payload, 0o644); err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("%x", sha256.Sum256(payload))
		for _, name := range []string{a, b} {
			cmd := e.NetCommand(t.Context(), "scp", "-F", sshConfig, "-o", "BatchMode=yes", src, name+".banger:/tmp/payload")
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("scp to %s.banger: %v\n%s", name, err, out)
				continue
			}
			if out := guestOK(t, e, name, "sha256sum", "/tmp/payload"); !strings.HasPrefix(out, want) {
				t.Errorf("scp to %s: sha256 %q, want %s", name, out, want)
			}
		}
		// ssh-config --install: the user's ~/.ssh/config includes banger's.
		e.Must("ssh-config", "--install")
		userConfig := filepath.Join(e.Dir(), ".ssh", "config")
		cmd := e.NetCommand(t.Context(), "ssh", "-F", userConfig, "-o", "BatchMode=yes", b+".banger", "echo", "installed")
		if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "installed") {
			t.Errorf("ssh through the installed config: %v\n%s", err, out)
		}
	})

	t.Run("ssh-host-key-changed", func(t *testing.T) {
		e.T = t
		if _, err := exec.LookPath("ssh"); err != nil {
			t.Skip("no ssh client")
		}
		// Another sshd answers on the guest's port 22 with a key the
		// guest's agent never reported (its files are not the sshd's):
		// what a machine in the middle would present.
		guestOK(t, e, a, "sh", "-c", `set -e
ssh-keygen -q -t ed25519 -N "" -f /root/fake_host_key
systemctl stop ssh.service ssh.socket 2>/dev/null || systemctl stop ssh.service
mkdir -p /run/sshd
/usr/sbin/sshd -h /root/fake_host_key -o PidFile=/run/fake-sshd.pid`)
		out, errOut, code := ssh(a+".banger", "true")
		if code == 0 {
			t.Errorf("ssh to a VM presenting another host key succeeded: %s", out)
		} else if !strings.Contains(errOut, "verification failed") && !strings.Contains(errOut, "HAS CHANGED") {
			t.Errorf("ssh's refusal does not say the key changed:\n%s", errOut)
		}
		guestOK(t, e, a, "sh", "-c", "kill $(cat /run/fake-sshd.pid); systemctl start ssh.service")
		out, errOut, code = ssh(a+".banger", "true")
		if code != 0 {
			t.Errorf("ssh with the guest's own sshd again: exit %d %s%s", code, out, errOut)
		}
		// Keys changed inside the running guest are not learned either:
		// the daemon keeps the boot's.
		guestOK(t, e, a, "sh", "-c", "rm -f /etc/ssh/ssh_host_* && ssh-keygen -A && systemctl restart ssh.service")
		if out, _, code := ssh(a+".banger", "true"); code == 0 {
			t.Errorf("ssh after the guest regenerated its host keys succeeded: %s", out)
		}
	})

	t.Run("anti-spoofing", func(t *testing.T) {
		e.T = t
		url := "http://" + harness.InternetIP + "/"
		script := `set -e
for d in /sys/class/net/*; do [ "$(cat $d/address)" = "` + na.MAC + `" ] && dev=${d##*/}; done
[ -n "$dev" ]
ip addr add 10.77.0.250/32 dev $dev
if curl -s --max-time 5 --interface 10.77.0.250 ` + url + ` >/dev/null; then echo ip-reached; else echo ip-blocked; fi
ip addr del 10.77.0.250/32 dev $dev
ip link set dev $dev address 02:00:00:00:00:99
if curl -s --max-time 5 ` + url + ` >/dev/null; then echo mac-reached; else echo mac-blocked; fi
ip link set dev $dev address ` + na.MAC + `
`
		before := lab.Hits("internet")
		out := guestOK(t, e, a, "sh", "-c", script)
		if strings.TrimSpace(out) != "ip-blocked\nmac-blocked" {
			t.Errorf("spoofed traffic: %q, want ip-blocked, mac-blocked", out)
		}
		if n := lab.Hits("internet"); n != before {
			t.Errorf("spoofed requests reached the outside server (%d)", n-before)
		}
		// The VM's own address and MAC work again.
		if out := waitGuest(t, e, a, 30*time.Second, "curl", "-sS", "--max-time", "5", url); out != harness.InternetBody {
			t.Errorf("after spoofing, curl = %q", out)
		}
	})

	t.Run("arp-spoofing", func(t *testing.T) {
		e.T = t
		// The host learns b's MAC for b's address; c then claims b's
		// address in ARP (gratuitous requests, after the neighbour
		// table's lock time): the host must keep b's MAC. (Without
		// banger's bridge table the entry flips to c's MAC.)
		guestOK(t, e, b, tool("lookup", harness.OutsideName)...)
		neigh := func() string {
			return strings.TrimSpace(lab.BGD.Run(t, "ip", "neigh", "show", nb.IP, "dev", bridgeName))
		}
		if n := neigh(); !strings.Contains(n, nb.MAC) {
			t.Fatalf("the host has no entry with b's mac %s for %s: %q", nb.MAC, nb.IP, n)
		}
		if out := guestOK(t, e, c, "sh", "-c", "ip addr add "+nb.IP+"/32 dev eth0; sleep 2; arping -U -c 3 -w 4 -I eth0 -s "+nb.IP+" "+gatewayIP+" 2>&1; ip addr del "+nb.IP+"/32 dev eth0; true"); !strings.Contains(out, "Sent 3") {
			t.Fatalf("arping in %s did not send:\n%s", c, out)
		}
		if n := neigh(); !strings.Contains(n, nb.MAC) || strings.Contains(n, nc.MAC) {
			t.Errorf("after c's spoofed ARP the host's entry for %s is %q (b is %s, c is %s)", nb.IP, n, nb.MAC, nc.MAC)
		}
	})

	stillWorks := func(t *testing.T, what string) {
		t.Helper()
		if out := waitGuest(t, e, a, 30*time.Second, tool("get", harness.InternetIP+":80")...); out != harness.InternetBody {
			t.Errorf("%s: NAT from %s = %q", what, a, out)
		}
		if out := waitGuest(t, e, c, 30*time.Second, tool("dial", "tcp", nb.IP+":8080", "y")...); out != "tcp:y" {
			t.Errorf("%s: %s -> %s = %q", what, c, b, out)
		}
		lab.WaitExchange("tcp", "127.0.0.1:18080", "again", "tcp:again", 30*time.Second)
		lab.WaitExchange("udp", "127.0.0.1:18081", "again", "udp:again", 30*time.Second)
		guestFails(t, e, a, tool("dial", "-t", "3", "tcp", nb.IP+":8080", "x")...)
	}

	t.Run("daemon-restart", func(t *testing.T) {
		e.T = t
		pid := e.Inspect(a).PID
		// While bangerd is stopped, the VMs' network stays: a fetch b
		// starts a few seconds after the daemon went reaches the outside.
		before := lab.Hits("internet")
		guestOK(t, e, b, "sh", "-c", "setsid sh -c 'sleep 3; "+harness.GuestToolPath+" get "+harness.InternetIP+":80' </dev/null >/dev/null 2>&1 &")
		e.StopDaemon()
		harness.WaitFor(t, 30*time.Second, "a fetch from a VM while bangerd is stopped", func() bool { return lab.Hits("internet") > before })
		e.StartDaemon()
		if vm := e.Inspect(a); vm.State != "running" || vm.PID != pid {
			t.Fatalf("after a restart %s is %s (pid %d, was %d)", a, vm.State, vm.PID, pid)
		}
		stillWorks(t, "after SIGTERM and restart")
		e.KillDaemon()
		e.StartDaemon()
		stillWorks(t, "after SIGKILL and restart")
	})

	t.Run("forward-policy-drop", func(t *testing.T) {
		e.T = t
		ipt := "iptables-nft"
		if _, err := exec.LookPath(ipt); err != nil {
			ipt = "iptables"
		}
		// As Docker does; banger adds what its traffic needs at start.
		lab.BGD.Run(t, ipt, "-P", "FORWARD", "DROP")
		e.StopDaemon()
		e.StartDaemon()
		stillWorks(t, "with FORWARD policy DROP")
		if out := lab.BGD.Run(t, ipt, "-S", "FORWARD"); !strings.Contains(out, "-P FORWARD DROP") {
			t.Errorf("banger changed the FORWARD policy:\n%s", out)
		}
	})

	t.Run("rm", func(t *testing.T) {
		e.T = t
		e.Must("vm", "rm", "-f", a)
		if l := leftovers(e, idA, "18080", "18081", "18083"); len(l) != 0 {
			t.Fatalf("vm rm left %v", l)
		}
		e.Must("vm", "rm", "-f", b, c)
		for _, l := range lab.Links(bridgeName) {
			if l != bridgeName {
				t.Errorf("link %s left after every VM went", l)
			}
		}
		for _, r := range lab.NFT() {
			if strings.Contains(r, " vm-") {
				t.Errorf("nftables chain %q left after every VM went", r)
			}
		}
	})
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
