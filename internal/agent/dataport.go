package agent

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/bangerdev/banger/internal/agentproto"
)

// Data ports (agentproto's datastream.go): bulk streams of non-PTY execs
// and copies travel on a raw byte channel beside the SSH connection,
// which stays the control channel. A transfer takes a free port from the
// client's pool (never waiting: with none free it goes over SSH as
// before), sends its token inside the SSH request, and gives the port
// back only once the SSH channel has closed (the guest closes the port
// before), so no byte of one transfer reaches the next.

// DataDialFunc connects to data port port of the VM.
type DataDialFunc func(ctx context.Context, port int) (net.Conn, error)

const (
	// dataDialTimeout bounds the connection to a data port; a port that
	// can't be reached in time is given back and the transfer goes over
	// SSH.
	dataDialTimeout = 5 * time.Second
	// dataAckTimeout bounds the wait for the guest's answer on the port.
	dataAckTimeout = 10 * time.Second
	// hostDataChunk is the payload of the frames the host sends (the
	// host's writes to the socket aren't limited like the guest's).
	hostDataChunk = 256 << 10
	// hostReadBuffer is the read buffer in front of a data port: the
	// guest's frames are 32 KiB, a read takes several when they wait.
	hostReadBuffer = 1 << 20
)

// dataDrainGrace is how long the stream may stay silent once the SSH
// channel has closed: the guest ended it before (End frame), what is left
// is in buffers on the way.
var dataDrainGrace = 2 * time.Second

// ErrDataStream: the guest broke the data port's protocol (bad answer,
// bad frame, a stream that doesn't end). The errors also wrap
// agentproto.ErrDataHandshake or agentproto.ErrDataFrame when they apply.
var ErrDataStream = errors.New("data port stream failed")

// dataPool is the client's set of free data ports.
type dataPool struct {
	mu   sync.Mutex
	dial DataDialFunc
	free []int
	gen  int // UseDataPorts calls; a port of an older pool isn't given back
}

// UseDataPorts lets the client move the bulk streams of execs without a
// terminal and of copies to n data ports (0..n-1), reached with dial.
// It has no effect on an agent older than protocol 1.5, or with n <= 0
// (the SSH channels carry everything, as before). Call it once, after
// Dial; a later call replaces the ports for transfers that start after it.
func (c *Client) UseDataPorts(n int, dial DataDialFunc) {
	n = min(n, agentproto.MaxDataPorts)
	c.data.mu.Lock()
	defer c.data.mu.Unlock()
	c.data.gen++
	c.data.free, c.data.dial = nil, nil
	if n <= 0 || dial == nil || !c.protoAtLeast(1, 5) {
		c.log.Debug("data ports not used", "ports", n, "proto_version", c.proto)
		return
	}
	c.data.dial = dial
	for i := range n {
		c.data.free = append(c.data.free, i)
	}
	c.log.Debug("data ports in use", "ports", n)
}

// acquire takes a free port, without waiting.
func (p *dataPool) acquire() (port, gen int, dial DataDialFunc, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.free) == 0 {
		return 0, 0, nil, false
	}
	port = p.free[len(p.free)-1]
	p.free = p.free[:len(p.free)-1]
	return port, p.gen, p.dial, true
}

func (p *dataPool) release(port, gen int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if gen == p.gen {
		p.free = append(p.free, port)
	}
}

// freePorts is the number of free ports (tests).
func (p *dataPool) freePorts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.free)
}

// dataConn is one transfer's data port.
type dataConn struct {
	pool  *dataPool
	port  int
	gen   int
	token []byte
	conn  net.Conn
	r     *bufio.Reader // conn's: several frames per read
	w     *agentproto.DataWriter

	closeOnce sync.Once
	aborted   chan struct{} // closed by abort
	dropOnce  sync.Once

	mu       sync.Mutex // orders chClosed and the read deadlines
	chClosed bool       // the SSH channel has closed
}

// openData takes a free data port, connects to it and sends the preamble.
// It returns nil when the transfer must go over SSH: no data ports, none
// free, or the port can't be reached (then given back).
func (c *Client) openData(ctx context.Context, what string) *dataConn {
	port, gen, dial, ok := c.data.acquire()
	if !ok {
		if c.dataEnabled() {
			c.log.Debug(what + " over SSH: no free data port")
		}
		return nil
	}
	d := &dataConn{pool: &c.data, port: port, gen: gen,
		token:   make([]byte, agentproto.DataTokenSize),
		aborted: make(chan struct{})}
	rand.Read(d.token) // never fails (crypto/rand)
	dctx, cancel := context.WithTimeout(ctx, dataDialTimeout)
	conn, err := dial(dctx, port)
	cancel()
	if err == nil {
		conn.SetWriteDeadline(time.Now().Add(dataDialTimeout))
		err = agentproto.WriteDataHello(conn, d.token)
		conn.SetWriteDeadline(time.Time{})
		if err != nil {
			conn.Close()
		}
	}
	if err != nil {
		c.data.release(port, gen)
		c.log.Debug(what+" over SSH: data port unreachable", "port", port, "err", err)
		return nil
	}
	d.conn, d.w = conn, agentproto.NewDataWriter(conn)
	d.r = bufio.NewReaderSize(conn, hostReadBuffer)
	c.log.Debug(what+" over a data port", "port", port)
	return d
}

func (c *Client) dataEnabled() bool {
	c.data.mu.Lock()
	defer c.data.mu.Unlock()
	return c.data.dial != nil
}

// stream is the request's DataStream; nil for a nil d (SSH path).
func (d *dataConn) stream() *agentproto.DataStream {
	if d == nil {
		return nil
	}
	return &agentproto.DataStream{Port: d.port, Token: d.token}
}

// abort disconnects from the port: the transfer is over (ended, failed or
// cancelled). It unblocks every read and write on the port.
func (d *dataConn) abort() {
	if d == nil {
		return
	}
	d.closeOnce.Do(func() {
		close(d.aborted)
		d.conn.Close()
	})
}

// releaseAfter gives the port back once the SSH channel has closed
// (chClosed) and the transfer is done with the port (aborted: every
// transfer aborts its port when it returns).
func (d *dataConn) releaseAfter(chClosed <-chan struct{}) {
	go func() {
		<-chClosed
		<-d.aborted
		d.drop()
	}()
}

// drop disconnects and gives the port back at once: no channel carried
// the request, or it has closed.
func (d *dataConn) drop() {
	if d == nil {
		return
	}
	d.dropOnce.Do(func() {
		d.abort()
		d.pool.release(d.port, d.gen)
	})
}

// channelClosed tells that the SSH channel has closed: from then on the
// stream may stay silent at most dataDrainGrace at a time.
func (d *dataConn) channelClosed() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.chClosed = true
	d.conn.SetReadDeadline(time.Now().Add(dataDrainGrace))
}

// progress arms the bound on silence before a read (none while the
// channel is open): it measures only the wait for the guest's bytes, not
// the time the transfer took to pass the last frame on.
func (d *dataConn) progress() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.chClosed {
		d.conn.SetReadDeadline(time.Now().Add(dataDrainGrace))
	} else {
		d.conn.SetReadDeadline(time.Time{})
	}
}

// readAck reads and checks the guest's answer, within dataAckTimeout.
func (d *dataConn) readAck() error {
	d.mu.Lock()
	if !d.chClosed {
		d.conn.SetReadDeadline(time.Now().Add(dataAckTimeout))
	}
	d.mu.Unlock()
	err := agentproto.ReadDataAck(d.r, d.token)
	d.progress()
	if err != nil {
		return d.readErr("the guest's answer", err)
	}
	return nil
}

// readErr describes an error reading the port.
func (d *dataConn) readErr(what string, err error) error {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded) && d.closedChannel():
		return fmt.Errorf("%w: data port %d: the guest closed the channel without ending the stream", ErrDataStream, d.port)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("%w: data port %d: no answer from the guest within %s", ErrDataStream, d.port, dataAckTimeout)
	default:
		return fmt.Errorf("%w: data port %d: %s: %w", ErrDataStream, d.port, what, err)
	}
}

func (d *dataConn) closedChannel() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.chClosed
}

// coalesceMax bounds what frames passes on at once. The guest's frames
// carry at most 32 KiB (agentproto.GuestDataChunk); consecutive payloads of
// one kind that are already read from the port are joined, so the hops
// after this one (the RPC's frames, the CLI's writes) make a few large
// writes instead of many small ones. Nothing waits for more bytes: a
// payload is held back only while the next frame is whole in the buffer.
const coalesceMax = 512 << 10

// frames reads the guest's frames until its End, passing the payloads of
// allowed kinds to fn, consecutive ones of one kind joined when they are
// already read (coalesceMax); kinds the transfer doesn't expect fail it.
// Everything passed on before an error or the End is passed to fn first.
func (d *dataConn) frames(stdout, stderr bool, fn func(kind byte, p []byte)) error {
	dr := agentproto.NewDataReader(d.r, agentproto.MaxDataFrame)
	var (
		acc     []byte
		accKind byte
	)
	flush := func() {
		if len(acc) > 0 {
			fn(accKind, acc)
			acc = acc[:0]
		}
	}
	for {
		d.progress()
		kind, p, err := dr.Next()
		if err != nil {
			flush()
			return d.readErr("read frame", err)
		}
		switch {
		case kind == agentproto.DataFrameEnd:
			flush()
			return nil
		case kind == agentproto.DataFrameData && stdout, kind == agentproto.DataFrameStderr && stderr:
			if len(acc) > 0 && kind != accKind {
				flush()
			}
			more := d.nextFrameBuffered()
			if len(acc) == 0 && !more {
				fn(kind, p) // alone: no copy
				continue
			}
			if acc == nil {
				acc = make([]byte, 0, coalesceMax+agentproto.GuestDataChunk)
			}
			accKind = kind
			acc = append(acc, p...)
			if !more || len(acc) >= coalesceMax {
				flush()
			}
		default:
			flush()
			return fmt.Errorf("%w: data port %d: %w: unexpected frame of kind %d", ErrDataStream, d.port, agentproto.ErrDataFrame, kind)
		}
	}
}

// nextFrameBuffered reports whether the next frame, header and payload, is
// already in the read buffer (so reading it won't wait for the guest).
func (d *dataConn) nextFrameBuffered() bool {
	n := d.r.Buffered()
	if n < agentproto.DataHeaderSize {
		return false
	}
	hdr, err := d.r.Peek(agentproto.DataHeaderSize)
	if err != nil {
		return false
	}
	return uint64(n) >= uint64(agentproto.DataHeaderSize)+uint64(binary.BigEndian.Uint32(hdr[4:8]))
}

// send writes r to the port as data frames, then End when r ended (not
// when reading r failed). It returns the read error of r (the port's
// write errors are not reported: the guest went, the SSH side says why).
func (d *dataConn) send(r io.Reader) error {
	src := &stickyReader{r: r}
	if r != nil {
		if _, err := d.w.Pump(agentproto.DataFrameData, src, hostDataChunk); err != nil {
			return src.err
		}
	}
	if src.err == nil {
		d.w.End()
	}
	return src.err
}

// frameReader is the guest's data frames as a byte stream, ending (io.EOF)
// at the End frame.
type frameReader struct {
	d   *dataConn
	dr  *agentproto.DataReader
	p   []byte
	err error
}

func (d *dataConn) reader() *frameReader {
	return &frameReader{d: d, dr: agentproto.NewDataReader(d.r, agentproto.MaxDataFrame)}
}

func (f *frameReader) Read(b []byte) (int, error) {
	for len(f.p) == 0 {
		if f.err != nil {
			return 0, f.err
		}
		f.d.progress()
		kind, p, err := f.dr.Next()
		switch {
		case err != nil:
			f.err = f.d.readErr("read frame", err)
		case kind == agentproto.DataFrameEnd:
			f.err = io.EOF
		case kind == agentproto.DataFrameData:
			f.p = p
		default:
			f.err = fmt.Errorf("%w: data port %d: %w: unexpected frame of kind %d", ErrDataStream, f.d.port, agentproto.ErrDataFrame, kind)
		}
	}
	n := copy(b, f.p)
	f.p = f.p[n:]
	return n, nil
}
