package guestagent

import (
	"io"
	"sync"
)

// readAhead reads its source in a goroutine, a few buffers ahead of its
// reader, so that taking bytes off a data port (on one vCPU) overlaps with
// what the reader does with them (a copy in writing files, on another);
// read in turn, the guest's CPU does one and then the other. The source
// is read into a buffer until the buffer is full or the reader has nothing
// queued, so a reader slower than the port gets few large chunks.
type readAhead struct {
	full chan []byte // chunks read, in order
	free chan []byte // buffers to read into
	stop chan struct{}
	done chan struct{}
	// err is the source's error (io.EOF at its end), set before full is
	// closed.
	err error

	cur  []byte // what is left of the chunk being read
	buf  []byte // the buffer cur is in
	once sync.Once
}

// newReadAhead reads r ahead of its reader into at most n buffers of size
// bytes, allocated as they are needed (a small copy takes one).
func newReadAhead(r io.Reader, n, size int) *readAhead {
	ra := &readAhead{
		full: make(chan []byte, n),
		free: make(chan []byte, n),
		stop: make(chan struct{}),
		done: make(chan struct{}),
	}
	go ra.fill(r, n, size)
	return ra
}

func (ra *readAhead) fill(r io.Reader, n, size int) {
	defer close(ra.done)
	defer close(ra.full)
	made := 0
	for {
		var buf []byte
		select {
		case buf = <-ra.free:
		default:
			if made < n {
				buf = make([]byte, size)
				made++
				break
			}
			select {
			case buf = <-ra.free:
			case <-ra.stop:
				ra.err = io.ErrClosedPipe
				return
			}
		}
		var (
			got int
			err error
		)
		for got < len(buf) && err == nil {
			var m int
			m, err = r.Read(buf[got:])
			got += m
			if got > 0 && len(ra.full) == 0 {
				break // the reader has nothing left: hand over what there is
			}
		}
		if got == 0 {
			ra.free <- buf // never blocks: n buffers, n places
		} else {
			select {
			case ra.full <- buf[:got]:
			case <-ra.stop:
				ra.err = io.ErrClosedPipe
				return
			}
		}
		if err != nil {
			ra.err = err
			return
		}
	}
}

// Read returns the source's bytes in order, then its error.
func (ra *readAhead) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for len(ra.cur) == 0 {
		if ra.buf != nil {
			ra.free <- ra.buf[:cap(ra.buf)]
			ra.buf = nil
		}
		chunk, ok := <-ra.full
		if !ok {
			return 0, ra.err
		}
		ra.buf, ra.cur = chunk, chunk
	}
	n := copy(p, ra.cur)
	ra.cur = ra.cur[n:]
	return n, nil
}

// Close stops reading ahead and waits for the goroutine to end: the source
// must return from a read in progress (a data port is closed first).
// Reads after Close return what was already read, then io.ErrClosedPipe or
// the source's error.
func (ra *readAhead) Close() {
	ra.once.Do(func() { close(ra.stop) })
	<-ra.done
}
