package sockbuf

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestGrowSend(t *testing.T) {
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	before, err := GrowSend(c, 1) // never shrinks: reports the default
	if err != nil {
		t.Fatal(err)
	}
	got, err := GrowSend(c, Stream)
	if err != nil {
		t.Fatal(err)
	}
	want := 2 * Stream // the kernel doubles what it is given
	if os.Geteuid() != 0 {
		// Without CAP_NET_ADMIN the kernel caps it at wmem_max.
		if b, err := os.ReadFile("/proc/sys/net/core/wmem_max"); err == nil {
			if m, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && 2*m < want {
				want = 2 * m
			}
		}
	}
	if got < want || got < before {
		t.Fatalf("send buffer %d after GrowSend(%d) (it was %d), want at least %d", got, Stream, before, want)
	}
	if _, err := GrowSend(fakeConn{c}, Stream); err == nil {
		t.Fatal("GrowSend of a connection without a socket succeeded")
	}
}

// fakeConn hides the socket of a net.Conn.
type fakeConn struct{ net.Conn }
