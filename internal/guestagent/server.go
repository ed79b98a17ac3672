// Package guestagent is banger's in-guest agent: an SSH server (see package
// agentproto for the wire contract) reached by the host over a virtio-serial
// port or a vsock connection. It runs commands (exec, shell and
// agentproto.ReqExecArgv sessions, with or without a PTY), copies files in
// and out as tar streams, answers info and shutdown requests, connects
// direct-tcpip channels inside the guest and serves the user's SSH logins
// (agentproto.ChanSSH: the guest's sshd, or its own SSH server).
//
// This package must only import the standard library, golang.org/x/...,
// creack/pty, mdlayher/vsock, pkg/sftp, vishvananda/netlink and agentproto:
// it is linked into the static (CGO_ENABLED=0) guest binary.
package guestagent

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
)

// Version is the agent's version, reported in agentproto.Info. Release
// builds set it with -ldflags "-X .../internal/guestagent.Version=v1.2.3".
var Version = "dev"

// handshakeTimeout bounds the SSH handshake of one connection, so a peer that
// connects and stalls cannot hold a single-stream transport forever.
const handshakeTimeout = 30 * time.Second

// Hooks are supplied by the init side of the agent.
type Hooks struct {
	// Shutdown powers the guest off (reboot=false) or reboots it. It is
	// called asynchronously after the GlobalShutdown request was answered.
	// When nil, shutdown requests are refused.
	Shutdown func(reboot bool) error
	// InitMode and Init are reported in agentproto.Info.
	InitMode string
	Init     string
	// EarlyBootDone reports whether the guest's early boot is over, and
	// how that is known (agentproto.Info.EarlyBootDone and
	// EarlyBootSignal). When nil, early boot counts as done ("none").
	EarlyBootDone func(ctx context.Context) (done bool, signal string)
	// OpenPTY allocates a pseudo-terminal (master, slave). When nil,
	// github.com/creack/pty.Open.
	OpenPTY func() (ptmx, tty *os.File, err error)
	// SSH tunes the user-facing SSH service (agentproto.ChanSSH).
	SSH SSHOptions
	// NetworkError is init's network setup error, reported in
	// agentproto.Info.Network.Error.
	NetworkError string
	// Network reports agentproto.Info.Network. When nil, the agent reads
	// the state of Config.Network's cards from the kernel.
	Network func() *agentproto.NetworkState
	// Listening reports agentproto.Info.Listening. When nil, the agent
	// reads the kernel's socket tables (listeningPorts).
	Listening func() []agentproto.PortListen
	// Main is the link to the main process's supervisor (PID 1) when there
	// is a main process: ReqAttach and Info.MainProcess. nil: none.
	Main *MainLink
	// OpenDataPort opens data port i (agentproto.DataPortName) for one
	// transfer and returns it once the host is connected (bounded by
	// ctx); closing it must interrupt a blocked Read or Write. When nil,
	// the agent opens the virtio-serial port itself and counts the ports
	// under /sys; when set (tests), DataPorts is the count.
	OpenDataPort func(ctx context.Context, port int) (io.ReadWriteCloser, error)
	DataPorts    int
}

// server holds what every connection of one agent shares.
type server struct {
	config  *ssh.ServerConfig
	cfg     agentproto.Config
	hostKey ssh.Signer
	hooks   Hooks
	log     *slog.Logger
	guest   guestReport // Info's network and SSH fields
	data    *dataPorts
}

func newServer(cfg agentproto.Config, hooks Hooks, log *slog.Logger) (*server, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.HostKey == "" {
		return nil, errors.New("agent config: host key missing")
	}
	signer, err := ssh.ParsePrivateKey([]byte(cfg.HostKey))
	if err != nil {
		return nil, fmt.Errorf("agent config: parse host key: %w", err)
	}
	if cfg.AuthorizedKey == "" {
		return nil, errors.New("agent config: authorized key missing")
	}
	authorized, _, _, _, err := ssh.ParseAuthorizedKey([]byte(cfg.AuthorizedKey))
	if err != nil {
		return nil, fmt.Errorf("agent config: parse authorized key: %w", err)
	}
	want := authorized.Marshal()
	sc := &ssh.ServerConfig{
		PublicKeyCallback: func(meta ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			if subtle.ConstantTimeCompare(key.Marshal(), want) == 1 {
				return &ssh.Permissions{}, nil
			}
			return nil, fmt.Errorf("public key %s not authorized", ssh.FingerprintSHA256(key))
		},
		ServerVersion: "SSH-2.0-banger-agent",
	}
	sc.AddHostKey(signer)
	return &server{config: sc, cfg: cfg, hostKey: signer, hooks: hooks, log: log,
		guest: newGuestReport(cfg, signer.PublicKey(), hooks), data: newDataPorts(hooks)}, nil
}

// Serve opens the transport named by cfg.Transport and serves SSH
// connections until ctx ends. With virtio-serial, connections are served one
// after the other (the port is a single stream); with vsock, concurrently.
// It returns nil when ctx ends, or an error when the configuration is
// unusable.
func Serve(ctx context.Context, cfg agentproto.Config, hooks Hooks, log *slog.Logger) error {
	s, err := newServer(cfg, hooks, log)
	if err != nil {
		return err
	}
	switch cfg.Transport {
	case agentproto.TransportVirtioSerial:
		name := cfg.PortName
		if name == "" {
			name = agentproto.VirtioPortName
		}
		return s.serveVirtio(ctx, name)
	case agentproto.TransportVsock:
		port := cfg.VsockPort
		if port == 0 {
			port = agentproto.DefaultVsockPort
		}
		return s.serveVsock(ctx, port)
	default:
		return fmt.Errorf("agent config: unknown transport %q", cfg.Transport)
	}
}

// ServeConn serves one SSH connection over conn until the peer disconnects
// or ctx ends, then closes conn. It returns nil on a normal end (peer gone
// or ctx done), and an error when the handshake fails (including a client
// with an unauthorized key) or the configuration is unusable.
func ServeConn(ctx context.Context, conn net.Conn, cfg agentproto.Config, hooks Hooks, log *slog.Logger) error {
	s, err := newServer(cfg, hooks, log)
	if err != nil {
		conn.Close()
		return err
	}
	return s.serveConn(ctx, conn)
}

func (s *server) serveConn(ctx context.Context, conn net.Conn) error {
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	hsTimer := time.AfterFunc(handshakeTimeout, func() { conn.Close() })
	sconn, chans, reqs, err := ssh.NewServerConn(conn, s.config)
	timedOut := !hsTimer.Stop()
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		if timedOut {
			return fmt.Errorf("ssh handshake: timed out after %s", handshakeTimeout)
		}
		return fmt.Errorf("ssh handshake: %w", err)
	}
	log := s.log.With("remote", conn.RemoteAddr().String())
	log.Info("agent client connected", "client_version", string(sconn.ClientVersion()))

	var wg sync.WaitGroup
	wg.Go(func() { s.handleGlobalRequests(reqs, log) })
	wg.Go(func() {
		for nc := range chans {
			switch nc.ChannelType() {
			case "session":
				wg.Go(func() { s.handleSession(nc, log) })
			case agentproto.ChanCopyIn:
				wg.Go(func() { s.handleCopyIn(nc, log) })
			case agentproto.ChanCopyOut:
				wg.Go(func() { s.handleCopyOut(nc, log) })
			case agentproto.ChanSSH:
				wg.Go(func() { s.handleSSH(ctx, nc, log) })
			case agentproto.ChanDirectTCPIP:
				wg.Go(func() { handleDirectTCPIP(ctx, nc, log) })
			default:
				nc.Reject(ssh.UnknownChannelType, "unknown channel type "+nc.ChannelType())
			}
		}
	})
	err = sconn.Wait()
	sconn.Close()
	cancel()
	wg.Wait()
	log.Info("agent client disconnected")
	if err == nil || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("ssh connection: %w", err)
}

func (s *server) handleGlobalRequests(reqs <-chan *ssh.Request, log *slog.Logger) {
	for req := range reqs {
		switch req.Type {
		case agentproto.GlobalInfo:
			payload, err := agentproto.MarshalPayload(s.info())
			if err != nil {
				log.Error("encode info", "err", err)
				req.Reply(false, nil)
				continue
			}
			req.Reply(true, payload)
		case agentproto.GlobalShutdown:
			var sr agentproto.ShutdownRequest
			if err := agentproto.UnmarshalPayload(req.Payload, &sr); err != nil {
				log.Warn("bad shutdown request", "err", err)
				req.Reply(false, nil)
				continue
			}
			if s.hooks.Shutdown == nil {
				log.Warn("shutdown requested but no shutdown hook")
				req.Reply(false, nil)
				continue
			}
			log.Info("shutdown requested", "reboot", sr.Reboot)
			req.Reply(true, nil)
			go func() {
				if err := s.hooks.Shutdown(sr.Reboot); err != nil {
					log.Error("shutdown", "reboot", sr.Reboot, "err", err)
				}
			}()
		default:
			if req.WantReply {
				req.Reply(false, nil)
			}
		}
	}
}

// info gathers agentproto.Info; fields that cannot be read are left empty.
func (s *server) info() agentproto.Info {
	inf := agentproto.Info{
		AgentVersion: Version,
		ProtoVersion: agentproto.Version,
		InitMode:     s.hooks.InitMode,
		Init:         s.hooks.Init,
	}
	inf.EarlyBootDone, inf.EarlyBootSignal = true, earlyBootByNone
	if s.hooks.EarlyBootDone != nil {
		inf.EarlyBootDone, inf.EarlyBootSignal = s.hooks.EarlyBootDone(context.Background())
	}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err == nil {
		inf.KernelRelease = unix.ByteSliceToString(uts.Release[:])
	}
	if h, err := os.Hostname(); err == nil {
		inf.Hostname = h
	}
	s.guest.fill(&inf)
	if s.hooks.Main != nil {
		inf.MainProcess = s.hooks.Main.State()
	}
	inf.DataPorts = s.data.count()
	if ms, err := readUptimeMS("/proc/uptime"); err == nil {
		inf.UptimeMS = ms
	} else {
		s.log.Debug("read uptime", "err", err)
	}
	return inf
}

// readUptimeMS parses the first field of /proc/uptime (seconds, with a
// fraction) into milliseconds.
func readUptimeMS(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read uptime: %w", err)
	}
	fields := strings.Fields(string(b))
	if len(fields) == 0 {
		return 0, fmt.Errorf("parse %s: empty", path)
	}
	secs, err := strconv.ParseFloat(fields[0], 64)
	if err != nil {
		return 0, fmt.Errorf("parse %s: %w", path, err)
	}
	return int64(secs * 1000), nil
}
