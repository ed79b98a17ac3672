package guestagent_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
	sshagent "golang.org/x/crypto/ssh/agent"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/guestagent"
	"github.com/bangerdev/banger/internal/testenv"
)

// envSSHProxy makes the test binary a ProxyCommand: it relays its stdin
// and stdout to the TCP address in the variable (see helperMain).
const envSSHProxy = "BANGER_TEST_SSH_PROXY"

// helperMain runs the test binary as a helper process when asked to (the
// agent's sftp-server subcommand, which the built-in SSH server runs
// through /proc/self/exe, or a ProxyCommand) and reports whether it did.
func helperMain() bool {
	if len(os.Args) > 1 && os.Args[1] == "sftp-server" {
		os.Exit(guestagent.Main(os.Args))
	}
	if addr := os.Getenv(envSSHProxy); addr != "" {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "proxy:", err)
			os.Exit(1)
		}
		go func() {
			io.Copy(conn, os.Stdin)
			conn.(*net.TCPConn).CloseWrite()
		}()
		io.Copy(os.Stdout, conn)
		os.Exit(0)
	}
	return false
}

// closedPort returns a loopback address where nothing listens.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// echoUpper serves on a loopback listener: it reads a connection to its
// end, then answers with what it read in upper case and closes. The
// answer therefore needs the client's half-close to arrive.
func echoUpper(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(io.LimitReader(c, 1<<20))
				c.Write(bytes.ToUpper(b))
			}()
		}
	}()
	return l.Addr().String()
}

// roundTrip writes msg, half-closes and reads the whole answer.
func roundTrip(t *testing.T, s io.ReadWriteCloser, msg string) string {
	t.Helper()
	hc, ok := s.(interface{ CloseWrite() error })
	if !ok {
		t.Fatalf("stream %T has no CloseWrite", s)
	}
	if _, err := io.WriteString(s, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := hc.CloseWrite(); err != nil {
		t.Fatalf("close write: %v", err)
	}
	b, err := io.ReadAll(s)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}

func splitHostPort(t *testing.T, addr string) (string, int) {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	var p int
	fmt.Sscan(port, &p)
	return host, p
}

func TestDialGuest(t *testing.T) {
	c, _ := connect(t, guestagent.Hooks{})
	host, port := splitHostPort(t, echoUpper(t))
	s, err := c.DialGuest(testCtx(t), host, port)
	if err != nil {
		t.Fatalf("dial guest: %v", err)
	}
	defer s.Close()
	if got := roundTrip(t, s, "hello through the agent"); got != "HELLO THROUGH THE AGENT" {
		t.Errorf("answer %q", got)
	}

	host, port = splitHostPort(t, closedPort(t))
	_, err = c.DialGuest(testCtx(t), host, port)
	if !errors.Is(err, agent.ErrGuestDial) || !strings.Contains(err.Error(), "refused") {
		t.Errorf("dial a closed port: %v, want ErrGuestDial saying refused", err)
	}
	if _, err := c.DialGuest(testCtx(t), "127.0.0.1", 0); err == nil {
		t.Errorf("dial port 0 succeeded")
	}
}

func TestSSHRelayedToSSHD(t *testing.T) {
	// A fake sshd: its banner, then an echo of what it gets.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		io.WriteString(conn, "SSH-2.0-fake-sshd\r\n")
		io.Copy(conn, conn)
	}()
	c, _ := connect(t, guestagent.Hooks{SSH: guestagent.SSHOptions{SSHDAddr: l.Addr().String()}})
	s, err := c.OpenSSH(testCtx(t))
	if err != nil {
		t.Fatalf("open ssh: %v", err)
	}
	defer s.Close()
	if got := roundTrip(t, s, "ping\n"); got != "SSH-2.0-fake-sshd\r\nping\n" {
		t.Errorf("relayed %q", got)
	}
}

// sshUser is a key pair for the built-in server's logins.
type sshUser struct {
	signer     ssh.Signer
	authorized string // authorized_keys line
	pemKey     []byte // OpenSSH private key file
}

func newSSHUser(t *testing.T) sshUser {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	blk, err := ssh.MarshalPrivateKey(priv, "test")
	if err != nil {
		t.Fatal(err)
	}
	return sshUser{signer: signer, authorized: string(ssh.MarshalAuthorizedKey(signer.PublicKey())), pemKey: pem.EncodeToMemory(blk)}
}

// builtinSSH is an agent without an sshd to relay to, whose built-in server
// lets user in as login ("" = root) with etc's passwd and group.
type builtinSSH struct {
	c       *agent.Client
	h       *harness
	user    sshUser
	hostKey ssh.PublicKey
}

func startBuiltinSSH(t *testing.T, login, etc string) *builtinSSH {
	t.Helper()
	b := &builtinSSH{user: newSSHUser(t)}
	hooks := guestagent.Hooks{SSH: guestagent.SSHOptions{SSHDAddr: closedPort(t), EtcDir: etc}}
	b.c, b.h = connectConfig(t, hooks, func(cfg *agentproto.Config) {
		cfg.SSH = &agentproto.SSHConfig{User: login, AuthorizedKeys: []string{"not a key", b.user.authorized}}
	})
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(b.h.km.HostPublic))
	if err != nil {
		t.Fatal(err)
	}
	b.hostKey = pub
	return b
}

// dial logs in with an x/crypto/ssh client over a ChanSSH stream.
func (b *builtinSSH) dial(t *testing.T, user string, signer ssh.Signer) (*ssh.Client, error) {
	t.Helper()
	s, err := b.c.OpenSSH(testCtx(t))
	if err != nil {
		t.Fatalf("open ssh: %v", err)
	}
	cc, chans, reqs, err := ssh.NewClientConn(streamConn{s.(agent.Stream)}, "vm", &ssh.ClientConfig{
		User:            user,
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: ssh.FixedHostKey(b.hostKey),
		Timeout:         10 * time.Second,
	})
	if err != nil {
		s.Close()
		return nil, err
	}
	client := ssh.NewClient(cc, chans, reqs)
	t.Cleanup(func() { client.Close() })
	return client, nil
}

func (b *builtinSSH) login(t *testing.T, user string) *ssh.Client {
	t.Helper()
	client, err := b.dial(t, user, b.user.signer)
	if err != nil {
		t.Fatalf("ssh login as %q: %v", user, err)
	}
	return client
}

// streamConn is an agent.Stream as the net.Conn of an SSH client.
type streamConn struct{ agent.Stream }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

func (streamConn) LocalAddr() net.Addr              { return pipeAddr{} }
func (streamConn) RemoteAddr() net.Addr             { return pipeAddr{} }
func (streamConn) SetDeadline(time.Time) error      { return nil }
func (streamConn) SetReadDeadline(time.Time) error  { return nil }
func (streamConn) SetWriteDeadline(time.Time) error { return nil }

// runSSH runs cmd in a new session and returns stdout, stderr and the exit
// status.
func runSSH(t *testing.T, client *ssh.Client, cmd string) (string, string, int) {
	t.Helper()
	sess, err := client.NewSession()
	if err != nil {
		t.Fatalf("new session: %v", err)
	}
	defer sess.Close()
	var stdout, stderr bytes.Buffer
	sess.Stdout, sess.Stderr = &stdout, &stderr
	err = sess.Run(cmd)
	var ee *ssh.ExitError
	switch {
	case err == nil:
		return stdout.String(), stderr.String(), 0
	case errors.As(err, &ee):
		return stdout.String(), stderr.String(), ee.ExitStatus()
	default:
		t.Fatalf("run %q: %v", cmd, err)
		return "", "", -1
	}
}

func TestBuiltinSSHExec(t *testing.T) {
	b := startBuiltinSSH(t, "", t.TempDir()) // no passwd file: root, /bin/sh
	client := b.login(t, "root")
	if got := string(client.ServerVersion()); got != "SSH-2.0-banger-agent" {
		t.Errorf("server version %q", got)
	}
	sess, err := client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	if err := sess.Setenv("BANGER_TEST_VAR", "from the client"); err != nil {
		t.Errorf("setenv: %v", err)
	}
	var out, errOut bytes.Buffer
	sess.Stdout, sess.Stderr = &out, &errOut
	err = sess.Run(`echo "$BANGER_TEST_VAR $HOME $SHELL $USER"; id -u; echo oops >&2; exit 3`)
	var ee *ssh.ExitError
	if !errors.As(err, &ee) || ee.ExitStatus() != 3 {
		t.Errorf("run: %v, want exit status 3", err)
	}
	if got, want := out.String(), "from the client /root /bin/sh root\n0\n"; got != want {
		t.Errorf("stdout %q, want %q", got, want)
	}
	if errOut.String() != "oops\n" {
		t.Errorf("stderr %q", errOut.String())
	}

	// Killed by a signal: exit-signal.
	sess, err = client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	err = sess.Run("kill -TERM $$")
	if !errors.As(err, &ee) || ee.Signal() != "TERM" {
		t.Errorf("killed command: %v, want signal TERM", err)
	}

	// banger's own argv exec is not for SSH users.
	sess, err = client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	payload, _ := agentproto.MarshalPayload(agentproto.ExecRequest{Argv: []string{"true"}})
	if ok, err := sess.SendRequest(agentproto.ReqExecArgv, true, payload); ok || err != nil {
		t.Errorf("%s through the built-in server: ok %v err %v, want refused", agentproto.ReqExecArgv, ok, err)
	}
	sess.Close()

	// Keepalives are answered (with a failure, as sshd does).
	if _, _, err := client.SendRequest("keepalive@openssh.com", true, nil); err != nil {
		t.Errorf("keepalive: %v", err)
	}
}

func TestBuiltinSSHPTY(t *testing.T) {
	b := startBuiltinSSH(t, "", t.TempDir())
	client := b.login(t, "root")
	sess, err := client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	if err := sess.RequestPty("xterm", 40, 100, ssh.TerminalModes{ssh.ECHO: 0}); err != nil {
		t.Fatalf("pty: %v", err)
	}
	in, err := sess.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	sess.Stdout = &out
	if err := sess.Shell(); err != nil {
		t.Fatalf("shell: %v", err)
	}
	io.WriteString(in, "stty size; test -t 0 && echo is-a-tty; echo $0; exit 7\n")
	err = sess.Wait()
	var ee *ssh.ExitError
	if !errors.As(err, &ee) || ee.ExitStatus() != 7 {
		t.Errorf("shell: %v, want exit status 7", err)
	}
	for _, want := range []string{"40 100", "is-a-tty", "-sh"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("terminal output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestBuiltinSSHAuth(t *testing.T) {
	b := startBuiltinSSH(t, "", t.TempDir())
	if _, err := b.dial(t, "root", newSSHUser(t).signer); err == nil {
		t.Errorf("login with an unknown key succeeded")
	}
	if _, err := b.dial(t, "someone", b.user.signer); err == nil {
		t.Errorf("login as another user than the configured one succeeded")
	}
	// The agent's own client key (bangerd's) is not a login key.
	clientKey, err := ssh.ParsePrivateKey([]byte(b.h.km.ClientPrivatePEM))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.dial(t, "root", clientKey); err == nil {
		t.Errorf("login with the agent's client key succeeded")
	}
	// Still usable afterwards.
	if out, _, code := runSSH(t, b.login(t, "root"), "echo ok"); out != "ok\n" || code != 0 {
		t.Errorf("after refusals: %q %d", out, code)
	}
}

func TestBuiltinSSHDirectTCPIP(t *testing.T) {
	b := startBuiltinSSH(t, "", t.TempDir())
	client := b.login(t, "root")
	conn, err := client.Dial("tcp", echoUpper(t))
	if err != nil {
		t.Fatalf("ssh -L style dial: %v", err)
	}
	defer conn.Close()
	if got := roundTrip(t, conn, "forwarded"); got != "FORWARDED" {
		t.Errorf("answer %q", got)
	}
	if _, err := client.Dial("tcp", closedPort(t)); err == nil {
		t.Errorf("dial of a closed port succeeded")
	}
}

func TestBuiltinSSHSFTP(t *testing.T) {
	b := startBuiltinSSH(t, "", t.TempDir())
	client := b.login(t, "root")
	sc, err := sftp.NewClient(client)
	if err != nil {
		t.Fatalf("sftp: %v", err)
	}
	defer sc.Close()
	dir := t.TempDir()
	p := filepath.Join(dir, "hello.txt")
	f, err := sc.Create(p)
	if err != nil {
		t.Fatalf("sftp create: %v", err)
	}
	if _, err := f.Write([]byte("written over sftp\n")); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "written over sftp\n" {
		t.Errorf("file on disk: %q, %v", b, err)
	}
	fi, err := sc.Stat(p)
	if err != nil || fi.Size() != int64(len("written over sftp\n")) {
		t.Errorf("sftp stat: %v, %v", fi, err)
	}
	rf, err := sc.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rf)
	rf.Close()
	if err != nil || string(got) != "written over sftp\n" {
		t.Errorf("sftp read: %q, %v", got, err)
	}
	if wd, err := sc.Getwd(); err != nil || wd != "/root" && wd != "/" {
		t.Errorf("sftp working directory %q, %v; want the home", wd, err)
	}
}

// TestBuiltinSSHUser logs in as an unprivileged user of the passwd file:
// sessions and sftp run with its uid, gid, groups and home.
func TestBuiltinSSHUser(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Missing(t, "running commands as another user needs root")
	}
	home, err := os.MkdirTemp("", "banger-ssh-home-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(home) })
	const uid, gid = 65534, 65533
	if err := os.Chown(home, uid, gid); err != nil {
		t.Fatal(err)
	}
	etc := t.TempDir()
	os.WriteFile(filepath.Join(etc, "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"+
		fmt.Sprintf("tester:x:%d:%d:Tester:%s:/bin/sh\n", uid, gid, home)), 0o644)
	os.WriteFile(filepath.Join(etc, "group"), []byte("root:x:0:\ntty:x:5:\nextra:x:4242:someone,tester\nother:x:4343:someone\n"), 0o644)

	b := startBuiltinSSH(t, "tester", etc)
	if _, err := b.dial(t, "root", b.user.signer); err == nil {
		t.Errorf("root may log in when the configured user is tester")
	}
	client := b.login(t, "tester")
	out, errOut, code := runSSH(t, client, `id -u; id -g; id -G; echo "$HOME $USER"; pwd`)
	if want := fmt.Sprintf("%d\n%d\n%d 4242\n%s tester\n%s\n", uid, gid, gid, home, home); out != want || code != 0 {
		t.Errorf("as tester: %q (stderr %q, status %d), want %q", out, errOut, code, want)
	}

	// The terminal belongs to the user.
	sess, err := client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	if err := sess.RequestPty("xterm", 24, 80, nil); err != nil {
		t.Fatal(err)
	}
	tty, err := sess.Output(`stat -c "%u %g %a" $(tty)`)
	if err != nil {
		t.Fatalf("tty owner: %v", err)
	}
	if got := strings.TrimSpace(string(tty)); got != fmt.Sprintf("%d 5 620", uid) {
		t.Errorf("tty owner, group, mode %q, want %d 5 620", got, uid)
	}

	// ssh -A: the user's commands reach the client's agent.
	if _, err := exec.LookPath("ssh-add"); err == nil {
		keyring := sshagent.NewKeyring()
		if err := keyring.Add(sshagent.AddedKey{PrivateKey: mustRawKey(t, b.user.pemKey)}); err != nil {
			t.Fatal(err)
		}
		if err := sshagent.ForwardToAgent(client, keyring); err != nil {
			t.Fatal(err)
		}
		sess, err := client.NewSession()
		if err != nil {
			t.Fatal(err)
		}
		if err := sshagent.RequestAgentForwarding(sess); err != nil {
			t.Fatalf("agent forwarding: %v", err)
		}
		out, err := sess.CombinedOutput(`stat -c %u "$SSH_AUTH_SOCK"; ssh-add -l`)
		if want := ssh.FingerprintSHA256(b.user.signer.PublicKey()); err != nil || !strings.Contains(string(out), want) || !strings.HasPrefix(string(out), fmt.Sprint(uid)+"\n") {
			t.Errorf("ssh-add -l through the forwarded agent: %v\n%s\nwant the socket owned by %d and %s", err, out, uid, want)
		}
	}

	sc, err := sftp.NewClient(client)
	if err != nil {
		t.Fatalf("sftp: %v", err)
	}
	defer sc.Close()
	f, err := sc.Create("relative.txt")
	if err != nil {
		t.Fatalf("sftp create in home: %v", err)
	}
	f.Write([]byte("mine"))
	f.Close()
	fi, err := os.Stat(filepath.Join(home, "relative.txt"))
	if err != nil {
		t.Fatalf("file written over sftp not in home: %v", err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != uid || st.Gid != gid {
		t.Errorf("sftp wrote a file owned by %d:%d, want %d:%d", st.Uid, st.Gid, uid, gid)
	}
	if _, err := sc.Create("/root/not-for-tester"); err == nil {
		os.Remove("/root/not-for-tester")
		t.Errorf("sftp as tester could write to /root")
	}
}

// TestBuiltinSSHOpenSSHClient logs in with the system's ssh and sftp, a
// ProxyCommand reaching the built-in server (as `banger vm ssh-proxy` does)
// and the agent's host key pinned in known_hosts.
func TestBuiltinSSHOpenSSHClient(t *testing.T) {
	b := startBuiltinSSH(t, "", t.TempDir())
	oc := newOpenSSHClient(t, b.c, b.user, "root")
	dir := oc.dir

	kh := oc.writeKnownHosts(b.h.km.HostPublic)
	out, err := oc.run("ssh", append(oc.args(kh), "vm.banger", "echo", "hello from", "$USER")...)
	if err != nil || out != "hello from root\n" {
		t.Errorf("ssh vm.banger echo: %v\n%s", err, out)
	}
	out, err = oc.run("ssh", append(oc.args(kh), "vm.banger", "exit 5")...)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 5 {
		t.Errorf("ssh exit 5: %v\n%s", err, out)
	}

	// sftp: put a file and get it back.
	src := filepath.Join(dir, "src.txt")
	os.WriteFile(src, []byte("sftp payload\n"), 0o644)
	remote := filepath.Join(t.TempDir(), "remote.txt")
	back := filepath.Join(dir, "back.txt")
	batch := filepath.Join(dir, "batch")
	os.WriteFile(batch, []byte(fmt.Sprintf("put %s %s\nget %s %s\n", src, remote, remote, back)), 0o644)
	out, err = oc.run("sftp", append(oc.args(kh), "-b", batch, "vm.banger")...)
	if err != nil {
		t.Errorf("sftp: %v\n%s", err, out)
	}
	if got, err := os.ReadFile(back); err != nil || string(got) != "sftp payload\n" {
		t.Errorf("sftp round trip: %q, %v", got, err)
	}

	// Another host key in known_hosts: refused.
	kh = oc.writeKnownHosts(generateKeys(t).HostPublic)
	out, err = oc.run("ssh", append(oc.args(kh), "vm.banger", "true")...)
	if err == nil || !strings.Contains(out, "REMOTE HOST IDENTIFICATION HAS CHANGED") && !strings.Contains(out, "Host key verification failed") {
		t.Errorf("ssh with another pinned host key: %v\n%s", err, out)
	}
}

// TestBuiltinSSHUserAuthorizedKeys: keys of the user's own
// ~/.ssh/authorized_keys log in too, unless the file could have been
// written by someone else or the entry has options this server would not
// honour.
func TestBuiltinSSHUserAuthorizedKeys(t *testing.T) {
	home := t.TempDir()
	etc := t.TempDir()
	os.WriteFile(filepath.Join(etc, "passwd"), []byte("root:x:0:0:root:"+home+":/bin/sh\n"), 0o644)
	b := startBuiltinSSH(t, "", etc)
	own, restricted := newSSHUser(t), newSSHUser(t)
	sshDir := filepath.Join(home, ".ssh")
	if err := os.Mkdir(sshDir, 0o700); err != nil {
		t.Fatal(err)
	}
	ak := filepath.Join(sshDir, "authorized_keys")
	content := "# comment\n" + own.authorized + `command="/bin/false" ` + restricted.authorized
	if err := os.WriteFile(ak, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := b.dial(t, "root", own.signer); err != nil {
		t.Errorf("key of ~/.ssh/authorized_keys refused: %v", err)
	}
	if _, err := b.dial(t, "root", restricted.signer); err == nil {
		t.Errorf("key with command= option accepted")
	}
	os.Chmod(ak, 0o666)
	if _, err := b.dial(t, "root", own.signer); err == nil {
		t.Errorf("key of a world-writable authorized_keys accepted")
	}
}

func mustRawKey(t *testing.T, pemKey []byte) any {
	t.Helper()
	k, err := ssh.ParseRawPrivateKey(pemKey)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestDialGuestClosedByHost: when the host closes a direct-tcpip stream,
// the agent closes its connection in the guest even if the service there
// neither answers nor closes after end of file.
func TestDialGuestClosedByHost(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			io.Copy(io.Discard, c) // to EOF, then stay open and silent
			accepted <- c
		}
	}()
	c, _ := connect(t, guestagent.Hooks{})
	host, port := splitHostPort(t, l.Addr().String())
	s, err := c.DialGuest(testCtx(t), host, port)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(s, "x")
	s.Close()
	var srv net.Conn
	select {
	case srv = <-accepted:
	case <-time.After(10 * time.Second):
		t.Fatal("the service never saw end of file")
	}
	defer srv.Close()
	_, agentPort := splitHostPort(t, srv.RemoteAddr().String())
	inode := tcpSocketInode(t, agentPort, port)
	if inode == "" {
		t.Fatalf("no socket from port %d to %d in /proc/net/tcp", agentPort, port)
	}
	waitFor(t, 10*time.Second, "the agent to close its connection in the guest", func() bool {
		return !hasFD("socket:[" + inode + "]")
	})
}

// tcpSocketInode finds the inode of the IPv4 TCP socket from local port lp
// to remote port rp.
func tcpSocketInode(t *testing.T, lp, rp int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 9 && strings.HasSuffix(f[1], fmt.Sprintf(":%04X", lp)) && strings.HasSuffix(f[2], fmt.Sprintf(":%04X", rp)) {
			return f[9]
		}
	}
	return ""
}

// hasFD reports whether this process has a descriptor linking to target.
func hasFD(target string) bool {
	ents, _ := os.ReadDir("/proc/self/fd")
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && l == target {
			return true
		}
	}
	return false
}

// openSSHClient runs the system's ssh and sftp against an agent's ChanSSH
// streams, through a ProxyCommand (the test binary, relaying to a loopback
// listener whose connections each get a stream), as `banger vm ssh-proxy`
// does.
type openSSHClient struct {
	t         *testing.T
	dir       string // HOME, key, known_hosts
	self      string
	proxyAddr string
	key       string
	user      string
}

func newOpenSSHClient(t *testing.T, c *agent.Client, u sshUser, login string) *openSSHClient {
	t.Helper()
	for _, tool := range []string{"ssh", "sftp"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Missing(t, "needs the OpenSSH client's %s (apt-get install openssh-client)", tool)
		}
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		l.Close()
		wg.Wait()
	})
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer conn.Close()
				s, err := c.OpenSSH(context.Background())
				if err != nil {
					t.Errorf("open ssh: %v", err)
					return
				}
				defer s.Close()
				go func() {
					io.Copy(s, conn)
					s.(agent.Stream).CloseWrite()
				}()
				io.Copy(conn, s)
			})
		}
	}()
	oc := &openSSHClient{t: t, dir: t.TempDir(), self: self, proxyAddr: l.Addr().String(), user: login}
	oc.key = filepath.Join(oc.dir, "id_ed25519")
	if err := os.WriteFile(oc.key, u.pemKey, 0o600); err != nil {
		t.Fatal(err)
	}
	return oc
}

// writeKnownHosts pins hostKey (authorized_keys format) for vm.banger.
func (oc *openSSHClient) writeKnownHosts(hostKey string) string {
	p := filepath.Join(oc.dir, "known_hosts")
	if err := os.WriteFile(p, []byte("vm.banger "+strings.TrimSpace(hostKey)+"\n"), 0o600); err != nil {
		oc.t.Fatal(err)
	}
	return p
}

func (oc *openSSHClient) args(knownHosts string) []string {
	return []string{"-F", "/dev/null",
		"-o", "ProxyCommand=" + oc.self,
		"-o", "UserKnownHostsFile=" + knownHosts,
		"-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "StrictHostKeyChecking=yes",
		"-o", "UpdateHostKeys=no",
		"-o", "BatchMode=yes",
		"-o", "IdentitiesOnly=yes",
		"-o", "IdentityFile=" + oc.key,
		"-o", "ConnectTimeout=30",
		"-o", "ServerAliveInterval=5",
		"-o", "User=" + oc.user,
	}
}

// run runs ssh or sftp (bounded to 2 minutes) and returns its output.
func (oc *openSSHClient) run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), envSSHProxy+"="+oc.proxyAddr, "HOME="+oc.dir)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
