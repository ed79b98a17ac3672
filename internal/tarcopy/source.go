package tarcopy

import (
	"archive/tar"
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
)

// sourceBufSize is the read buffer under tar.Reader: it reads a few
// hundred bytes at a time (a header, a small file, its padding), each of
// which would otherwise be a read of the stream.
const sourceBufSize = 64 << 10

// archive/tar reads a PAX GNU sparse 1.0 entry (what Write makes of a
// file with holes) itself, and hands out its holes as zeros through Read:
// a 2 GiB file with 8 MiB of data costs 2 GiB of zeros written and
// scanned, seconds in a guest. It exposes no sparse map. So, while
// tar.Reader reads an entry's headers, tarSource renames the record
// "GNU.sparse.major=1" of each PAX extended header to hiddenMajor:
// archive/tar then takes the entry for a regular file holding the map
// and the data regions (its framing untouched), and Extract reads the map
// and seeks over the holes (sparseEntry). Only the record's key changes,
// and only inside PAX extended header bodies, found by following the
// headers' framing.
const (
	sparseMajorRecord = "GNU.sparse.major=1"
	hiddenMajor       = "GNU.sparse.MAJOR" // as long as "GNU.sparse.major"
)

// maxPAXBody is the largest PAX extended header tarSource rewrites (what
// archive/tar accepts: larger ones fail there).
const maxPAXBody = 1 << 20

// tarSource is the reader Extract gives tar.Reader: a read buffer, and
// the renaming of the sparse record above between beginHeaders and
// endHeaders.
type tarSource struct {
	br  *bufio.Reader
	off int64 // stream offset of the next byte Read returns

	headers bool
	// next is the offset of the next header block while headers are
	// followed, -1 once past the entry's own header (or lost).
	next int64
	// bodyOff and bodySize place a PAX extended header's body (bodySize
	// -1 for none); body is its rewritten content being served.
	bodyOff, bodySize int64
	body              []byte
}

func newTarSource(r io.Reader) *tarSource {
	return &tarSource{br: bufio.NewReaderSize(r, sourceBufSize), next: -1, bodySize: -1}
}

// beginHeaders is called before tar.Reader.Next, once the current
// entry's content was read: its next header is at the next block.
func (s *tarSource) beginHeaders() {
	s.headers = true
	s.next = s.off + pad(s.off)
	s.bodySize, s.body = -1, nil
}

// endHeaders is called after tar.Reader.Next.
func (s *tarSource) endHeaders() {
	s.headers = false
	s.next, s.bodySize, s.body = -1, -1, nil
}

func (s *tarSource) Read(p []byte) (int, error) {
	if !s.headers || len(p) == 0 {
		return s.pass(p)
	}
	if s.body != nil {
		n := copy(p, s.body)
		s.body = s.body[n:]
		if len(s.body) == 0 {
			s.body = nil
		}
		s.off += int64(n)
		return n, nil
	}
	if s.bodySize >= 0 && s.off == s.bodyOff {
		return s.readBody(p)
	}
	if s.next >= 0 && s.off == s.next {
		s.header()
	}
	limit := int64(-1)
	switch {
	case s.bodySize >= 0:
		limit = s.bodyOff
	case s.next >= 0:
		limit = s.next
	}
	if limit > s.off && int64(len(p)) > limit-s.off {
		p = p[:limit-s.off]
	}
	return s.pass(p)
}

func (s *tarSource) pass(p []byte) (int, error) {
	n, err := s.br.Read(p)
	s.off += int64(n)
	return n, err
}

// header looks at the header block at s.off: a PAX extended header, a
// global one or a GNU long name or link precedes another header; any
// other ends what tarSource follows.
func (s *tarSource) header() {
	s.next = -1
	blk, err := s.br.Peek(512)
	if err != nil {
		return // tar.Reader gets the error
	}
	switch blk[156] {
	case 'x', 'g', 'L', 'K':
	default:
		return
	}
	size, ok := headerSize(blk[124:136])
	if !ok {
		return
	}
	s.next = s.off + 512 + size + pad(size)
	if blk[156] == 'x' && size <= maxPAXBody {
		s.bodyOff, s.bodySize = s.off+512, size
	}
}

// readBody reads the PAX body at s.off whole and serves it with the
// sparse record renamed.
func (s *tarSource) readBody(p []byte) (int, error) {
	body := make([]byte, s.bodySize)
	n, err := io.ReadFull(s.br, body)
	s.bodySize = -1
	if err != nil {
		// Serve what came; the stream's error follows.
		body = body[:n]
	} else {
		renameSparseMajor(body)
	}
	if len(body) == 0 {
		return 0, err
	}
	s.body = body
	return s.Read(p)
}

// renameSparseMajor renames the records "GNU.sparse.major=1" of a PAX
// body to hiddenMajor, in place. It stops at the first malformed record
// (archive/tar refuses the header then).
func renameSparseMajor(body []byte) {
	for len(body) > 0 {
		sp := bytes.IndexByte(body, ' ')
		if sp <= 0 {
			return
		}
		n, err := strconv.Atoi(string(body[:sp]))
		if err != nil || n <= sp+1 || n > len(body) || body[n-1] != '\n' {
			return
		}
		if kv := body[sp+1 : n-1]; string(kv) == sparseMajorRecord {
			copy(kv, hiddenMajor)
		}
		body = body[n:]
	}
}

// headerSize parses a header's size field as archive/tar does for the
// sizes of extended headers (octal, NUL or space padded); base-256 sizes
// are not followed.
func headerSize(b []byte) (int64, bool) {
	if len(b) > 0 && b[0]&0x80 != 0 {
		return 0, false
	}
	b = bytes.Trim(b, " \x00")
	if len(b) == 0 {
		return 0, true
	}
	n, err := strconv.ParseInt(string(b), 8, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// sparse1x0 turns the header of a PAX GNU sparse 1.0 entry whose major
// record tarSource hid into the file's header, as archive/tar would have
// (name from GNU.sparse.name, apparent size from GNU.sparse.size or
// GNU.sparse.realsize), and reports whether hdr was one: its content is
// then the sparse map and the data regions.
func sparse1x0(hdr *tar.Header) (bool, error) {
	rec := hdr.PAXRecords
	if rec[hiddenMajor] != "1" || rec["GNU.sparse.major"] != "" || rec["GNU.sparse.minor"] != "0" {
		return false, nil
	}
	if hdr.Typeflag != tar.TypeReg {
		return false, fmt.Errorf("read tar: sparse entry %s of type %q: %w", quote(hdr.Name), hdr.Typeflag, tar.ErrHeader)
	}
	if name := rec["GNU.sparse.name"]; name != "" {
		hdr.Name = name
	}
	size := rec["GNU.sparse.size"]
	if size == "" {
		size = rec["GNU.sparse.realsize"]
	}
	if size != "" {
		n, err := strconv.ParseInt(size, 10, 64)
		if err != nil || n < 0 {
			return false, fmt.Errorf("read tar: sparse entry %s: size %s: %w", quote(hdr.Name), quote(size), tar.ErrHeader)
		}
		hdr.Size = n
	}
	return true, nil
}

// maxSparseMap bounds a sparse map's text, as archive/tar does.
const maxSparseMap = 1 << 20

// readSparseMap reads a GNU sparse 1.0 map (the number of regions, then
// each region's offset and length, one decimal number a line, padded to a
// block) from r, block by block as archive/tar does, and checks that the
// regions are in order, apart and within size.
func readSparseMap(r io.Reader, size int64) ([]segment, error) {
	var (
		blk      [512]byte
		text     []byte
		newlines int
	)
	feed := func(n int) error {
		for newlines < n {
			if len(text)+len(blk) > maxSparseMap {
				return fmt.Errorf("longer than %d bytes: %w", maxSparseMap, tar.ErrHeader)
			}
			if _, err := io.ReadFull(r, blk[:]); err != nil {
				if errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF
				}
				return err
			}
			text = append(text, blk[:]...)
			newlines += bytes.Count(blk[:], []byte{'\n'})
		}
		return nil
	}
	next := func() (int64, error) {
		i := bytes.IndexByte(text, '\n')
		tok := text[:i]
		text = text[i+1:]
		newlines--
		return strconv.ParseInt(string(tok), 10, 64)
	}
	if err := feed(1); err != nil {
		return nil, err
	}
	// Each region takes at least 4 bytes ("0\n0\n").
	count, err := next()
	if err != nil || count < 0 || count > maxSparseMap/4 {
		return nil, fmt.Errorf("bad region count: %w", tar.ErrHeader)
	}
	if err := feed(2 * int(count)); err != nil {
		return nil, err
	}
	segs := make([]segment, 0, count)
	var prevEnd int64
	for range count {
		off, err1 := next()
		n, err2 := next()
		switch {
		case err1 != nil || err2 != nil, off < 0, n < 0, off > math.MaxInt64-n, off+n > size, off < prevEnd:
			return nil, fmt.Errorf("bad region %d+%d of a %d-byte file: %w", off, n, size, tar.ErrHeader)
		}
		prevEnd = off + n
		if n > 0 {
			segs = append(segs, segment{off, n})
		}
	}
	return segs, nil
}
