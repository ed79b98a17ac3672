package disk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/bangerdev/banger/internal/vmm"
)

// A qcow2 overlay is written here rather than by running `qemu-img create`:
// the file is a few fixed structures (docs/interop/qcow2.txt in QEMU's
// source), and a process per VM create cost more than the rest of the
// create together. The layout is qemu-img's own:
//
//	cluster 0  header (version 3), header extensions, backing file name
//	cluster 1  refcount table (one entry: the refcount block)
//	cluster 2  refcount block (refcount 1 for clusters 0 to the L1 table's end)
//	cluster 3  L1 table, all zero (no L2 table yet: every read goes to the
//	           backing file); the file ends where the table ends
//
// Clusters are 64 KiB (cluster_bits 16) and refcounts 16 bits, qemu-img's
// defaults; no snapshot, no feature bit, no compression.
const (
	qcow2ClusterBits   = 16
	qcow2ClusterSize   = 1 << qcow2ClusterBits
	qcow2HeaderLength  = 104 // the version 3 header without optional fields
	qcow2RefcountOrder = 4   // 16-bit refcounts

	// qcow2MaxL1Bytes is QEMU's limit on the L1 table (QCOW_MAX_L1_SIZE):
	// 2 PiB of virtual size with 64 KiB clusters.
	qcow2MaxL1Bytes = 32 << 20

	qcow2ExtEnd           = 0x00000000
	qcow2ExtBackingFormat = 0xe2792aca
)

// qcow2L2Coverage is the virtual size one L2 table maps: a cluster of
// 8-byte entries, each mapping a cluster.
const qcow2L2Coverage = int64(qcow2ClusterSize/8) * qcow2ClusterSize

// qcow2Layout is where an overlay's structures go.
type qcow2Layout struct {
	size        int64 // virtual size, a multiple of 512
	l1Entries   int64
	l1Offset    int64
	refTable    int64
	refBlock    int64
	clusters    int64 // clusters the metadata uses, from 0
	fileSize    int64 // the L1 table's end
	backingOff  int64
	backingName string
	backingFmt  string
}

func newQcow2Layout(size int64, backing, backingFmt string) (qcow2Layout, error) {
	if size <= 0 {
		return qcow2Layout{}, fmt.Errorf("qcow2 virtual size %d: must be positive", size)
	}
	if len(backing) == 0 || len(backing) > maxBackingName {
		return qcow2Layout{}, fmt.Errorf("qcow2 backing file name of %d bytes: qemu takes 1 to %d", len(backing), maxBackingName)
	}
	switch backingFmt {
	case vmm.FormatRaw, vmm.FormatQcow2:
	default:
		return qcow2Layout{}, fmt.Errorf("qcow2 backing format %q: want raw or qcow2", backingFmt)
	}
	size = roundUp(size, 512) // qemu-img rounds a size up to whole sectors
	if size < 0 {
		return qcow2Layout{}, fmt.Errorf("qcow2 virtual size %d: too large", size)
	}
	l := qcow2Layout{size: size, backingName: backing, backingFmt: backingFmt}
	l.l1Entries = (size + qcow2L2Coverage - 1) / qcow2L2Coverage
	if l.l1Entries*8 > qcow2MaxL1Bytes {
		return qcow2Layout{}, fmt.Errorf("qcow2 virtual size %d bytes: larger than qemu supports with 64 KiB clusters", size)
	}
	l.refTable = 1 * qcow2ClusterSize
	l.refBlock = 2 * qcow2ClusterSize
	l.l1Offset = 3 * qcow2ClusterSize
	l1Clusters := (l.l1Entries*8 + qcow2ClusterSize - 1) / qcow2ClusterSize
	l.clusters = 3 + l1Clusters
	// One refcount block of 16-bit entries covers 32768 clusters: the
	// L1 table stays far below that (qcow2MaxL1Bytes is 512 clusters).
	l.fileSize = l.l1Offset + l.l1Entries*8
	// The backing file name follows the header and its extensions.
	l.backingOff = qcow2HeaderLength + extLen(len(backingFmt)) + extLen(0)
	return l, nil
}

// extLen is the room a header extension with n bytes of data takes.
func extLen(n int) int64 { return 8 + roundUp(int64(n), 8) }

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// header returns cluster 0's bytes up to the end of the backing file name.
func (l qcow2Layout) header() []byte {
	b := make([]byte, l.backingOff+int64(len(l.backingName)))
	be := binary.BigEndian
	copy(b[0:4], qcow2Magic)
	be.PutUint32(b[4:], 3) // version
	be.PutUint64(b[8:], uint64(l.backingOff))
	be.PutUint32(b[16:], uint32(len(l.backingName)))
	be.PutUint32(b[20:], qcow2ClusterBits)
	be.PutUint64(b[24:], uint64(l.size))
	// 32: crypt_method 0
	be.PutUint32(b[36:], uint32(l.l1Entries))
	be.PutUint64(b[40:], uint64(l.l1Offset))
	be.PutUint64(b[48:], uint64(l.refTable))
	be.PutUint32(b[56:], 1) // refcount_table_clusters
	// 60: nb_snapshots 0; 64: snapshots_offset 0; 72, 80, 88: feature bits 0
	be.PutUint32(b[96:], qcow2RefcountOrder)
	be.PutUint32(b[100:], qcow2HeaderLength)
	ext := b[qcow2HeaderLength:]
	be.PutUint32(ext[0:], qcow2ExtBackingFormat)
	be.PutUint32(ext[4:], uint32(len(l.backingFmt)))
	copy(ext[8:], l.backingFmt)
	ext = ext[extLen(len(l.backingFmt)):]
	be.PutUint32(ext[0:], qcow2ExtEnd) // end of extensions: type 0, length 0
	copy(b[l.backingOff:], l.backingName)
	return b
}

// writeQcow2Overlay writes into f (empty) a qcow2 overlay of virtual size
// size (rounded up to 512 bytes) backed by backing, a file of format
// backingFmt. It returns the virtual size.
func writeQcow2Overlay(f *os.File, size int64, backing, backingFmt string) (int64, error) {
	l, err := newQcow2Layout(size, backing, backingFmt)
	if err != nil {
		return 0, err
	}
	if _, err := f.WriteAt(l.header(), 0); err != nil {
		return 0, fmt.Errorf("write qcow2 header: %w", err)
	}
	var entry [8]byte
	binary.BigEndian.PutUint64(entry[:], uint64(l.refBlock))
	if _, err := f.WriteAt(entry[:], l.refTable); err != nil {
		return 0, fmt.Errorf("write qcow2 refcount table: %w", err)
	}
	refs := make([]byte, 2*l.clusters)
	for i := range l.clusters {
		binary.BigEndian.PutUint16(refs[2*i:], 1)
	}
	if _, err := f.WriteAt(refs, l.refBlock); err != nil {
		return 0, fmt.Errorf("write qcow2 refcount block: %w", err)
	}
	// The L1 table is zeros: extending the file makes them (a hole).
	if err := f.Truncate(l.fileSize); err != nil {
		return 0, fmt.Errorf("write qcow2 L1 table: %w", err)
	}
	return l.size, nil
}

// qcow2Header is what banger reads of an existing qcow2 image's header.
type qcow2Header struct {
	version     uint32
	size        int64 // virtual size
	incompat    uint64
	cryptMethod uint32
}

// errQcow2Unsupported marks a qcow2 image whose header this package does
// not read (qemu-img may).
var errQcow2Unsupported = errors.New("qcow2 image not understood")

// readQcow2Header reads the header of the qcow2 image r (named path in
// errors).
func readQcow2Header(r io.ReaderAt, path string) (qcow2Header, error) {
	b := make([]byte, 104)
	n, err := r.ReadAt(b, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return qcow2Header{}, fmt.Errorf("read qcow2 header of %s: %w", path, err)
	}
	if n < 72 || string(b[:4]) != string(qcow2Magic) {
		return qcow2Header{}, fmt.Errorf("%s is not a qcow2 image", path)
	}
	be := binary.BigEndian
	h := qcow2Header{version: be.Uint32(b[4:]), size: int64(be.Uint64(b[24:])), cryptMethod: be.Uint32(b[32:])}
	switch {
	case h.version == 3 && n < 104:
		return qcow2Header{}, fmt.Errorf("%s: qcow2 header cut short", path)
	case h.version == 3:
		h.incompat = be.Uint64(b[72:])
	case h.version != 2:
		return qcow2Header{}, fmt.Errorf("%s: qcow2 version %d: %w", path, h.version, errQcow2Unsupported)
	}
	if h.size < 0 {
		return qcow2Header{}, fmt.Errorf("%s: qcow2 virtual size %d: %w", path, h.size, errQcow2Unsupported)
	}
	return h, nil
}
