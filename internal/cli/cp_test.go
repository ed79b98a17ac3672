package cli

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/rpc"
)

func TestGuestBase(t *testing.T) {
	for in, want := range map[string]string{"/var/log/": "log", "/etc/os-release": "os-release", "/": ".", "//": ".", "/a/./b/..": "a"} {
		if got := guestBase(in); got != want {
			t.Errorf("guestBase(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestInvokingUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the sudo owner applies to root only")
	}
	t.Setenv("SUDO_UID", "1234")
	t.Setenv("SUDO_GID", "5678")
	o, err := invokingUser()
	if err != nil || o == nil || o.UID != 1234 || o.GID != 5678 {
		t.Errorf("invokingUser() = %+v, %v; want 1234:5678", o, err)
	}
	t.Setenv("SUDO_GID", "staff")
	if _, err := invokingUser(); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("invokingUser() with a non-numeric SUDO_GID: %v, want ErrInvalid", err)
	}
	os.Unsetenv("SUDO_UID")
	if o, err := invokingUser(); o != nil || err != nil {
		t.Errorf("invokingUser() without sudo = %+v, %v; want nil (root owns)", o, err)
	}
}

// TestCopyOutErrorAfterACompleteTar runs `vm cp NAME:SRC DST` against a
// daemon that relays a complete tar and then fails the call, as bangerd
// does when the guest sent more than it announced after a valid tar: the
// command fails and DST holds what it held before.
func TestCopyOutErrorAfterACompleteTar(t *testing.T) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	tw.WriteHeader(&tar.Header{Name: "tree/", Typeflag: tar.TypeDir, Mode: 0o755})
	tw.WriteHeader(&tar.Header{Name: "tree/f", Mode: 0o644, Size: 4})
	tw.Write([]byte("data"))
	tw.Close()
	dir, err := os.MkdirTemp("/tmp", "bgrcp") // unix socket paths are short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "bangerd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := rpc.NewServer(slog.New(slog.DiscardHandler), nil)
	srv.Handle(api.MethodVMCopyOut, rpc.PermWrite, func(ctx context.Context, call *rpc.Call) (any, error) {
		if err := call.Send(api.Frame{Type: api.FrameStdout, Data: b.Bytes()}); err != nil {
			return nil, err
		}
		return nil, errors.New(`copy from vm "box": copy out of /tree: guest sent more than it announced`)
	})
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); <-served })

	// An empty config: nothing from the host's.
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	dest := filepath.Join(dir, "dest")
	if err := os.MkdirAll(filepath.Join(dest, "tree"), 0o755); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	a := &app{stdout: &bytes.Buffer{}, stderr: &stderr}
	root := a.rootCmd()
	root.SetArgs([]string{"--config", cfgPath, "--socket", sock, "vm", "cp", "box:/tree", dest})
	err = root.ExecuteContext(context.Background())
	if err == nil || !strings.Contains(err.Error(), "more than it announced") || !strings.Contains(err.Error(), "partial copy was removed") {
		t.Fatalf("vm cp: %v, want the daemon's error and the partial copy removed", err)
	}
	ents, err := os.ReadDir(filepath.Join(dest, "tree"))
	if err != nil || len(ents) != 0 {
		t.Errorf("dest/tree after the failed copy: %v, %v; want it there and empty, as it was", ents, err)
	}
}

// fakeCopyIn reads its input as the client library does, in a reader of
// its own: at the input's end (or a read error) it would send the daemon
// an EOF, which ends the copy as a success; a cancelled call ends with the
// context's error. eofs reports whether an EOF went out while the call ran.
func fakeCopyIn(got *bytes.Buffer, eofs *atomic.Int32) func(context.Context, io.Reader) error {
	return func(ctx context.Context, r io.Reader) error {
		eof := make(chan struct{})
		go func() {
			buf := make([]byte, 1000)
			for {
				n, err := r.Read(buf)
				got.Write(buf[:n])
				if err != nil {
					if ctx.Err() == nil {
						eofs.Add(1)
						close(eof)
					}
					return
				}
			}
		}()
		select {
		case <-eof:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// A copy in whose tar writer fails (a file that can't be read) fails with
// its error, and the call is cancelled rather than sent the end of its
// input: the guest would take the cut stream for a whole one.
func TestSendTarWriteFails(t *testing.T) {
	broken := errors.New("read /src/f: input/output error")
	var got bytes.Buffer // still written to after the call: not read
	var eofs atomic.Int32
	err := sendTar(context.Background(), func(w io.Writer) error {
		w.Write(make([]byte, 5000))
		return broken
	}, fakeCopyIn(&got, &eofs))
	if !errors.Is(err, broken) {
		t.Errorf("sendTar: %v, want the writer's error", err)
	}
	if eofs.Load() != 0 {
		t.Error("the call was sent the end of its input after the stream failed")
	}

	// The whole stream, when it is whole.
	var whole bytes.Buffer
	err = sendTar(context.Background(), func(w io.Writer) error {
		_, err := w.Write(make([]byte, 5000))
		return err
	}, fakeCopyIn(&whole, &eofs))
	if err != nil || whole.Len() != 5000 || eofs.Load() != 1 {
		t.Errorf("sendTar of a whole stream: %v, %d bytes, %d EOFs; want nil, 5000, 1", err, whole.Len(), eofs.Load())
	}

	// A call that fails (the guest refused an entry) fails the copy with
	// its error, and the writer, blocked on the pipe, returns.
	refused := errors.New("copy in to /root: refused entry")
	err = sendTar(context.Background(), func(w io.Writer) error {
		for {
			if _, err := w.Write(make([]byte, 1000)); err != nil {
				return err
			}
		}
	}, func(ctx context.Context, r io.Reader) error {
		io.ReadFull(r, make([]byte, 100))
		return refused
	})
	if !errors.Is(err, refused) {
		t.Errorf("sendTar with a failing call: %v, want the call's error", err)
	}
}
