package download

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
)

func payload(n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// server serves data at /f with Range support (http.ServeContent), and
// records the requests' Range headers and the bytes it wrote.
type server struct {
	*httptest.Server
	data      []byte
	mu        sync.Mutex
	ranges    []string
	served    atomic.Int64
	cutOnce   int64 // cut the first response after this many bytes (0: never)
	cut       atomic.Bool
	noRange   bool // ignore Range headers
	status    int  // answer this status instead (0: serve)
	etagAfter string
}

func newServer(t *testing.T, data []byte) *server {
	s := &server{data: data}
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

type countingWriter struct {
	http.ResponseWriter
	s     *server
	limit int64 // stop after this many body bytes (0: none)
	n     int64
}

var errCut = errors.New("cut")

func (w *countingWriter) Write(p []byte) (int, error) {
	if w.limit > 0 && w.n+int64(len(p)) > w.limit {
		p = p[:w.limit-w.n]
		n, _ := w.ResponseWriter.Write(p)
		w.n += int64(n)
		w.s.served.Add(int64(n))
		return n, errCut
	}
	n, err := w.ResponseWriter.Write(p)
	w.n += int64(n)
	w.s.served.Add(int64(n))
	return n, err
}

func (s *server) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.ranges = append(s.ranges, r.Header.Get("Range"))
	s.mu.Unlock()
	if s.status != 0 {
		http.Error(w, "nope", s.status)
		return
	}
	if s.etagAfter != "" && r.Header.Get("Range") != "" {
		w.Header().Set("ETag", s.etagAfter)
	} else {
		w.Header().Set("ETag", `"v1"`)
	}
	if s.noRange {
		r.Header.Del("Range")
	}
	cw := &countingWriter{ResponseWriter: w, s: s}
	if s.cutOnce > 0 && s.cut.CompareAndSwap(false, true) {
		cw.limit = s.cutOnce
		defer func() {
			// Drop the connection mid-body.
			if hj, ok := w.(http.Hijacker); ok {
				if c, _, err := hj.Hijack(); err == nil {
					c.Close()
				}
			}
		}()
	}
	http.ServeContent(cw, r, "f", time.Unix(0, 0), bytes.NewReader(s.data))
}

func (s *server) requests() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.ranges...)
}

func readAll(t *testing.T, src Source, off int64) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rc, err := src.Open(ctx, off)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

func TestHTTPWhole(t *testing.T) {
	data := payload(1 << 20)
	s := newServer(t, data)
	src, err := New(s.URL+"/f", Options{})
	if err != nil {
		t.Fatal(err)
	}
	if src.Size() != -1 {
		t.Errorf("size before any request = %d, want -1", src.Size())
	}
	got, err := readAll(t, src, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("got %d bytes, not the file's %d", len(got), len(data))
	}
	if src.Size() != int64(len(data)) {
		t.Errorf("size = %d, want %d", src.Size(), len(data))
	}
	if r := s.requests(); len(r) != 1 || r[0] != "" {
		t.Errorf("requests' ranges = %q, want one without Range", r)
	}
}

func TestHTTPOffset(t *testing.T) {
	data := payload(300 << 10)
	s := newServer(t, data)
	src, _ := New(s.URL+"/f", Options{Size: int64(len(data))})
	got, err := readAll(t, src, 100000)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data[100000:]) {
		t.Fatalf("got %d bytes, not the file's tail", len(got))
	}
	if r := s.requests(); len(r) != 1 || r[0] != "bytes=100000-" {
		t.Errorf("requests' ranges = %q, want [bytes=100000-]", r)
	}
	if n := s.served.Load(); n != int64(len(data)-100000) {
		t.Errorf("server wrote %d bytes, want only the tail's %d", n, len(data)-100000)
	}
}

// A server that ignores Range: the stream still starts at the offset (the
// head is read again and discarded).
func TestHTTPServerIgnoresRange(t *testing.T) {
	data := payload(200 << 10)
	s := newServer(t, data)
	s.noRange = true
	src, _ := New(s.URL+"/f", Options{})
	got, err := readAll(t, src, 5000)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data[5000:]) {
		t.Fatalf("got %d bytes, not the file from byte 5000", len(got))
	}
	if n := s.served.Load(); n != int64(len(data)) {
		t.Errorf("server wrote %d bytes, want the whole file %d", n, len(data))
	}
}

// A body cut short is resumed with a Range request from where it stopped.
func TestHTTPResumesCutBody(t *testing.T) {
	data := payload(2 << 20)
	s := newServer(t, data)
	s.cutOnce = 700 << 10
	src, _ := New(s.URL+"/f", Options{})
	got, err := readAll(t, src, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("got %d bytes, not the file's %d", len(got), len(data))
	}
	r := s.requests()
	if len(r) != 2 || r[0] != "" || !strings.HasPrefix(r[1], "bytes=") {
		t.Fatalf("requests' ranges = %q, want a whole request then a Range request", r)
	}
	var from int64
	fmt.Sscanf(r[1], "bytes=%d-", &from)
	if from == 0 || from > s.cutOnce {
		t.Errorf("resumed from %d, want (0, %d]", from, s.cutOnce)
	}
	if n := s.served.Load(); n >= 2*int64(len(data)) || n < int64(len(data)) {
		t.Errorf("server wrote %d bytes for a %d byte file", n, len(data))
	}
}

// If the file changed between the first request and the resumption
// (If-Range failed), the download stops with an error.
func TestHTTPChangedDuringDownload(t *testing.T) {
	data := payload(1 << 20)
	s := newServer(t, data)
	s.cutOnce = 100 << 10
	s.etagAfter = `"v2"`
	s.noRange = true // If-Range mismatch: the whole (new) file comes back
	src, _ := New(s.URL+"/f", Options{Retries: 2})
	_, err := readAll(t, src, 0)
	if err == nil || !strings.Contains(err.Error(), "changed on the server") {
		t.Fatalf("err = %v, want the file changed", err)
	}
}

func TestHTTPErrors(t *testing.T) {
	for _, tc := range []struct {
		status int
		kind   error
	}{
		{http.StatusNotFound, errdefs.ErrNotFound},
		{http.StatusInternalServerError, nil},
		{http.StatusBadGateway, nil},
		{http.StatusForbidden, errdefs.ErrPermissionDenied},
	} {
		s := newServer(t, nil)
		s.status = tc.status
		src, _ := New(s.URL+"/f", Options{})
		_, err := readAll(t, src, 0)
		if !errors.Is(err, ErrUnreachable) {
			t.Errorf("HTTP %d: err = %v, want ErrUnreachable", tc.status, err)
		}
		if tc.kind != nil && !errors.Is(err, tc.kind) {
			t.Errorf("HTTP %d: err = %v, want %v", tc.status, err, tc.kind)
		}
		if err != nil && !strings.Contains(err.Error(), fmt.Sprint(tc.status)) {
			t.Errorf("HTTP %d: err = %v does not name the status", tc.status, err)
		}
	}
}

func TestHTTPConnectionRefused(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	src, _ := New("http://"+addr+"/f", Options{})
	_, err = readAll(t, src, 0)
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("err = %v, want ErrUnreachable", err)
	}
}

// A name that doesn't resolve is unreachable. The dialer fails as the
// resolver would: no query leaves the machine.
func TestHTTPNoSuchHost(t *testing.T) {
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		return nil, &net.OpError{Op: "dial", Net: network, Err: &net.DNSError{Err: "no such host", Name: "no-such-host.invalid", IsNotFound: true}}
	}}}
	src, _ := New("https://no-such-host.invalid/f", Options{Client: client})
	_, err := readAll(t, src, 0)
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("err = %v, want ErrUnreachable", err)
	}
}

// A server that stops sending is an idle timeout, then resumed; the
// retries are bounded.
func TestHTTPStalledServer(t *testing.T) {
	var reqs atomic.Int32
	release := make(chan struct{})
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reqs.Add(1)
		w.Header().Set("Content-Length", "1000")
		w.Write(make([]byte, 10))
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	defer s.Close()
	defer close(release)
	src, _ := New(s.URL+"/f", Options{IdleTimeout: 100 * time.Millisecond, Retries: 2})
	_, err := readAll(t, src, 0)
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("err = %v, want ErrUnreachable after the retries", err)
	}
	if n := reqs.Load(); n != 3 {
		t.Errorf("%d requests, want 3 (the first and 2 resumptions)", n)
	}
}

func TestHTTPCancel(t *testing.T) {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.Write(make([]byte, 10))
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	defer s.Close()
	src, _ := New(s.URL+"/f", Options{})
	ctx, cancel := context.WithCancel(context.Background())
	rc, err := src.Open(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	_, err = io.ReadAll(rc)
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrUnreachable) {
		t.Fatalf("err = %v, want context.Canceled and not ErrUnreachable", err)
	}
}

func TestURLRules(t *testing.T) {
	for _, ok := range []string{
		"https://example.com/x.tar.zst", "http://127.0.0.1:8080/x", "http://localhost/x", "http://[::1]:9/x",
		"http://127.3.4.5/x", "file:///var/x", "/var/x",
	} {
		if _, err := New(ok, Options{}); err != nil {
			t.Errorf("New(%s): %v", ok, err)
		}
	}
	for _, bad := range []string{
		"http://example.com/x", "http://10.0.0.1/x", "ftp://127.0.0.1/x", "relative/path", "file://host/x",
		"https:///x", "file:relative",
	} {
		_, err := New(bad, Options{})
		if !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("New(%s) = %v, want ErrInvalid", bad, err)
		}
	}
}

// A redirect from loopback http to a non-loopback http host is refused
// before any request goes there.
func TestHTTPRedirectRules(t *testing.T) {
	s := httptest.NewServer(http.RedirectHandler("http://192.0.2.1/x", http.StatusFound))
	defer s.Close()
	src, _ := New(s.URL+"/f", Options{})
	_, err := readAll(t, src, 0)
	if err == nil || !strings.Contains(err.Error(), "loopback") || errors.Is(err, ErrUnreachable) {
		t.Fatalf("err = %v, want the redirect refused", err)
	}
}

func TestFile(t *testing.T) {
	data := payload(100 << 10)
	p := filepath.Join(t.TempDir(), "b.tar.zst")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{p, "file://" + p} {
		src, err := New(ref, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if src.Size() != int64(len(data)) {
			t.Errorf("%s: size %d, want %d", ref, src.Size(), len(data))
		}
		got, err := readAll(t, src, 1234)
		if err != nil || !bytes.Equal(got, data[1234:]) {
			t.Errorf("%s from 1234: %d bytes, %v", ref, len(got), err)
		}
		if _, err := readAll(t, src, int64(len(data))+1); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s past its end: %v, want ErrInvalid", ref, err)
		}
	}
	src, _ := New(filepath.Join(t.TempDir(), "missing"), Options{})
	if _, err := readAll(t, src, 0); !errors.Is(err, ErrUnreachable) {
		t.Errorf("missing file: %v, want ErrUnreachable", err)
	}
}

func TestParseContentRange(t *testing.T) {
	for _, tc := range []struct {
		in           string
		start, total int64
		ok           bool
	}{
		{"bytes 0-99/100", 0, 100, true},
		{"bytes 10-99/*", 10, -1, true},
		{"bytes 10-99/50", 0, 0, false},
		{"bytes */100", 0, 0, false},
		{"items 0-1/2", 0, 0, false},
		{"bytes 5-4/10", 0, 0, false},
	} {
		s, tot, err := parseContentRange(tc.in)
		if (err == nil) != tc.ok || (tc.ok && (s != tc.start || tot != tc.total)) {
			t.Errorf("parseContentRange(%q) = %d, %d, %v", tc.in, s, tot, err)
		}
	}
}

// A file whose size is not the expected one is refused at once, not read
// and retried.
func TestSizeMismatch(t *testing.T) {
	data := payload(64 << 10)
	s := newServer(t, data)
	src, _ := New(s.URL+"/f", Options{Size: int64(len(data)) * 2})
	_, err := readAll(t, src, 0)
	if !errors.Is(err, errdefs.ErrInvalid) || errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "expected") {
		t.Fatalf("err = %v, want a size mismatch", err)
	}
	if r := s.requests(); len(r) != 1 {
		t.Errorf("%d requests, want 1", len(r))
	}
	p := filepath.Join(t.TempDir(), "f")
	os.WriteFile(p, data, 0o644)
	fsrc, _ := New(p, Options{Size: 10})
	if _, err := readAll(t, fsrc, 0); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("file: err = %v, want a size mismatch", err)
	}
}
