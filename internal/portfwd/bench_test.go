package portfwd

import (
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"
)

// BenchmarkTCP measures TCP throughput on loopback straight to a sink and
// through a Proxy to it (the forwarded/direct ratio the benchmark
// wants at least 0.9 of, here without a VM). Loopback only: no link,
// address or namespace is made.
func BenchmarkTCP(b *testing.B) {
	sink, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer sink.Close()
	go func() {
		for {
			c, err := sink.Accept()
			if err != nil {
				return
			}
			go func() {
				_, _ = io.Copy(io.Discard, c)
				_ = c.(*net.TCPConn).CloseWrite()
				c.Close()
			}()
		}
	}()
	sinkAddr := sink.Addr().(*net.TCPAddr).AddrPort()

	// A free port for the proxy's listener.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	proxyAddr := l.Addr().(*net.TCPAddr).AddrPort()
	l.Close()
	p := NewProxy(slog.New(slog.DiscardHandler))
	rule := Rule{Proto: TCP, HostIP: proxyAddr.Addr(), HostPort: int(proxyAddr.Port()), GuestPort: int(sinkAddr.Port())}
	if err := p.Start("bench", sinkAddr.Addr(), []Rule{rule}); err != nil {
		b.Fatal(err)
	}
	defer p.Stop("bench")

	for _, c := range []struct {
		name string
		addr netip.AddrPort
	}{{"direct", sinkAddr}, {"proxied", proxyAddr}} {
		b.Run(c.name, func(b *testing.B) {
			conn, err := net.Dial("tcp", c.addr.String())
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			buf := make([]byte, 1<<20)
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for range b.N {
				if _, err := conn.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			// Wait for the sink to have read everything.
			_ = conn.(*net.TCPConn).CloseWrite()
			_, _ = io.Copy(io.Discard, conn)
		})
	}
}
