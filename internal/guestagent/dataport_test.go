package guestagent_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/guestagent"
	"github.com/bangerdev/banger/internal/tarcopy"
)

// fakePorts are data ports for Hooks.OpenDataPort: the test's host side
// dials port i (a socket pair per transfer) and the guest's next open of
// port i gets the other end.
type fakePorts struct {
	n     int
	conns []chan net.Conn
}

func newFakePorts(n int) *fakePorts {
	f := &fakePorts{n: n}
	for range n {
		f.conns = append(f.conns, make(chan net.Conn, 4))
	}
	return f
}

func (f *fakePorts) hooks() guestagent.Hooks {
	return guestagent.Hooks{DataPorts: f.n, OpenDataPort: f.open}
}

func (f *fakePorts) open(ctx context.Context, i int) (io.ReadWriteCloser, error) {
	select {
	case c := <-f.conns[i]:
		return c, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// dial connects the host to port i.
func (f *fakePorts) dial(t *testing.T, i int) net.Conn {
	t.Helper()
	guest, host := socketPair(t)
	t.Cleanup(func() { guest.Close(); host.Close() })
	f.conns[i] <- guest
	return host
}

// rawClient serves an agent with hooks and connects a plain SSH client to
// it (the test plays the host side of the data port protocol itself).
func rawClient(t *testing.T, hooks guestagent.Hooks) *ssh.Client {
	t.Helper()
	km := generateKeys(t)
	h := startServer(t, km, hooks)
	keys, err := km.Keys()
	if err != nil {
		t.Fatal(err)
	}
	return rawSSH(t, h.host, keys)
}

// rawSSH runs the host's SSH handshake on conn.
func rawSSH(t *testing.T, conn net.Conn, keys agent.Keys) *ssh.Client {
	t.Helper()
	cfg := &ssh.ClientConfig{
		User:            "root",
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(keys.ClientSigner)},
		HostKeyCallback: ssh.FixedHostKey(keys.HostPublic),
		Timeout:         10 * time.Second,
	}
	sc, chans, reqs, err := ssh.NewClientConn(conn, "agent", cfg)
	if err != nil {
		t.Fatalf("ssh handshake: %v", err)
	}
	c := ssh.NewClient(sc, chans, reqs)
	t.Cleanup(func() { c.Close() })
	return c
}

func newToken(t *testing.T) []byte {
	tok := make([]byte, agentproto.DataTokenSize)
	rand.Read(tok)
	return tok
}

// exitResult is an exec's end as the session channel reports it.
type exitResult struct {
	status int
	signal string
	stderr string // the channel's stderr (only set-up failures)
}

// dataExec is one exec on a data port as the test drives it.
type dataExec struct {
	ch    ssh.Channel
	exitc chan exitResult
}

// startDataExec opens a session and sends ReqExecArgv with ds; it fails
// the test when the request is refused.
func startDataExec(t *testing.T, c *ssh.Client, argv []string, ds *agentproto.DataStream) *dataExec {
	t.Helper()
	e, ok := tryDataExec(t, c, argv, ds, false)
	if !ok {
		t.Fatalf("exec request refused")
	}
	return e
}

func tryDataExec(t *testing.T, c *ssh.Client, argv []string, ds *agentproto.DataStream, pty bool) (*dataExec, bool) {
	t.Helper()
	ch, reqs, err := c.OpenChannel("session", nil)
	if err != nil {
		t.Fatalf("open session: %v", err)
	}
	t.Cleanup(func() { ch.Close() })
	e := &dataExec{ch: ch, exitc: make(chan exitResult, 1)}
	var stderr bytes.Buffer
	var wg sync.WaitGroup
	wg.Go(func() { io.Copy(&stderr, ch.Stderr()) })
	wg.Go(func() { io.Copy(io.Discard, ch) })
	go func() {
		res := exitResult{status: -1}
		for req := range reqs {
			switch req.Type {
			case "exit-status":
				var m agentproto.ExitStatusMsg
				ssh.Unmarshal(req.Payload, &m)
				res.status = int(m.Status)
			case "exit-signal":
				var m agentproto.ExitSignalMsg
				ssh.Unmarshal(req.Payload, &m)
				res.signal = m.Signal
			}
			if req.WantReply {
				req.Reply(false, nil)
			}
		}
		wg.Wait()
		res.stderr = stderr.String()
		e.exitc <- res
	}()
	if pty {
		ok, err := ch.SendRequest("pty-req", true, ssh.Marshal(agentproto.PtyReqMsg{Term: "xterm", Columns: 80, Rows: 24}))
		if err != nil || !ok {
			t.Fatalf("pty-req: %v %v", ok, err)
		}
	}
	payload, err := agentproto.MarshalPayload(agentproto.ExecRequest{Argv: argv, Data: ds})
	if err != nil {
		t.Fatal(err)
	}
	ok, err := ch.SendRequest(agentproto.ReqExecArgv, true, payload)
	if err != nil {
		t.Fatalf("exec request: %v", err)
	}
	return e, ok
}

func (e *dataExec) wait(t *testing.T) exitResult {
	t.Helper()
	select {
	case res := <-e.exitc:
		return res
	case <-time.After(30 * time.Second):
		t.Fatalf("no end of the exec session")
		return exitResult{}
	}
}

// hostHandshake connects the host to port i and runs its side of the
// handshake with token.
func hostHandshake(t *testing.T, fp *fakePorts, i int, token []byte) (net.Conn, error) {
	t.Helper()
	conn := fp.dial(t, i)
	return conn, handshakeOn(conn, token)
}

func handshakeOn(conn net.Conn, token []byte) error {
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	if err := agentproto.WriteDataHello(conn, token); err != nil {
		return err
	}
	return agentproto.ReadDataAck(conn, token)
}

// sendFrames sends r as DataFrameData frames of chunk bytes, then End.
func sendFrames(w io.Writer, r io.Reader, chunk int) error {
	dw := agentproto.NewDataWriter(w)
	if r != nil {
		if _, err := dw.Pump(agentproto.DataFrameData, r, chunk); err != nil {
			return err
		}
	}
	return dw.End()
}

// readFrames reads the guest's frames until its End: data to stdout,
// stderr frames to stderr.
func readFrames(r io.Reader, stdout, stderr io.Writer) error {
	dr := agentproto.NewDataReader(r, 0)
	for {
		kind, p, err := dr.Next()
		if err != nil {
			return err
		}
		switch kind {
		case agentproto.DataFrameData:
			stdout.Write(p)
		case agentproto.DataFrameStderr:
			stderr.Write(p)
		case agentproto.DataFrameEnd:
			return nil
		}
		if len(p) > agentproto.GuestDataChunk {
			return fmt.Errorf("guest frame of %d bytes, more than GuestDataChunk", len(p))
		}
	}
}

// runDataExec runs argv with stdin through data port i and returns its
// output and end. It checks that the guest closed the port before it
// reported the exit.
func runDataExec(t *testing.T, c *ssh.Client, fp *fakePorts, i int, argv []string, stdin []byte) (stdout, stderr []byte, res exitResult) {
	t.Helper()
	return runDataExecOn(t, c, func() net.Conn { return fp.dial(t, i) }, i, argv, stdin, true)
}

// runDataExecOn is runDataExec with the host's connection to the port
// made by dial; closed tells whether the host sees the guest's closing
// (not through QEMU, which keeps the host's socket connected).
func runDataExecOn(t *testing.T, c *ssh.Client, dial func() net.Conn, i int, argv []string, stdin []byte, closed bool) (stdout, stderr []byte, res exitResult) {
	t.Helper()
	tok := newToken(t)
	e := startDataExec(t, c, argv, &agentproto.DataStream{Port: i, Token: tok})
	conn := dial()
	if err := handshakeOn(conn, tok); err != nil {
		t.Fatalf("handshake: %v", err)
	}
	conn.SetDeadline(time.Now().Add(3 * time.Minute)) // a slow emulated guest
	sent := make(chan error, 1)
	go func() { sent <- sendFrames(conn, bytes.NewReader(stdin), 64<<10) }()
	var out, errb bytes.Buffer
	if err := readFrames(conn, &out, &errb); err != nil {
		t.Fatalf("read frames: %v", err)
	}
	res = e.wait(t)
	// The port was closed before the exit status: nothing follows End.
	if closed {
		if n, err := conn.Read(make([]byte, 1)); n != 0 || !portClosed(err) {
			t.Errorf("after the exit: read %d bytes, %v; want end of file (port closed)", n, err)
		}
	}
	if err := <-sent; err != nil && len(stdin) > 0 {
		t.Logf("send stdin: %v", err)
	}
	conn.Close()
	return out.Bytes(), errb.Bytes(), res
}

// portClosed tells whether a read error is the guest's end closed (a
// unix socket closed with unread data resets the connection).
func portClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}

func TestDataExec(t *testing.T) {
	fp := newFakePorts(2)
	c := rawClient(t, fp.hooks())
	stdout, stderr, res := runDataExec(t, c, fp, 1,
		[]string{"sh", "-c", "cat; echo err1 >&2; echo out2; exit 3"}, []byte("hello\n"))
	if got, want := string(stdout), "hello\nout2\n"; got != want {
		t.Errorf("stdout = %q, want %q", got, want)
	}
	if got, want := string(stderr), "err1\n"; got != want {
		t.Errorf("stderr = %q, want %q", got, want)
	}
	if res.status != 3 || res.stderr != "" {
		t.Errorf("exit %+v, want status 3 and nothing on the channel", res)
	}
	// A command that can't start says so on the port's stderr.
	_, stderr, res = runDataExec(t, c, fp, 0, []string{"banger-no-such-program"}, nil)
	if res.status != 127 || !strings.Contains(string(stderr), "no such file") {
		t.Errorf("missing program: exit %+v, stderr %q", res, stderr)
	}
}

func TestDataExecBigStreams(t *testing.T) {
	fp := newFakePorts(1)
	c := rawClient(t, fp.hooks())
	in := make([]byte, 6<<20+12345)
	rand.Read(in)
	// stdout: stdin echoed; stderr: 3 MB of a known pattern, at the
	// same time.
	stdout, stderr, res := runDataExec(t, c, fp, 0,
		[]string{"sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x >&2 & cat; wait"}, in)
	if res.status != 0 {
		t.Fatalf("exit %+v", res)
	}
	if !bytes.Equal(stdout, in) {
		t.Errorf("stdout: %d bytes, differs from the %d bytes of stdin", len(stdout), len(in))
	}
	if len(stderr) != 3000000 || strings.Trim(string(stderr), "x") != "" {
		t.Errorf("stderr: %d bytes, want 3000000 x", len(stderr))
	}
	// Again on the same port: nothing of the first transfer leaks.
	stdout, _, res = runDataExec(t, c, fp, 0, []string{"echo", "second"}, nil)
	if string(stdout) != "second\n" || res.status != 0 {
		t.Errorf("second transfer: %q, %+v", stdout, res)
	}
}

func TestDataExecRefused(t *testing.T) {
	fp := newFakePorts(2)
	c := rawClient(t, fp.hooks())
	dir := t.TempDir()
	marker := filepath.Join(dir, "ran")
	argv := []string{"touch", marker}

	t.Run("wrong token", func(t *testing.T) {
		e := startDataExec(t, c, argv, &agentproto.DataStream{Port: 0, Token: newToken(t)})
		_, err := hostHandshake(t, fp, 0, newToken(t))
		if !errors.Is(err, io.EOF) && !errors.Is(err, agentproto.ErrDataHandshake) {
			t.Errorf("host handshake: %v, want a failure", err)
		}
		res := e.wait(t)
		if res.status != 255 || !strings.Contains(res.stderr, "handshake") {
			t.Errorf("exit %+v, want status 255 and a handshake error", res)
		}
	})
	t.Run("port out of range", func(t *testing.T) {
		e := startDataExec(t, c, argv, &agentproto.DataStream{Port: 2, Token: newToken(t)})
		res := e.wait(t)
		if res.status != 255 || !strings.Contains(res.stderr, "data port 2: the guest has 2") {
			t.Errorf("exit %+v", res)
		}
	})
	t.Run("short token", func(t *testing.T) {
		if _, ok := tryDataExec(t, c, argv, &agentproto.DataStream{Port: 0, Token: []byte("x")}, false); ok {
			t.Errorf("exec with a 1-byte token accepted")
		}
	})
	t.Run("pty", func(t *testing.T) {
		if _, ok := tryDataExec(t, c, argv, &agentproto.DataStream{Port: 0, Token: newToken(t)}, true); ok {
			t.Errorf("exec with a data port and a terminal accepted")
		}
	})
	if _, err := os.Stat(marker); err == nil {
		t.Errorf("a refused exec ran its command")
	}
	// The port is free again.
	stdout, _, res := runDataExec(t, c, fp, 0, []string{"echo", "ok"}, nil)
	if string(stdout) != "ok\n" || res.status != 0 {
		t.Errorf("after refusals: %q, %+v", stdout, res)
	}
}

// TestDataExecHostGone: the host disconnecting mid-stream, or closing the
// session, abandons the transfer (the command is killed) and frees the
// port for the next one.
func TestDataExecHostGone(t *testing.T) {
	fp := newFakePorts(1)
	c := rawClient(t, fp.hooks())
	start := func(t *testing.T) (*dataExec, net.Conn) {
		tok := newToken(t)
		e := startDataExec(t, c, []string{"cat", "/dev/zero"}, &agentproto.DataStream{Port: 0, Token: tok})
		conn, err := hostHandshake(t, fp, 0, tok)
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		// Some output flows.
		if _, err := io.ReadFull(conn, make([]byte, 1<<20)); err != nil {
			t.Fatalf("read: %v", err)
		}
		return e, conn
	}
	t.Run("port closed", func(t *testing.T) {
		e, conn := start(t)
		conn.Close()
		if res := e.wait(t); res.signal != "KILL" {
			t.Errorf("exit %+v, want killed", res)
		}
	})
	t.Run("session closed", func(t *testing.T) {
		e, conn := start(t)
		e.ch.Close()
		e.wait(t)
		// The guest closed its end: the host reads to end of file.
		if _, err := io.Copy(io.Discard, conn); err != nil && !portClosed(err) {
			t.Errorf("host read after the session closed: %v", err)
		}
	})
	t.Run("next", func(t *testing.T) {
		stdout, _, res := runDataExec(t, c, fp, 0, []string{"echo", "again"}, nil)
		if string(stdout) != "again\n" || res.status != 0 {
			t.Errorf("after abandoned transfers: %q, %+v", stdout, res)
		}
	})
}

func TestDataExecBadFrames(t *testing.T) {
	fp := newFakePorts(1)
	c := rawClient(t, fp.hooks())
	for _, tc := range []struct {
		name string
		hdr  func([]byte)
	}{
		{"unknown kind", func(h []byte) { agentproto.PutDataHeader(h, 9, 0) }},
		{"stderr from the host", func(h []byte) { agentproto.PutDataHeader(h, agentproto.DataFrameStderr, 0) }},
		{"over the limit", func(h []byte) { agentproto.PutDataHeader(h, agentproto.DataFrameData, agentproto.MaxDataFrame+1) }},
		{"empty data", func(h []byte) { agentproto.PutDataHeader(h, agentproto.DataFrameData, 0) }},
		{"after the end", func(h []byte) {
			agentproto.PutDataHeader(h[:agentproto.DataHeaderSize], agentproto.DataFrameEnd, 0)
			agentproto.PutDataHeader(h[agentproto.DataHeaderSize:], agentproto.DataFrameData, 1)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := newToken(t)
			e := startDataExec(t, c, []string{"sleep", "30"}, &agentproto.DataStream{Port: 0, Token: tok})
			conn, err := hostHandshake(t, fp, 0, tok)
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			// Room for a second header and its one byte of payload.
			hdr := make([]byte, 2*agentproto.DataHeaderSize+1)
			tc.hdr(hdr[:2*agentproto.DataHeaderSize])
			if hdr[agentproto.DataHeaderSize] == 0 {
				hdr = hdr[:agentproto.DataHeaderSize]
			}
			conn.Write(hdr)
			if res := e.wait(t); res.signal != "KILL" {
				t.Errorf("exit %+v, want the command killed", res)
			}
		})
	}
}

// copyChannel opens a copy channel with req; its copy status (or "" when
// the channel closed without one) and header come on the channels.
func copyChannel(t *testing.T, c *ssh.Client, kind string, req agentproto.CopyRequest) (ssh.Channel, chan agentproto.CopyHeader, chan *agentproto.CopyStatus) {
	t.Helper()
	payload, err := agentproto.MarshalPayload(req)
	if err != nil {
		t.Fatal(err)
	}
	ch, reqs, err := c.OpenChannel(kind, payload)
	if err != nil {
		t.Fatalf("open %s: %v", kind, err)
	}
	t.Cleanup(func() { ch.Close() })
	go io.Copy(io.Discard, ch)
	headerc := make(chan agentproto.CopyHeader, 1)
	statusc := make(chan *agentproto.CopyStatus, 1)
	go func() {
		var st *agentproto.CopyStatus
		for r := range reqs {
			switch r.Type {
			case agentproto.ReqCopyHeader:
				var h agentproto.CopyHeader
				agentproto.UnmarshalPayload(r.Payload, &h)
				headerc <- h
			case agentproto.ReqCopyStatus:
				st = new(agentproto.CopyStatus)
				agentproto.UnmarshalPayload(r.Payload, st)
			}
		}
		statusc <- st
	}()
	return ch, headerc, statusc
}

func waitStatus(t *testing.T, statusc chan *agentproto.CopyStatus) *agentproto.CopyStatus {
	t.Helper()
	select {
	case st := <-statusc:
		if st == nil {
			t.Fatalf("copy channel closed without a status")
		}
		return st
	case <-time.After(30 * time.Second):
		t.Fatalf("no copy status")
		return nil
	}
}

func TestDataCopy(t *testing.T) {
	fp := newFakePorts(1)
	c := rawClient(t, fp.hooks())
	src := filepath.Join(t.TempDir(), "tree")
	buildTree(t, src)
	big := make([]byte, tarcopy.DirectMin+777) // written with O_DIRECT in, and its tail
	rand.Read(big)
	if err := os.WriteFile(filepath.Join(src, "big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	mtime := time.Unix(1700000000, 0)
	if err := os.Chtimes(filepath.Join(src, "big"), mtime, mtime); err != nil {
		t.Fatal(err)
	}

	// Out.
	tok := newToken(t)
	_, headerc, statusc := copyChannel(t, c, agentproto.ChanCopyOut, agentproto.CopyRequest{Path: src, Data: &agentproto.DataStream{Port: 0, Token: tok}})
	var hdr agentproto.CopyHeader
	select {
	case hdr = <-headerc: // announced before the port is set up
	case <-time.After(30 * time.Second):
		t.Fatal("no copy header")
	}
	conn, err := hostHandshake(t, fp, 0, tok)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	var archive bytes.Buffer
	short := 0 // data frames of less than GuestDataChunk
	dr := agentproto.NewDataReader(conn, 0)
	for {
		kind, p, err := dr.Next()
		if err != nil {
			t.Fatalf("read frames: %v", err)
		}
		if kind == agentproto.DataFrameEnd {
			break
		}
		if kind != agentproto.DataFrameData || len(p) > agentproto.GuestDataChunk {
			t.Fatalf("frame of kind %d, %d bytes", kind, len(p))
		}
		if len(p) < agentproto.GuestDataChunk {
			short++
		}
		archive.Write(p)
	}
	if st := waitStatus(t, statusc); st.Error != "" {
		t.Fatalf("copy out: %s", st.Error)
	}
	if int64(archive.Len()) != hdr.Size {
		t.Errorf("stream of %d bytes, announced %d", archive.Len(), hdr.Size)
	}
	// Full frames (one 32 KiB port write each), but the last.
	if short > 1 {
		t.Errorf("%d data frames shorter than GuestDataChunk, want at most the last", short)
	}
	if n, err := conn.Read(make([]byte, 1)); n != 0 || !portClosed(err) {
		t.Errorf("after the status: read %d, %v; want the port closed", n, err)
	}
	conn.Close()

	// In, on the same port.
	dst := filepath.Join(t.TempDir(), "dst")
	tok = newToken(t)
	_, _, statusc = copyChannel(t, c, agentproto.ChanCopyIn, agentproto.CopyRequest{Path: dst, Archive: true, DirectIO: true, Data: &agentproto.DataStream{Port: 0, Token: tok}})
	conn, err = hostHandshake(t, fp, 0, tok)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	if err := sendFrames(conn, bytes.NewReader(archive.Bytes()), 100<<10); err != nil {
		t.Fatalf("send: %v", err)
	}
	if st := waitStatus(t, statusc); st.Error != "" {
		t.Fatalf("copy in: %s", st.Error)
	}
	compareTrees(t, src, filepath.Join(dst, "tree"))
	got, err := os.ReadFile(filepath.Join(dst, "tree", "big"))
	if err != nil || !bytes.Equal(got, big) {
		t.Errorf("big file: %d bytes, err %v; differs", len(got), err)
	}
	conn.Close()
}

func TestDataCopyFailures(t *testing.T) {
	fp := newFakePorts(1)
	c := rawClient(t, fp.hooks())
	src := filepath.Join(t.TempDir(), "src")
	if err := os.WriteFile(src, make([]byte, 8<<20), 0o644); err != nil {
		t.Fatal(err)
	}

	t.Run("wrong token", func(t *testing.T) {
		_, _, statusc := copyChannel(t, c, agentproto.ChanCopyIn, agentproto.CopyRequest{Path: t.TempDir(), Data: &agentproto.DataStream{Port: 0, Token: newToken(t)}})
		hostHandshake(t, fp, 0, newToken(t))
		if st := waitStatus(t, statusc); !strings.Contains(st.Error, "handshake") {
			t.Errorf("status %q, want a handshake error", st.Error)
		}
	})
	t.Run("in: host gone", func(t *testing.T) {
		tok := newToken(t)
		dst := t.TempDir()
		_, _, statusc := copyChannel(t, c, agentproto.ChanCopyIn, agentproto.CopyRequest{Path: dst, Data: &agentproto.DataStream{Port: 0, Token: tok}})
		conn, err := hostHandshake(t, fp, 0, tok)
		if err != nil {
			t.Fatal(err)
		}
		var tb bytes.Buffer
		tw := tar.NewWriter(&tb)
		tw.WriteHeader(&tar.Header{Name: "f", Mode: 0o644, Size: 1 << 20, Typeflag: tar.TypeReg})
		tw.Write(make([]byte, 1<<20))
		agentproto.NewDataWriter(conn).WriteFrame(agentproto.DataFrameData, append(make([]byte, agentproto.DataHeaderSize), tb.Bytes()[:100000]...))
		conn.Close()
		if st := waitStatus(t, statusc); !strings.Contains(st.Error, "unexpected EOF") {
			t.Errorf("status %q, want an unexpected end of stream", st.Error)
		}
	})
	t.Run("in: bad frame", func(t *testing.T) {
		tok := newToken(t)
		_, _, statusc := copyChannel(t, c, agentproto.ChanCopyIn, agentproto.CopyRequest{Path: t.TempDir(), Data: &agentproto.DataStream{Port: 0, Token: tok}})
		conn, err := hostHandshake(t, fp, 0, tok)
		if err != nil {
			t.Fatal(err)
		}
		hdr := make([]byte, agentproto.DataHeaderSize)
		agentproto.PutDataHeader(hdr, agentproto.DataFrameData, agentproto.MaxDataFrame+1)
		conn.Write(hdr)
		if st := waitStatus(t, statusc); !strings.Contains(st.Error, agentproto.ErrDataFrame.Error()) {
			t.Errorf("status %q, want a bad frame", st.Error)
		}
	})
	t.Run("out: host gone", func(t *testing.T) {
		tok := newToken(t)
		_, _, statusc := copyChannel(t, c, agentproto.ChanCopyOut, agentproto.CopyRequest{Path: src, Data: &agentproto.DataStream{Port: 0, Token: tok}})
		conn, err := hostHandshake(t, fp, 0, tok)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadFull(conn, make([]byte, 100000))
		conn.Close()
		if st := waitStatus(t, statusc); st.Error == "" {
			t.Errorf("copy out to a host gone: no error")
		}
	})
	t.Run("out: the host's end frame", func(t *testing.T) {
		tok := newToken(t)
		_, _, statusc := copyChannel(t, c, agentproto.ChanCopyOut, agentproto.CopyRequest{Path: src, Data: &agentproto.DataStream{Port: 0, Token: tok}})
		conn, err := hostHandshake(t, fp, 0, tok)
		if err != nil {
			t.Fatal(err)
		}
		sendFrames(conn, nil, 0) // the host has nothing to send: End
		var archive bytes.Buffer
		if err := readFrames(conn, &archive, io.Discard); err != nil {
			t.Fatal(err)
		}
		if st := waitStatus(t, statusc); st.Error != "" || archive.Len() < 8<<20 {
			t.Errorf("copy out with the host's end frame: %q, %d bytes", st.Error, archive.Len())
		}
	})
	t.Run("out: data from the host", func(t *testing.T) {
		tok := newToken(t)
		_, _, statusc := copyChannel(t, c, agentproto.ChanCopyOut, agentproto.CopyRequest{Path: src, Data: &agentproto.DataStream{Port: 0, Token: tok}})
		conn, err := hostHandshake(t, fp, 0, tok)
		if err != nil {
			t.Fatal(err)
		}
		sendFrames(conn, strings.NewReader("x"), 1)
		// Not read: the guest's writes block once the socket is full, so
		// the frame is seen before the copy ends.
		if st := waitStatus(t, statusc); st.Error == "" {
			t.Errorf("copy out with data from the host: no error")
		}
	})
	t.Run("out: session closed", func(t *testing.T) {
		tok := newToken(t)
		ch, _, statusc := copyChannel(t, c, agentproto.ChanCopyOut, agentproto.CopyRequest{Path: src, Data: &agentproto.DataStream{Port: 0, Token: tok}})
		conn, err := hostHandshake(t, fp, 0, tok)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadFull(conn, make([]byte, 100000))
		ch.Close()
		<-statusc
		if _, err := io.Copy(io.Discard, conn); err != nil && !portClosed(err) {
			t.Errorf("host read after the channel closed: %v", err)
		}
	})
	t.Run("next", func(t *testing.T) {
		tok := newToken(t)
		_, _, statusc := copyChannel(t, c, agentproto.ChanCopyOut, agentproto.CopyRequest{Path: src, Data: &agentproto.DataStream{Port: 0, Token: tok}})
		conn, err := hostHandshake(t, fp, 0, tok)
		if err != nil {
			t.Fatal(err)
		}
		var archive bytes.Buffer
		if err := readFrames(conn, &archive, io.Discard); err != nil {
			t.Fatal(err)
		}
		if st := waitStatus(t, statusc); st.Error != "" {
			t.Fatalf("copy out: %s", st.Error)
		}
		tr := tar.NewReader(&archive)
		h, err := tr.Next()
		if err != nil || h.Size != 8<<20 {
			t.Fatalf("archive: %v %+v", err, h)
		}
		n, _ := io.Copy(io.Discard, tr)
		if n != 8<<20 {
			t.Errorf("file of %d bytes in the archive", n)
		}
	})
}
