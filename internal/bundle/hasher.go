package bundle

import (
	"encoding"
	"hash"
	"time"
)

// The installer's hasher: files are summed in a goroutine of their own,
// beside the one writing them (and the ones decoding), in the order the
// data was written. What the hasher must see in order goes through its
// queue: data to sum, a decoded buffer to recycle once everything before
// it is summed, a checkpoint to complete with the sum's state and publish,
// a request for a file's final sum.

type hashItem struct {
	h       hash.Hash
	data    []byte
	release *[]byte
	snap    *checkpoint
	reply   chan []byte
}

type hasher struct {
	in    *installer
	queue chan hashItem
	done  chan struct{}
}

func startHasher(in *installer) *hasher {
	hs := &hasher{in: in, queue: make(chan hashItem, 8), done: make(chan struct{})}
	go hs.run()
	return hs
}

func (hs *hasher) run() {
	defer close(hs.done)
	for it := range hs.queue {
		switch {
		case it.data != nil:
			it.h.Write(it.data)
		case it.release != nil:
			putBuf(it.release)
		case it.snap != nil:
			if it.h != nil {
				it.snap.Sum, _ = it.h.(encoding.BinaryMarshaler).MarshalBinary()
			}
			hs.in.publish(it.snap)
		case it.reply != nil:
			it.reply <- it.h.Sum(nil)
		}
	}
}

func (hs *hasher) write(h hash.Hash, b []byte) { hs.queue <- hashItem{h: h, data: b} }

func (hs *hasher) recycle(b *[]byte) {
	if b != nil {
		hs.queue <- hashItem{release: b}
	}
}

func (hs *hasher) checkpoint(ck *checkpoint, h hash.Hash) { hs.queue <- hashItem{snap: ck, h: h} }

func (hs *hasher) sum(h hash.Hash) []byte {
	reply := make(chan []byte, 1)
	hs.queue <- hashItem{h: h, reply: reply}
	return <-reply
}

// close waits for the hasher to finish its queue.
func (hs *hasher) close() {
	close(hs.queue)
	<-hs.done
}

// publish makes ck the point to resume from, writing it at most every
// checkpointEvery (and on failure, by install). Called by the hasher only.
func (in *installer) publish(ck *checkpoint) {
	in.safe = ck
	if time.Since(in.writtenAt) >= in.checkpointEvery {
		// A checkpoint that can't be written costs a resume, not the install.
		_ = in.writeCheckpoint(ck)
	}
}
