package guestagent

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"testing"
	"testing/iotest"
	"time"
)

func TestReadAheadKeepsOrderAndError(t *testing.T) {
	data := make([]byte, 3<<20+123)
	rand.Read(data)
	boom := errors.New("boom")
	for name, src := range map[string]io.Reader{
		"one byte": iotest.OneByteReader(bytes.NewReader(data[:100<<10])),
		"half":     iotest.HalfReader(bytes.NewReader(data)),
		"whole":    bytes.NewReader(data),
	} {
		t.Run(name, func(t *testing.T) {
			want := data
			if name == "one byte" {
				want = data[:100<<10]
			}
			ra := newReadAhead(io.MultiReader(src, iotest.ErrReader(boom)), 3, 64<<10)
			defer ra.Close()
			got, err := io.ReadAll(iotest.HalfReader(ra))
			if !errors.Is(err, boom) {
				t.Fatalf("err %v, want boom", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("read %d bytes, not the source's %d", len(got), len(want))
			}
		})
	}
}

// countingReader counts the bytes read from it.
type countingReader struct {
	r io.Reader
	n chan int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n <- n
	return n, err
}

func TestReadAheadReadsAheadOfAnIdleReader(t *testing.T) {
	src := &countingReader{r: bytes.NewReader(make([]byte, 10<<20)), n: make(chan int, 1000)}
	ra := newReadAhead(src, 4, 64<<10)
	defer ra.Close()
	var one [1]byte
	if _, err := ra.Read(one[:]); err != nil {
		t.Fatal(err)
	}
	// The reader now sits on its first chunk; the other three buffers
	// fill meanwhile, and no more.
	total := 0
	deadline := time.After(10 * time.Second)
	for total < 4*64<<10 {
		select {
		case n := <-src.n:
			total += n
		case <-deadline:
			t.Fatalf("read %d bytes ahead of an idle reader, want %d", total, 4*64<<10)
		}
	}
	select {
	case n := <-src.n:
		t.Fatalf("read %d more bytes with every buffer full", n)
	case <-time.After(100 * time.Millisecond):
	}
}

func TestReadAheadCloseAfterTheSourceCloses(t *testing.T) {
	pr, pw := io.Pipe()
	ra := newReadAhead(pr, 2, 1024)
	if _, err := pw.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	var b [8]byte
	if n, err := ra.Read(b[:]); err != nil || string(b[:n]) != "abc" {
		t.Fatalf("read %q, %v", b[:n], err)
	}
	// The goroutine is blocked reading the pipe: closing the source
	// (as a data port is closed) lets Close return.
	pr.CloseWithError(errors.New("port closed"))
	closeWithin(t, ra, "Close did not return once the source was closed")
	if _, err := ra.Read(b[:]); err == nil {
		t.Fatal("a read after Close succeeded")
	}
}

// TestReadAheadCloseStopsFilling: with the reader gone and the source
// never ending, the goroutine waits with every buffer full; Close stops
// it without the source's help.
func TestReadAheadCloseStopsFilling(t *testing.T) {
	src := &countingReader{r: zeroReader{}, n: make(chan int, 1<<20)}
	ra := newReadAhead(src, 2, 1024)
	deadline := time.After(10 * time.Second)
	for total := 0; total < 2*1024; {
		select {
		case n := <-src.n:
			total += n
		case <-deadline:
			t.Fatalf("read %d bytes ahead, want the 2 buffers filled", total)
		}
	}
	closeWithin(t, ra, "Close did not stop a goroutine waiting to hand over a buffer")
	var b [4096]byte
	n, err := io.ReadFull(ra, b[:])
	if n > 2*1024 || err == nil {
		t.Fatalf("after Close: read %d bytes, %v; want at most what was read ahead, then an error", n, err)
	}
}

// zeroReader reads zeros without end.
type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// closeWithin closes ra, failing with msg when Close takes 10 s.
func closeWithin(t *testing.T, ra *readAhead, msg string) {
	t.Helper()
	done := make(chan struct{})
	go func() { ra.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal(msg)
	}
}
