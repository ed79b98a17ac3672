package agent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/tarcopy"
	"github.com/bangerdev/banger/test/harness"
)

// A hostile guest on the data ports: an SSH agent of protocol 1.5 whose
// requests are handled by the test, with the port of each transfer.

// guestTransfer is one request the fake guest received.
type guestTransfer struct {
	kind string // agentproto.ReqExecArgv, ChanCopyIn, ChanCopyOut
	data *agentproto.DataStream
	// directIO is a copy request's DirectIO.
	directIO bool
	ch       ssh.Channel
	port     net.Conn // the guest's end, after the host's preamble was checked; nil without Data
	token    []byte
}

// ack writes the guest's answer.
func (g *guestTransfer) ack(t *testing.T) {
	t.Helper()
	if err := agentproto.WriteDataAck(g.port, g.token); err != nil {
		t.Errorf("guest: write ack: %v", err)
	}
}

// frame writes one frame.
func (g *guestTransfer) frame(kind byte, p []byte) error {
	buf := make([]byte, agentproto.DataHeaderSize+len(p))
	copy(buf[agentproto.DataHeaderSize:], p)
	return agentproto.NewDataWriter(g.port).WriteFrame(kind, buf)
}

// exit ends an exec: the port closed, then the exit status and the channel.
func (g *guestTransfer) exit(code uint32) {
	if g.port != nil {
		g.port.Close()
	}
	g.ch.SendRequest("exit-status", false, ssh.Marshal(agentproto.ExitStatusMsg{Status: code}))
	g.ch.Close()
}

// status ends a copy: the port closed, then the status and the channel.
func (g *guestTransfer) status(msg string) {
	if g.port != nil {
		g.port.Close()
	}
	send(g.ch, agentproto.ReqCopyStatus, agentproto.CopyStatus{Error: msg})
	g.ch.Close()
}

// fakeDataGuest serves handle for each transfer; it returns the client
// (dialed with opts) with n data ports and a count of the host's dials.
func fakeDataGuest(t *testing.T, n int, handle func(g *guestTransfer), opts ...agent.DialOption) (*agent.Client, *atomic.Int32) {
	t.Helper()
	km, err := agent.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	keys, _ := km.Keys()
	signer, err := ssh.ParsePrivateKey([]byte(km.HostPrivatePEM))
	if err != nil {
		t.Fatal(err)
	}
	cfg := &ssh.ServerConfig{
		PublicKeyCallback: func(ssh.ConnMetadata, ssh.PublicKey) (*ssh.Permissions, error) { return nil, nil },
	}
	cfg.AddHostKey(signer)

	ports := make([]chan net.Conn, n)
	for i := range ports {
		ports[i] = make(chan net.Conn, 1)
	}
	var dials atomic.Int32
	dial := func(ctx context.Context, port int) (net.Conn, error) {
		guest, host := socketPair(t)
		select {
		case ports[port] <- guest:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		dials.Add(1)
		return host, nil
	}
	// open takes the port's connection and checks the host's preamble.
	open := func(g *guestTransfer) bool {
		select {
		case g.port = <-ports[g.data.Port]:
		case <-time.After(10 * time.Second):
			t.Errorf("guest: no host on data port %d", g.data.Port)
			return false
		}
		g.token = g.data.Token
		if err := agentproto.ReadDataHello(g.port, g.token); err != nil {
			t.Errorf("guest: %v", err)
			return false
		}
		return true
	}
	run := func(g *guestTransfer) {
		if g.data != nil && !open(g) {
			g.ch.Close()
			return
		}
		handle(g)
	}

	guest, host := socketPair(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, chans, reqs, err := ssh.NewServerConn(guest, cfg)
		if err != nil {
			return
		}
		go func() {
			for req := range reqs {
				if req.Type == agentproto.GlobalInfo {
					payload, _ := agentproto.MarshalPayload(agentproto.Info{ProtoVersion: agentproto.Version, DataPorts: n})
					req.Reply(true, payload)
					continue
				}
				req.Reply(false, nil)
			}
		}()
		for nc := range chans {
			switch nc.ChannelType() {
			case "session":
				ch, creqs, err := nc.Accept()
				if err != nil {
					continue
				}
				go func() {
					for req := range creqs {
						if req.Type != agentproto.ReqExecArgv {
							req.Reply(false, nil)
							continue
						}
						var er agentproto.ExecRequest
						if err := agentproto.UnmarshalPayload(req.Payload, &er); err != nil {
							req.Reply(false, nil)
							continue
						}
						req.Reply(true, nil)
						go run(&guestTransfer{kind: req.Type, data: er.Data, ch: ch})
					}
				}()
			case agentproto.ChanCopyIn, agentproto.ChanCopyOut:
				var cr agentproto.CopyRequest
				if err := agentproto.UnmarshalPayload(nc.ExtraData(), &cr); err != nil {
					nc.Reject(ssh.Prohibited, "bad request")
					continue
				}
				ch, creqs, err := nc.Accept()
				if err != nil {
					continue
				}
				go ssh.DiscardRequests(creqs)
				go run(&guestTransfer{kind: nc.ChannelType(), data: cr.Data, ch: ch, directIO: cr.DirectIO})
			default:
				nc.Reject(ssh.UnknownChannelType, "no")
			}
		}
	}()
	t.Cleanup(func() { guest.Close(); <-done })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, func(context.Context) (net.Conn, error) { return host, nil }, keys, nil, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.UseDataPorts(n, dial)
	return c, &dials
}

// echoExec is a well-behaved guest's exec: stdin back as stdout, "err" on
// stderr, exit status 3.
func echoExec(t *testing.T) func(g *guestTransfer) {
	return func(g *guestTransfer) {
		if g.data == nil {
			g.exit(99)
			return
		}
		g.ack(t)
		dr := agentproto.NewDataReader(g.port, 0)
		for {
			kind, p, err := dr.Next()
			if err != nil { // the host went (cancelled)
				g.exit(98)
				return
			}
			if kind == agentproto.DataFrameEnd {
				break
			}
			for len(p) > 0 {
				n := min(len(p), agentproto.GuestDataChunk)
				if err := g.frame(agentproto.DataFrameData, p[:n]); err != nil {
					g.exit(97) // the host went (cancelled)
					return
				}
				p = p[n:]
			}
		}
		g.frame(agentproto.DataFrameStderr, []byte("err"))
		g.frame(agentproto.DataFrameEnd, nil)
		g.exit(3)
	}
}

func dataCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestFakeGuestExecOverADataPort(t *testing.T) {
	c, dials := fakeDataGuest(t, 2, echoExec(t))
	in := make([]byte, 3<<20+17)
	rand.Read(in)
	var out, errOut bytes.Buffer
	code, err := c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"cat"}, Stdin: bytes.NewReader(in), Stdout: &out, Stderr: &errOut})
	if err != nil || code != 3 {
		t.Fatalf("exec: %d, %v; want 3", code, err)
	}
	if !bytes.Equal(out.Bytes(), in) {
		t.Errorf("stdout: %d bytes, not the %d sent", out.Len(), len(in))
	}
	if errOut.String() != "err" {
		t.Errorf("stderr %q, want \"err\"", errOut.String())
	}
	if n := dials.Load(); n != 1 {
		t.Errorf("%d dials, want 1", n)
	}
	// No stdin: End at once.
	out.Reset()
	code, err = c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"true"}, Stdout: &out})
	if err != nil || code != 3 || out.Len() != 0 {
		t.Errorf("exec without stdin: %d, %v, %q", code, err, out.String())
	}
}

// failingWriter fails every write.
type failingWriter struct{ n atomic.Int64 }

func (f *failingWriter) Write(p []byte) (int, error) {
	f.n.Add(1)
	return 0, errors.New("disk full")
}

func TestFakeGuestExecStdoutWriterFails(t *testing.T) {
	c, _ := fakeDataGuest(t, 1, echoExec(t))
	in := make([]byte, 1<<20)
	fw := &failingWriter{}
	var errOut bytes.Buffer
	code, err := c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"cat"}, Stdin: bytes.NewReader(in), Stdout: fw, Stderr: &errOut})
	if code != 3 || err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Errorf("exec: %d, %v; want 3 and the writer's error", code, err)
	}
	if n := fw.n.Load(); n != 1 {
		t.Errorf("%d writes to the failed writer, want 1 (then drained and dropped)", n)
	}
	if errOut.String() != "err" {
		t.Errorf("stderr %q: the stream was not drained", errOut.String())
	}
}

func TestFakeGuestBadAck(t *testing.T) {
	killed := make(chan struct{})
	c, _ := fakeDataGuest(t, 1, func(g *guestTransfer) {
		wrong := bytes.Clone(g.token)
		wrong[0] ^= 1
		agentproto.WriteDataAck(g.port, wrong)
		// The host kills the command and closes the channel.
		io.Copy(io.Discard, g.ch)
		close(killed)
	})
	_, err := c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"cat"}})
	if !errors.Is(err, agentproto.ErrDataHandshake) || !errors.Is(err, agent.ErrDataStream) {
		t.Errorf("exec: %v, want a handshake error", err)
	}
	select {
	case <-killed:
	case <-time.After(10 * time.Second):
		t.Errorf("the host didn't close the channel")
	}
}

func TestFakeGuestOversizedFrame(t *testing.T) {
	c, _ := fakeDataGuest(t, 1, func(g *guestTransfer) {
		g.ack(t)
		var hdr [agentproto.DataHeaderSize]byte
		agentproto.PutDataHeader(hdr[:], agentproto.DataFrameData, agentproto.MaxDataFrame+1)
		g.port.Write(hdr[:])
		io.Copy(io.Discard, g.ch)
	})
	var out bytes.Buffer
	_, err := c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"cat"}, Stdout: &out})
	if !errors.Is(err, agentproto.ErrDataFrame) {
		t.Errorf("exec: %v, want ErrDataFrame", err)
	}
}

func TestFakeGuestStreamThatDoesNotEnd(t *testing.T) {
	// Exit status and channel closed, the port silent, no End.
	hold := make(chan struct{})
	c, _ := fakeDataGuest(t, 1, func(g *guestTransfer) {
		g.ack(t)
		g.frame(agentproto.DataFrameData, []byte("partial"))
		g.ch.SendRequest("exit-status", false, ssh.Marshal(agentproto.ExitStatusMsg{}))
		g.ch.Close()
		<-hold // the port stays open, silent
	})
	t.Cleanup(func() { close(hold) })
	_, err := c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"cat"}})
	if !errors.Is(err, agent.ErrDataStream) || !strings.Contains(err.Error(), "without ending the stream") {
		t.Errorf("exec: %v, want a stream that didn't end", err)
	}
}

func TestFakeGuestCopyOut(t *testing.T) {
	stream := tarStream(t)
	sendOut := func(announce int64, extra []byte) func(g *guestTransfer) {
		return func(g *guestTransfer) {
			send(g.ch, agentproto.ReqCopyHeader, agentproto.CopyHeader{Size: announce, Entries: 3})
			g.ack(t)
			for p := append(bytes.Clone(stream), extra...); len(p) > 0; {
				n := min(len(p), agentproto.GuestDataChunk)
				if g.frame(agentproto.DataFrameData, p[:n]) != nil {
					break
				}
				p = p[n:]
			}
			g.frame(agentproto.DataFrameEnd, nil)
			g.status("")
		}
	}
	t.Run("honest", func(t *testing.T) {
		c, dials := fakeDataGuest(t, 1, sendOut(int64(len(stream)), nil))
		var out bytes.Buffer
		var size int64
		err := c.CopyOutWith(dataCtx(t), "/tree", &out, agent.CopyOutOptions{OnHeader: func(s, _ int64) { size = s }})
		if err != nil {
			t.Fatalf("copy out: %v", err)
		}
		if !bytes.Equal(out.Bytes(), stream) || size != int64(len(stream)) || dials.Load() != 1 {
			t.Errorf("got %d bytes (header %d, %d dials), want %d", out.Len(), size, dials.Load(), len(stream))
		}
	})
	t.Run("more than announced", func(t *testing.T) {
		c, _ := fakeDataGuest(t, 1, sendOut(int64(len(stream)), []byte("zzzz")))
		dest := filepath.Join(t.TempDir(), "dest")
		err := tarcopy.ExtractFrom(func(w io.Writer) error {
			return c.CopyOut(dataCtx(t), "/tree", w)
		}, dest, tarcopy.ExtractOptions{Base: "tree"})
		if !errors.Is(err, agent.ErrCopyTooLarge) {
			t.Errorf("copy out: %v, want ErrCopyTooLarge", err)
		}
	})
	t.Run("less announced", func(t *testing.T) {
		c, _ := fakeDataGuest(t, 1, sendOut(2560, nil))
		var got int64
		err := c.CopyOut(dataCtx(t), "/tree", countingWriter{io.Discard, &got})
		if !errors.Is(err, agent.ErrCopyTooLarge) || got > 2560 {
			t.Errorf("copy out: %v after %d bytes, want ErrCopyTooLarge within 2560", err, got)
		}
	})
	t.Run("stderr frame", func(t *testing.T) {
		c, _ := fakeDataGuest(t, 1, func(g *guestTransfer) {
			send(g.ch, agentproto.ReqCopyHeader, agentproto.CopyHeader{Size: 10, Entries: 1})
			g.ack(t)
			g.frame(agentproto.DataFrameStderr, []byte("x"))
			io.Copy(io.Discard, g.ch)
		})
		err := c.CopyOut(dataCtx(t), "/tree", io.Discard)
		if !errors.Is(err, agentproto.ErrDataFrame) {
			t.Errorf("copy out: %v, want ErrDataFrame", err)
		}
	})
	t.Run("guest error", func(t *testing.T) {
		c, _ := fakeDataGuest(t, 1, func(g *guestTransfer) {
			send(g.ch, agentproto.ReqCopyHeader, agentproto.CopyHeader{Size: 1 << 20, Entries: 1})
			g.ack(t)
			g.frame(agentproto.DataFrameData, stream[:512])
			g.status("read /tree/big: input/output error")
		})
		err := c.CopyOut(dataCtx(t), "/tree", io.Discard)
		if !errors.Is(err, agent.ErrCopyFailed) || !strings.Contains(err.Error(), "input/output error") {
			t.Errorf("copy out: %v, want the guest's error", err)
		}
	})
}

func TestFakeGuestCopyIn(t *testing.T) {
	stream := tarStream(t)
	got := make(chan []byte, 1)
	c, dials := fakeDataGuest(t, 1, func(g *guestTransfer) {
		g.ack(t)
		var b bytes.Buffer
		dr := agentproto.NewDataReader(g.port, 0)
		for {
			kind, p, err := dr.Next()
			if err != nil {
				g.status(err.Error())
				return
			}
			if kind == agentproto.DataFrameEnd {
				break
			}
			b.Write(p)
		}
		g.frame(agentproto.DataFrameEnd, nil)
		got <- b.Bytes()
		g.status("")
	})
	if err := c.CopyIn(dataCtx(t), bytes.NewReader(stream), "/dest", agent.CopyOptions{}); err != nil {
		t.Fatalf("copy in: %v", err)
	}
	if b := <-got; !bytes.Equal(b, stream) || dials.Load() != 1 {
		t.Errorf("guest got %d bytes (%d dials), want %d", len(b), dials.Load(), len(stream))
	}
}

func TestFakeGuestFallbackAndCancel(t *testing.T) {
	c, dials := fakeDataGuest(t, 1, echoExec(t))
	// The one port is held by a running exec.
	pr, pw := io.Pipe()
	defer pw.Close()
	ctx, cancel := context.WithCancel(dataCtx(t))
	defer cancel()
	var out bytes.Buffer
	first := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, agent.ExecOptions{Argv: []string{"cat"}, Stdin: pr, Stdout: &out})
		first <- err
	}()
	pw.Write([]byte("hello"))
	harness.WaitFor(t, 10*time.Second, "the first exec to take the port", func() bool { return dials.Load() == 1 })
	// The next one goes over SSH (the fake answers 99 there).
	code, err := c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"true"}})
	if err != nil || code != 99 {
		t.Errorf("exec with no free port: %d, %v; want 99 (SSH path)", code, err)
	}
	if c.FreeDataPorts() != 0 {
		t.Errorf("a port is free while an exec holds it")
	}
	// Cancelled mid-stream: the port comes back for the next transfer.
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled exec: %v", err)
	}
	harness.WaitFor(t, 10*time.Second, "the port to be free", func() bool { return c.FreeDataPorts() == 1 })
	code, err = c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"cat"}, Stdin: strings.NewReader("again")})
	if err != nil || code != 3 || dials.Load() != 2 {
		t.Errorf("exec after the cancel: %d, %v, %d dials; want 3 over the port", code, err, dials.Load())
	}
}

func TestCipherFollowsTheOption(t *testing.T) {
	km, _ := agent.GenerateKeys()
	keys, _ := km.Keys()
	for _, want := range []string{ssh.CipherChaCha20Poly1305, ssh.CipherAES128GCM} {
		prefs := agent.CiphersAESNI
		if want == ssh.CipherChaCha20Poly1305 {
			prefs = agent.CiphersSoftware
		}
		host := serve(t, km)
		c, err := agent.Dial(dataCtx(t), func(context.Context) (net.Conn, error) { return host, nil }, keys, nil, agent.WithCiphers(prefs...))
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Cipher(); got != want {
			t.Errorf("cipher %q with %v, want %q", got, prefs, want)
		}
		c.Close()
	}
}

// slowWriter blocks its first write until release is closed.
type slowWriter struct {
	release <-chan struct{}
	buf     bytes.Buffer
}

func (w *slowWriter) Write(p []byte) (int, error) {
	<-w.release
	return w.buf.Write(p)
}

// TestFakeGuestSlowWriterAfterTheChannelClosed: the bound on a silent
// stream after the channel closed counts only the wait for the guest's
// bytes, not the time the writer takes.
func TestFakeGuestSlowWriterAfterTheChannelClosed(t *testing.T) {
	defer agent.SetDataDrainGrace(20 * time.Millisecond)()
	exited := make(chan struct{})
	c, _ := fakeDataGuest(t, 1, func(g *guestTransfer) {
		g.ack(t)
		g.frame(agentproto.DataFrameData, []byte("first"))
		g.frame(agentproto.DataFrameData, []byte(" second"))
		g.frame(agentproto.DataFrameEnd, nil)
		g.exit(0)
		close(exited)
	})
	release := make(chan struct{})
	go func() {
		<-exited
		time.Sleep(200 * time.Millisecond) // many times the grace
		close(release)
	}()
	w := &slowWriter{release: release}
	code, err := c.Exec(dataCtx(t), agent.ExecOptions{Argv: []string{"cat"}, Stdout: w})
	if err != nil || code != 0 || w.buf.String() != "first second" {
		t.Errorf("exec: %d, %v, %q; want 0 and the whole output", code, err, w.buf.String())
	}
}

func TestFakeGuestCopyBadAck(t *testing.T) {
	badAck := func(g *guestTransfer) {
		if g.kind == agentproto.ChanCopyOut {
			send(g.ch, agentproto.ReqCopyHeader, agentproto.CopyHeader{Size: 10, Entries: 1})
		}
		agentproto.WriteDataAck(g.port, make([]byte, agentproto.DataTokenSize))
		io.Copy(io.Discard, g.ch) // until the host closes the channel
	}
	c, _ := fakeDataGuest(t, 1, badAck)
	err := c.CopyIn(dataCtx(t), bytes.NewReader(tarStream(t)), "/dest", agent.CopyOptions{})
	if !errors.Is(err, agentproto.ErrDataHandshake) {
		t.Errorf("copy in: %v, want a handshake error", err)
	}
	c, _ = fakeDataGuest(t, 1, badAck)
	var out bytes.Buffer
	err = c.CopyOut(dataCtx(t), "/tree", &out)
	if !errors.Is(err, agentproto.ErrDataHandshake) || out.Len() != 0 {
		t.Errorf("copy out: %v after %d bytes, want a handshake error and nothing written", err, out.Len())
	}
}

// TestDirectCopyInFollowsTheOption: copies in ask the agent for O_DIRECT
// writes only when the client was dialed WithDirectCopyIn(true).
func TestDirectCopyInFollowsTheOption(t *testing.T) {
	for _, on := range []bool{false, true} {
		asked := make(chan bool, 1)
		c, _ := fakeDataGuest(t, 1, func(g *guestTransfer) {
			asked <- g.directIO
			g.ack(t)
			dr := agentproto.NewDataReader(g.port, 0)
			for {
				kind, _, err := dr.Next()
				if err != nil || kind == agentproto.DataFrameEnd {
					break
				}
			}
			g.status("")
		}, agent.WithDirectCopyIn(on))
		if err := c.CopyIn(dataCtx(t), bytes.NewReader(tarStream(t)), "/dest", agent.CopyOptions{}); err != nil {
			t.Fatalf("copy in: %v", err)
		}
		if got := <-asked; got != on {
			t.Errorf("WithDirectCopyIn(%v): the request's DirectIO is %v", on, got)
		}
	}
}
