package guestagent_test

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
)

// The network boot tests give the VM a card on QEMU's user-mode network
// with restrict=on: the guest can reach nothing outside QEMU, and the test
// sends no traffic anywhere; it only checks what the guest configured.
// banger's address (10.0.2.77) differs from the one slirp's DHCP would hand
// out (10.0.2.15), so an address kept after systemd-networkd ran with a
// DHCP configuration proves that banger's runtime .network file won.

const (
	netbootMAC  = "02:00:00:00:00:77"
	netbootAddr = "10.0.2.77/24"
	// testUserKey is the "user's" key, authorized for the image's user.
	testUserKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB8pQ8Jr1G6Q2p5sPQdZ2yJ6E5vTqH4m3cWlq2r2hYkF alice@laptop"
)

func netbootSpec(rootfs string, useModulesDir bool, mode, user string) bootSpec {
	return bootSpec{
		rootfs: rootfs, useModulesDir: useModulesDir, wantMode: mode,
		network: &agentproto.NetworkConfig{
			Interfaces: []agentproto.Interface{{MAC: netbootMAC, Address: netbootAddr, Gateway: "10.0.2.2", MTU: 1500}},
			DNS:        []string{"10.0.2.3"},
			Search:     []string{"banger.test"},
		},
		ssh: &agentproto.SSHConfig{User: user, AuthorizedKeys: []string{testUserKey}},
		qemuArgs: []string{
			"-netdev", "user,id=n0,restrict=on",
			"-device", "virtio-net-device,netdev=n0,mac=" + netbootMAC,
		},
	}
}

// TestBootNetwork boots with a network configuration and SSH settings, in
// both init modes.
func TestBootNetwork(t *testing.T) {
	t.Run("systemd", func(t *testing.T) {
		testBootNetwork(t, netbootSpec("rootfs.ext4", false, "systemd", "dev"))
	})
	t.Run("agent-pid1", func(t *testing.T) {
		testBootNetwork(t, netbootSpec("busybox-rootfs.ext4", true, "agent", ""))
	})
}

func testBootNetwork(t *testing.T, spec bootSpec) {
	img := findTestImage(t)
	v, cfg, keys := bootVM(t, img, spec)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	readyCtx, readyCancel := context.WithTimeout(ctx, 2*time.Minute)
	c, err := agent.WaitReady(readyCtx, v.dial, keys, nil)
	readyCancel()
	if err != nil {
		t.Fatalf("agent not ready: %v", err)
	}
	defer c.Close()
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ready %s after QEMU start; network %+v, sshd %v, host keys %q", time.Since(v.started).Round(time.Millisecond), info.Network, info.SSHD, info.SSHHostKeys)
	if info.ProtoVersion != agentproto.Version {
		t.Errorf("protocol %q, want %s", info.ProtoVersion, agentproto.Version)
	}
	if n := info.Network; n == nil || !n.Configured || n.Error != "" || !slices.Contains(n.Addresses, netbootAddr) {
		t.Errorf("Info.Network %+v, want configured with %s", n, netbootAddr)
	}
	agentKey := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(keys.HostPublic)))
	if n := len(info.SSHHostKeys); n == 0 || info.SSHHostKeys[n-1] != agentKey {
		t.Errorf("SSHHostKeys %q, want the agent's host key last", info.SSHHostKeys)
	}

	// What the guest's kernel has: the address on the card with that
	// MAC, up, and the default route (10.0.2.2 is 0202000A in
	// /proc/net/route).
	script := `for d in /sys/class/net/*; do [ "$(cat $d/address)" = ` + netbootMAC + ` ] && echo ${d##*/}; done; true`
	dev := strings.TrimSpace(run(ctx, t, c, "sh", "-c", script))
	if dev == "" {
		t.Fatalf("no card with MAC %s in the guest", netbootMAC)
	}
	if addrs := run(ctx, t, c, "ip", "addr", "show", "dev", dev); !strings.Contains(addrs, "inet "+netbootAddr) || !strings.Contains(addrs, ",UP") {
		t.Errorf("ip addr show %s:\n%s", dev, addrs)
	}
	if routes := run(ctx, t, c, "cat", "/proc/net/route"); !containsLine(routes, dev, "00000000", "0202000A") {
		t.Errorf("no default route via 10.0.2.2 on %s:\n%s", dev, routes)
	}
	if rc := run(ctx, t, c, "cat", "/etc/resolv.conf"); !strings.Contains(rc, "nameserver 10.0.2.3\nsearch banger.test\n") {
		t.Errorf("/etc/resolv.conf:\n%s", rc)
	}
	if hosts := run(ctx, t, c, "cat", "/etc/hosts"); !strings.Contains(hosts, "127.0.1.1\t"+cfg.Hostname+"\n") {
		t.Errorf("/etc/hosts lacks the hostname:\n%s", hosts)
	}

	home, uid := "/root", "0"
	if spec.ssh.User == "dev" {
		home, uid = "/home/dev", "1000"
	}
	ak := run(ctx, t, c, "sh", "-c", "stat -c '%u %a' "+home+"/.ssh "+home+"/.ssh/authorized_keys; cat "+home+"/.ssh/authorized_keys")
	if want := uid + " 700\n" + uid + " 600\n" + testUserKey + "\n"; ak != want {
		t.Errorf("authorized_keys (owner, mode, content):\n%s\nwant\n%s", ak, want)
	}

	if spec.wantMode != "systemd" {
		if info.SSHD || len(info.SSHHostKeys) != 1 {
			t.Errorf("no sshd in the image: SSHD %v, host keys %q; want false and the agent's key only", info.SSHD, info.SSHHostKeys)
		}
		return
	}

	// The image has an sshd and no host keys: the agent made them before
	// systemd started ssh.service.
	pub := strings.Fields(run(ctx, t, c, "cat", "/etc/ssh/ssh_host_ed25519_key.pub"))
	if len(pub) < 2 || !slices.Contains(info.SSHHostKeys, pub[0]+" "+pub[1]) {
		t.Errorf("SSHHostKeys %q lack the sshd's ed25519 key %q", info.SSHHostKeys, pub)
	}
	if mode := strings.TrimSpace(run(ctx, t, c, "stat", "-c", "%u %a", "/etc/ssh/ssh_host_ed25519_key")); mode != "0 600" {
		t.Errorf("ed25519 host key: owner and mode %q, want 0 600", mode)
	}
	// ssh.service comes late in a loaded TCG boot (25 s to 70 s measured).
	sshdCtx, sshdCancel := context.WithTimeout(ctx, 4*time.Minute)
	for !info.SSHD {
		select {
		case <-sshdCtx.Done():
			sshdCancel()
			t.Fatalf("Info.SSHD still false %s after QEMU start; ssh.service:\n%s", time.Since(v.started).Round(time.Millisecond),
				execOut(ctx, c, "systemctl", "status", "--no-pager", "ssh.service"))
		case <-time.After(250 * time.Millisecond):
		}
		if info, err = c.Info(ctx); err != nil {
			t.Fatal(err)
		}
	}
	sshdCancel()
	t.Logf("sshd listening %s after QEMU start", time.Since(v.started).Round(time.Millisecond))
	if st := strings.TrimSpace(execOut(ctx, c, "systemctl", "is-active", "ssh.service")); st != "active" {
		t.Errorf("ssh.service is %q", st)
	}

	// systemd-networkd with a DHCP configuration for every card: banger's
	// runtime file (00-banger-*.network) wins, its address stays.
	run(ctx, t, c, "sh", "-c", "mkdir -p /etc/systemd/network && printf '[Match]\\nName=e*\\n\\n[Network]\\nDHCP=yes\\n' > /etc/systemd/network/99-dhcp.network && systemctl start systemd-networkd")
	// networkctl needs D-Bus, which the image lacks: read networkd's
	// state file of the link.
	state := "/run/systemd/netif/links/" + strings.TrimSpace(run(ctx, t, c, "cat", "/sys/class/net/"+dev+"/ifindex"))
	nctx, ncancel := context.WithTimeout(ctx, 2*time.Minute)
	var status string
	for {
		status = execOut(nctx, c, "cat", state)
		if strings.Contains(status, "ADMIN_STATE=configured") {
			break
		}
		select {
		case <-nctx.Done():
			ncancel()
			t.Fatalf("networkd did not configure %s:\n%s\n%s", dev, execOut(ctx, c, "cat", state),
				execOut(ctx, c, "journalctl", "-b", "--no-pager", "-n", "40", "-u", "systemd-networkd"))
		case <-time.After(500 * time.Millisecond):
		}
	}
	ncancel()
	if want := "NETWORK_FILE=/run/systemd/network/00-banger-020000000077.network"; !strings.Contains(status, want) {
		t.Errorf("networkd's state of %s lacks %q:\n%s", dev, want, status)
	}
	// Give networkd time to act on the link, as a DHCP client would.
	run(ctx, t, c, "sleep", "3")
	addrs := run(ctx, t, c, "ip", "-4", "addr", "show", "dev", dev)
	if !strings.Contains(addrs, "inet "+netbootAddr) || strings.Contains(addrs, "10.0.2.15") {
		t.Errorf("after networkd: addresses of %s:\n%s\nwant %s only", dev, addrs, netbootAddr)
	}
	if info, err = c.Info(ctx); err != nil || info.Network == nil || !info.Network.Configured {
		t.Errorf("after networkd: Info.Network %+v (%v)", info.Network, err)
	}
	if routes := run(ctx, t, c, "cat", "/proc/net/route"); !containsLine(routes, dev, "00000000", "0202000A") {
		t.Errorf("after networkd: no default route via 10.0.2.2:\n%s", routes)
	}
}

// containsLine tells whether a line of text starts with the given fields.
func containsLine(text string, fields ...string) bool {
	for _, l := range strings.Split(text, "\n") {
		f := strings.Fields(l)
		if len(f) >= len(fields) && slices.Equal(f[:len(fields)], fields) {
			return true
		}
	}
	return false
}

// execOut runs argv in the guest and returns its stdout and stderr,
// whatever its exit status.
func execOut(ctx context.Context, c *agent.Client, argv ...string) string {
	var out bytes.Buffer
	if _, err := c.Exec(ctx, agent.ExecOptions{Argv: argv, Stdout: &out, Stderr: &out}); err != nil {
		out.WriteString(err.Error())
	}
	return out.String()
}
