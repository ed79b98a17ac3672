package rpc

import (
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
}

// Authorizer decides whether peer may call a method needing perm.
type Authorizer func(peer Peer, perm Perm) error

// Server dispatches calls to a table of handlers.
type Server struct {
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
func (s *Server) Handle(name string, perm Perm, h Handler) {
	if _, dup := s.methods[name]; dup {
		panic("rpc: duplicate method " + name)
	}
	s.methods[name] = method{perm: perm, handler: h}
}

// Serve accepts connections until ctx ends or l fails. It waits for
// in-flight calls to return before it returns.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	defer s.wg.Wait()
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
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
	// Every message is read through a budget: a client can't make the
	// daemon buffer more than about MaxRequestBytes (request) or
	// MaxFrameBytes (each later frame), whatever it sends.
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
	in.limit = MaxFrameBytes
	call := &Call{Method: req.Method, Params: req.Params, enc: json.NewEncoder(conn), frames: make(chan api.Frame, 64)}
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
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Read client frames; a closed connection cancels the call.
	go func() {
		defer cancel()
		defer close(call.frames)
		for {
			var msg Message
			in.reset()
			if err := dec.Decode(&msg); err != nil {
				if errors.Is(err, errdefs.ErrInvalid) {
					call.setInputErr(err)
				}
				return
			}
			if msg.Frame == nil {
				continue
			}
			select {
			case call.frames <- *msg.Frame:
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

// Call is one call being served.
type Call struct {
	Method string
	Params json.RawMessage
	Peer   Peer

	mu     sync.Mutex
	enc    *json.Encoder
	frames chan api.Frame
	inErr  error // a client frame broke the rules (too large); guarded by mu
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

// Send sends a frame to the client.
func (c *Call) Send(f api.Frame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.enc.Encode(Message{Frame: &f})
}

// Progress sends a progress frame; errors are ignored (the client may
// have gone; the call's context tells).
func (c *Call) Progress(p api.Progress) {
	_ = c.Send(api.Frame{Type: api.FrameProgress, Progress: &p})
}

// Frames returns the frames the client sends. The channel is closed when
// the client closes its side.
func (c *Call) Frames() <-chan api.Frame { return c.frames }

func (c *Call) finish(res any, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		_ = c.enc.Encode(Message{Error: &WireError{Code: errdefs.Code(err), Message: err.Error()}})
		return
	}
	raw, merr := json.Marshal(res)
	if merr != nil {
		_ = c.enc.Encode(Message{Error: &WireError{Code: api.CodeInternal, Message: "encode result: " + merr.Error()}})
		return
	}
	_ = c.enc.Encode(Message{Result: raw, Done: true})
}
