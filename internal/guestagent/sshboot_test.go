package guestagent_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
)

// guestSSH logs in over a ChanSSH stream of c, pinning hostKey.
func guestSSH(t *testing.T, c *agent.Client, user string, signer ssh.Signer, hostKey ssh.PublicKey) *ssh.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := c.OpenSSH(ctx)
	if err != nil {
		t.Fatalf("open ssh: %v", err)
	}
	cc, chans, reqs, err := ssh.NewClientConn(streamConn{s.(agent.Stream)}, "vm", &ssh.ClientConfig{
		User:              user,
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback:   ssh.FixedHostKey(hostKey),
		HostKeyAlgorithms: []string{hostKey.Type()},
		Timeout:           30 * time.Second,
	})
	if err != nil {
		s.Close()
		t.Fatalf("ssh login as %s: %v", user, err)
	}
	client := ssh.NewClient(cc, chans, reqs)
	t.Cleanup(func() { client.Close() })
	return client
}

// sshBanner returns the version line of the SSH server behind a new
// ChanSSH stream.
func sshBanner(ctx context.Context, c *agent.Client) (string, error) {
	s, err := c.OpenSSH(ctx)
	if err != nil {
		return "", err
	}
	defer s.Close()
	line, err := bufio.NewReader(s).ReadString('\n')
	return strings.TrimSpace(line), err
}

// TestBootSSHBuiltin boots the busybox image (no sshd, no /etc/passwd): a
// ChanSSH stream reaches the agent's built-in server, whose host key is the
// agent's; root runs commands and uses sftp (the agent binary re-executed
// from the freed initramfs).
func TestBootSSHBuiltin(t *testing.T) {
	img := findTestImage(t)
	user := newSSHUser(t)
	v, cfg, keys := bootVM(t, img, bootSpec{rootfs: "busybox-rootfs.ext4", useModulesDir: true, config: func(cfg *agentproto.Config) {
		cfg.SSH = &agentproto.SSHConfig{AuthorizedKeys: []string{user.authorized}}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := agent.WaitReady(ctx, v.dial, keys, nil)
	if err != nil {
		t.Fatalf("agent not ready: %v", err)
	}
	defer c.Close()
	hostKey, err := ssh.ParsePrivateKey([]byte(cfg.HostKey))
	if err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	client := guestSSH(t, c, "root", user.signer, hostKey.PublicKey())
	t.Logf("ssh login through the agent in %s", time.Since(start).Round(time.Millisecond))
	if got := string(client.ServerVersion()); got != "SSH-2.0-banger-agent" {
		t.Errorf("server %q, want the agent's built-in server", got)
	}
	checkInfoHostKey(ctx, t, c, hostKey.PublicKey())
	out, errOut, code := runSSH(t, client, "id -u; echo $HOME; uname -r")
	if want := "0\n/root\n" + img.release + "\n"; out != want || code != 0 {
		t.Errorf("ssh exec: %q (stderr %q, status %d), want %q", out, errOut, code, want)
	}

	sc, err := sftp.NewClient(client)
	if err != nil {
		t.Fatalf("sftp: %v", err)
	}
	defer sc.Close()
	f, err := sc.Create("/tmp/over-sftp")
	if err != nil {
		t.Fatalf("sftp create: %v", err)
	}
	if _, err := f.Write([]byte("sftp in the guest\n")); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if got := run(ctx, t, c, "cat", "/tmp/over-sftp"); got != "sftp in the guest\n" {
		t.Errorf("file written over sftp: %q", got)
	}

	// The system's ssh, as `ssh NAME.banger` runs it.
	oc := newOpenSSHClient(t, c, user, "root")
	kh := oc.writeKnownHosts(string(ssh.MarshalAuthorizedKey(hostKey.PublicKey())))
	if out, err := oc.run("ssh", append(oc.args(kh), "vm.banger", "id -u; cat /tmp/over-sftp")...); err != nil || out != "0\nsftp in the guest\n" {
		t.Errorf("ssh vm.banger: %v\n%s", err, out)
	}

	if _, err := c.DialGuest(ctx, "127.0.0.1", 1); !errors.Is(err, agent.ErrGuestDial) {
		t.Errorf("dial a closed guest port: %v, want ErrGuestDial", err)
	}
}

// TestBootSSHRelay boots the Debian image, whose sshd (without host keys
// in the image) listens on port 22: a ChanSSH stream reaches that sshd
// (the host key the agent made for it, listed in Info) and logs in as the
// image's user with the key the agent authorized.
func TestBootSSHRelay(t *testing.T) {
	img := findTestImage(t)
	user := newSSHUser(t)
	v, _, keys := bootVM(t, img, bootSpec{rootfs: "rootfs.ext4", config: func(cfg *agentproto.Config) {
		cfg.SSH = &agentproto.SSHConfig{User: "dev", AuthorizedKeys: []string{user.authorized}}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c, err := agent.WaitReady(ctx, v.dial, keys, nil)
	if err != nil {
		t.Fatalf("agent not ready: %v", err)
	}
	defer c.Close()
	for {
		info, err := c.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.EarlyBootDone {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("early boot not done: %v", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	// The agent made the host keys before sshd started and put the
	// user's key into dev's authorized_keys: nothing is prepared here.
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(run(ctx, t, c, "cat", "/etc/ssh/ssh_host_ed25519_key.pub")))
	if err != nil {
		t.Fatalf("guest sshd host key: %v", err)
	}

	// Until sshd listens, the agent's own server answers: wait for sshd.
	var banner string
	for {
		banner, err = sshBanner(ctx, c)
		if err == nil && strings.HasPrefix(banner, "SSH-2.0-OpenSSH") {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the guest's sshd never answered a ChanSSH stream (last: %q, %v)", banner, err)
		case <-time.After(500 * time.Millisecond):
		}
	}
	t.Logf("sshd answers %s after QEMU start: %s", time.Since(v.started).Round(time.Millisecond), banner)
	checkInfoHostKey(ctx, t, c, pub)
	client := guestSSH(t, c, "dev", user.signer, pub)
	out, errOut, code := runSSH(t, client, "id -un; echo $HOME")
	if out != "dev\n/home/dev\n" || code != 0 {
		t.Errorf("ssh exec as dev: %q (stderr %q, status %d)", out, errOut, code)
	}
	// ssh -L through the guest's sshd reaches the guest's own port 22.
	conn, err := client.Dial("tcp", "127.0.0.1:22")
	if err != nil {
		t.Fatalf("direct-tcpip through sshd: %v", err)
	}
	line, _ := bufio.NewReader(conn).ReadString('\n')
	conn.Close()
	if !strings.HasPrefix(line, "SSH-2.0-OpenSSH") {
		t.Errorf("direct-tcpip to 127.0.0.1:22 read %q", line)
	}
	// And straight through the agent.
	s, err := c.DialGuest(ctx, "127.0.0.1", 22)
	if err != nil {
		t.Fatalf("dial guest port 22: %v", err)
	}
	b := make([]byte, 7)
	_, err = io.ReadFull(s, b)
	s.Close()
	if err != nil || !bytes.Equal(b, []byte("SSH-2.0")) {
		t.Errorf("DialGuest 22 read %q, %v", b, err)
	}
}

// checkInfoHostKey checks that the agent's info lists key among the host
// keys a ChanSSH stream may present (the keys bangerd pins).
func checkInfoHostKey(ctx context.Context, t *testing.T, c *agent.Client, key ssh.PublicKey) {
	t.Helper()
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range info.SSHHostKeys {
		if pk, _, _, _, err := ssh.ParseAuthorizedKey([]byte(k)); err == nil && bytes.Equal(pk.Marshal(), key.Marshal()) {
			return
		}
	}
	t.Errorf("Info.SSHHostKeys %q lacks the presented host key %s", info.SSHHostKeys, ssh.FingerprintSHA256(key))
}
