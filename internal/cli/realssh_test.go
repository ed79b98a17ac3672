package cli

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/rpc"
	"github.com/bangerdev/banger/internal/sshcfg"
	"github.com/bangerdev/banger/internal/testenv"
)

// TestMain lets the test binary act as banger: the real ssh client runs
// it as its ProxyCommand (`banger vm ssh-proxy`), with the test user's
// home from BANGER_CLI_TEST_HOME.
func TestMain(m *testing.M) {
	if os.Getenv("BANGER_CLI_TEST_MAIN") == "1" {
		a := &app{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}
		if home := os.Getenv("BANGER_CLI_TEST_HOME"); home != "" {
			a.sshUser = &sshcfg.User{Name: "me", UID: os.Getuid(), GID: os.Getgid(), Home: home}
		}
		os.Exit(a.main(context.Background(), os.Args))
	}
	os.Exit(m.Run())
}

// guestSSHServer is an SSH server on loopback standing for a guest's: it
// accepts the public key in authorized (read at each login), runs no
// command but answers an exec with "guest ran: CMD" and exit status 3.
func guestSSHServer(t *testing.T, hostKey ssh.Signer, authorized func() string) string {
	t.Helper()
	cfg := &ssh.ServerConfig{
		PublicKeyCallback: func(meta ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			want, _, _, _, err := ssh.ParseAuthorizedKey([]byte(authorized()))
			if err != nil || meta.User() != "dev" || string(want.Marshal()) != string(key.Marshal()) {
				return nil, errors.New("not authorised")
			}
			return nil, nil
		},
	}
	cfg.AddHostKey(hostKey)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, chans, reqs, err := ssh.NewServerConn(c, cfg)
				if err != nil {
					return
				}
				go ssh.DiscardRequests(reqs)
				for nc := range chans {
					if nc.ChannelType() != "session" {
						nc.Reject(ssh.UnknownChannelType, "session only")
						continue
					}
					ch, creqs, err := nc.Accept()
					if err != nil {
						return
					}
					for r := range creqs {
						if r.Type != "exec" {
							r.Reply(false, nil)
							continue
						}
						r.Reply(true, nil)
						n := binary.BigEndian.Uint32(r.Payload)
						io.WriteString(ch, "guest ran: "+string(r.Payload[4:4+n])+"\n")
						ch.SendRequest("exit-status", false, binary.BigEndian.AppendUint32(nil, 3))
						ch.Close()
						break
					}
				}
			}()
		}
	}()
	return l.Addr().String()
}

// tunnelTo is a v1.vm.tunnel handler that relays to addr, as bangerd
// relays to the guest's SSH service through the agent.
func tunnelTo(addr string) rpc.Handler {
	return func(ctx context.Context, call *rpc.Call) (any, error) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		go func() {
			for f := range call.Frames() {
				if f.Type == api.FrameEOF {
					break
				}
				if _, err := c.Write(f.Data); err != nil {
					break
				}
			}
			c.(*net.TCPConn).CloseWrite()
		}()
		buf := make([]byte, 32<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if serr := call.Send(api.Frame{Type: api.FrameStdout, Data: append([]byte(nil), buf[:n]...)}); serr != nil {
					return nil, serr
				}
			}
			if err != nil {
				return nil, nil
			}
		}
	}
}

// TestVMSSHWithOpenSSH runs the real OpenSSH client through `banger vm
// ssh` and its ProxyCommand (this test binary as banger) against a fake
// daemon: through the daemon's tunnel, then straight to the address, then
// with a host key the daemon doesn't report, which ssh refuses.
func TestVMSSHWithOpenSSH(t *testing.T) {
	if _, err := exec.LookPath("ssh"); err != nil {
		testenv.Missing(t, "no ssh client (openssh-client)")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	hostKey, hostKeyLine := newHostKey(t)
	_, otherKeyLine := newHostKey(t)
	var s *sshTestApp
	addr := guestSSHServer(t, hostKey, func() string {
		b, _ := os.ReadFile(s.files.Key + ".pub")
		return string(b)
	})
	var reported atomic.Value // the host key the daemon reports
	reported.Store(hostKeyLine)
	var direct atomic.Value
	direct.Store("")
	d := startFakeDaemon(t, map[string]rpc.Handler{
		api.MethodVMSSHInfo: func(ctx context.Context, call *rpc.Call) (any, error) {
			return api.SSHInfo{Name: "box", User: "dev", HostKeys: []string{reported.Load().(string)}, Direct: direct.Load().(string)}, nil
		},
		api.MethodVMTunnel: tunnelTo(addr),
		api.MethodVMInspect: func(ctx context.Context, call *rpc.Call) (any, error) {
			return api.VM{Name: "box", State: api.StateRunning}, nil
		},
	})
	s = newSSHTestApp(t, d.sock, strings.NewReader(""))
	s.a.sshBanger = exe
	t.Setenv("BANGER_CLI_TEST_MAIN", "1")
	t.Setenv("BANGER_CLI_TEST_HOME", s.files.User.Home)

	// -F /dev/null: none of this machine's ssh config.
	run := func() (int, error) {
		s.stdout.Reset()
		s.stderr.Reset()
		err := s.run("vm", "ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "box", "--", "echo", "hi")
		var ee exitError
		if errors.As(err, &ee) {
			return ee.code, nil
		}
		return 0, err
	}
	for _, mode := range []string{"tunnel", "direct"} {
		if mode == "direct" {
			direct.Store(addr)
		}
		code, err := run()
		if err != nil || code != 3 || s.stdout.String() != "guest ran: echo hi\n" {
			t.Fatalf("%s: vm ssh: code %d, %v; stdout %q; stderr:\n%s", mode, code, err, s.stdout, s.stderr)
		}
		if s.stderr.Len() > 0 {
			t.Errorf("%s: stderr:\n%s", mode, s.stderr)
		}
	}
	calls := d.called()
	var tunnels int
	for _, c := range calls {
		if c == api.MethodVMTunnel {
			tunnels++
		}
	}
	if tunnels != 1 {
		t.Errorf("daemon calls %v: want one tunnel (the first login; the second goes straight)", calls)
	}

	// The daemon reports another key than the server's: ssh refuses.
	reported.Store(otherKeyLine)
	code, err := run()
	if err != nil || code != 255 || strings.Contains(s.stdout.String(), "guest ran") ||
		!strings.Contains(s.stderr.String(), "Host key verification failed") {
		t.Fatalf("a changed host key: code %d, %v; stdout %q; stderr:\n%s", code, err, s.stdout, s.stderr)
	}

	// Plain ssh NAME.banger with banger's config file (the socket from
	// $BANGER_SOCKET, as a user's shell would set it or not need it).
	reported.Store(hostKeyLine)
	direct.Store("")
	t.Setenv("BANGER_SOCKET", d.sock)
	out, err := exec.Command("ssh", "-F", s.files.Config, "-o", "BatchMode=yes", "box.banger", "echo", "plain").CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 || string(out) != "guest ran: echo plain\n" {
		t.Errorf("ssh -F banger's config box.banger: %v\n%s", err, out)
	}
}
