// Package agent is the host side of the guest agent protocol (see package
// agentproto): a typed SSH client that runs commands in a VM, copies files
// in and out, and asks the guest for its info or to shut down.
//
// The client does not know the transport: Dial and WaitReady take a dial
// function returning a net.Conn (a unix socket to QEMU's virtio-serial
// chardev, a Firecracker vsock connection, or an in-memory pipe in tests).
// The agent must present the pinned host key (Keys.HostPublic); the client
// authenticates with Keys.ClientSigner.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
)

// Errors returned by the client (wrapped; test with errors.Is).
var (
	// ErrHostKeyMismatch: the agent presented another host key than the
	// pinned one. WaitReady does not retry it.
	ErrHostKeyMismatch = errors.New("agent host key mismatch")
	// ErrIncompatibleAgent: the agent speaks another major protocol
	// version. WaitReady does not retry it.
	ErrIncompatibleAgent = errors.New("incompatible agent protocol version")
	// ErrConnectionLost: the connection ended before the operation
	// completed (for Exec: before an exit status arrived).
	ErrConnectionLost = errors.New("agent connection lost")
	// ErrRefused: the agent refused a request (bad arguments, unsupported
	// feature).
	ErrRefused = errors.New("request refused by agent")
)

// Keepalive: over virtio-serial a guest agent that dies leaves the host's
// socket open, so a silent agent is only noticed by asking it. A connection
// whose agent does not answer a keepalive within keepaliveTimeout is
// closed (Done fires); the daemon then dials again.
var (
	keepaliveInterval = 5 * time.Second
	keepaliveTimeout  = 10 * time.Second
)

const (
	// readyAttemptTimeout bounds one Dial attempt of WaitReady: the guest
	// may accept bytes without answering while it boots.
	readyAttemptTimeout = 2 * time.Second
	// readyRetryInterval is the pause between WaitReady attempts.
	readyRetryInterval = 50 * time.Millisecond
	// cancelGrace is how long an operation whose ctx ended still waits
	// for the agent to confirm the channel is closed.
	cancelGrace = 2 * time.Second
)

// DialFunc opens the byte stream to the agent.
type DialFunc func(ctx context.Context) (net.Conn, error)

// Client is a connection to one guest agent. It is safe for concurrent use:
// each operation runs on its own SSH channel.
type Client struct {
	ssh   *ssh.Client
	log   *slog.Logger
	done  chan struct{}
	proto string // the agent's protocol version

	data     dataPool // the data ports (UseDataPorts)
	directIO bool     // copies in ask for CopyRequest.DirectIO (WithDirectCopyIn)

	closeOnce sync.Once
	closeErr  error
}

// DialOption tunes Dial and WaitReady.
type DialOption func(*dialConfig)

type dialConfig struct {
	ciphers  []string
	directIO bool
}

// WithCiphers sets the SSH ciphers the client offers, preferred first
// (ssh.Cipher* names; the agent's choice follows the client's order).
// Without it, x/crypto/ssh's default order (AES-GCM first).
func WithCiphers(ciphers ...string) DialOption {
	return func(c *dialConfig) { c.ciphers = ciphers }
}

// WithDirectCopyIn makes copies in ask the agent to write large files past
// the guest's page cache (agentproto.CopyRequest.DirectIO): for a guest
// whose CPU is emulated (TCG), where that saves most of a copy's CPU.
func WithDirectCopyIn(on bool) DialOption {
	return func(c *dialConfig) { c.directIO = on }
}

// Cipher preferences for WithCiphers.
var (
	// CiphersSoftware puts ChaCha20-Poly1305 first: without AES
	// instructions (a guest under TCG, whose CPU is emulated) it is
	// about 2.6 times as fast as AES-GCM.
	CiphersSoftware = []string{ssh.CipherChaCha20Poly1305, ssh.CipherAES128GCM, ssh.CipherAES256GCM}
	// CiphersAESNI puts AES-128-GCM first, the fastest with AES
	// instructions (a guest under KVM on a host that has them).
	CiphersAESNI = []string{ssh.CipherAES128GCM, ssh.CipherAES256GCM, ssh.CipherChaCha20Poly1305}
)

// Dial opens a connection with dial, runs the SSH handshake (bounded by
// ctx), checks that the agent presents keys.HostPublic and that its
// protocol major version matches agentproto.Version. On success ctx no
// longer governs the connection; Close it when done.
func Dial(ctx context.Context, dial DialFunc, keys Keys, log *slog.Logger, opts ...DialOption) (*Client, error) {
	var dc dialConfig
	for _, o := range opts {
		o(&dc)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if keys.ClientSigner == nil || keys.HostPublic == nil {
		return nil, errors.New("dial agent: client key and host public key are required")
	}
	conn, err := dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("dial agent: %w", err)
	}
	// Bound the handshake and the version check by ctx: closing the conn
	// unblocks everything.
	stop := context.AfterFunc(ctx, func() { conn.Close() })

	pinned := ssh.FixedHostKey(keys.HostPublic)
	cfg := &ssh.ClientConfig{
		User: "root",
		Auth: []ssh.AuthMethod{ssh.PublicKeys(keys.ClientSigner)},
		HostKeyCallback: func(host string, remote net.Addr, key ssh.PublicKey) error {
			if err := pinned(host, remote, key); err != nil {
				return fmt.Errorf("%w: agent presented %s, want %s", ErrHostKeyMismatch,
					ssh.FingerprintSHA256(key), ssh.FingerprintSHA256(keys.HostPublic))
			}
			return nil
		},
		ClientVersion: "SSH-2.0-banger",
	}
	cfg.Ciphers = dc.ciphers
	sc, chans, reqs, err := ssh.NewClientConn(conn, "agent", cfg)
	if err != nil {
		stop()
		conn.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("agent handshake: %w", ctx.Err())
		}
		return nil, fmt.Errorf("agent handshake: %w", err)
	}
	c := &Client{ssh: ssh.NewClient(sc, chans, reqs), log: log, done: make(chan struct{}), directIO: dc.directIO}
	go func() {
		c.ssh.Wait()
		close(c.done)
	}()

	info, err := c.Info(ctx)
	if !stop() || err != nil {
		c.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("agent handshake: %w", ctx.Err())
		}
		return nil, fmt.Errorf("agent handshake: %w", err)
	}
	if major(info.ProtoVersion) != major(agentproto.Version) {
		c.Close()
		return nil, fmt.Errorf("agent speaks protocol %q, host speaks %q: %w",
			info.ProtoVersion, agentproto.Version, ErrIncompatibleAgent)
	}
	c.proto = info.ProtoVersion
	log.Debug("connected to agent", "agent_version", info.AgentVersion,
		"proto_version", info.ProtoVersion, "kernel", info.KernelRelease, "cipher", c.cipher())
	go c.keepalive()
	return c, nil
}

// keepalive closes the connection when the agent stops answering.
func (c *Client) keepalive() {
	t := time.NewTicker(keepaliveInterval)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), keepaliveTimeout)
		// Any reply, even a refusal, proves the agent alive.
		_, _, err := c.globalRequest(ctx, "keepalive@banger.dev", nil)
		cancel()
		if err != nil {
			c.log.Warn("guest agent stopped answering: closing the connection", "err", err)
			c.Close()
			return
		}
	}
}

func major(v string) string {
	m, _, _ := strings.Cut(v, ".")
	return m
}

// protoAtLeast reports whether the agent speaks protocol maj.min or a later
// minor version.
func (c *Client) protoAtLeast(maj, min int) bool {
	a, b, _ := strings.Cut(c.proto, ".")
	gotMaj, err1 := strconv.Atoi(a)
	gotMin, err2 := strconv.Atoi(b)
	return err1 == nil && err2 == nil && gotMaj == maj && gotMin >= min
}

// WaitReady calls Dial until it succeeds or ctx ends, each attempt bounded
// by 2 s and separated by 50 ms, since the guest may not be listening yet
// (dial fails) or not answering yet (the handshake hangs). A host key
// mismatch or an incompatible agent ends the wait at once.
func WaitReady(ctx context.Context, dial DialFunc, keys Keys, log *slog.Logger, opts ...DialOption) (*Client, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if keys.ClientSigner == nil || keys.HostPublic == nil {
		return nil, errors.New("wait for agent: client key and host public key are required")
	}
	var lastErr error
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, readyAttemptTimeout)
		c, err := Dial(actx, dial, keys, log, opts...)
		cancel()
		if err == nil {
			return c, nil
		}
		if errors.Is(err, ErrHostKeyMismatch) || errors.Is(err, ErrIncompatibleAgent) {
			return nil, fmt.Errorf("wait for agent: %w", err)
		}
		lastErr = err
		log.Debug("agent not ready", "attempt", attempt, "err", err)
		t := time.NewTimer(readyRetryInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("wait for agent: %w (last attempt: %w)", ctx.Err(), lastErr)
		case <-t.C:
		}
	}
}

// cipher is the negotiated cipher of the host's writes.
func (c *Client) cipher() string {
	if m, ok := c.ssh.Conn.(ssh.AlgorithmsConnMetadata); ok {
		return m.Algorithms().Write.Cipher
	}
	return ""
}

// Close closes the connection; running operations fail.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		if err := c.ssh.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			c.closeErr = fmt.Errorf("close agent connection: %w", err)
		}
	})
	return c.closeErr
}

// Done is closed when the connection has ended (Close, guest shutdown,
// transport failure).
func (c *Client) Done() <-chan struct{} {
	return c.done
}

// Info asks the agent to describe the guest.
func (c *Client) Info(ctx context.Context) (agentproto.Info, error) {
	ok, payload, err := c.globalRequest(ctx, agentproto.GlobalInfo, nil)
	if err != nil {
		return agentproto.Info{}, fmt.Errorf("agent info: %w", err)
	}
	if !ok {
		return agentproto.Info{}, fmt.Errorf("agent info: %w", ErrRefused)
	}
	var info agentproto.Info
	if err := agentproto.UnmarshalPayload(payload, &info); err != nil {
		return agentproto.Info{}, fmt.Errorf("agent info: %w", err)
	}
	return info, nil
}

// Shutdown asks the guest to power off (reboot=false) or reboot. It returns
// once the agent has accepted the request; the connection then ends (watch
// Done).
func (c *Client) Shutdown(ctx context.Context, reboot bool) error {
	payload, err := agentproto.MarshalPayload(agentproto.ShutdownRequest{Reboot: reboot})
	if err != nil {
		return fmt.Errorf("agent shutdown: %w", err)
	}
	ok, _, err := c.globalRequest(ctx, agentproto.GlobalShutdown, payload)
	if err != nil {
		return fmt.Errorf("agent shutdown: %w", err)
	}
	if !ok {
		return fmt.Errorf("agent shutdown: %w", ErrRefused)
	}
	return nil
}

// globalRequest sends a global request and waits for its reply or ctx.
func (c *Client) globalRequest(ctx context.Context, name string, payload []byte) (bool, []byte, error) {
	if err := ctx.Err(); err != nil {
		return false, nil, err
	}
	type reply struct {
		ok      bool
		payload []byte
		err     error
	}
	rc := make(chan reply, 1)
	go func() {
		ok, p, err := c.ssh.SendRequest(name, true, payload)
		rc <- reply{ok, p, err}
	}()
	select {
	case r := <-rc:
		if r.err != nil {
			return false, nil, fmt.Errorf("%w: %w", ErrConnectionLost, r.err)
		}
		return r.ok, r.payload, nil
	case <-ctx.Done():
		return false, nil, ctx.Err()
	}
}
