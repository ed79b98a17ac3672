package agentproto

import (
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
)

// Data ports (since 1.5).
//
// Bulk streams (an exec's stdin, stdout and stderr, the tar stream of a
// copy) can travel beside the SSH connection, on a data port of their own:
// a raw byte channel between bangerd and the guest (a virtio-serial port
// named DataPortName(i) with QEMU), which costs no encryption. Under TCG
// the guest's CPU, emulated, makes SSH's ciphers slower than the channel
// (AES-GCM 20 MB/s, ChaCha20-Poly1305 53 MB/s, the port 50–120 MB/s).
//
// The SSH connection stays the control channel: the host names the port
// and a fresh random token in the request (ExecRequest.Data,
// CopyRequest.Data) on the authenticated, encrypted connection. The data
// port is a point-to-point channel between the host's daemon and the
// guest (no third party sees or changes its bytes): the token binds the
// stream to the request, and the guest, untrusted as always, is held to
// the same limits as on SSH (announced copy sizes, entry counts, frame
// sizes).
//
// One transfer, on port i:
//
//  1. the host sends the request with Data{Port: i, Token: T} on SSH;
//  2. the host connects to the port and writes the preamble
//     (DataHelloMagic, T); the guest opens the port, reads the preamble
//     and checks T against the request's, else fails the request;
//  3. the guest writes the answer (DataAckMagic, T), which the host
//     checks (a stale byte from an earlier transfer fails it);
//  4. frames (DataWriter) go only in the directions the transfer has,
//     each direction's stream ended by one DataFrameEnd:
//     - exec, both ways: the host sends DataFrameData (stdin), then End
//       at stdin's end of file; the guest sends DataFrameData (stdout)
//       and DataFrameStderr, then End once the command's output is done;
//     - copy in, host → guest only: the host sends the tar stream as
//       DataFrameData, then End; the guest sends nothing after its
//       answer (no End either: it closes the port, step 5);
//     - copy out, guest → host only: the guest sends the tar stream as
//       DataFrameData, then End; the host sends nothing at all after its
//       preamble (not even an End: the guest takes any byte from the
//       host as a broken stream);
//     a Data or Stderr frame carries at least one byte (an empty one
//     fails the transfer);
//  5. the guest closes the port before it reports the outcome on SSH
//     (exit-status, ReqCopyStatus) and closes the SSH channel; the host
//     disconnects. The host uses the port again only after the SSH
//     channel has closed, so no byte of one transfer reaches another.
//
// A side that sees the other go (the host disconnected: the guest reads
// end of file; the SSH channel closed) abandons the transfer. On a copy
// in, the host sees the guest close the port without an End: the copy's
// status on SSH says how it went.
//
// internal/agent's dataport_test.go runs the host's side against the
// guest agent's: it is this contract's test.

// DataPortPrefix starts the names of the data ports; DataPortName(i) is
// port i's.
const DataPortPrefix = "org.banger.data."

// MaxDataPorts is the most data ports a VM has.
const MaxDataPorts = 16

// DataPortName is the virtio-serial name of data port i.
func DataPortName(i int) string { return DataPortPrefix + strconv.Itoa(i) }

// DataTokenSize is the length of a data stream's token.
const DataTokenSize = 32

// DataStream names the data port a request's bulk stream travels on.
type DataStream struct {
	// Port is the data port's number (DataPortName).
	Port int `json:"port"`
	// Token is DataTokenSize random bytes, fresh for each transfer.
	Token []byte `json:"token"`
}

// Validate checks the request's fields.
func (d *DataStream) Validate(ports int) error {
	if d.Port < 0 || d.Port >= ports {
		return fmt.Errorf("data port %d: the guest has %d", d.Port, ports)
	}
	if len(d.Token) != DataTokenSize {
		return fmt.Errorf("data token of %d bytes, want %d", len(d.Token), DataTokenSize)
	}
	return nil
}

// The preamble's and answer's magic numbers (8 bytes each).
const (
	DataHelloMagic = "BNGDATA1"
	DataAckMagic   = "BNGDACK1"
)

// ErrDataHandshake: a data port's preamble or answer is not the expected
// one (wrong magic or token, stale bytes).
var ErrDataHandshake = errors.New("data port handshake failed")

// WriteDataHello writes the host's preamble.
func WriteDataHello(w io.Writer, token []byte) error { return writeMagic(w, DataHelloMagic, token) }

// ReadDataHello reads the host's preamble and checks its token.
func ReadDataHello(r io.Reader, token []byte) error { return readMagic(r, DataHelloMagic, token) }

// WriteDataAck writes the guest's answer.
func WriteDataAck(w io.Writer, token []byte) error { return writeMagic(w, DataAckMagic, token) }

// ReadDataAck reads the guest's answer and checks its token.
func ReadDataAck(r io.Reader, token []byte) error { return readMagic(r, DataAckMagic, token) }

func writeMagic(w io.Writer, magic string, token []byte) error {
	b := make([]byte, 0, len(magic)+len(token))
	b = append(append(b, magic...), token...)
	_, err := w.Write(b)
	return err
}

func readMagic(r io.Reader, magic string, token []byte) error {
	b := make([]byte, len(magic)+DataTokenSize)
	if _, err := io.ReadFull(r, b); err != nil {
		return fmt.Errorf("%w: %w", ErrDataHandshake, err)
	}
	if string(b[:len(magic)]) != magic || len(token) != DataTokenSize ||
		subtle.ConstantTimeCompare(b[len(magic):], token) != 1 {
		return fmt.Errorf("%w: unexpected %s", ErrDataHandshake, magic)
	}
	return nil
}

// Data frame kinds.
const (
	DataFrameData   byte = 1 // stdin (host → guest), stdout, a copy's tar stream
	DataFrameStderr byte = 2 // an exec's stderr (guest → host)
	DataFrameEnd    byte = 3 // no payload: the sender sends nothing more
)

// DataHeaderSize is the size of a frame's header: the kind, three zero
// bytes, the payload's length (big-endian uint32).
const DataHeaderSize = 8

// MaxDataFrame is the largest payload a receiver accepts.
const MaxDataFrame = 1 << 20

// GuestDataChunk is the payload size the guest writes: header and payload
// then fill one write of a virtio-serial port (the guest driver takes at
// most 32 KiB per write).
const GuestDataChunk = 32<<10 - DataHeaderSize

// ErrDataFrame: a frame that breaks the rules (unknown kind, too large).
var ErrDataFrame = errors.New("bad data frame")

// PutDataHeader fills hdr (DataHeaderSize bytes) for a frame.
func PutDataHeader(hdr []byte, kind byte, n int) {
	hdr[0], hdr[1], hdr[2], hdr[3] = kind, 0, 0, 0
	binary.BigEndian.PutUint32(hdr[4:8], uint32(n))
}

// DataWriter writes frames to a data port. It is safe for concurrent use:
// each frame goes in one Write.
type DataWriter struct {
	mu sync.Mutex
	w  io.Writer
}

// NewDataWriter returns a frame writer on w.
func NewDataWriter(w io.Writer) *DataWriter { return &DataWriter{w: w} }

// WriteFrame writes buf as one frame of kind: buf's first DataHeaderSize
// bytes are room for the header, the payload follows.
func (dw *DataWriter) WriteFrame(kind byte, buf []byte) error {
	n := len(buf) - DataHeaderSize
	if n < 0 || n > MaxDataFrame {
		return fmt.Errorf("%w: payload of %d bytes", ErrDataFrame, n)
	}
	PutDataHeader(buf, kind, n)
	dw.mu.Lock()
	defer dw.mu.Unlock()
	_, err := dw.w.Write(buf)
	return err
}

// End writes the DataFrameEnd frame.
func (dw *DataWriter) End() error {
	var hdr [DataHeaderSize]byte
	return dw.WriteFrame(DataFrameEnd, hdr[:])
}

// Pump copies r to frames of kind, chunk bytes of payload at most, until
// r's end of file (not sent: call End once every pump is done). It
// returns the bytes copied and the first read or write error.
func (dw *DataWriter) Pump(kind byte, r io.Reader, chunk int) (int64, error) {
	buf := make([]byte, DataHeaderSize+chunk)
	var total int64
	for {
		n, err := r.Read(buf[DataHeaderSize:])
		if n > 0 {
			if werr := dw.WriteFrame(kind, buf[:DataHeaderSize+n]); werr != nil {
				return total, werr
			}
			total += int64(n)
		}
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// Writer returns an io.Writer sending what is written to it as frames of
// kind (split in payloads of at most chunk bytes).
func (dw *DataWriter) Writer(kind byte, chunk int) io.Writer {
	return &frameSink{dw: dw, kind: kind, buf: make([]byte, DataHeaderSize+chunk)}
}

type frameSink struct {
	dw   *DataWriter
	kind byte
	buf  []byte
}

func (s *frameSink) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n := copy(s.buf[DataHeaderSize:], p)
		if err := s.dw.WriteFrame(s.kind, s.buf[:DataHeaderSize+n]); err != nil {
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// DataReader reads the frames of a data port.
type DataReader struct {
	r   io.Reader
	hdr [DataHeaderSize]byte
	buf []byte
	max int
}

// NewDataReader returns a frame reader on r that refuses payloads larger
// than max (at most MaxDataFrame; 0 means MaxDataFrame).
func NewDataReader(r io.Reader, max int) *DataReader {
	if max <= 0 || max > MaxDataFrame {
		max = MaxDataFrame
	}
	return &DataReader{r: r, max: max}
}

// Next returns the next frame's kind and payload (valid until the next
// call). After a DataFrameEnd frame it returns that kind with no payload.
// A stream that ends before DataFrameEnd gives io.ErrUnexpectedEOF; an
// unknown kind, a payload over the limit, an End with a payload or a Data
// or Stderr frame without one, ErrDataFrame.
func (dr *DataReader) Next() (byte, []byte, error) {
	if _, err := io.ReadFull(dr.r, dr.hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	kind := dr.hdr[0]
	n := binary.BigEndian.Uint32(dr.hdr[4:8])
	switch {
	case kind != DataFrameData && kind != DataFrameStderr && kind != DataFrameEnd,
		dr.hdr[1]|dr.hdr[2]|dr.hdr[3] != 0:
		return 0, nil, fmt.Errorf("%w: kind %d", ErrDataFrame, kind)
	case uint64(n) > uint64(dr.max):
		return 0, nil, fmt.Errorf("%w: payload of %d bytes, the limit is %d", ErrDataFrame, n, dr.max)
	case kind == DataFrameEnd && n != 0:
		return 0, nil, fmt.Errorf("%w: end frame with a payload", ErrDataFrame)
	case kind != DataFrameEnd && n == 0:
		// A sender never has a reason for one; refused, it can't keep a
		// receiver waiting while passing nothing on.
		return 0, nil, fmt.Errorf("%w: empty frame of kind %d", ErrDataFrame, kind)
	}
	if cap(dr.buf) < int(n) {
		dr.buf = make([]byte, max(int(n), 32<<10))
	}
	p := dr.buf[:n]
	if _, err := io.ReadFull(dr.r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return kind, p, nil
}
