package sockbuf

import (
	"net"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// pair returns both ends of a fresh unix stream connection.
func pair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// expected is what GrowSend(Stream) may reach here, probed on a scratch
// socket: twice Stream where SO_SNDBUFFORCE is allowed (CAP_NET_ADMIN),
// else what the kernel grants SO_SNDBUF (capped at wmem_max, which a
// network namespace or a container may set apart).
func expected(t *testing.T) int {
	t.Helper()
	c, _ := pair(t)
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var size int
	raw.Control(func(fd uintptr) {
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, Stream) != nil {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, Stream)
		}
		size, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF)
	})
	return size
}

func TestGrowSend(t *testing.T) {
	want := expected(t)
	c, _ := pair(t)
	before, err := GrowSend(c, 1) // never shrinks: reports the default
	if err != nil {
		t.Fatal(err)
	}
	got, err := GrowSend(c, Stream)
	if err != nil {
		t.Fatal(err)
	}
	if got < max(want, before) {
		t.Fatalf("send buffer %d after GrowSend(%d) (it was %d), want at least %d", got, Stream, before, max(want, before))
	}
	if again, err := GrowSend(c, 1); err != nil || again != got {
		t.Fatalf("GrowSend(1) after GrowSend(%d): %d, %v; want %d kept", Stream, again, err, got)
	}
	t.Logf("send buffer %d → %d (this host grants %d)", before, got, want)
	if _, err := GrowSend(fakeConn{c}, Stream); err == nil {
		t.Fatal("GrowSend of a connection without a socket succeeded")
	}
}

// fakeConn hides the socket of a net.Conn.
type fakeConn struct{ net.Conn }
