package tarcopy

import (
	"bufio"
	"io"
)

// sourceBufSize is the read buffer under tar.Reader: it reads a few
// hundred bytes at a time (a header, a small file, its padding), each of
// which would otherwise be a read of the stream.
const sourceBufSize = 64 << 10

// tarSource is the reader Extract gives tar.Reader.
type tarSource struct {
	br *bufio.Reader
}

func newTarSource(r io.Reader) *tarSource {
	return &tarSource{br: bufio.NewReaderSize(r, sourceBufSize)}
}

func (s *tarSource) Read(p []byte) (int, error) { return s.br.Read(p) }
