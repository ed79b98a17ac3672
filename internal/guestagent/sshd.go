package guestagent

import (
	"bytes"
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
)

// The user-facing SSH service (agentproto.ChanSSH): a ChanSSH channel is a
// byte stream to the guest's sshd when one listens on 127.0.0.1:22;
// otherwise the agent serves that stream itself with a small SSH server:
// host key = the agent's (Config.HostKey), public-key authentication of
// SSHConfig.User with SSHConfig.AuthorizedKeys (or the user's own
// ~/.ssh/authorized_keys), sessions as that user (shell, exec, pty, env,
// signal, exit status, the sftp subsystem) and direct-tcpip channels.

// SSHOptions tune the user-facing SSH service; the zero value is what the
// guest uses.
type SSHOptions struct {
	// SSHDAddr is where the guest's own sshd is looked for (default
	// 127.0.0.1:22).
	SSHDAddr string
	// EtcDir holds the passwd and group files (default /etc).
	EtcDir string
	// SFTPServer is the command serving the "sftp" subsystem on its stdin
	// and stdout, run as the user (default: this binary's sftp-server
	// subcommand, through /proc/self/exe).
	SFTPServer []string
}

const (
	defaultSSHDAddr = "127.0.0.1:22"
	// sshdDialTimeout bounds the connection to the guest's sshd: on
	// loopback it is refused at once when nothing listens.
	sshdDialTimeout = 3 * time.Second
	// sftpServerCommand is the hidden subcommand of the agent binary
	// serving sftp on stdin/stdout.
	sftpServerCommand = "sftp-server"
)

func (o SSHOptions) sshdAddr() string {
	if o.SSHDAddr == "" {
		return defaultSSHDAddr
	}
	return o.SSHDAddr
}

func (o SSHOptions) etcDir() string {
	if o.EtcDir == "" {
		return "/etc"
	}
	return o.EtcDir
}

func (o SSHOptions) sftpServer() []string {
	if len(o.SFTPServer) == 0 {
		return []string{"/proc/self/exe", sftpServerCommand}
	}
	return o.SFTPServer
}

// handleSSH serves an agentproto.ChanSSH channel: relayed to the guest's
// sshd when it accepts a connection, else served by the built-in server.
func (s *server) handleSSH(ctx context.Context, nc ssh.NewChannel, log *slog.Logger) {
	addr := s.hooks.SSH.sshdAddr()
	d := net.Dialer{Timeout: sshdDialTimeout}
	conn, dialErr := d.DialContext(ctx, "tcp", addr)
	ch, reqs, err := nc.Accept()
	if err != nil {
		if conn != nil {
			conn.Close()
		}
		log.Warn("accept ssh channel", "err", err)
		return
	}
	if dialErr == nil {
		log.Debug("ssh channel relayed to the guest's sshd", "addr", addr)
		relayChannel(ctx, ch, reqs, conn.(*net.TCPConn))
		return
	}
	go ssh.DiscardRequests(reqs)
	log.Debug("no sshd in the guest: serving the ssh channel with the built-in server", "addr", addr, "err", dialErr)
	s.serveBuiltinSSH(ctx, &channelConn{Channel: ch}, log)
}

// loginUser is the only user the built-in server lets in.
func (s *server) loginUser() string {
	if s.cfg.SSH != nil && s.cfg.SSH.User != "" {
		return s.cfg.SSH.User
	}
	return "root"
}

// builtinSSHConfig is the built-in server's configuration: the agent's host
// key, public keys only, for loginUser.
func (s *server) builtinSSHConfig(log *slog.Logger) *ssh.ServerConfig {
	user := s.loginUser()
	var configured [][]byte
	if s.cfg.SSH != nil {
		for _, k := range s.cfg.SSH.AuthorizedKeys {
			pk, _, _, _, err := ssh.ParseAuthorizedKey([]byte(k))
			if err != nil {
				log.Warn("ignoring a malformed authorized key of the ssh config", "err", err)
				continue
			}
			configured = append(configured, pk.Marshal())
		}
	}
	sc := &ssh.ServerConfig{
		PublicKeyCallback: func(meta ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			if meta.User() != user {
				return nil, fmt.Errorf("user %q may not log in (only %q)", meta.User(), user)
			}
			got := key.Marshal()
			for _, k := range configured {
				if subtle.ConstantTimeCompare(got, k) == 1 {
					return &ssh.Permissions{}, nil
				}
			}
			acct, err := lookupAccount(s.hooks.SSH.etcDir(), user)
			if err == nil && userAuthorizedKey(acct, got, log) {
				return &ssh.Permissions{}, nil
			}
			return nil, fmt.Errorf("public key %s not authorized for %q", ssh.FingerprintSHA256(key), user)
		},
		ServerVersion: "SSH-2.0-banger-agent",
	}
	sc.AddHostKey(s.hostKey)
	return sc
}

// userAuthorizedKey reports whether key (wire form) is in the account's
// ~/.ssh/authorized_keys, as sshd would accept it: the file and its
// directory belong to the user or root and are writable by nobody else.
// Entries with options (command=, from=, restrict...) are not honoured by
// this server, so they are skipped rather than granted more than they say.
func userAuthorizedKey(acct account, key []byte, log *slog.Logger) bool {
	dir := filepath.Join(acct.home, ".ssh")
	path := filepath.Join(dir, "authorized_keys")
	for _, p := range []string{dir, path} {
		fi, err := os.Lstat(p)
		if err != nil {
			return false
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok || (st.Uid != acct.uid && st.Uid != 0) || fi.Mode().Perm()&0o022 != 0 || fi.Mode()&fs.ModeSymlink != 0 {
			log.Warn("ignoring authorized_keys: wrong owner or mode", "path", p)
			return false
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	for len(b) > 0 {
		pk, _, options, rest, err := ssh.ParseAuthorizedKey(b)
		if err != nil {
			return false
		}
		if len(options) == 0 && bytes.Equal(pk.Marshal(), key) {
			return true
		}
		b = rest
	}
	return false
}

// serveBuiltinSSH serves one SSH connection of the built-in server over
// conn until the client leaves or ctx ends.
func (s *server) serveBuiltinSSH(ctx context.Context, conn net.Conn, log *slog.Logger) {
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	hsTimer := time.AfterFunc(handshakeTimeout, func() { conn.Close() })
	sconn, chans, reqs, err := ssh.NewServerConn(conn, s.builtinSSHConfig(log))
	hsTimer.Stop()
	if err != nil {
		log.Info("built-in ssh server: handshake failed", "err", err)
		return
	}
	log = log.With("ssh_user", sconn.User())
	log.Info("built-in ssh server: login", "client_version", string(sconn.ClientVersion()))

	var wg sync.WaitGroup
	wg.Go(func() {
		for req := range reqs {
			// keepalive@openssh.com and anything else: any reply proves
			// the server alive; none is supported.
			if req.WantReply {
				req.Reply(false, nil)
			}
		}
	})
	wg.Go(func() {
		for nc := range chans {
			switch nc.ChannelType() {
			case "session":
				acct, err := lookupAccount(s.hooks.SSH.etcDir(), sconn.User())
				if err != nil {
					log.Warn("built-in ssh server: session refused", "err", err)
					nc.Reject(ssh.ConnectionFailed, err.Error())
					continue
				}
				wg.Go(func() { s.handleLoginSession(nc, acct, sconn, log) })
			case agentproto.ChanDirectTCPIP:
				wg.Go(func() { handleDirectTCPIP(ctx, nc, log) })
			default:
				nc.Reject(ssh.UnknownChannelType, "unknown channel type "+nc.ChannelType())
			}
		}
	})
	sconn.Wait()
	sconn.Close()
	cancel()
	wg.Wait()
	log.Info("built-in ssh server: logout")
}

// handleLoginSession serves a session channel of the built-in server as
// acct.
func (s *server) handleLoginSession(nc ssh.NewChannel, acct account, conn ssh.Conn, log *slog.Logger) {
	ch, reqs, err := nc.Accept()
	if err != nil {
		log.Warn("accept session", "err", err)
		return
	}
	ss := s.newSession(ch, log)
	ss.acct = &acct
	ss.sftpServer = s.hooks.SSH.sftpServer()
	ss.openAgent = func() (ssh.Channel, <-chan *ssh.Request, error) {
		return conn.OpenChannel("auth-agent@openssh.com", nil)
	}
	ss.serve(reqs)
}

// newSession is a session on an accepted channel, run as root (the
// agent's own sessions) until its acct is set.
func (s *server) newSession(ch ssh.Channel, log *slog.Logger) *session {
	ss := &session{log: log, ch: ch, done: make(chan struct{}), openPTY: s.hooks.OpenPTY,
		main: s.hooks.Main, execDefaults: s.cfg.ExecDefaults, dataPorts: s.data}
	ss.ctx, ss.cancel = context.WithCancel(context.Background())
	if ss.openPTY == nil {
		ss.openPTY = pty.Open
	}
	return ss
}

// loginCommand is what a session of the built-in server runs for "shell"
// (cmd == nil: the user's login shell, "-" in its argv[0] as login(1) and
// sshd do) and "exec" (the user's shell -c cmd).
func (a *account) loginCommand(cmd *string) command {
	base := filepath.Base(a.shell)
	if cmd == nil {
		return command{path: a.shell, argv: []string{"-" + base}}
	}
	return command{path: a.shell, argv: []string{base, "-c", *cmd}}
}

// subsystemMsg is a "subsystem" request (RFC 4254 6.5).
type subsystemMsg struct {
	Name string
}

// channelConn is an SSH channel used as the net.Conn of another SSH
// connection (the built-in server runs inside a ChanSSH channel).
type channelConn struct {
	ssh.Channel
}

type channelAddr struct{}

func (channelAddr) Network() string { return "banger-ssh" }
func (channelAddr) String() string  { return agentproto.ChanSSH }

func (*channelConn) LocalAddr() net.Addr              { return channelAddr{} }
func (*channelConn) RemoteAddr() net.Addr             { return channelAddr{} }
func (*channelConn) SetDeadline(time.Time) error      { return errors.ErrUnsupported }
func (*channelConn) SetReadDeadline(time.Time) error  { return errors.ErrUnsupported }
func (*channelConn) SetWriteDeadline(time.Time) error { return errors.ErrUnsupported }

// forwardAgent serves "auth-agent-req@openssh.com" (ssh -A) in a session of
// the built-in server: a unix socket only the user can reach, named by
// SSH_AUTH_SOCK in the command's environment; each connection to it is
// relayed over an "auth-agent@openssh.com" channel to the client's agent.
// The socket goes with the session.
func (ss *session) forwardAgent() error {
	if ss.acct == nil || ss.openAgent == nil {
		return errors.New("agent forwarding is only for logins")
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.started {
		return errors.New("agent forwarding asked after the command started")
	}
	dir, err := os.MkdirTemp("", "banger-ssh-agent-")
	if err != nil {
		ss.log.Warn("agent forwarding", "err", err)
		return err
	}
	sock := filepath.Join(dir, "agent.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err == nil {
		err = errors.Join(os.Chown(sock, int(ss.acct.uid), int(ss.acct.gid)), os.Chown(dir, int(ss.acct.uid), int(ss.acct.gid)))
	}
	if err != nil {
		if l != nil {
			l.Close()
		}
		os.RemoveAll(dir)
		ss.log.Warn("agent forwarding", "err", err)
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	ss.cleanups = append(ss.cleanups, func() {
		cancel()
		l.Close()
		wg.Wait()
		os.RemoveAll(dir)
	})
	wg.Go(func() {
		for {
			conn, err := l.AcceptUnix()
			if err != nil {
				return
			}
			wg.Go(func() {
				ch, reqs, err := ss.openAgent()
				if err != nil {
					ss.log.Debug("open agent channel", "err", err)
					conn.Close()
					return
				}
				relayChannel(ctx, ch, reqs, conn)
			})
		}
	})
	ss.env = append(ss.env, "SSH_AUTH_SOCK="+sock)
	return nil
}
