package agent_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/bangerdev/banger/internal/agent"
	"github.com/bangerdev/banger/internal/agentproto"
	"github.com/bangerdev/banger/internal/tarcopy"
	"github.com/bangerdev/banger/test/harness"
)

// fakeAgent is a hostile guest agent: it speaks protocol proto and
// answers every copy-out channel with copyOut.
func fakeAgent(t *testing.T, proto string, copyOut func(ch ssh.Channel)) *agent.Client {
	t.Helper()
	km, err := agent.GenerateKeys()
	if err != nil {
		t.Fatal(err)
	}
	keys, err := km.Keys()
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey([]byte(km.HostPrivatePEM))
	if err != nil {
		t.Fatal(err)
	}
	cfg := &ssh.ServerConfig{
		PublicKeyCallback: func(ssh.ConnMetadata, ssh.PublicKey) (*ssh.Permissions, error) { return nil, nil },
	}
	cfg.AddHostKey(signer)
	guest, host := socketPair(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, chans, reqs, err := ssh.NewServerConn(guest, cfg)
		if err != nil {
			return
		}
		go func() {
			for req := range reqs {
				if req.Type == agentproto.GlobalInfo {
					payload, _ := agentproto.MarshalPayload(agentproto.Info{ProtoVersion: proto})
					req.Reply(true, payload)
					continue
				}
				req.Reply(false, nil)
			}
		}()
		for nc := range chans {
			if nc.ChannelType() != agentproto.ChanCopyOut {
				nc.Reject(ssh.UnknownChannelType, "no")
				continue
			}
			ch, creqs, err := nc.Accept()
			if err != nil {
				continue
			}
			go ssh.DiscardRequests(creqs)
			go func() {
				defer ch.Close()
				copyOut(ch)
			}()
		}
	}()
	t.Cleanup(func() { guest.Close(); <-done })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Dial(ctx, func(context.Context) (net.Conn, error) { return host, nil }, keys, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func send(ch ssh.Channel, req string, v any) {
	payload, _ := agentproto.MarshalPayload(v)
	ch.SendRequest(req, false, payload)
}

// tarStream is a tree "tree" with a small file, then a larger one.
func tarStream(t *testing.T) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	tw.WriteHeader(&tar.Header{Name: "tree/", Typeflag: tar.TypeDir, Mode: 0o755})
	for _, f := range []struct {
		name string
		size int
	}{{"tree/small", 10}, {"tree/big", 256 << 10}} {
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Mode: 0o644, Size: int64(f.size), ModTime: time.Unix(1e9, 0)}); err != nil {
			t.Fatal(err)
		}
		tw.Write(bytes.Repeat([]byte("x"), f.size))
	}
	tw.Close()
	return b.Bytes()
}

func copyCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestCopyOutStopsPastTheAnnouncedSize(t *testing.T) {
	stream := tarStream(t)
	c := fakeAgent(t, agentproto.Version, func(ch ssh.Channel) {
		// Announce part of the stream, then send all of it.
		send(ch, agentproto.ReqCopyHeader, agentproto.CopyHeader{Size: 2560, Entries: 3})
		ch.Write(stream)
		ch.CloseWrite()
		send(ch, agentproto.ReqCopyStatus, agentproto.CopyStatus{})
	})
	dest := filepath.Join(t.TempDir(), "dest")
	var got int64
	err := tarcopy.ExtractFrom(func(w io.Writer) error {
		return c.CopyOut(copyCtx(t), "/tree", countingWriter{w, &got})
	}, dest, tarcopy.ExtractOptions{Base: "tree"})
	if !errors.Is(err, agent.ErrCopyTooLarge) {
		t.Fatalf("copy out: %v, want ErrCopyTooLarge", err)
	}
	if !strings.Contains(err.Error(), "2560 bytes") {
		t.Errorf("error %q doesn't say what was announced", err)
	}
	if got > 2560 {
		t.Errorf("%d bytes passed on, more than the 2560 announced", got)
	}
	// tree/small was complete within the announced size; it is removed
	// with the rest of the partial copy, destination included.
	if _, err := os.Lstat(dest); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("partial copy left at %s: %v", dest, err)
	}
}

func TestCopyOutStopsPastACompleteTar(t *testing.T) {
	// The announced size is the whole, valid tar; the guest sends more
	// after it. The extraction has reached the end marker when the
	// excess shows: it is removed all the same.
	stream := tarStream(t)
	c := fakeAgent(t, agentproto.Version, func(ch ssh.Channel) {
		send(ch, agentproto.ReqCopyHeader, agentproto.CopyHeader{Size: int64(len(stream)), Entries: 3})
		ch.Write(stream)
		ch.Write(bytes.Repeat([]byte("z"), 4096))
		ch.CloseWrite()
		send(ch, agentproto.ReqCopyStatus, agentproto.CopyStatus{})
	})
	dest := filepath.Join(t.TempDir(), "dest")
	err := tarcopy.ExtractFrom(func(w io.Writer) error {
		return c.CopyOut(copyCtx(t), "/tree", w)
	}, dest, tarcopy.ExtractOptions{Base: "tree"})
	if !errors.Is(err, agent.ErrCopyTooLarge) || !strings.Contains(err.Error(), "partial copy was removed") {
		t.Fatalf("copy out: %v, want ErrCopyTooLarge and the partial copy removed", err)
	}
	if _, err := os.Lstat(dest); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("copy left at %s after the error: %v", dest, err)
	}
}

func TestCopyOutStopsPastTheAnnouncedEntries(t *testing.T) {
	// The size is honest, the number of entries (3) is not.
	stream := tarStream(t)
	c := fakeAgent(t, agentproto.Version, func(ch ssh.Channel) {
		send(ch, agentproto.ReqCopyHeader, agentproto.CopyHeader{Size: int64(len(stream)), Entries: 2})
		ch.Write(stream)
		ch.CloseWrite()
		send(ch, agentproto.ReqCopyStatus, agentproto.CopyStatus{})
	})
	dest := filepath.Join(t.TempDir(), "dest")
	err := tarcopy.ExtractFrom(func(w io.Writer) error {
		return c.CopyOut(copyCtx(t), "/tree", w)
	}, dest, tarcopy.ExtractOptions{Base: "tree"})
	if !errors.Is(err, agent.ErrCopyTooLarge) || !strings.Contains(err.Error(), "2 entries the guest announced") {
		t.Fatalf("copy out: %v, want ErrCopyTooLarge for the third entry", err)
	}
	if _, err := os.Lstat(dest); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("copy left at %s after the error: %v", dest, err)
	}
}

// TestCopyOutCountsEntriesAsTheWriterDoes: the entries the guest agent's
// writer announces are the entries CopyOut counts, whatever the tree
// holds (PAX records for long names, sparse files, links).
func TestCopyOutCountsEntriesAsTheWriterDoes(t *testing.T) {
	src := filepath.Join(t.TempDir(), "tree")
	long := strings.Repeat("n", 150)
	for _, d := range []string{"", "empty", long} {
		if err := os.MkdirAll(filepath.Join(src, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(src, long, "f"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(filepath.Join(src, long, "f"), filepath.Join(src, "hard")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(long+"/f", filepath.Join(src, "sym")); err != nil {
		t.Fatal(err)
	}
	sparse, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	sparse.WriteAt([]byte("end"), 8<<20)
	sparse.Close()
	var announced atomic.Int64
	c := fakeAgent(t, agentproto.Version, func(ch ssh.Channel) {
		err := tarcopy.Write(ch, src, tarcopy.WriteOptions{Announce: func(size, entries int64) error {
			announced.Store(entries)
			send(ch, agentproto.ReqCopyHeader, agentproto.CopyHeader{Size: size, Entries: entries})
			return nil
		}})
		ch.CloseWrite()
		var st agentproto.CopyStatus
		if err != nil {
			st.Error = err.Error()
		}
		send(ch, agentproto.ReqCopyStatus, st)
	})
	dest := t.TempDir()
	err = tarcopy.ExtractFrom(func(w io.Writer) error {
		return c.CopyOut(copyCtx(t), "/tree", w)
	}, dest, tarcopy.ExtractOptions{Base: "tree"})
	if err != nil {
		t.Fatalf("copy out: %v", err)
	}
	if n := announced.Load(); n != 7 {
		t.Errorf("the writer announced %d entries, want 7", n)
	}
	if b, err := os.ReadFile(filepath.Join(dest, "tree", "hard")); err != nil || string(b) != "data" {
		t.Errorf("tree/hard = %q, %v; want \"data\"", b, err)
	}
}

// TestCopyOutCancelledRemovesThePartialCopy: cancelling a copy out
// midway, as Ctrl-C does in the CLI, removes what it wrote.
func TestCopyOutCancelledRemovesThePartialCopy(t *testing.T) {
	stream := tarStream(t)
	hold := make(chan struct{})
	c := fakeAgent(t, agentproto.Version, func(ch ssh.Channel) {
		send(ch, agentproto.ReqCopyHeader, agentproto.CopyHeader{Size: int64(len(stream)), Entries: 3})
		// tree/, tree/small and the start of tree/big, then nothing
		// until the test ends.
		ch.Write(stream[:64<<10])
		<-hold
	})
	t.Cleanup(func() { close(hold) }) // before fakeAgent's cleanup
	dest := filepath.Join(t.TempDir(), "dest")
	ctx, cancel := context.WithCancel(copyCtx(t))
	err := tarcopy.ExtractFrom(func(w io.Writer) error {
		res := make(chan error, 1)
		go func() { res <- c.CopyOut(ctx, "/tree", w) }()
		harness.WaitFor(t, 10*time.Second, "tree/big to be written", func() bool {
			_, err := os.Lstat(filepath.Join(dest, "tree", "big"))
			return err == nil
		})
		cancel()
		return <-res
	}, dest, tarcopy.ExtractOptions{Base: "tree"})
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "partial copy was removed") {
		t.Fatalf("copy out: %v, want context.Canceled and the partial copy removed", err)
	}
	if _, err := os.Lstat(dest); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("partial copy left at %s after the cancel: %v", dest, err)
	}
}

type countingWriter struct {
	w io.Writer
	n *int64
}

func (c countingWriter) Write(p []byte) (int, error) {
	*c.n += int64(len(p))
	return c.w.Write(p)
}

func TestCopyOutRequiresAHeader(t *testing.T) {
	stream := tarStream(t)
	c := fakeAgent(t, agentproto.Version, func(ch ssh.Channel) {
		ch.Write(stream[:4096]) // within the channel window
		ch.CloseWrite()
		send(ch, agentproto.ReqCopyStatus, agentproto.CopyStatus{})
	})
	var out bytes.Buffer
	err := c.CopyOut(copyCtx(t), "/tree", &out)
	if !errors.Is(err, agent.ErrCopyFailed) || !strings.Contains(err.Error(), "no copy header") {
		t.Errorf("copy out: %v, want ErrCopyFailed for a missing header", err)
	}
	if out.Len() != 0 {
		t.Errorf("%d bytes passed on without a header", out.Len())
	}
}

func TestCopyOutRefusesOldAgents(t *testing.T) {
	var opened atomic.Bool
	c := fakeAgent(t, "1.0", func(ch ssh.Channel) { opened.Store(true) })
	err := c.CopyOut(copyCtx(t), "/tree", io.Discard)
	if !errors.Is(err, agent.ErrIncompatibleAgent) || !strings.Contains(err.Error(), "restart the VM") {
		t.Errorf("copy out of a 1.0 agent: %v, want ErrIncompatibleAgent", err)
	}
	if opened.Load() {
		t.Errorf("copy channel opened with an agent that can't announce sizes")
	}
}

func TestCopyOutHonestHeaderHostileContent(t *testing.T) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	tw.WriteHeader(&tar.Header{Name: "tree/", Typeflag: tar.TypeDir, Mode: 0o755})
	tw.WriteHeader(&tar.Header{Name: "tree/ok", Mode: 0o644, Size: 2})
	tw.Write([]byte("ok"))
	tw.WriteHeader(&tar.Header{Name: "tree/../../escape", Mode: 0o644, Size: 2})
	tw.Write([]byte("no"))
	tw.Close()
	stream := b.Bytes()
	c := fakeAgent(t, agentproto.Version, func(ch ssh.Channel) {
		send(ch, agentproto.ReqCopyHeader, agentproto.CopyHeader{Size: int64(len(stream)), Entries: 3})
		ch.Write(stream)
		ch.CloseWrite()
		send(ch, agentproto.ReqCopyStatus, agentproto.CopyStatus{})
	})
	base := t.TempDir()
	dest := filepath.Join(base, "a", "dest")
	err := tarcopy.ExtractFrom(func(w io.Writer) error {
		return c.CopyOut(copyCtx(t), "/tree", w)
	}, dest, tarcopy.ExtractOptions{Base: "tree"})
	if !errors.Is(err, tarcopy.ErrUnsafePath) || !strings.Contains(err.Error(), "..") {
		t.Fatalf("copy out: %v, want ErrUnsafePath for the .. entry", err)
	}
	ents, _ := os.ReadDir(base)
	if len(ents) != 0 {
		t.Errorf("%d entries left in %s after the refused copy", len(ents), base)
	}
}

func TestCopyOutQuotesTheGuestsError(t *testing.T) {
	msg := "\x1b]0;pwned\x07" + strings.Repeat("y", 100_000)
	c := fakeAgent(t, agentproto.Version, func(ch ssh.Channel) {
		ch.CloseWrite()
		send(ch, agentproto.ReqCopyStatus, agentproto.CopyStatus{Error: msg})
	})
	err := c.CopyOut(copyCtx(t), "/tree", io.Discard)
	if !errors.Is(err, agent.ErrCopyFailed) {
		t.Fatalf("copy out: %v, want ErrCopyFailed", err)
	}
	if strings.ContainsAny(err.Error(), "\x1b\x07") || len(err.Error()) > 1000 {
		t.Errorf("the guest's message reaches the user raw or whole (%d bytes): %.100q", len(err.Error()), err)
	}
}
