package bundle

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// The decoding pipeline: one goroutine reads the compressed stream and
// splits it into frames; frames whose header gives a content size up to
// maxBufferedFrame are decoded whole by decodeWorkers goroutines in
// parallel, larger or unsized ones (a bundle made by the zstd CLI: one
// frame) by a streaming decoder in the reading goroutine. The installer
// reads the decoded stream in order, knowing where each frame ends.

const (
	maxBufferedFrame = 32 << 20
	streamChunk      = 4 << 20
	decodeWorkers    = 2
	framesAhead      = 3
	maxWindow        = 128 << 20
)

// chunk is decoded data of one frame; the last chunk of a frame has
// frameEnd set.
type chunk struct {
	data     []byte
	buf      *[]byte // data's buffer, back to the pool once read
	frameEnd bool
	off      int64  // compressed offset read so far (after the frame when frameEnd)
	sum      []byte // state of the bundle's sha256 at off, when frameEnd and summing
	err      error
}

type job struct {
	raw  *[]byte
	size int64
	out  chan chunk
	c    chunk
}

// stream is the decoded bundle, read in order by the installer.
type stream struct {
	frames chan chan chunk
	ctx    context.Context
	sum    hash.Hash // the bundle's sha256 (nil: not summed)
	done   sync.WaitGroup

	cur  chan chunk
	c    chunk
	pos  int
	last int64 // compressed offset after the last frame fully read
	err  error

	progress func(done int64) // called with each chunk's compressed offset
	recycle  func(*[]byte)    // takes a read chunk's buffer
}

func startDecoding(ctx context.Context, r io.Reader, off int64, sum hash.Hash, progress func(int64)) *stream {
	s := &stream{frames: make(chan chan chunk, framesAhead), ctx: ctx, sum: sum, last: off, progress: progress, recycle: putBuf}
	jobs := make(chan job)
	// The frames' checksums are not checked: every file's sha256 is.
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(decodeWorkers), zstd.WithDecoderMaxWindow(maxWindow),
		zstd.WithDecoderMaxMemory(maxBufferedFrame), zstd.IgnoreChecksum(true))
	if err != nil {
		// Only bad options fail; report it as the stream's error.
		s.err = err
		close(s.frames)
		return s
	}
	var workers sync.WaitGroup
	for range decodeWorkers {
		workers.Go(func() {
			for j := range jobs {
				buf := getBuf(int(j.size))
				data, err := dec.DecodeAll(*j.raw, (*buf)[:0])
				putBuf(j.raw)
				if err == nil && int64(len(data)) != j.size {
					err = fmt.Errorf("%d bytes decoded, the frame header says %d", len(data), j.size)
				}
				if err != nil {
					data, j.c.err = nil, corrupt("zstd frame ending at offset %d: %w", j.c.off, err)
				}
				*buf = data
				j.c.data, j.c.buf = data, buf
				j.out <- j.c // buffered: never blocks
			}
		})
	}
	s.done.Go(func() {
		defer close(s.frames)
		defer close(jobs)
		s.split(r, off, jobs)
	})
	s.done.Go(func() {
		workers.Wait()
		dec.Close()
	})
	return s
}

// split reads the frames of r and hands them to the workers or decodes
// them itself, queueing each frame's result channel in order.
func (s *stream) split(r io.Reader, off int64, jobs chan<- job) {
	sp := newSplitter(r, off, s.sum)
	var sdec *zstd.Decoder
	defer func() {
		if sdec != nil {
			sdec.Close()
		}
	}()
	queue := func(out chan chunk) bool {
		select {
		case s.frames <- out:
			return true
		case <-s.ctx.Done():
			return false
		}
	}
	fail := func(err error) {
		out := make(chan chunk, 1)
		out <- chunk{err: err}
		queue(out)
	}
	for {
		f, err := sp.next()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			fail(err)
			return
		}
		if f.contentSize >= 0 && f.contentSize <= maxBufferedFrame {
			raw := getBuf(0)
			var err error
			if *raw, err = f.readAll((*raw)[:0]); err != nil {
				fail(err)
				return
			}
			out := make(chan chunk, 1)
			if !queue(out) {
				return
			}
			if f.zeroRLE && f.rleSize == f.contentSize {
				// Zeros: nothing to decode.
				putBuf(raw)
				out <- chunk{data: zeros[:f.contentSize], frameEnd: true, off: sp.off, sum: s.sumState()}
				continue
			}
			j := job{raw: raw, size: f.contentSize, out: out, c: chunk{frameEnd: true, off: sp.off, sum: s.sumState()}}
			select {
			case jobs <- j:
			case <-s.ctx.Done():
				return
			}
			continue
		}
		// A large frame: decode it here, as a stream.
		if sdec == nil {
			if sdec, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(2), zstd.WithDecoderMaxWindow(maxWindow), zstd.IgnoreChecksum(true)); err != nil {
				fail(err)
				return
			}
		}
		if err := sdec.Reset(f); err != nil {
			fail(err)
			return
		}
		out := make(chan chunk, 2)
		if !queue(out) {
			return
		}
		for {
			buf := getBuf(streamChunk)
			n, err := io.ReadFull(sdec, (*buf)[:streamChunk])
			c := chunk{data: (*buf)[:n], buf: buf, off: sp.off}
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				if _, ferr := f.Read(nil); !errors.Is(ferr, io.EOF) {
					// The decoder stopped before the frame's end.
					c.err = corrupt("zstd frame at offset %d: %v", f.start, firstErr(ferr, err))
				}
				c.frameEnd, c.off, c.sum = true, sp.off, s.sumState()
			} else if err != nil {
				if !errors.Is(err, errTruncated) && !errors.Is(err, ErrCorrupt) && s.ctx.Err() == nil {
					err = corrupt("zstd frame at offset %d: %w", f.start, err)
				}
				c.err = err
			}
			select {
			case out <- c:
			case <-s.ctx.Done():
				return
			}
			if c.err != nil {
				return
			}
			if c.frameEnd {
				break
			}
		}
	}
}

var bufs sync.Pool

// getBuf returns a buffer of at least n bytes' capacity, from the pool.
func getBuf(n int) *[]byte {
	if b, ok := bufs.Get().(*[]byte); ok && cap(*b) >= n {
		return b
	}
	b := make([]byte, 0, max(n, FrameSize+64<<10))
	return &b
}

func putBuf(b *[]byte) {
	if b != nil {
		bufs.Put(b)
	}
}

func firstErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

func (s *stream) sumState() []byte {
	if s.sum == nil {
		return nil
	}
	st, _ := s.sum.(interface{ MarshalBinary() ([]byte, error) }).MarshalBinary()
	return st
}

// wait returns once the pipeline's goroutines are gone (after the context
// is cancelled or the stream read to its end).
func (s *stream) wait() {
	s.done.Wait()
}

// fill makes the current chunk hold unread data.
func (s *stream) fill() error {
	for s.pos >= len(s.c.data) {
		if s.err != nil {
			return s.err
		}
		if s.cur == nil {
			var ok bool
			select {
			case s.cur, ok = <-s.frames:
			case <-s.ctx.Done():
				return s.ctx.Err()
			}
			if !ok {
				if s.err == nil {
					s.err = io.EOF
				}
				if err := s.ctx.Err(); err != nil {
					s.err = err
				}
				return s.err
			}
		}
		var c chunk
		select {
		case c = <-s.cur:
		case <-s.ctx.Done():
			return s.ctx.Err()
		}
		if c.err != nil {
			s.err = c.err
			return c.err
		}
		s.recycle(s.c.buf)
		s.c, s.pos = c, 0
		if c.frameEnd {
			s.cur = nil
			s.last = c.off
		}
		if s.progress != nil {
			s.progress(c.off)
		}
	}
	return nil
}

// peek returns up to max unread bytes without consuming them.
func (s *stream) peek(max int64) ([]byte, error) {
	if err := s.fill(); err != nil {
		return nil, err
	}
	b := s.c.data[s.pos:]
	if int64(len(b)) > max {
		b = b[:max]
	}
	return b, nil
}

func (s *stream) advance(n int) { s.pos += n }

func (s *stream) Read(p []byte) (int, error) {
	if err := s.fill(); err != nil {
		return 0, err
	}
	n := copy(p, s.c.data[s.pos:])
	s.pos += n
	return n, nil
}

// atFrameEnd reports whether what was read ends exactly at a frame's end.
func (s *stream) atFrameEnd() bool { return s.pos == len(s.c.data) && s.c.frameEnd }

// offset is the compressed offset after the last frame fully decoded
// (where a resume at the current point would start, when atFrameEnd).
func (s *stream) offset() int64 { return s.last }
