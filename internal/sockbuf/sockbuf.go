// Package sockbuf sizes the kernel buffers of banger's stream sockets.
//
// A unix stream socket queues at most its sender's send buffer
// (net.core.wmem_default, 208 KiB on most hosts) before the sender blocks.
// On the data path a blocked sender stalls every hop behind it: bangerd
// writing a stream to a slow CLI stops reading the VM's port, QEMU's
// socket fills, and the guest's writer waits. A larger buffer lets each
// hop run ahead of the next one for a few more milliseconds, which on a
// busy host is the difference between a pipeline and a relay (measured on
// vm exec's 200 MiB out under TCG: 1.57 s with the default buffer, 1.1 s
// with 2 MiB; docs/dev/data-path.md).
package sockbuf

import (
	"fmt"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// Stream is the send buffer banger gives the sockets that carry bulk
// streams. It is a limit, not an allocation: the kernel uses it only
// while the reader is behind.
const Stream = 2 << 20

// GrowSend raises conn's send buffer to n bytes: beyond net.core.wmem_max
// when the process may (CAP_NET_ADMIN: SO_SNDBUFFORCE), else up to it. It
// never shrinks the buffer and returns the size the kernel reports (which
// counts its own overhead: about twice what was asked).
func GrowSend(conn net.Conn, n int) (int, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return 0, fmt.Errorf("send buffer: %T has no socket", conn)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("send buffer: %w", err)
	}
	var size int
	var serr error
	if err := rc.Control(func(fd uintptr) {
		size, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF)
		if serr != nil || size >= 2*n {
			return
		}
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, n) != nil {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, n); serr != nil {
				return
			}
		}
		size, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF)
	}); err != nil {
		return 0, fmt.Errorf("send buffer: %w", err)
	}
	if serr != nil {
		return 0, fmt.Errorf("send buffer: %w", serr)
	}
	return size, nil
}
