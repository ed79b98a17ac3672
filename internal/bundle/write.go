package bundle

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/errdefs"
)

// FrameSize is the most content of one file a frame holds: a resumed
// download re-reads at most this much (compressed).
const FrameSize = 8 << 20

// Write writes a bundle of m's files, read from srcDir (m.Files[i].Path is
// relative to it), to w. It fills in each file's size, sha256 and (when
// zero) mode from the files, in m itself. The files must not change while
// Write runs (it reads them twice: to sum, then to write).
func Write(ctx context.Context, w io.Writer, m *Manifest, srcDir string) error {
	return writeDir(ctx, w, m, srcDir, FrameSize)
}

// WriteFiles is Write with each file's host path given: src maps each of
// m.Files' paths to the file to read.
func WriteFiles(ctx context.Context, w io.Writer, m *Manifest, src map[string]string) error {
	return write(ctx, w, m, func(p string) (*os.File, error) {
		hp, ok := src[p]
		if !ok {
			return nil, fmt.Errorf("bundle file %s: no source file given: %w", p, errdefs.ErrInvalid)
		}
		st, err := os.Lstat(hp)
		if err != nil {
			return nil, fmt.Errorf("bundle file %s: %w", p, err)
		}
		if !st.Mode().IsRegular() {
			return nil, fmt.Errorf("bundle file %s: %s is not a regular file (%s): %w", p, hp, st.Mode().Type(), errdefs.ErrInvalid)
		}
		return os.Open(hp)
	}, FrameSize)
}

func writeDir(ctx context.Context, w io.Writer, m *Manifest, srcDir string, frameSize int) error {
	root, err := os.OpenRoot(srcDir)
	if err != nil {
		return fmt.Errorf("bundle source: %w", err)
	}
	defer root.Close()
	return write(ctx, w, m, func(p string) (*os.File, error) { return openRegular(root, p) }, frameSize)
}

// opener opens the source of a bundle file.
type opener func(path string) (*os.File, error)

func write(ctx context.Context, w io.Writer, m *Manifest, open opener, frameSize int) error {
	if err := m.Validate(false); err != nil {
		return err
	}
	for i := range m.Files {
		if err := sumFile(ctx, open, &m.Files[i]); err != nil {
			return err
		}
	}
	if err := m.Validate(true); err != nil {
		return err
	}
	manifest, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBetterCompression), zstd.WithEncoderConcurrency(encodeWorkers))
	if err != nil {
		return err
	}
	fw := newFrameWriter(w, enc, frameSize+64<<10)
	closed := false
	defer func() {
		if !closed {
			_ = fw.close()
		}
	}()
	tw := tar.NewWriter(fw)
	epoch := time.Unix(0, 0)
	header := func(name string, size int64, mode uint32) error {
		// A new frame for each entry: flush the previous entry's padding first.
		if err := tw.Flush(); err != nil {
			return err
		}
		if err := fw.endFrame(); err != nil {
			return err
		}
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Size: size, Mode: int64(mode), ModTime: epoch, Format: tar.FormatPAX})
	}
	if err := header(ManifestName, int64(len(manifest)), 0o644); err != nil {
		return err
	}
	if _, err := tw.Write(manifest); err != nil {
		return err
	}
	buf := make([]byte, frameSize)
	for i := range m.Files {
		f := &m.Files[i]
		if err := header(f.Path, f.Size, f.Mode); err != nil {
			return err
		}
		if err := copyFile(ctx, open, f, tw, fw, buf); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := fw.endFrame(); err != nil {
		return err
	}
	closed = true
	return fw.close()
}

// sumFile fills f's size, sha256 and mode from the file.
func sumFile(ctx context.Context, open opener, f *File) error {
	in, err := open(f.Path)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	h := sha256.New()
	n, err := io.Copy(h, ctxReader{ctx, in})
	if err != nil {
		return fmt.Errorf("read %s: %w", f.Path, err)
	}
	f.Size = n
	f.SHA256 = hex.EncodeToString(h.Sum(nil))
	if f.Mode == 0 {
		f.Mode = uint32(st.Mode().Perm())
	}
	return nil
}

func openRegular(root *os.Root, p string) (*os.File, error) {
	st, err := root.Lstat(p)
	if err != nil {
		return nil, fmt.Errorf("bundle file: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("bundle file %s: not a regular file (%s): %w", p, st.Mode().Type(), errdefs.ErrInvalid)
	}
	return root.Open(p)
}

// copyFile writes f's content into the tar stream, a frame for each
// frameSize bytes, checking it still has the size and sum summed.
func copyFile(ctx context.Context, open opener, f *File, tw *tar.Writer, fw *frameWriter, buf []byte) error {
	in, err := open(f.Path)
	if err != nil {
		return err
	}
	defer in.Close()
	h := sha256.New()
	var off int64
	for off < f.Size {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := io.ReadFull(in, buf[:min(int64(len(buf)), f.Size-off)])
		if err != nil {
			return fmt.Errorf("read %s: %w (did it change while the bundle was written?)", f.Path, err)
		}
		h.Write(buf[:n])
		// Runs of zeros go in frames of their own, made of RLE blocks that
		// decode as fast as memset (and that Install doesn't even decode).
		for b := buf[:n]; len(b) > 0; {
			u := b[:min(len(b), zeroUnit)]
			if isZero(u) != fw.zero && len(fw.buf) > 0 {
				if err := fw.endFrame(); err != nil {
					return err
				}
			}
			if _, err := tw.Write(u); err != nil {
				return err
			}
			b = b[len(u):]
		}
		off += int64(n)
		if off < f.Size && off%int64(len(buf)) == 0 {
			if err := fw.endFrame(); err != nil {
				return err
			}
		}
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != f.SHA256 {
		return fmt.Errorf("%s changed while the bundle was written: %w", f.Path, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// zeroUnit is the granularity at which Write finds runs of zeros.
const zeroUnit = 1 << 20

// zeros is read only: compared with, and handed out as decoded zeros.
var zeros [maxBufferedFrame]byte

// isZero reports whether b (at most maxBufferedFrame long) is all zeros.
func isZero(b []byte) bool { return bytes.Equal(b, zeros[:len(b)]) }

// zeroFrame is a zstd frame of n zero bytes (n <= maxBufferedFrame): a
// single-segment frame header with the content size, then RLE blocks.
func zeroFrame(n int) []byte {
	out := binary.LittleEndian.AppendUint32(nil, zstdMagic)
	out = append(out, 0xa0) // 4-byte content size, single segment, no checksum
	out = binary.LittleEndian.AppendUint32(out, uint32(n))
	for n > 0 {
		k := min(n, maxBlockSize)
		n -= k
		h := uint32(k)<<3 | 1<<1 // RLE
		if n == 0 {
			h |= 1 // last block
		}
		out = append(out, byte(h), byte(h>>8), byte(h>>16), 0)
	}
	return out
}

// encodeWorkers is how many frames Write compresses at once.
const encodeWorkers = 2

// frameWriter gathers the tar stream and compresses it as one zstd frame
// per endFrame (and whenever it holds a full buffer). Frames are
// compressed in parallel and written in order by a goroutine of their own.
type frameWriter struct {
	w     io.Writer
	enc   *zstd.Encoder
	size  int
	buf   []byte
	zero  bool             // buf holds only zeros
	free  chan []byte      // buffers back from the encoders
	order chan chan []byte // each frame's result, in the stream's order
	done  chan struct{}

	mu   sync.Mutex
	werr error
}

func newFrameWriter(w io.Writer, enc *zstd.Encoder, size int) *frameWriter {
	fw := &frameWriter{w: w, enc: enc, size: size, buf: make([]byte, 0, size), zero: true,
		free: make(chan []byte, encodeWorkers+2), order: make(chan chan []byte, encodeWorkers), done: make(chan struct{})}
	go func() {
		defer close(fw.done)
		for r := range fw.order {
			out := <-r
			if fw.err() == nil {
				if _, err := fw.w.Write(out); err != nil {
					fw.mu.Lock()
					fw.werr = err
					fw.mu.Unlock()
				}
			}
		}
	}()
	return fw
}

func (fw *frameWriter) err() error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return fw.werr
}

func (fw *frameWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if len(fw.buf) == cap(fw.buf) {
			if err := fw.endFrame(); err != nil {
				return 0, err
			}
		}
		k := copy(fw.buf[len(fw.buf):cap(fw.buf)], p)
		if fw.zero && !isZero(p[:k]) {
			fw.zero = false
		}
		fw.buf = fw.buf[:len(fw.buf)+k]
		p = p[k:]
	}
	return n, nil
}

func (fw *frameWriter) endFrame() error {
	if len(fw.buf) == 0 {
		return fw.err()
	}
	if fw.zero {
		r := make(chan []byte, 1)
		r <- zeroFrame(len(fw.buf))
		fw.order <- r
		fw.buf = fw.buf[:0]
		return fw.err()
	}
	fw.zero = true
	src := fw.buf
	select {
	case fw.buf = <-fw.free:
	default:
		fw.buf = make([]byte, 0, fw.size)
	}
	r := make(chan []byte, 1)
	fw.order <- r // waits while encodeWorkers frames are queued
	go func() {
		r <- fw.enc.EncodeAll(src, nil)
		select {
		case fw.free <- src[:0]:
		default:
		}
	}()
	return fw.err()
}

// close waits for every frame to be written.
func (fw *frameWriter) close() error {
	close(fw.order)
	<-fw.done
	return fw.err()
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
