package rpc

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
)

// modes are the two framings a client may ask for.
var modes = []struct {
	name   string
	open   func(ctx context.Context, socketPath, method string, params any) (*Stream, error)
	binary bool
}{
	{"json", Open, false},
	{"binary", OpenBinary, true},
}

type catResult struct {
	N      int  `json:"n"`
	Binary bool `json:"binary"`
}

// catServer serves v1.cat: it echoes stdin to stdout (alternately with
// SendData and with Send), then, at EOF, writes bigStderr to stderr in one
// write and returns what it read.
func catServer(t *testing.T, bigStderr []byte) string {
	return serve(t, nil, func(s *Server) {
		s.Handle("v1.cat", PermWrite, func(ctx context.Context, c *Call) (any, error) {
			n, i := 0, 0
			for f := range c.Frames() {
				if f.Type == api.FrameEOF {
					if err := c.SendData(KindStderr, bigStderr); err != nil {
						return nil, err
					}
					return catResult{N: n, Binary: c.Binary()}, nil
				}
				if f.Type != api.FrameStdin {
					return nil, fmt.Errorf("frame %q", f.Type)
				}
				n += len(f.Data)
				var err error
				if i++; i%2 == 0 {
					err = c.SendData(KindStdout, f.Data)
				} else {
					err = c.Send(api.Frame{Type: api.FrameStdout, Data: f.Data})
				}
				c.Release(f)
				if err != nil {
					return nil, err
				}
			}
			return nil, errors.New("input ended without EOF")
		}, TakesInput())
	})
}

// Megabytes go through a call and back byte for byte, in both framings:
// stdin written in pieces of every size (split into frames the daemon
// accepts), stdout echoed, and a stderr write of over 3 MiB (split into
// data frames of at most MaxDataFrame in binary framing).
func TestStreamRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	data := make([]byte, 10<<20)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	bigStderr := data[:3*MaxDataFrame+1234]
	sock := catServer(t, bigStderr)
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			s, err := mode.open(context.Background(), sock, "v1.cat", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			sent := make(chan error, 1)
			go func() {
				p := data
				for i := 0; len(p) > 0; i++ {
					n := min(len(p), []int{1, 1000, MaxFrameBytes, MaxFrameBytes + 1, 300 << 10, 3 << 20}[i%6])
					if err := s.SendData(KindStdin, p[:n]); err != nil {
						sent <- err
						return
					}
					p = p[n:]
				}
				sent <- s.Send(api.Frame{Type: api.FrameEOF})
			}()
			var out, errOut bytes.Buffer
			var res catResult
			for {
				f, err := s.Next(&res)
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				if mode.binary && len(f.Data) > MaxDataFrame {
					t.Fatalf("a data frame of %d bytes, over MaxDataFrame", len(f.Data))
				}
				switch f.Type {
				case api.FrameStdout:
					out.Write(f.Data)
				case api.FrameStderr:
					errOut.Write(f.Data)
				default:
					t.Fatalf("frame %q", f.Type)
				}
			}
			if err := <-sent; err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out.Bytes(), data) || !bytes.Equal(errOut.Bytes(), bigStderr) {
				t.Fatalf("stdout %d bytes (equal: %v), stderr %d bytes (equal: %v); sent %d and %d",
					out.Len(), bytes.Equal(out.Bytes(), data), errOut.Len(), bytes.Equal(errOut.Bytes(), bigStderr), len(data), len(bigStderr))
			}
			if res.N != len(data) || res.Binary != mode.binary {
				t.Fatalf("result %+v, want n=%d binary=%v", res, len(data), mode.binary)
			}
		})
	}
}

// Recv's frames are the caller's: a later Recv doesn't change them.
func TestRecvDataIsCopied(t *testing.T) {
	sock := serve(t, nil, func(s *Server) {
		s.Handle("v1.two", PermRead, func(ctx context.Context, c *Call) (any, error) {
			_ = c.SendData(KindStdout, []byte("first"))
			return nil, c.SendData(KindStdout, []byte("other"))
		})
	})
	s, err := OpenBinary(context.Background(), sock, "v1.two", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	f1, err1 := s.Recv(nil)
	f2, err2 := s.Recv(nil)
	if err1 != nil || err2 != nil || string(f1.Data) != "first" || string(f2.Data) != "other" {
		t.Fatalf("frames %q %q, %v %v", f1.Data, f2.Data, err1, err2)
	}
}

// An old client speaks JSON lines: no flag in its request, base64 data in
// its frames, one message per line in the answer; handlers written for
// binary framing (SendData, Release) serve it the same.
func TestOldClientJSONLines(t *testing.T) {
	sock := catServer(t, []byte("E"))
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = io.WriteString(conn, `{"method":"v1.cat","params":null}`+"\n"+
		`{"frame":{"type":"stdin","data":"aGVsbG8="}}`+"\n"+
		`{"frame":{"type":"stdin","data":"IHdvcmxk"}}`+"\n"+
		`{"frame":{"type":"eof"}}`+"\n")
	if err != nil {
		t.Fatal(err)
	}
	answer, err := io.ReadAll(conn)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"frame":{"type":"stdout","data":"aGVsbG8="}}` + "\n" +
		`{"frame":{"type":"stdout","data":"IHdvcmxk"}}` + "\n" +
		`{"frame":{"type":"stderr","data":"RQ=="}}` + "\n" +
		`{"result":{"n":11,"binary":false},"done":true}` + "\n"
	if string(answer) != want {
		t.Fatalf("answer:\n%s\nwant:\n%s", answer, want)
	}
	// And Open's request is the old one: no flag.
	line, _ := json.Marshal(Request{Method: "v1.cat"})
	if strings.Contains(string(line), "binary") {
		t.Fatalf("a JSON-lines request says %s", line)
	}
}

// A daemon from before binary framing ignores the flag and answers in JSON
// lines: a binary stream reads them.
func TestBinaryClientOldDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "old.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		if _, err := bufio.NewReader(conn).ReadString('\n'); err != nil {
			return
		}
		_, _ = io.WriteString(conn, `{"frame":{"type":"stdout","data":"b2xk"}}`+"\n"+`{"result":7,"done":true}`+"\n")
	}()
	s, err := OpenBinary(context.Background(), sock, "v1.logs", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	f, err := s.Next(nil)
	if err != nil || f.Type != api.FrameStdout || string(f.Data) != "old" {
		t.Fatalf("first frame %+v %v", f, err)
	}
	var n int
	if _, err := s.Next(&n); !errors.Is(err, io.EOF) || n != 7 {
		t.Fatalf("end: %d %v", n, err)
	}
}

// binaryCall opens a binary call by hand.
func binaryCall(t *testing.T, sock, method string) net.Conn {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := io.WriteString(conn, `{"method":"`+method+`","binary":true}`+"\n"); err != nil {
		t.Fatal(err)
	}
	return conn
}

// binaryMessage is one binary message: a header claiming n bytes, then
// payload.
func binaryMessage(kind byte, n int, payload []byte) []byte {
	b := []byte{kind, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[1:], uint32(n))
	return append(b, payload...)
}

// callError reads a binary call's messages until its error.
func callError(t *testing.T, conn net.Conn) *WireError {
	t.Helper()
	// Generous: the answer is sent at once or never comes.
	_ = conn.SetReadDeadline(time.Now().Add(time.Minute))
	r := bufio.NewReader(conn)
	var hdr [headerLen]byte
	for {
		kind, n, err := readHeader(r, &hdr)
		if err != nil {
			t.Fatalf("read the answer: %v", err)
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(r, payload); err != nil {
			t.Fatalf("read the answer: %v", err)
		}
		if kind != KindMessage {
			continue
		}
		var msg Message
		if err := json.Unmarshal(payload, &msg); err != nil {
			t.Fatal(err)
		}
		if msg.Error != nil {
			return msg.Error
		}
		if msg.Done {
			t.Fatalf("the call succeeded: %s", msg.Result)
		}
	}
}

// A binary call's input keeps the bounds of JSON lines: a message over
// MaxFrameBytes ends the call unread, so do a kind a client doesn't send,
// a message that isn't one, and any input to a method that takes none.
func TestBinaryInputBounds(t *testing.T) {
	sock := serve(t, nil, func(s *Server) {
		s.Handle("v1.in", PermWrite, func(ctx context.Context, c *Call) (any, error) {
			for f := range c.Frames() {
				c.Release(f)
			}
			<-ctx.Done()
			return nil, ctx.Err()
		}, TakesInput())
		s.Handle("v1.wait", PermRead, func(ctx context.Context, c *Call) (any, error) {
			<-ctx.Done()
			return "never seen", nil
		})
	})
	for _, tc := range []struct {
		name, method string
		msg          []byte
		want         string
	}{
		// The payload is never sent: the server refuses the header.
		{"oversized", "v1.in", binaryMessage(3, MaxFrameBytes+1, nil), "larger than 128 KiB"},
		{"1 GiB", "v1.in", binaryMessage(3, 1<<30, nil), "larger than 128 KiB"},
		{"unknown kind", "v1.in", binaryMessage(9, 1, []byte("x")), "kind 9, not one a client sends"},
		{"stdout from a client", "v1.in", binaryMessage(1, 1, []byte("x")), "kind 1, not one a client sends"},
		{"bad message", "v1.in", binaryMessage(0, 4, []byte("nope")), "bad message"},
		{"data to a method without input", "v1.wait", binaryMessage(3, 1, []byte("x")), "takes no input"},
		{"eof to a method without input", "v1.wait", binaryMessage(0, 24, []byte(`{"frame":{"type":"eof"}}`)), "takes no input"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := binaryCall(t, sock, tc.method)
			// A frame of the largest size first: accepted.
			if tc.method == "v1.in" {
				if _, err := conn.Write(binaryMessage(3, MaxFrameBytes, make([]byte, MaxFrameBytes))); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := conn.Write(tc.msg); err != nil {
				t.Fatal(err)
			}
			e := callError(t, conn)
			if e.Code != api.CodeInvalid || !strings.Contains(e.Message, tc.want) {
				t.Fatalf("error %+v, want an invalid-argument error with %q", e, tc.want)
			}
		})
	}
}

// Through the typed stream, in both framings: a frame over the limit ends
// the call with ErrInvalid, and closing the stream cancels the call.
func TestOversizedFrameAndCancelBothModes(t *testing.T) {
	cancelled := make(chan struct{}, 2)
	sock := serve(t, nil, func(s *Server) {
		s.Handle("v1.in", PermRead, func(ctx context.Context, c *Call) (any, error) {
			for range c.Frames() {
			}
			<-ctx.Done()
			return nil, ctx.Err()
		}, TakesInput())
		s.Handle("v1.block", PermWrite, func(ctx context.Context, c *Call) (any, error) {
			c.Progress(api.Progress{Phase: "blocked"})
			<-ctx.Done()
			cancelled <- struct{}{}
			return nil, ctx.Err()
		})
	})
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			s, err := mode.open(context.Background(), sock, "v1.in", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			go func() { _ = s.Send(api.Frame{Type: api.FrameStdin, Data: make([]byte, 2<<20)}) }()
			for {
				_, err := s.Next(nil)
				if err == nil {
					continue
				}
				if !errors.Is(err, errdefs.ErrInvalid) {
					t.Fatalf("call with a 2 MiB frame ended with %v, want ErrInvalid", err)
				}
				break
			}

			b, err := mode.open(context.Background(), sock, "v1.block", nil)
			if err != nil {
				t.Fatal(err)
			}
			if f, err := b.Next(nil); err != nil || f.Progress == nil || f.Progress.Phase != "blocked" {
				t.Fatalf("progress: %+v %v", f, err)
			}
			b.Close()
			select {
			case <-cancelled:
			case <-time.After(time.Minute):
				t.Fatal("handler context not cancelled when the client went away")
			}
		})
	}
}

// A stdin frame's buffer, once released, holds a later frame: a handler
// that releases its frames costs no allocation per frame.
func TestReleasedBuffersReused(t *testing.T) {
	sock := serve(t, nil, func(s *Server) {
		s.Handle("v1.where", PermWrite, func(ctx context.Context, c *Call) (any, error) {
			for f := range c.Frames() {
				if f.Type != api.FrameStdin {
					return nil, nil
				}
				// Answer where the data was, after giving it back.
				where := fmt.Appendf(nil, "%p", &f.Data[0])
				c.Release(f)
				if err := c.SendData(KindStdout, where); err != nil {
					return nil, err
				}
			}
			return nil, nil
		}, TakesInput())
	})
	s, err := OpenBinary(context.Background(), sock, "v1.where", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	seen := map[string]int{}
	for range 10 {
		// One frame at a time: the next is sent once the last was released.
		if err := s.SendData(KindStdin, make([]byte, 100<<10)); err != nil {
			t.Fatal(err)
		}
		f, err := s.Next(nil)
		if err != nil {
			t.Fatal(err)
		}
		seen[string(f.Data)]++
	}
	if len(seen) != 1 {
		t.Fatalf("10 frames released one by one landed in %d buffers, want 1: %v", len(seen), seen)
	}
}
