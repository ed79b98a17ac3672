package bundle

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
)

// The zstd frame format (RFC 8878, section 3.1), as much of it as finding
// where each frame ends needs: a frame is a magic number, a frame header, a
// sequence of blocks with 3-byte headers (the last flagged), and an
// optional 4-byte checksum. Skippable frames are a magic, a 4-byte length
// and that many bytes.
const (
	zstdMagic          = 0xFD2FB528
	skippableMagicMask = 0xFFFFFFF0
	skippableMagic     = 0x184D2A50
	maxBlockSize       = 128 << 10
)

// splitter reads a zstd stream frame by frame.
type splitter struct {
	r   *bufio.Reader
	off int64     // compressed offset of the next unread byte
	h   hash.Hash // when set, sums every byte read
}

func newSplitter(r io.Reader, off int64, h hash.Hash) *splitter {
	return &splitter{r: bufio.NewReaderSize(r, 256<<10), off: off, h: h}
}

func (s *splitter) consumed(p []byte) {
	s.off += int64(len(p))
	if s.h != nil {
		s.h.Write(p)
	}
}

// frame is one zstd frame being read: Read passes its bytes through (frame
// header, blocks, checksum) and returns io.EOF at its end.
type frame struct {
	s           *splitter
	start       int64
	contentSize int64 // from the frame header; -1 when not given
	checksum    bool
	pending     []byte // header bytes not yet passed on
	hdr         [18]byte
	remain      int // payload bytes of the current block not yet passed on
	last        bool
	done        bool
	zeroRLE     bool  // every block so far is an RLE block of zeros
	rleByte     bool  // the next payload byte is an RLE block's
	rleSize     int64 // the content of the RLE blocks
}

// errTruncated is wrapped by every error of a stream that ends inside a
// frame.
var errTruncated = errors.New("truncated archive")

func (s *splitter) read(p []byte) error {
	n, err := io.ReadFull(s.r, p)
	s.consumed(p[:n])
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return corrupt("compressed stream ends inside a frame at offset %d (%w)", s.off, errTruncated)
		}
		return err
	}
	return nil
}

// next reads the header of the next frame, skipping skippable frames. It
// returns io.EOF when the stream ends cleanly, between frames.
func (s *splitter) next() (*frame, error) {
	for {
		start := s.off
		var magic [4]byte
		n, err := io.ReadFull(s.r, magic[:])
		s.consumed(magic[:n])
		if err != nil {
			if n == 0 && errors.Is(err, io.EOF) {
				return nil, io.EOF
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, corrupt("compressed stream ends inside a frame header at offset %d (%w)", s.off, errTruncated)
			}
			return nil, err
		}
		m := binary.LittleEndian.Uint32(magic[:])
		if m&skippableMagicMask == skippableMagic {
			var l [4]byte
			if err := s.read(l[:]); err != nil {
				return nil, err
			}
			size := int64(binary.LittleEndian.Uint32(l[:]))
			w := io.Discard
			if s.h != nil {
				w = s.h
			}
			k, err := io.CopyN(w, s.r, size)
			s.off += k
			if err != nil {
				return nil, corrupt("compressed stream ends inside a skippable frame at offset %d (%w)", s.off, errTruncated)
			}
			continue
		}
		if m != zstdMagic {
			return nil, corrupt("not a zstd frame at offset %d (magic %#08x)", start, m)
		}
		f := &frame{s: s, start: start, contentSize: -1, zeroRLE: true}
		copy(f.hdr[:], magic[:])
		if err := s.read(f.hdr[4:5]); err != nil {
			return nil, err
		}
		fhd := f.hdr[4]
		if fhd&0x08 != 0 {
			return nil, corrupt("zstd frame at offset %d: reserved bit set", start)
		}
		single := fhd&0x20 != 0
		f.checksum = fhd&0x04 != 0
		fcsSize := [4]int{0, 2, 4, 8}[fhd>>6]
		if fhd>>6 == 0 && single {
			fcsSize = 1
		}
		dictSize := [4]int{0, 1, 2, 4}[fhd&3]
		winSize := 1
		if single {
			winSize = 0
		}
		rest := f.hdr[5 : 5+winSize+dictSize+fcsSize]
		if err := s.read(rest); err != nil {
			return nil, err
		}
		fcs := rest[winSize+dictSize:]
		switch fcsSize {
		case 1:
			f.contentSize = int64(fcs[0])
		case 2:
			f.contentSize = int64(binary.LittleEndian.Uint16(fcs)) + 256
		case 4:
			f.contentSize = int64(binary.LittleEndian.Uint32(fcs))
		case 8:
			if v := binary.LittleEndian.Uint64(fcs); v < 1<<62 {
				f.contentSize = int64(v)
			}
		}
		f.pending = f.hdr[:5+len(rest)]
		return f, nil
	}
}

// Read passes the frame's bytes on.
func (f *frame) Read(p []byte) (int, error) {
	for {
		if len(f.pending) > 0 {
			n := copy(p, f.pending)
			f.pending = f.pending[n:]
			return n, nil
		}
		if f.remain > 0 {
			if len(p) > f.remain {
				p = p[:f.remain]
			}
			n, err := f.s.r.Read(p)
			f.s.consumed(p[:n])
			f.remain -= n
			if f.rleByte && n > 0 {
				f.zeroRLE = f.zeroRLE && p[0] == 0
				f.rleByte = false
			}
			if n > 0 {
				return n, nil
			}
			if err == nil || errors.Is(err, io.EOF) {
				return 0, corrupt("compressed stream ends inside a block at offset %d (%w)", f.s.off, errTruncated)
			}
			return 0, err
		}
		if f.done {
			return 0, io.EOF
		}
		if f.last {
			f.done = true
			if f.checksum {
				if err := f.s.read(f.hdr[:4]); err != nil {
					return 0, err
				}
				f.pending = f.hdr[:4]
			}
			continue
		}
		if err := f.s.read(f.hdr[:3]); err != nil {
			return 0, err
		}
		h := uint32(f.hdr[0]) | uint32(f.hdr[1])<<8 | uint32(f.hdr[2])<<16
		f.last = h&1 != 0
		size := int(h >> 3)
		switch (h >> 1) & 3 {
		case 0, 2: // raw, compressed
			f.remain = size
			f.zeroRLE = false
		case 1: // RLE: one byte repeated size times
			f.remain = 1
			f.rleByte = true
			f.rleSize += int64(size)
		default:
			return 0, corrupt("zstd frame at offset %d: reserved block type", f.start)
		}
		if f.remain > maxBlockSize {
			return 0, corrupt("zstd frame at offset %d: block of %d bytes", f.start, f.remain)
		}
		f.pending = f.hdr[:3]
	}
}

// readAll reads the rest of the frame into buf (reused), returning it.
func (f *frame) readAll(buf []byte) ([]byte, error) {
	buf = buf[:0]
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := f.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if errors.Is(err, io.EOF) {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

// String names the frame in messages.
func (f *frame) String() string { return fmt.Sprintf("zstd frame at offset %d", f.start) }
