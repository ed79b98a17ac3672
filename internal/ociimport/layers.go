package ociimport

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	kgzip "github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/bangerdev/banger/internal/api"
)

// layerSource is one layer to apply.
type layerSource struct {
	name string // its digest, for messages
	// open returns the layer as stored (compressed) when decompress is
	// set, else its tar stream. Reading it to its end verifies its digest.
	open       func() (io.ReadCloser, error)
	decompress bool
	size       int64 // bytes open returns; 0 when unknown
}

// Readahead: each layer is read and decompressed by a goroutine of its
// own into a bounded queue of chunks, so decompression runs beside the
// extraction, and the next layer's download starts while the current one
// is extracted. At most two layers are in flight: 2 × readaheadChunks ×
// chunkSize bytes of memory.
const (
	chunkSize       = 1 << 20
	readaheadChunks = 16
)

type readahead struct {
	ch   chan []byte
	done chan struct{}
	err  error // set before ch is closed
	cur  []byte
}

func startReadahead(ctx context.Context, ls layerSource, counter *atomic.Int64) *readahead {
	ra := &readahead{ch: make(chan []byte, readaheadChunks), done: make(chan struct{})}
	go func() {
		defer close(ra.done)
		defer close(ra.ch)
		ra.err = ra.run(ctx, ls, counter)
	}()
	return ra
}

func (ra *readahead) run(ctx context.Context, ls layerSource, counter *atomic.Int64) error {
	rc, err := ls.open()
	if err != nil {
		return fmt.Errorf("open layer: %w", err)
	}
	defer rc.Close()
	raw := &countingReader{r: rc, n: counter}
	var r io.Reader = raw
	if ls.decompress {
		dr, closeFn, err := decompressor(raw)
		if err != nil {
			return err
		}
		defer closeFn()
		r = dr
	}
	for {
		buf := make([]byte, chunkSize)
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			select {
			case ra.ch <- buf[:n]:
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read layer: %w", err)
		}
	}
	// What follows the compressed stream is read too: the digest is
	// verified when the stored blob has been read to its end.
	if _, err := io.Copy(io.Discard, raw); err != nil {
		return fmt.Errorf("read layer: %w", err)
	}
	return nil
}

func (ra *readahead) Read(p []byte) (int, error) {
	for len(ra.cur) == 0 {
		b, ok := <-ra.ch
		if !ok {
			if ra.err != nil {
				return 0, ra.err
			}
			return 0, io.EOF
		}
		ra.cur = b
	}
	n := copy(p, ra.cur)
	ra.cur = ra.cur[n:]
	return n, nil
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// decompressor recognises gzip and zstd by their magic numbers (media
// types lie often enough); anything else is taken as a plain tar.
func decompressor(r io.Reader) (io.Reader, func(), error) {
	br := bufio.NewReaderSize(r, 1<<16)
	head, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, fmt.Errorf("read layer: %w", err)
	}
	switch {
	case bytes.HasPrefix(head, gzipMagic):
		zr, err := kgzip.NewReader(br)
		if err != nil {
			return nil, nil, fmt.Errorf("layer: gzip: %w", err)
		}
		return zr, func() { zr.Close() }, nil
	case bytes.HasPrefix(head, zstdMagic):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, nil, fmt.Errorf("layer: zstd: %w", err)
		}
		return zr, zr.Close, nil
	default:
		return br, func() {}, nil
	}
}

// progressReader reports the bytes read by the layers' readers at most
// every progressEvery.
type progressReader struct {
	r        io.Reader
	read     *atomic.Int64
	total    int64
	progress func(api.Progress)
	last     time.Time
}

const progressEvery = 200 * time.Millisecond

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if now := time.Now(); now.Sub(p.last) >= progressEvery {
		p.last = now
		p.report()
	}
	return n, err
}

func (p *progressReader) report() {
	p.progress(api.Progress{Phase: PhaseLayers, Done: p.read.Load(), Total: p.total, Unit: "bytes"})
}

// Progress phases.
const (
	PhaseResolve = "resolve"
	PhaseLayers  = "extract layers"
	PhaseMkfs    = "mkfs"
)

// flatten applies layers in order onto root, an existing empty directory.
func flatten(ctx context.Context, layers []layerSource, root string, log *slog.Logger, progress func(api.Progress)) (FlattenStats, error) {
	if progress == nil {
		progress = func(api.Progress) {}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a, err := newApplier(root, log)
	if err != nil {
		return FlattenStats{}, err
	}
	defer a.close()
	var total int64
	for _, l := range layers {
		if l.size <= 0 {
			total = 0
			break
		}
		total += l.size
	}
	var read atomic.Int64
	ctx, cancel := context.WithCancelCause(ctx)
	var started []*readahead
	defer func() {
		cancel(context.Canceled)
		for _, ra := range started {
			<-ra.done
		}
	}()
	pr := &progressReader{read: &read, total: total, progress: progress, last: time.Now()}
	pr.report()
	var next *readahead
	for i, l := range layers {
		cur := next
		if cur == nil {
			cur = startReadahead(ctx, l, &read)
			started = append(started, cur)
		}
		if i+1 < len(layers) {
			next = startReadahead(ctx, layers[i+1], &read)
			started = append(started, next)
		}
		pr.r = cur
		err := a.applyLayer(pr)
		if err == nil {
			// The tar's end marker may come before the stream's end.
			_, err = io.Copy(io.Discard, pr)
		}
		if err == nil {
			err = ctx.Err()
		}
		if err != nil {
			a.stats.CompressedRead = read.Load()
			return a.stats, fmt.Errorf("layer %d of %d (%s): %w", i+1, len(layers), l.name, err)
		}
	}
	if err := a.finish(); err != nil {
		return a.stats, err
	}
	a.stats.CompressedRead = read.Load()
	pr.report()
	return a.stats, nil
}

// emptyDir makes dir (mode 0755), which must not exist yet.
func emptyDir(dir string) error {
	if err := os.Mkdir(dir, 0o755); err != nil {
		return fmt.Errorf("make root directory: %w", err)
	}
	return nil
}
