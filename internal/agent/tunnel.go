package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
)

// Errors of OpenSSH and DialGuest (wrapped; test with errors.Is).
var (
	// ErrGuestDial: the agent could not connect to the address inside the
	// guest (nothing listens there, no route, timeout); the error carries
	// the guest's reason.
	ErrGuestDial = errors.New("connection failed inside the guest")
	// ErrUnsupported: the agent does not know the channel (protocol
	// before 1.3); restarting the VM updates its agent.
	ErrUnsupported = errors.New("not supported by the guest agent")
)

// Stream is a byte stream to the guest (a channel of the agent
// connection). CloseWrite sends end of file while the other direction
// stays open; Close ends both.
type Stream interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// OpenSSH opens a byte stream to the guest's SSH service
// (agentproto.ChanSSH): the guest's sshd when one listens on its port 22,
// else the agent's built-in SSH server. Hand it to an SSH client (as a
// ProxyCommand's stdin/stdout). The returned value is a Stream (it has
// CloseWrite). ctx bounds the opening only.
func (c *Client) OpenSSH(ctx context.Context) (io.ReadWriteCloser, error) {
	s, err := c.openStream(ctx, agentproto.ChanSSH, nil)
	if err != nil {
		return nil, fmt.Errorf("open ssh stream to the guest: %w", err)
	}
	return s, nil
}

// DialGuest opens a TCP connection from inside the guest to host:port
// (agentproto.ChanDirectTCPIP: "localhost" or "127.0.0.1" is the guest
// itself) and returns it as a byte stream. The returned value is a Stream
// (it has CloseWrite). ctx bounds the opening only; the agent gives up
// connecting after 10 s.
func (c *Client) DialGuest(ctx context.Context, host string, port int) (io.ReadWriteCloser, error) {
	addr := net.JoinHostPort(host, strconv.Itoa(port))
	if host == "" || port <= 0 || port > 65535 {
		return nil, fmt.Errorf("dial %s in the guest: invalid address", addr)
	}
	extra := ssh.Marshal(agentproto.DirectTCPIPMsg{
		HostToConnect:  host,
		PortToConnect:  uint32(port),
		OriginatorIP:   "127.0.0.1",
		OriginatorPort: 0,
	})
	s, err := c.openStream(ctx, agentproto.ChanDirectTCPIP, extra)
	if err != nil {
		return nil, fmt.Errorf("dial %s in the guest: %w", addr, err)
	}
	return s, nil
}

// openStream opens a channel whose requests are ignored, bounded by ctx.
func (c *Client) openStream(ctx context.Context, kind string, extra []byte) (Stream, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	type opened struct {
		ch   ssh.Channel
		reqs <-chan *ssh.Request
		err  error
	}
	oc := make(chan opened, 1)
	go func() {
		ch, reqs, err := c.ssh.OpenChannel(kind, extra)
		oc <- opened{ch, reqs, err}
	}()
	var o opened
	select {
	case o = <-oc:
	case <-ctx.Done():
		go func() {
			// Opened after all: nobody wants it.
			if o := <-oc; o.err == nil {
				go ssh.DiscardRequests(o.reqs)
				o.ch.Close()
			}
		}()
		return nil, ctx.Err()
	}
	if o.err != nil {
		var oe *ssh.OpenChannelError
		switch {
		case errors.As(o.err, &oe) && oe.Reason == ssh.ConnectionFailed:
			return nil, fmt.Errorf("%w: %s", ErrGuestDial, oe.Message)
		case errors.As(o.err, &oe) && oe.Reason == ssh.UnknownChannelType:
			return nil, fmt.Errorf("%w (agent protocol %s, needs 1.3): restart the VM to update its agent", ErrUnsupported, c.proto)
		case errors.As(o.err, &oe):
			return nil, fmt.Errorf("%w: %s", ErrRefused, oe.Message)
		default:
			return nil, fmt.Errorf("%w: %w", ErrConnectionLost, o.err)
		}
	}
	go ssh.DiscardRequests(o.reqs)
	return o.ch, nil
}
