package rpc

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/sockbuf"
)

// Peer is the process at the other end of a connection: its credentials
// (SO_PEERCRED) and supplementary groups (SO_PEERGROUPS), as the kernel
// recorded them when it connected.
type Peer struct {
	PID    int32
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups
}

// InGroup reports whether gid is the peer's primary or a supplementary group.
func (p Peer) InGroup(gid uint32) bool {
	return p.GID == gid || slices.Contains(p.Groups, gid)
}

// unknownID is the uid and gid of a peer whose credentials can't be read
// ((uid_t)-1: nobody has it).
const unknownID = ^uint32(0)

// Perm is the permission a method needs.
type Perm int

const (
	// PermRead methods only report state.
	PermRead Perm = iota
	// PermWrite methods change state or run code in VMs.
	PermWrite
	// PermAdmin methods read arbitrary host paths or change images, which
	// root alone may do.
	PermAdmin
)

// Handler serves one call. Its result is JSON-encoded into the response.
type Handler func(ctx context.Context, call *Call) (any, error)

type method struct {
	perm    Perm
	handler Handler
	input   bool // the client may stream frames to the call
}

// Option changes how a method is served.
type Option func(*method)

// TakesInput lets the method's client stream frames to the call (stdin,
// resize, EOF), which the handler reads from Call.Frames. Any frame sent to
// a method registered without it ends the call with ErrInvalid.
func TakesInput() Option { return func(m *method) { m.input = true } }

// DefaultMaxCalls is how many calls a server serves at once by default.
const DefaultMaxCalls = 256

// frameQueue is how many client frames a call holds read but not yet
// taken by its handler. Past it the server stops reading the connection:
// the client's writes block (backpressure) instead of the daemon queueing.
const frameQueue = 2

// Authorizer decides whether peer may call a method needing perm.
type Authorizer func(peer Peer, perm Perm) error

// Server dispatches calls to a table of handlers.
type Server struct {
	// MaxCalls is how many connections (calls) are served at once; 0 means
	// DefaultMaxCalls. Past it, new connections wait in the listen backlog,
	// unread, until a call ends. Set it before Serve.
	MaxCalls int

	log       *slog.Logger
	authorize Authorizer
	methods   map[string]method
	wg        sync.WaitGroup
}

// NewServer returns a server; authorize may be nil (everyone allowed).
func NewServer(log *slog.Logger, authorize Authorizer) *Server {
	return &Server{log: log, authorize: authorize, methods: map[string]method{}}
}

// Handle registers a method. It panics on a duplicate name: the table is
// built once at start-up.
func (s *Server) Handle(name string, perm Perm, h Handler, opts ...Option) {
	if _, dup := s.methods[name]; dup {
		panic("rpc: duplicate method " + name)
	}
	m := method{perm: perm, handler: h}
	for _, o := range opts {
		o(&m)
	}
	s.methods[name] = m
}

// Serve accepts connections until ctx ends or l fails. It waits for
// in-flight calls to return before it returns.
//
// At most MaxCalls connections are served at once: the server accepts a
// connection only when a slot is free, so the connections past the cap
// cost the daemon nothing (the kernel holds them in the listen backlog)
// and their calls start, in order, as earlier calls end.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	defer s.wg.Wait()
	maxCalls := s.MaxCalls
	if maxCalls <= 0 {
		maxCalls = DefaultMaxCalls
	}
	slots := make(chan struct{}, maxCalls)
	for {
		select {
		case slots <- struct{}{}:
		default:
			s.log.Warn("rpc: too many calls at once; new calls wait until one ends", "max_calls", maxCalls)
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return nil
			}
		}
		conn, err := l.Accept()
		if err != nil {
			<-slots
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { <-slots }()
			s.serveConn(ctx, conn)
		}()
	}
}

// peerOf reads the peer's credentials. When only its supplementary groups
// can't be read (kernels before 4.13), the peer is returned without them,
// with groupsErr set: those groups then grant nothing.
func peerOf(conn net.Conn) (_ Peer, groupsErr, err error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return Peer{}, nil, errors.New("not a unix connection")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Peer{}, nil, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Peer{}, nil, err
	}
	if serr != nil {
		return Peer{}, nil, serr
	}
	p := Peer{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}
	if err := raw.Control(func(fd uintptr) { p.Groups, serr = peerGroups(int(fd)) }); err != nil {
		return Peer{}, nil, err
	}
	if serr != nil {
		return p, fmt.Errorf("SO_PEERGROUPS: %w", serr), nil
	}
	return p, nil, nil
}

// peerGroups reads the peer's supplementary groups (SO_PEERGROUPS, Linux
// 4.13+), taken by the kernel when the peer connected: unlike
// /proc/<pid>/status, it can't be raced by a peer that exits and whose pid
// is reused.
func peerGroups(fd int) ([]uint32, error) {
	buf := make([]uint32, 64)
	for {
		size := uint32(len(buf) * 4)
		var p unsafe.Pointer
		if len(buf) > 0 {
			p = unsafe.Pointer(&buf[0])
		}
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(p), uintptr(unsafe.Pointer(&size)), 0)
		switch {
		case errno == 0:
			return buf[:size/4], nil
		case errno == unix.ERANGE && int(size/4) > len(buf):
			buf = make([]uint32, size/4) // the kernel said how much it needs
		default:
			return nil, errno
		}
	}
}

func (s *Server) serveConn(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	// The request is read through a budget: a client can't make the daemon
	// buffer more than about MaxRequestBytes of it, whatever it sends.
	in := &budgetReader{r: conn, left: MaxRequestBytes, limit: MaxRequestBytes}
	dec := json.NewDecoder(in)
	var req Request
	if err := dec.Decode(&req); err != nil {
		switch {
		case errors.Is(err, errdefs.ErrInvalid):
			s.log.Warn("rpc: request refused", "err", err)
			_ = json.NewEncoder(conn).Encode(Message{Error: &WireError{Code: errdefs.Code(err), Message: err.Error()}})
		case !errors.Is(err, io.EOF):
			s.log.Debug("rpc: bad request", "err", err)
		}
		return
	}
	// What follows the request is read through a buffer that isn't the
	// request decoder's (grown to the request's size, it isn't kept for the
	// call). JSON lines are read one line at a time (json.Encoder ends each
	// message with a newline) through a buffer of MaxFrameBytes: a longer
	// line is refused. Binary messages are read header first: a payload
	// over MaxFrameBytes is refused unread.
	ahead, _ := io.ReadAll(dec.Buffered())
	rest := io.MultiReader(bytes.NewReader(ahead), conn)
	call := &Call{Method: req.Method, Params: req.Params, frames: make(chan api.Frame, frameQueue)}
	var next func() (api.Frame, bool, error)
	if req.Binary {
		call.bin = &binOut{w: conn}
		call.free = make(chan []byte, frameQueue+2)
		next = binaryFrames(bufio.NewReaderSize(rest, binaryReadBuffer), call.free)
	} else {
		call.enc = json.NewEncoder(conn)
		lines := bufio.NewReaderSize(rest, MaxFrameBytes)
		next = func() (api.Frame, bool, error) {
			msg, err := readMessage(lines)
			if err != nil || msg.Frame == nil {
				return api.Frame{}, false, err
			}
			return *msg.Frame, true, nil
		}
	}
	if req.Method == MethodBinaryProbe {
		call.finish(struct{}{}, nil)
		return
	}
	m, ok := s.methods[req.Method]
	if !ok {
		call.finish(nil, fmt.Errorf("method %s (client and daemon versions differ?): %w", errdefs.Quote(req.Method), errdefs.ErrUnknownMethod))
		return
	}
	peer, groupsErr, err := peerOf(conn)
	if groupsErr != nil {
		s.log.Warn("rpc: the peer's supplementary groups are unknown; they grant nothing", "peer_uid", peer.UID, "err", groupsErr)
	}
	if err != nil {
		// Unknown peers are never privileged.
		s.log.Warn("rpc: no peer credentials", "err", err)
		peer = Peer{PID: -1, UID: unknownID, GID: unknownID}
	}
	call.Peer = peer
	if s.authorize != nil {
		if err := s.authorize(peer, m.perm); err != nil {
			call.finish(nil, err)
			return
		}
	}
	if call.bin != nil {
		// A bulk stream's frames queue in the kernel while the client
		// is behind, rather than stalling the daemon's reads of the VM;
		// only for an authorized binary call (as root the buffer isn't
		// bounded by wmem_max). Best effort: the call works with any
		// buffer.
		if _, err := sockbuf.GrowSend(conn, sockbuf.Stream); err != nil {
			s.log.Debug("rpc: send buffer", "err", err)
		}
	}
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Read client frames; a closed connection cancels the call. The reader
	// holds at most one frame while the queue is full: it then stops
	// reading the connection until the handler takes one.
	go func() {
		defer cancel()
		defer close(call.frames)
		for {
			f, ok, err := next()
			if err != nil {
				if errors.Is(err, errdefs.ErrInvalid) {
					call.setInputErr(err)
				}
				return
			}
			if !ok {
				continue
			}
			if !m.input {
				call.setInputErr(fmt.Errorf("%s takes no input frames (got a %s frame): %w", req.Method, errdefs.Quote(f.Type), errdefs.ErrInvalid))
				return
			}
			select {
			case call.frames <- f:
			case <-cctx.Done():
				return
			}
		}
	}()
	log := s.log.With("method", req.Method, "peer_uid", peer.UID, "peer_pid", peer.PID)
	log.Debug("rpc call")
	res, err := m.handler(cctx, call)
	if ierr := call.inputErr(); ierr != nil {
		// The call was cancelled because of its input: say why.
		res, err = nil, ierr
	}
	if err != nil {
		log.Debug("rpc call failed", "err", err)
	}
	call.finish(res, err)
}

// readMessage reads the next message: one line of JSON, at most
// MaxFrameBytes long (r's buffer). A longer line, or one that isn't a
// message, is an ErrInvalid error; the end of the stream is io.EOF.
func readMessage(r *bufio.Reader) (Message, error) {
	for {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			return Message{}, fmt.Errorf("message larger than %d KiB: %w", MaxFrameBytes>>10, errdefs.ErrInvalid)
		}
		if err != nil {
			// A last line without its newline is a client that went away
			// mid-message.
			return Message{}, err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var msg Message
		if err := json.Unmarshal(line, &msg); err != nil {
			return Message{}, fmt.Errorf("bad message: %w: %w", err, errdefs.ErrInvalid)
		}
		return msg, nil
	}
}

// binaryFrames returns a reader of the binary messages in r: each call
// returns the next client frame (ok false for a message that is no frame), an
// ErrInvalid error for a message that breaks the rules (a payload over
// MaxFrameBytes, refused unread; a kind a client doesn't send; a message
// that isn't one), or the connection's error (io.EOF: the client closed
// its side). A stdin frame's data is read straight into a slice of its
// own, handed to the handler: one the handler gave back (Call.Release)
// when there is one in free.
func binaryFrames(r *bufio.Reader, free chan []byte) func() (api.Frame, bool, error) {
	var hdr [headerLen]byte
	first := true
	return func() (api.Frame, bool, error) {
		if first {
			// The request line's end (its newline), which the request's
			// decoder left unread: no kind is JSON white space.
			first = false
			for {
				b, err := r.Peek(1)
				if err != nil {
					return api.Frame{}, false, err
				}
				if b[0] != '\n' && b[0] != '\r' && b[0] != ' ' && b[0] != '\t' {
					break
				}
				_, _ = r.Discard(1)
			}
		}
		kind, n, err := readHeader(r, &hdr)
		if err != nil {
			return api.Frame{}, false, err
		}
		if n > MaxFrameBytes {
			return api.Frame{}, false, fmt.Errorf("message of %d KiB larger than %d KiB: %w", n>>10, MaxFrameBytes>>10, errdefs.ErrInvalid)
		}
		switch kind {
		case KindStdin:
			var data []byte
			switch {
			case n < smallFrame:
				data = make([]byte, n)
			default:
				select {
				case b := <-free:
					data = b[:n]
				default:
					data = make([]byte, n, MaxFrameBytes)
				}
			}
			if _, err := io.ReadFull(r, data); err != nil {
				return api.Frame{}, false, err
			}
			return api.Frame{Type: api.FrameStdin, Data: data}, true, nil
		case KindMessage:
			raw := make([]byte, n)
			if _, err := io.ReadFull(r, raw); err != nil {
				return api.Frame{}, false, err
			}
			var msg Message
			if err := json.Unmarshal(raw, &msg); err != nil {
				return api.Frame{}, false, fmt.Errorf("bad message: %w: %w", err, errdefs.ErrInvalid)
			}
			if msg.Frame == nil {
				return api.Frame{}, false, nil
			}
			return *msg.Frame, true, nil
		}
		return api.Frame{}, false, fmt.Errorf("message of kind %d, not one a client sends (client and daemon versions differ?): %w", kind, errdefs.ErrInvalid)
	}
}

// Call is one call being served.
type Call struct {
	Method string
	Params json.RawMessage
	Peer   Peer

	mu     sync.Mutex
	enc    *json.Encoder // JSON lines: writes messages; guarded by mu
	bin    *binOut       // binary framing: writes messages; guarded by mu
	frames chan api.Frame
	free   chan []byte // binary framing: data buffers given back (Release)
	inErr  error       // a client frame broke the rules (too large); guarded by mu
}

// smallFrame: stdin data shorter than this (typing) gets a slice of its
// size; longer data gets one of MaxFrameBytes, reused once released.
const smallFrame = 4 << 10

// Release gives f's data back to the call once the handler is done with
// it (it no longer reads or keeps f.Data): the next stdin frame may be read
// into it, sparing an allocation per frame. Optional: a frame not released
// is left to the garbage collector.
func (c *Call) Release(f api.Frame) {
	if c.free == nil || cap(f.Data) != MaxFrameBytes {
		return
	}
	select {
	case c.free <- f.Data[:0]:
	default:
	}
}

// Binary reports whether the call speaks binary framing.
func (c *Call) Binary() bool { return c.bin != nil }

// write sends msg; c.mu is held.
func (c *Call) write(msg Message) error {
	if c.bin == nil {
		return c.enc.Encode(msg)
	}
	raw, err := json.Marshal(msg)
	if err != nil {
		return err
	}
	return c.bin.write(KindMessage, raw)
}

func (c *Call) setInputErr(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.inErr = err
}

func (c *Call) inputErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.inErr
}

// Decode decodes the call's parameters into v, rejecting unknown fields.
func (c *Call) Decode(v any) error {
	if len(c.Params) == 0 {
		return nil
	}
	dec := json.NewDecoder(bytesReader(c.Params))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode %s params: %w: %w", c.Method, err, errdefs.ErrInvalid)
	}
	return nil
}

// Send sends a frame to the client. In binary framing a stdout or stderr
// frame goes as data (see SendData).
func (c *Call) Send(f api.Frame) error {
	if k := KindOf(f.Type); c.bin != nil && (k == KindStdout || k == KindStderr) {
		return c.SendData(k, f.Data)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.write(Message{Frame: &f})
}

// SendData sends p as stream data of kind (KindStdout or KindStderr). In
// binary framing it is written as it is, in frames of at most MaxDataFrame:
// no encoding, no copy; in JSON lines as frames with p base64-encoded. An
// empty p sends nothing. p is not retained: the caller may reuse it once
// SendData returns.
func (c *Call) SendData(kind Kind, p []byte) error {
	if kind != KindStdout && kind != KindStderr {
		return fmt.Errorf("rpc: a daemon sends no data of kind %d", kind)
	}
	if len(p) == 0 {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.bin == nil {
		return c.enc.Encode(Message{Frame: &api.Frame{Type: kind.frameType(), Data: p}})
	}
	for len(p) > 0 {
		n := min(len(p), MaxDataFrame)
		if err := c.bin.write(kind, p[:n]); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// Progress sends a progress frame; errors are ignored (the client may
// have gone; the call's context tells).
func (c *Call) Progress(p api.Progress) {
	_ = c.Send(api.Frame{Type: api.FrameProgress, Progress: &p})
}

// Frames returns the frames the client sends (only to a method registered
// with TakesInput). The channel is closed when the client closes its side
// or the call ends. The server reads a frame from the connection only when
// the handler has room for it: a handler that stops taking frames stops the
// client's writes. A handler done with a stdin frame's data may Release it.
func (c *Call) Frames() <-chan api.Frame { return c.frames }

func (c *Call) finish(res any, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		_ = c.write(Message{Error: &WireError{Code: errdefs.Code(err), Message: err.Error()}})
		return
	}
	raw, merr := json.Marshal(res)
	if merr != nil {
		_ = c.write(Message{Error: &WireError{Code: api.CodeInternal, Message: "encode result: " + merr.Error()}})
		return
	}
	_ = c.write(Message{Result: raw, Done: true})
}

// binOut writes binary messages; its user serializes the calls.
type binOut struct {
	w    io.Writer
	hdr  [headerLen]byte
	bufs [2][]byte
	nb   net.Buffers
}

// write sends one message: header and payload in one writev, p unchanged
// and not retained.
func (o *binOut) write(kind Kind, p []byte) error {
	putHeader(&o.hdr, kind, len(p))
	o.bufs = [2][]byte{o.hdr[:], p}
	o.nb = o.bufs[:]
	_, err := o.nb.WriteTo(o.w)
	o.bufs[1] = nil
	return err
}
