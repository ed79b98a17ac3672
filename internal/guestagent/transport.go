package guestagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/mdlayher/vsock"
)

const (
	// hostPollInterval is how often a virtio-serial port is polled while
	// the host side is not connected.
	hostPollInterval = 20 * time.Millisecond
	// portRetryInterval is how long to wait before looking up or opening
	// the port again after a failure (port not there yet, EBUSY, ...).
	portRetryInterval = 200 * time.Millisecond
)

// errPortNotFound is returned by findVirtioPort when no port has the name.
var errPortNotFound = errors.New("virtio-serial port not found")

// findVirtioPort returns the device name (e.g. "vport0p1") of the
// virtio-serial port called name, looking in sysfsRoot (normally "/sys")
// under class/virtio-ports/*/name.
func findVirtioPort(sysfsRoot, name string) (string, error) {
	matches, err := filepath.Glob(filepath.Join(sysfsRoot, "class", "virtio-ports", "*", "name"))
	if err != nil {
		return "", fmt.Errorf("find virtio port %s: %w", name, err)
	}
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err != nil {
			continue
		}
		if strings.TrimSpace(string(b)) == name {
			return filepath.Base(filepath.Dir(m)), nil
		}
	}
	return "", fmt.Errorf("find virtio port %s under %s: %w", name, sysfsRoot, errPortNotFound)
}

// waitVirtioPort polls findVirtioPort until the port appears (its driver may
// still be probing when the agent starts) or ctx ends, and returns the
// device path under devRoot.
func (s *server) waitVirtioPort(ctx context.Context, sysfsRoot, devRoot, name string) (string, error) {
	logged := false
	for {
		dev, err := findVirtioPort(sysfsRoot, name)
		if err == nil {
			return filepath.Join(devRoot, dev), nil
		}
		if !logged {
			s.log.Info("waiting for virtio-serial port", "name", name, "err", err)
			logged = true
		}
		if err := sleepCtx(ctx, portRetryInterval); err != nil {
			return "", fmt.Errorf("find virtio port %s: %w", name, err)
		}
	}
}

func (s *server) serveVirtio(ctx context.Context, portName string) error {
	dev, err := s.waitVirtioPort(ctx, "/sys", "/dev", portName)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	s.log.Info("serving on virtio-serial port", "name", portName, "device", dev)
	s.servePort(ctx, dev, func() (*os.File, error) {
		return os.OpenFile(dev, os.O_RDWR, 0)
	})
	return nil
}

// servePort serves one SSH connection after the other over a port that
// behaves like a Linux virtio_console port: one open at a time; reads return
// 0 bytes while the host side is not connected; writes block until it is.
// For each client it opens the port, waits for the host (the first bytes
// read are replayed to the SSH server), serves the connection, then closes
// the fd, so that nothing from a dead session (a blocked write, unread
// input) leaks into the next one. It returns when ctx ends.
func (s *server) servePort(ctx context.Context, name string, open func() (*os.File, error)) {
	for ctx.Err() == nil {
		f, err := open()
		if err != nil {
			s.log.Warn("open agent port", "device", name, "err", err)
			sleepCtx(ctx, portRetryInterval)
			continue
		}
		if err := s.servePortOnce(ctx, name, f); err != nil && ctx.Err() == nil {
			s.log.Warn("agent port session", "device", name, "err", err)
			// A hard read error (hot-unplug, ...): don't spin.
			sleepCtx(ctx, portRetryInterval)
		}
	}
}

func (s *server) servePortOnce(ctx context.Context, name string, f *os.File) error {
	conn := &portConn{f: f, addr: portAddr(name)}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()
	first, err := waitForHost(ctx, f)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("wait for host on %s: %w", name, err)
	}
	return s.serveConn(ctx, newReplayConn(conn, first))
}

// waitForHost reads r until it yields data, sleeping hostPollInterval after
// each empty read (0 bytes or EOF: the host side is not connected). It
// returns the data read, which the caller must not lose.
func waitForHost(ctx context.Context, r io.Reader) ([]byte, error) {
	return waitForHostBackoff(ctx, r, hostPollInterval, hostPollInterval)
}

// waitForHostBackoff is waitForHost pausing first, then twice as long
// after each empty read, up to most.
func waitForHostBackoff(ctx context.Context, r io.Reader, first, most time.Duration) ([]byte, error) {
	buf := make([]byte, 4096)
	pause := first
	for {
		n, err := r.Read(buf)
		if n > 0 {
			return buf[:n], nil
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		if err := sleepCtx(ctx, pause); err != nil {
			return nil, err
		}
		pause = min(2*pause, most)
	}
}

func (s *server) serveVsock(ctx context.Context, port uint32) error {
	ln, err := vsock.Listen(port, nil)
	if err != nil {
		return fmt.Errorf("listen on vsock port %d: %w", port, err)
	}
	s.log.Info("serving on vsock", "port", port)
	return s.serveListener(ctx, ln)
}

// serveListener serves each accepted connection concurrently until ctx ends.
func (s *server) serveListener(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
			}
			s.log.Warn("accept agent connection", "addr", ln.Addr().String(), "err", err)
			sleepCtx(ctx, portRetryInterval)
			continue
		}
		wg.Go(func() {
			if err := s.serveConn(ctx, conn); err != nil {
				s.log.Warn("agent connection", "remote", conn.RemoteAddr().String(), "err", err)
			}
		})
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// replayConn is a net.Conn whose reads first return pending, the bytes
// already consumed from the underlying conn (while waiting for the host).
type replayConn struct {
	net.Conn
	mu      sync.Mutex
	pending []byte
}

func newReplayConn(c net.Conn, pending []byte) *replayConn {
	return &replayConn{Conn: c, pending: pending}
}

func (c *replayConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		c.mu.Unlock()
		return n, nil
	}
	c.mu.Unlock()
	return c.Conn.Read(p)
}

// portConn adapts a character device (*os.File) to net.Conn. Deadlines are
// honoured when the file is pollable and ignored otherwise.
type portConn struct {
	f    *os.File
	addr portAddr
}

func (c *portConn) Read(p []byte) (int, error)  { return c.f.Read(p) }
func (c *portConn) Write(p []byte) (int, error) { return c.f.Write(p) }
func (c *portConn) Close() error                { return c.f.Close() }
func (c *portConn) LocalAddr() net.Addr         { return c.addr }
func (c *portConn) RemoteAddr() net.Addr        { return c.addr }

func (c *portConn) SetDeadline(t time.Time) error {
	return ignoreNoDeadline(c.f.SetDeadline(t))
}

func (c *portConn) SetReadDeadline(t time.Time) error {
	return ignoreNoDeadline(c.f.SetReadDeadline(t))
}

func (c *portConn) SetWriteDeadline(t time.Time) error {
	return ignoreNoDeadline(c.f.SetWriteDeadline(t))
}

func ignoreNoDeadline(err error) error {
	if errors.Is(err, os.ErrNoDeadline) {
		return nil
	}
	return err
}

// portAddr is the net.Addr of a virtio-serial port.
type portAddr string

func (a portAddr) Network() string { return "virtio-serial" }
func (a portAddr) String() string  { return string(a) }
