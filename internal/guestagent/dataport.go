package guestagent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bangerdev/banger/internal/agentproto"
)

// Data ports (agentproto's datastream.go): bulk streams beside the SSH
// connection, one transfer at a time per port.

const (
	// dataHelloTimeout bounds the wait for the host's preamble on a data
	// port once the request named it.
	dataHelloTimeout = 10 * time.Second
	// dataReadBuffer is the read buffer in front of a data port: frame
	// headers and small frames cost no read of their own.
	dataReadBuffer = 64 << 10
	// dataPollMax is the longest pause between two reads of a data port
	// whose host side is not connected yet (the pauses start at 1 ms).
	dataPollMax = 20 * time.Millisecond
)

// dataPorts are the agent's data ports: their discovery, and which are in
// a transfer.
type dataPorts struct {
	// hooked: Hooks.OpenDataPort is set, Hooks.DataPorts is the count.
	hooked bool
	fixed  int
	open   func(ctx context.Context, port int) (io.ReadWriteCloser, error)
	sysfs  string // "/sys"
	dev    string // "/dev"

	mu   sync.Mutex
	devs []string // device names of ports 0..n-1 (last scan)
	// busy holds a token per port in a transfer.
	busy [agentproto.MaxDataPorts]chan struct{}
}

func newDataPorts(hooks Hooks) *dataPorts {
	d := &dataPorts{sysfs: "/sys", dev: "/dev"}
	for i := range d.busy {
		d.busy[i] = make(chan struct{}, 1)
	}
	if hooks.OpenDataPort != nil {
		d.hooked, d.open = true, hooks.OpenDataPort
		d.fixed = min(max(hooks.DataPorts, 0), agentproto.MaxDataPorts)
	} else {
		d.open = d.openDevice
	}
	return d
}

// count is the number of data ports (agentproto.Info.DataPorts). Without
// hooks it looks them up under /sys each time (the ports may appear after
// the agent started; a few small reads, asked for by Info only).
func (d *dataPorts) count() int {
	if d.hooked {
		return d.fixed
	}
	devs := scanDataPorts(d.sysfs)
	d.mu.Lock()
	d.devs = devs
	d.mu.Unlock()
	return len(devs)
}

// scanDataPorts returns the device names of the consecutive data ports
// DataPortName(0), (1), ... found under sysfs/class/virtio-ports/*/name.
func scanDataPorts(sysfs string) []string {
	matches, _ := filepath.Glob(filepath.Join(sysfs, "class", "virtio-ports", "*", "name"))
	var found [agentproto.MaxDataPorts]string
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err != nil {
			continue
		}
		rest, ok := strings.CutPrefix(strings.TrimSpace(string(b)), agentproto.DataPortPrefix)
		if !ok {
			continue
		}
		i, err := strconv.Atoi(rest)
		if err != nil || i < 0 || i >= len(found) || agentproto.DataPortName(i) != agentproto.DataPortPrefix+rest {
			continue
		}
		found[i] = filepath.Base(filepath.Dir(m))
	}
	var devs []string
	for _, dev := range found {
		if dev == "" {
			break
		}
		devs = append(devs, dev)
	}
	return devs
}

// device returns the device path of data port i, looking the ports up
// again when i is not known yet.
func (d *dataPorts) device(i int) (string, error) {
	d.mu.Lock()
	n := len(d.devs)
	d.mu.Unlock()
	if i >= n {
		d.count()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if i < 0 || i >= len(d.devs) {
		return "", fmt.Errorf("data port %d (%s): %w", i, agentproto.DataPortName(i), errPortNotFound)
	}
	return filepath.Join(d.dev, d.devs[i]), nil
}

// openDevice opens the virtio-serial data port i and waits for the host's
// first bytes. The file goes through Go's poller (a virtio port supports
// poll), so Close interrupts a blocked Read or Write. A virtio port's
// reads return 0 bytes while its host side is not connected: they are
// retried, with pauses, until data comes or ctx ends.
func (d *dataPorts) openDevice(ctx context.Context, i int) (io.ReadWriteCloser, error) {
	dev, err := d.device(i)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open data port %d: %w", i, err)
	}
	stop := context.AfterFunc(ctx, func() { f.Close() })
	first, err := waitForHostBackoff(ctx, f, time.Millisecond, dataPollMax)
	if !stop() || err != nil {
		f.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("wait for the host on data port %d: %w", i, context.Cause(ctx))
		}
		return nil, fmt.Errorf("wait for the host on data port %d: %w", i, err)
	}
	return &replayPort{File: f, pending: first}, nil
}

// replayPort is an opened data port whose reads first return the bytes
// read while waiting for the host.
type replayPort struct {
	*os.File
	pending []byte
}

func (p *replayPort) Read(b []byte) (int, error) {
	if len(p.pending) > 0 {
		n := copy(b, p.pending)
		p.pending = p.pending[n:]
		return n, nil
	}
	return p.File.Read(b)
}

// errDataPortBusy: the port named by a request is in another transfer.
var errDataPortBusy = errors.New("data port busy")

// acquire sets up one transfer on the port ds names: it checks the
// request, opens the port, reads the host's preamble and checks its token,
// then answers. The wait for the host is bounded by ctx and
// dataHelloTimeout. Close the returned transfer when done (before the
// request's outcome is reported on SSH).
func (d *dataPorts) acquire(ctx context.Context, ds *agentproto.DataStream) (*dataConn, error) {
	ports := d.fixed
	if !d.hooked {
		d.mu.Lock()
		ports = len(d.devs)
		d.mu.Unlock()
		if ds.Port >= ports {
			ports = d.count()
		}
	}
	if err := ds.Validate(ports); err != nil {
		return nil, err
	}
	i := ds.Port
	hctx, cancel := context.WithTimeoutCause(ctx, dataHelloTimeout,
		fmt.Errorf("no host on data port %d after %s", i, dataHelloTimeout))
	defer cancel()
	// The host reuses a port once the previous request's channel closed;
	// the previous transfer may still be winding down here: wait for it.
	select {
	case d.busy[i] <- struct{}{}:
	case <-hctx.Done():
		return nil, fmt.Errorf("data port %d: %w (%w)", i, errDataPortBusy, context.Cause(hctx))
	}
	release := func() { <-d.busy[i] }
	rwc, err := d.open(hctx, i)
	if err != nil {
		release()
		return nil, err
	}
	dc := &dataConn{port: i, rwc: rwc, release: release}
	dc.r = bufio.NewReaderSize(rwc, dataReadBuffer)
	dc.w = agentproto.NewDataWriter(portWriter{dc})
	// The handshake is bounded too: a host that connects and stalls.
	stop := context.AfterFunc(hctx, func() { rwc.Close() })
	err = agentproto.ReadDataHello(dc.r, ds.Token)
	if err == nil {
		err = agentproto.WriteDataAck(rwc, ds.Token)
	}
	if !stop() && err == nil {
		err = context.Cause(hctx)
	}
	if err != nil {
		if hctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", err, context.Cause(hctx))
		}
		dc.Close()
		return nil, fmt.Errorf("data port %d: %w", i, err)
	}
	return dc, nil
}

// dataConn is one transfer on a data port.
type dataConn struct {
	port    int
	rwc     io.ReadWriteCloser
	r       *bufio.Reader
	w       *agentproto.DataWriter
	release func()
	// onFail is called once when the stream breaks (the host went away,
	// a bad frame, a failed write), before the port is closed.
	onFail func()

	closed    atomic.Bool
	closeOnce sync.Once
	failOnce  sync.Once
}

// portWriter is the port as the frame writer sees it: a failed write
// breaks the transfer.
type portWriter struct{ dc *dataConn }

func (w portWriter) Write(p []byte) (int, error) {
	n, err := w.dc.rwc.Write(p)
	if err != nil {
		w.dc.fail()
	}
	return n, err
}

// fail abandons a broken transfer (unless it was closed by us first):
// onFail, then the port closed, so that no goroutine stays blocked on it.
func (dc *dataConn) fail() {
	if dc.isClosed() {
		return
	}
	dc.failOnce.Do(func() {
		if dc.onFail != nil {
			dc.onFail()
		}
		dc.Close()
	})
}

// feedStdin writes the host's DataFrameData frames to stdin and closes it
// at the host's DataFrameEnd. It reads on after the End, to see the host
// go: end of file or a bad frame abandons the transfer. When the command
// no longer reads its stdin, the host's data is read and dropped.
func (dc *dataConn) feedStdin(stdin io.WriteCloser, log *slog.Logger) {
	defer stdin.Close()
	dr := agentproto.NewDataReader(dc.r, agentproto.MaxDataFrame)
	in, ended := stdin, false
	for {
		kind, p, err := dr.Next()
		switch {
		case err == nil && kind == agentproto.DataFrameData && !ended:
			if in != nil {
				if _, werr := in.Write(p); werr != nil {
					in.Close() // the command closed its stdin: drop the rest
					in = nil
				}
			}
			continue
		case err == nil && kind == agentproto.DataFrameEnd && !ended:
			ended = true
			if in != nil {
				in.Close()
				in = nil
			}
			continue
		case err == nil:
			err = fmt.Errorf("%w: kind %d from the host", agentproto.ErrDataFrame, kind)
			if ended {
				err = fmt.Errorf("%w: a frame after the end", agentproto.ErrDataFrame)
			}
		}
		if !dc.isClosed() {
			log.Warn("data port stream broken, abandoning the transfer", "port", dc.port, "err", err)
			dc.fail()
		}
		return
	}
}

// Close closes the port (interrupting a blocked read or write) and frees
// it for the next transfer.
func (dc *dataConn) Close() {
	dc.closeOnce.Do(func() {
		dc.closed.Store(true)
		dc.rwc.Close()
		dc.release()
	})
}

// isClosed tells whether Close was called (errors after it are ours).
func (dc *dataConn) isClosed() bool { return dc.closed.Load() }

// frameReader reads the payload of the host's DataFrameData frames up to
// its DataFrameEnd (io.EOF). The host's going away before the end gives
// io.ErrUnexpectedEOF; another kind, agentproto.ErrDataFrame.
type frameReader struct {
	dr  *agentproto.DataReader
	p   []byte
	err error
}

func (r *frameReader) Read(b []byte) (int, error) {
	for len(r.p) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		kind, p, err := r.dr.Next()
		switch {
		case err != nil:
			r.err = fmt.Errorf("data port: %w", err)
		case kind == agentproto.DataFrameEnd:
			r.err = io.EOF
		case kind == agentproto.DataFrameData:
			r.p = p
		default:
			r.err = fmt.Errorf("data port: %w: kind %d from the host", agentproto.ErrDataFrame, kind)
		}
	}
	n := copy(b, r.p)
	r.p = r.p[n:]
	return n, nil
}

// frameBuffer is an io.Writer that sends what is written to it as frames
// of kind, each (but the last, at Flush) a full frame of chunk payload
// bytes: one port write per frame, however small the writes.
type frameBuffer struct {
	w    *agentproto.DataWriter
	kind byte
	buf  []byte // header room, then the payload
	n    int    // payload bytes in buf
	err  error
}

func newFrameBuffer(w *agentproto.DataWriter, kind byte, chunk int) *frameBuffer {
	return &frameBuffer{w: w, kind: kind, buf: make([]byte, agentproto.DataHeaderSize+chunk)}
}

func (b *frameBuffer) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 && b.err == nil {
		k := copy(b.buf[agentproto.DataHeaderSize+b.n:], p)
		b.n += k
		written += k
		p = p[k:]
		if agentproto.DataHeaderSize+b.n == len(b.buf) {
			b.Flush()
		}
	}
	return written, b.err
}

// Flush sends the buffered bytes as one frame.
func (b *frameBuffer) Flush() error {
	if b.err != nil || b.n == 0 {
		return b.err
	}
	b.err = b.w.WriteFrame(b.kind, b.buf[:agentproto.DataHeaderSize+b.n])
	b.n = 0
	return b.err
}

// watchHost reads the port of a transfer the host sends nothing on (a
// copy out) but, at most, its end frame: its end of file (the host went
// away) or any other byte abandons the transfer, so that no write stays
// blocked on a port nobody reads.
func (dc *dataConn) watchHost(log *slog.Logger) {
	dr := agentproto.NewDataReader(dc.r, agentproto.DataHeaderSize)
	ended := false
	for {
		kind, _, err := dr.Next()
		if err == nil && kind == agentproto.DataFrameEnd && !ended {
			ended = true
			continue
		}
		if dc.isClosed() {
			return
		}
		if err == nil {
			err = fmt.Errorf("%w: unexpected data from the host", agentproto.ErrDataFrame)
		}
		log.Warn("data port stream broken, abandoning the transfer", "port", dc.port, "err", err)
		dc.fail()
		return
	}
}

// pumpFrames is how many frames one read of a command's output can fill.
const pumpFrames = 32

// pipeSize is the capacity asked for the pipes of a command's output on a
// data port: a writer fills it without waking the agent at each write.
const pipeSize = 1 << 20

// pumpPipe copies the pipe r to frames of kind until its end of file, like
// DataWriter.Pump but with fewer system calls (each costs much in an
// emulated guest): one readv fills the payloads of up to pumpFrames
// frames laid out in one buffer with room for their headers, and each
// full frame goes out in one write (GuestDataChunk: one port write). A
// last partial frame is held while the pipe has more (moved to the first
// frame, completed by the next read) and sent as soon as it is empty, so
// that a writer's sizes (32 KiB writes are common) don't add a small
// frame to each full one and nothing waits. It returns the first read or
// write error; a held frame is sent before a read error is returned (r
// closed once the output's grace ran out: nothing read is dropped).
func pumpPipe(dw *agentproto.DataWriter, kind byte, r *os.File) error {
	const (
		hdr   = agentproto.DataHeaderSize
		chunk = agentproto.GuestDataChunk
		frame = hdr + chunk
	)
	buf := make([]byte, pumpFrames*frame)
	iovs := make([][]byte, pumpFrames)
	for i := range iovs {
		iovs[i] = buf[i*frame+hdr : (i+1)*frame]
	}
	rc, err := r.SyscallConn()
	if err != nil {
		_, err := dw.Pump(kind, r, chunk)
		return err
	}
	pending := 0 // payload bytes held in the first frame
	for {
		var (
			n     int
			rerr  error
			flush bool
		)
		iovs[0] = buf[hdr+pending : frame]
		if err := rc.Read(func(fd uintptr) bool {
			n, rerr = unix.Readv(int(fd), iovs)
			if rerr == unix.EAGAIN {
				// The pipe is empty: send what is held, else wait.
				flush = pending > 0
				return flush
			}
			return true
		}); err != nil {
			// The pipe was closed (the output's grace ran out): what
			// was read from it still goes out, as over SSH.
			if pending > 0 {
				dw.WriteFrame(kind, buf[:hdr+pending])
			}
			return err
		}
		switch {
		case flush || (rerr == nil && n == 0):
			if pending > 0 {
				if err := dw.WriteFrame(kind, buf[:hdr+pending]); err != nil {
					return err
				}
				pending = 0
			}
			if !flush {
				return nil // end of file
			}
			continue
		case rerr == unix.EINTR:
			continue
		case rerr != nil:
			if pending > 0 {
				dw.WriteFrame(kind, buf[:hdr+pending])
			}
			return &os.PathError{Op: "readv", Path: r.Name(), Err: rerr}
		}
		total := pending + n
		full := total / chunk
		for i := range full {
			if err := dw.WriteFrame(kind, buf[i*frame:(i+1)*frame]); err != nil {
				return err
			}
		}
		pending = total % chunk
		if full > 0 && pending > 0 {
			copy(buf[hdr:hdr+pending], buf[full*frame+hdr:full*frame+hdr+pending])
		}
	}
}

// growPipe asks for a pipe of pipeSize bytes (best effort).
func growPipe(f *os.File) {
	if rc, err := f.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { unix.FcntlInt(fd, unix.F_SETPIPE_SZ, pipeSize) })
	}
}
