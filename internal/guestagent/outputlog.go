package guestagent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
)

// The main process's output travels from PID 1 (which runs the process)
// to the agent server (which serves ReqAttach) as a sequence of log
// entries: output chunks and state changes, the last one the final exit.
// Both sides keep them in an outputLog, a bounded log that readers follow
// with a cursor and that never blocks its writer: a reader that falls
// behind the bound skips what was dropped.

// Kinds of log entries, also their type byte on the link.
const (
	entryStdout = 'o'
	entryStderr = 'e'
	// entryState carries an agentproto.MainProcessState (JSON).
	entryState = 's'
)

// mainLogMax bounds the output an outputLog holds (attach replays at most
// this much).
const mainLogMax = 1 << 20

// logEntry is one entry of an outputLog.
type logEntry struct {
	kind byte
	data []byte
}

// outputLog is a bounded, append-only log of entries with absolute
// indexes. Entries are dropped from the front when their data exceeds
// max bytes (the newest entry always stays).
type outputLog struct {
	mu      sync.Mutex
	entries []logEntry
	first   int64 // index of entries[0]
	size    int   // bytes held
	max     int
	changed chan struct{} // closed (and replaced) at each append
}

func newOutputLog(max int) *outputLog {
	return &outputLog{max: max, changed: make(chan struct{})}
}

// append adds an entry (data is copied).
func (l *outputLog) append(kind byte, data []byte) {
	e := logEntry{kind: kind, data: append([]byte(nil), data...)}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.entries = append(l.entries, e)
	l.size += len(e.data)
	for l.size > l.max && len(l.entries) > 1 {
		l.size -= len(l.entries[0].data)
		l.entries[0] = logEntry{}
		l.entries = l.entries[1:]
		l.first++
	}
	close(l.changed)
	l.changed = make(chan struct{})
}

// end is the index the next entry will get.
func (l *outputLog) end() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.first + int64(len(l.entries))
}

// read returns the entries from index i on (from the oldest one held when
// i was dropped), the index after them, and, when there are none yet, a
// channel closed when one is appended.
func (l *outputLog) read(i int64) (es []logEntry, next int64, more <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if i < l.first {
		i = l.first
	}
	end := l.first + int64(len(l.entries))
	if i >= end {
		return nil, end, l.changed
	}
	return append([]logEntry(nil), l.entries[i-l.first:]...), end, nil
}

// follow calls fn for every entry from index i on, as they are appended,
// until fn returns false or an error, or ctx ends.
func (l *outputLog) follow(ctx context.Context, i int64, fn func(logEntry) (bool, error)) error {
	for {
		es, next, more := l.read(i)
		for _, e := range es {
			ok, err := fn(e)
			if err != nil || !ok {
				return err
			}
		}
		i = next
		if more != nil {
			select {
			case <-more:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
}

// maxLinkFrame bounds one entry on the link.
const maxLinkFrame = 1 << 20

// writeLinkEntry writes e on the link: its kind byte, its length (uint32,
// big endian) and its data.
func writeLinkEntry(w io.Writer, e logEntry) error {
	b := make([]byte, 5+len(e.data))
	b[0] = e.kind
	binary.BigEndian.PutUint32(b[1:], uint32(len(e.data)))
	copy(b[5:], e.data)
	_, err := w.Write(b)
	return err
}

// readLinkEntry reads one entry written by writeLinkEntry.
func readLinkEntry(r io.Reader) (logEntry, error) {
	var h [5]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return logEntry{}, err
	}
	n := binary.BigEndian.Uint32(h[1:])
	switch h[0] {
	case entryStdout, entryStderr, entryState:
	default:
		return logEntry{}, fmt.Errorf("main process link: unknown entry type %#x", h[0])
	}
	if n > maxLinkFrame {
		return logEntry{}, fmt.Errorf("main process link: entry of %d bytes", n)
	}
	e := logEntry{kind: h[0], data: make([]byte, n)}
	if _, err := io.ReadFull(r, e.data); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return logEntry{}, err
	}
	return e, nil
}

// linkAck is the byte the agent server sends back to PID 1 once the
// final exit status was sent to an attached client.
const linkAck = 'a'
