// Package download gives bundle installs their bytes: a Source reads a
// bundle from an https:// URL (http:// only on a loopback host), a file://
// URL or a file path, from any offset, so an interrupted install resumes
// where it stopped instead of starting again.
//
// An HTTP source asks for the rest of the file with a Range request. A
// server that answers 206 must say, in Content-Range, that the part starts
// at the offset asked for; a server that ignores Range (200, the whole
// file) is read from its start and the first offset bytes are discarded,
// so the caller always gets the bytes it asked for. A body cut short (a
// reset connection, a server that stops) is resumed by a new Range request
// from where it stopped, a bounded number of times.
//
// Errors that mean the bytes can't be had from that place at all (no such
// host, connection refused, TLS failure, HTTP 404 or 5xx, no such file)
// wrap ErrUnreachable: a caller that has another way to make the thing (a
// local build) falls back on it; other errors (a refused URL, a cancelled
// context) don't.
package download

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
)

// ErrUnreachable wraps the errors that mean the source can't be fetched
// from where it is (network, server or missing file), as opposed to a
// refused address or a cancellation.
var ErrUnreachable = errors.New("can't fetch")

// Source is a resumable byte stream (bundle.Source): Open returns the
// stream from offset on; Size is its total length, or -1 while unknown.
type Source interface {
	Open(ctx context.Context, offset int64) (io.ReadCloser, error)
	Size() int64
}

// Options tune a Source.
type Options struct {
	// Size is the expected total size (a catalog entry's); 0: learnt from
	// the server or the file.
	Size int64
	// Client is the HTTP client (default: one with connect, TLS and
	// response-header timeouts; redirects follow the same scheme rules).
	Client *http.Client
	// Retries is how many times a cut body is resumed within one Open's
	// stream (default 5); negative: never.
	Retries int
	// IdleTimeout ends a read that gets no byte for that long (default
	// 60s): a stalled server is an error, not a hang.
	IdleTimeout time.Duration
	// Log receives resumptions (default: discarded).
	Log *slog.Logger
}

// New returns the source of ref: an https:// or http:// URL (plain HTTP
// only to a loopback host: localhost, 127.0.0.0/8, ::1), a file:// URL, or
// an absolute file path. Anything else is an ErrInvalid error.
func New(ref string, o Options) (Source, error) {
	if strings.HasPrefix(ref, "/") {
		return newFile(ref, o.Size), nil
	}
	u, err := url.Parse(ref)
	if err != nil {
		return nil, fmt.Errorf("source %s: %w: %w", errdefs.Quote(ref), err, errdefs.ErrInvalid)
	}
	switch u.Scheme {
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return nil, fmt.Errorf("source %s: a file URL names a file on this host (file:///PATH): %w", errdefs.Quote(ref), errdefs.ErrInvalid)
		}
		if !strings.HasPrefix(u.Path, "/") {
			return nil, fmt.Errorf("source %s: want file:///ABSOLUTE/PATH: %w", errdefs.Quote(ref), errdefs.ErrInvalid)
		}
		return newFile(u.Path, o.Size), nil
	case "https", "http":
		if err := CheckURL(u); err != nil {
			return nil, err
		}
		return newHTTP(u, o), nil
	}
	return nil, fmt.Errorf("source %s: want an https:// URL, http:// on a loopback host, file:// or an absolute path: %w", errdefs.Quote(ref), errdefs.ErrInvalid)
}

// CheckURL refuses what banger never downloads from: schemes other than
// https, and plain http to anything but a loopback host.
func CheckURL(u *url.URL) error {
	switch u.Scheme {
	case "https":
		if u.Host == "" {
			return fmt.Errorf("url %s has no host: %w", errdefs.Quote(u.String()), errdefs.ErrInvalid)
		}
		return nil
	case "http":
		if !IsLoopback(u.Hostname()) {
			return fmt.Errorf("url %s: plain http is allowed only to a loopback host (localhost, 127.0.0.1, ::1); use https: %w", errdefs.Quote(u.String()), errdefs.ErrInvalid)
		}
		return nil
	}
	return fmt.Errorf("url %s: want https (or http to a loopback host): %w", errdefs.Quote(u.String()), errdefs.ErrInvalid)
}

// IsLoopback reports whether host (a URL's hostname) is loopback:
// "localhost" or an address in 127.0.0.0/8 or ::1.
func IsLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.Unmap().IsLoopback()
}

// file is a Source reading a local file.
type file struct {
	path string
	size atomic.Int64
}

func newFile(path string, size int64) *file {
	f := &file{path: path}
	if size <= 0 {
		size = -1
		if st, err := os.Stat(path); err == nil && st.Mode().IsRegular() {
			size = st.Size()
		}
	}
	f.size.Store(size)
	return f
}

func (f *file) Size() int64 { return f.size.Load() }

func (f *file) Open(ctx context.Context, offset int64) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fh, err := os.Open(f.path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open %s: %w: %w", f.path, ErrUnreachable, err)
		}
		return nil, fmt.Errorf("open %s: %w", f.path, err)
	}
	st, err := fh.Stat()
	if err != nil {
		fh.Close()
		return nil, fmt.Errorf("stat %s: %w", f.path, err)
	}
	if !st.Mode().IsRegular() {
		fh.Close()
		return nil, fmt.Errorf("%s is not a regular file: %w", f.path, errdefs.ErrInvalid)
	}
	if want := f.size.Load(); want >= 0 && st.Size() != want {
		fh.Close()
		return nil, fmt.Errorf("%s has %d bytes, %d were expected (a truncated or replaced file?): %w", f.path, st.Size(), want, errdefs.ErrInvalid)
	}
	if offset < 0 || offset > st.Size() {
		fh.Close()
		return nil, fmt.Errorf("%s: offset %d is outside the file (%d bytes): %w", f.path, offset, st.Size(), errdefs.ErrInvalid)
	}
	if _, err := fh.Seek(offset, io.SeekStart); err != nil {
		fh.Close()
		return nil, fmt.Errorf("seek %s: %w", f.path, err)
	}
	return fh, nil
}

// httpSource is a Source reading a URL with Range requests.
type httpSource struct {
	url     *url.URL
	client  *http.Client
	retries int
	idle    time.Duration
	log     *slog.Logger
	size    atomic.Int64

	expected int64 // Options.Size (0: none)

	mu        sync.Mutex
	validator string // the first answer's strong ETag (or Last-Modified), for If-Range
}

// defaultClient has timeouts on every step before the body; the body's
// reads have their own (idle) timeout.
var defaultClient = &http.Client{
	Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   30 * time.Second,
		ResponseHeaderTimeout: 60 * time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   4,
		ForceAttemptHTTP2:     true,
		TLSClientConfig:       &tls.Config{MinVersion: tls.VersionTLS12},
	},
	CheckRedirect: checkRedirect,
}

func checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= 10 {
		return errors.New("stopped after 10 redirects")
	}
	if via[0].URL.Scheme == "https" && req.URL.Scheme != "https" {
		return fmt.Errorf("redirect from https to %s refused: %w", req.URL.Scheme, errdefs.ErrInvalid)
	}
	return CheckURL(req.URL)
}

func newHTTP(u *url.URL, o Options) *httpSource {
	s := &httpSource{url: u, client: o.Client, retries: o.Retries, idle: o.IdleTimeout, log: o.Log, expected: max(o.Size, 0)}
	if s.client == nil {
		s.client = defaultClient
	} else if s.client.CheckRedirect == nil {
		c := *s.client
		c.CheckRedirect = checkRedirect
		s.client = &c
	}
	if s.retries == 0 {
		s.retries = 5
	}
	if s.idle == 0 {
		s.idle = 60 * time.Second
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	size := o.Size
	if size <= 0 {
		size = -1
	}
	s.size.Store(size)
	return s
}

func (s *httpSource) Size() int64 { return s.size.Load() }

// Open returns the stream from offset on. Its reads resume a cut body
// with a Range request from where it stopped, up to Retries times in a
// row without progress.
func (s *httpSource) Open(ctx context.Context, offset int64) (io.ReadCloser, error) {
	if offset < 0 {
		return nil, fmt.Errorf("%s: negative offset %d: %w", s.url.Redacted(), offset, errdefs.ErrInvalid)
	}
	r := &resumingReader{ctx: ctx, src: s, off: offset}
	if err := r.open(); err != nil {
		return nil, err
	}
	return r, nil
}

// get asks for the bytes from offset on and returns a body that starts
// exactly there.
func (s *httpSource) get(ctx context.Context, offset int64) (io.ReadCloser, error) {
	name := s.url.Redacted()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w: %w", name, err, errdefs.ErrInvalid)
	}
	// Bytes as stored: a transparently decompressed body would make
	// offsets meaningless.
	req.Header.Set("Accept-Encoding", "identity")
	s.mu.Lock()
	validator := s.validator
	s.mu.Unlock()
	if offset > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", offset))
		if validator != "" {
			req.Header.Set("If-Range", validator)
		}
	}
	resp, err := s.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if errors.Is(err, errdefs.ErrInvalid) {
			return nil, fmt.Errorf("GET %s: %w", name, err)
		}
		return nil, fmt.Errorf("GET %s: %w: %w", name, ErrUnreachable, err)
	}
	switch {
	case resp.StatusCode == http.StatusPartialContent && offset > 0:
		start, total, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || start != offset {
			resp.Body.Close()
			if err == nil {
				err = fmt.Errorf("it starts at %d", start)
			}
			return nil, fmt.Errorf("GET %s from byte %d: bad Content-Range %q: %w", name, offset, resp.Header.Get("Content-Range"), err)
		}
		if err := s.learnSize(total); err != nil {
			resp.Body.Close()
			return nil, err
		}
		return resp.Body, nil
	case resp.StatusCode == http.StatusOK:
		if err := s.learnSize(resp.ContentLength); err != nil {
			resp.Body.Close()
			return nil, err
		}
		v := validatorOf(resp.Header)
		if offset == 0 {
			s.mu.Lock()
			s.validator = v
			s.mu.Unlock()
			return resp.Body, nil
		}
		if validator != "" && v != validator {
			// If-Range failed: the file changed since the first bytes.
			resp.Body.Close()
			return nil, fmt.Errorf("GET %s: the file changed on the server during the download (validator %s, was %s): pull again: %w", name, v, validator, ErrUnreachable)
		}
		// The server ignores Range: read again from the start and drop
		// what the caller already has.
		s.log.Info("server ignores range requests: reading again from the start", "url", name, "skip", offset)
		if _, err := io.CopyN(io.Discard, resp.Body, offset); err != nil {
			resp.Body.Close()
			return nil, fmt.Errorf("GET %s: skip %d bytes already read: %w: %w", name, offset, ErrUnreachable, err)
		}
		return resp.Body, nil
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable:
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s from byte %d: the server has fewer bytes (%s): %w", name, offset, resp.Header.Get("Content-Range"), ErrUnreachable)
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s: %w: %w", name, resp.Status, ErrUnreachable, errdefs.ErrNotFound)
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s: %w: %w", name, resp.Status, ErrUnreachable, errdefs.ErrPermissionDenied)
	default:
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s: %w", name, resp.Status, ErrUnreachable)
	}
}

// learnSize records the size the server reports (n < 0: unknown); one
// that differs from the expected size is an error: the file is not the
// one the caller was promised.
func (s *httpSource) learnSize(n int64) error {
	if n < 0 {
		return nil
	}
	if s.expected > 0 && n != s.expected {
		return fmt.Errorf("GET %s: the server has %d bytes, %d were expected (a truncated or replaced file?): %w", s.url.Redacted(), n, s.expected, errdefs.ErrInvalid)
	}
	s.size.CompareAndSwap(-1, n)
	return nil
}

// validatorOf returns what If-Range may carry: a strong ETag, else
// Last-Modified.
func validatorOf(h http.Header) string {
	if e := h.Get("ETag"); e != "" && !strings.HasPrefix(e, "W/") {
		return e
	}
	return h.Get("Last-Modified")
}

// parseContentRange parses "bytes START-END/TOTAL" (TOTAL may be "*": -1).
func parseContentRange(v string) (start, total int64, err error) {
	rest, ok := strings.CutPrefix(v, "bytes ")
	if !ok {
		return 0, 0, errors.New("not a byte range")
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, errors.New("no total")
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, errors.New("no range")
	}
	start, err1 := strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || start < 0 || end < start {
		return 0, 0, errors.New("bad range")
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil || total <= end {
			return 0, 0, errors.New("bad total")
		}
	}
	return start, total, nil
}

// resumingReader reads an HTTP body and, when it is cut short, asks for
// the rest with a Range request.
type resumingReader struct {
	ctx    context.Context
	src    *httpSource
	off    int64 // the offset of the next byte
	body   io.ReadCloser
	cancel context.CancelFunc
	idle   *time.Timer
	fails  int // failures in a row without a byte read
	closed bool
}

func (r *resumingReader) open() error {
	ctx, cancel := context.WithCancel(r.ctx)
	body, err := r.src.get(ctx, r.off)
	if err != nil {
		cancel()
		return err
	}
	r.body, r.cancel = body, cancel
	// A read that gets nothing for the idle timeout cancels the request.
	r.idle = time.AfterFunc(r.src.idle, cancel)
	return nil
}

func (r *resumingReader) drop() {
	if r.body != nil {
		r.idle.Stop()
		r.body.Close()
		r.cancel()
		r.body = nil
	}
}

func (r *resumingReader) Read(p []byte) (int, error) {
	if r.closed {
		return 0, errors.New("read after close")
	}
	for {
		if r.body == nil {
			if err := r.open(); err != nil {
				return 0, err
			}
		}
		n, err := r.body.Read(p)
		r.off += int64(n)
		if n > 0 {
			r.idle.Reset(r.src.idle)
			r.fails = 0
		}
		if err == nil {
			return n, nil
		}
		total := r.src.Size()
		if errors.Is(err, io.EOF) && (total < 0 || r.off >= total) {
			return n, io.EOF
		}
		// Cut short: a reset, a server that stopped, or an idle timeout.
		r.drop()
		if r.ctx.Err() != nil {
			return n, r.ctx.Err()
		}
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		r.fails++
		if r.fails > r.src.retries {
			return n, fmt.Errorf("GET %s: cut at byte %d of %d, %d times in a row: %w: %w", r.src.url.Redacted(), r.off, total, r.fails, ErrUnreachable, err)
		}
		r.src.log.Info("download cut short: resuming", "url", r.src.url.Redacted(), "offset", r.off, "err", err, "attempt", r.fails)
		if n > 0 {
			return n, nil
		}
		if err := r.backoff(); err != nil {
			return 0, err
		}
	}
}

// backoff waits before a resumption: 0.25 s, doubling, at most 4 s.
func (r *resumingReader) backoff() error {
	d := min(250*time.Millisecond<<(r.fails-1), 4*time.Second)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-r.ctx.Done():
		return r.ctx.Err()
	}
}

func (r *resumingReader) Close() error {
	r.closed = true
	r.drop()
	return nil
}
