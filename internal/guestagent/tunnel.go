package guestagent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agentproto"
)

// tunnelDialTimeout bounds a direct-tcpip connection attempt inside the
// guest.
const tunnelDialTimeout = 10 * time.Second

// halfCloser is a byte stream whose sending side can be closed alone
// (ssh.Channel, *net.TCPConn, *net.UnixConn).
type halfCloser interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// handleDirectTCPIP serves a "direct-tcpip" channel (agentproto.ChanDirectTCPIP,
// and ssh -L through the built-in SSH server): it connects to the requested
// address inside the guest and relays bytes both ways until both sides
// have finished or ctx ends.
func handleDirectTCPIP(ctx context.Context, nc ssh.NewChannel, log *slog.Logger) {
	var m agentproto.DirectTCPIPMsg
	if err := ssh.Unmarshal(nc.ExtraData(), &m); err != nil {
		nc.Reject(ssh.Prohibited, "malformed direct-tcpip request")
		return
	}
	if m.PortToConnect == 0 || m.PortToConnect > 65535 {
		nc.Reject(ssh.Prohibited, "direct-tcpip: bad port "+strconv.FormatUint(uint64(m.PortToConnect), 10))
		return
	}
	addr := net.JoinHostPort(m.HostToConnect, strconv.FormatUint(uint64(m.PortToConnect), 10))
	dctx, cancel := context.WithTimeout(ctx, tunnelDialTimeout)
	var d net.Dialer
	conn, err := d.DialContext(dctx, "tcp", addr)
	cancel()
	if err != nil {
		log.Debug("direct-tcpip connect failed", "addr", addr, "err", err)
		nc.Reject(ssh.ConnectionFailed, err.Error())
		return
	}
	ch, reqs, err := nc.Accept()
	if err != nil {
		conn.Close()
		log.Warn("accept direct-tcpip", "err", err)
		return
	}
	log.Debug("direct-tcpip connected", "addr", addr)
	relayChannel(ctx, ch, reqs, conn.(*net.TCPConn))
}

// relayChannel relays an SSH channel and a connection (see relay); reqs
// are the channel's requests, which are refused. When the channel's peer
// closes it (or the SSH connection ends), what it had sent is still
// delivered, then both are closed: nobody reads what conn would still
// send, and a service that keeps conn open after end of file must not
// hold it forever.
func relayChannel(ctx context.Context, ch ssh.Channel, reqs <-chan *ssh.Request, conn halfCloser) {
	gone := make(chan struct{})
	go func() {
		ssh.DiscardRequests(reqs)
		close(gone)
	}()
	relay(ctx, ch, conn, gone)
}

// relay copies a to b and b to a. When one side's input ends, the other
// side's output is half-closed, so each peer sees the other's end of file.
// Both are closed when both directions are over, when one fails, when ctx
// ends, or when aGone is closed (a's peer left) and a's input is over.
func relay(ctx context.Context, a, b halfCloser, aGone <-chan struct{}) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	stop := context.AfterFunc(ctx, closeBoth)
	defer stop()
	pipe := func(dst, src halfCloser) {
		_, err := io.Copy(dst, src)
		if err != nil && !errors.Is(err, net.ErrClosed) {
			closeBoth()
			return
		}
		dst.CloseWrite()
	}
	bDone := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		pipe(b, a)
		select {
		case <-aGone:
			closeBoth()
		case <-bDone:
		}
	})
	wg.Go(func() {
		pipe(a, b)
		close(bDone)
	})
	wg.Wait()
	closeBoth()
}
