package rpc

import (
	"context"
	"errors"
	"io"
	"testing"

	"github.com/bangerdev/banger/internal/api"
)

// streamParams asks the benchmark's v1.out for Size bytes in writes of
// Chunk bytes.
type streamParams struct {
	Size  int `json:"size"`
	Chunk int `json:"chunk"`
}

// streamServer serves v1.out (the handler writes stdout data, as the
// daemon's frameWriter does) and v1.in (the handler reads stdin frames to
// EOF and returns their size, as pumpInput does).
func streamServer(tb testing.TB) string {
	return serve(tb, nil, func(s *Server) {
		s.Handle("v1.out", PermRead, func(ctx context.Context, c *Call) (any, error) {
			var p streamParams
			if err := c.Decode(&p); err != nil {
				return nil, err
			}
			buf := make([]byte, p.Chunk)
			for i := range buf {
				buf[i] = byte(i)
			}
			for left := p.Size; left > 0; left -= p.Chunk {
				if err := c.SendData(KindStdout, buf[:min(left, p.Chunk)]); err != nil {
					return nil, err
				}
			}
			return p.Size, nil
		})
		s.Handle("v1.in", PermWrite, func(ctx context.Context, c *Call) (any, error) {
			n := 0
			for f := range c.Frames() {
				if f.Type == api.FrameEOF {
					return n, nil
				}
				n += len(f.Data)
				c.Release(f)
			}
			return nil, errors.New("input ended without EOF")
		}, TakesInput())
	})
}

// BenchmarkStream moves data over a real unix socket through a call, in
// JSON lines (base64, today's old clients) and in binary framing: out is
// daemon → client (exec output, cp out, logs), in is client → daemon (exec
// stdin, cp in), each in the chunks the client and daemon use.
func BenchmarkStream(b *testing.B) {
	sock := streamServer(b)
	const size = 32 << 20
	for _, mode := range []struct {
		name    string
		open    func(context.Context, string, string, any) (*Stream, error)
		inChunk int
	}{
		{"json", Open, 32 << 10},
		{"binary", OpenBinary, MaxFrameBytes},
	} {
		b.Run(mode.name+"/out", func(b *testing.B) {
			b.SetBytes(size)
			b.ReportAllocs()
			for b.Loop() {
				s, err := mode.open(context.Background(), sock, "v1.out", streamParams{Size: size, Chunk: 32 << 10})
				if err != nil {
					b.Fatal(err)
				}
				got, n := 0, 0
				for {
					f, err := s.Next(&n)
					if errors.Is(err, io.EOF) {
						break
					}
					if err != nil {
						b.Fatal(err)
					}
					got += len(f.Data)
				}
				s.Close()
				if got != size || n != size {
					b.Fatalf("got %d bytes, result %d, want %d", got, n, size)
				}
			}
		})
		b.Run(mode.name+"/in", func(b *testing.B) {
			b.SetBytes(size)
			b.ReportAllocs()
			buf := make([]byte, mode.inChunk)
			for b.Loop() {
				s, err := mode.open(context.Background(), sock, "v1.in", nil)
				if err != nil {
					b.Fatal(err)
				}
				for left := size; left > 0; left -= len(buf) {
					if err := s.SendData(KindStdin, buf[:min(left, len(buf))]); err != nil {
						b.Fatal(err)
					}
				}
				if err := s.Send(api.Frame{Type: api.FrameEOF}); err != nil {
					b.Fatal(err)
				}
				var n int
				if _, err := s.Next(&n); !errors.Is(err, io.EOF) || n != size {
					b.Fatalf("result %d, %v; want %d", n, err, size)
				}
				s.Close()
			}
		})
	}
}
