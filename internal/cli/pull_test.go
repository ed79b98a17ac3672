package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/rpc"
)

// fakePullDaemon serves image pull (progress frames, then the image or,
// with hold, until cancelled) and pull cancel (recorded).
type fakePullDaemon struct {
	sock, cfg string
	mu        sync.Mutex
	cancels   []api.PullCancelParams
	pulling   chan struct{} // closed when a held pull sent its progress
	cancelled chan struct{}
}

func newFakePullDaemon(t *testing.T, hold bool) *fakePullDaemon {
	dir, err := os.MkdirTemp("/tmp", "bgrpl") // unix socket paths are short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f := &fakePullDaemon{sock: filepath.Join(dir, "bangerd.sock"), cfg: filepath.Join(dir, "config.toml"), pulling: make(chan struct{}), cancelled: make(chan struct{})}
	if err := os.WriteFile(f.cfg, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", f.sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := rpc.NewServer(slog.New(slog.DiscardHandler), nil)
	srv.Handle(api.MethodImagePull, rpc.PermAdmin, func(ctx context.Context, call *rpc.Call) (any, error) {
		var p api.PullParams
		if err := call.Decode(&p); err != nil {
			return nil, err
		}
		call.Progress(api.Progress{Phase: "download image " + p.Ref, Done: 1, Total: 2, Unit: "bytes"})
		if hold {
			close(f.pulling)
			select {
			case <-f.cancelled:
				return nil, context.Canceled
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		call.Progress(api.Progress{Phase: "download image " + p.Ref, Done: 2, Total: 2, Unit: "bytes"})
		return api.Image{Name: p.Ref, Source: api.SourceCatalog}, nil
	})
	srv.Handle(api.MethodPullCancel, rpc.PermAdmin, func(ctx context.Context, call *rpc.Call) (any, error) {
		var p api.PullCancelParams
		if err := call.Decode(&p); err != nil {
			return nil, err
		}
		f.mu.Lock()
		f.cancels = append(f.cancels, p)
		f.mu.Unlock()
		close(f.cancelled)
		return nil, nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	t.Cleanup(func() { cancel(); <-served })
	return f
}

func TestImagePullJSON(t *testing.T) {
	f := newFakePullDaemon(t, false)
	var stdout, stderr bytes.Buffer
	a := &app{stdout: &stdout, stderr: &stderr}
	code := a.main(context.Background(), []string{"banger", "--config", f.cfg, "--socket", f.sock, "image", "pull", "--json", "deb"})
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	sc := bufio.NewScanner(&stdout)
	var lines []map[string]json.RawMessage
	for sc.Scan() {
		var m map[string]json.RawMessage
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("line %q is not JSON: %v", sc.Text(), err)
		}
		lines = append(lines, m)
	}
	if len(lines) != 3 || lines[0]["progress"] == nil || lines[1]["progress"] == nil || lines[2]["image"] == nil {
		t.Fatalf("stdout %q: want 2 progress lines then the image", stdout.String())
	}
	var p api.Progress
	json.Unmarshal(lines[1]["progress"], &p)
	var im api.Image
	json.Unmarshal(lines[2]["image"], &im)
	if p.Done != 2 || p.Total != 2 || im.Name != "deb" {
		t.Fatalf("progress %+v, image %+v", p, im)
	}
}

func TestImagePullPlain(t *testing.T) {
	f := newFakePullDaemon(t, false)
	var stdout, stderr bytes.Buffer
	a := &app{stdout: &stdout, stderr: &stderr}
	if code := a.main(context.Background(), []string{"banger", "--config", f.cfg, "--socket", f.sock, "image", "pull", "deb"}); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if stdout.String() != "deb\n" || !strings.Contains(stderr.String(), "==> download image deb") {
		t.Fatalf("stdout %q, stderr %q", stdout.String(), stderr.String())
	}
}

// Ctrl-C (the command's context ends) asks the daemon to cancel the pull
// and exits 130.
func TestImagePullInterrupt(t *testing.T) {
	f := newFakePullDaemon(t, true)
	var stdout, stderr bytes.Buffer
	a := &app{stdout: &stdout, stderr: &stderr}
	ctx, interrupt := context.WithCancel(context.Background())
	go func() {
		select {
		case <-f.pulling:
			interrupt()
		case <-time.After(20 * time.Second):
		}
	}()
	code := a.main(ctx, []string{"banger", "--config", f.cfg, "--socket", f.sock, "image", "pull", "deb"})
	if code != 130 {
		t.Fatalf("exit %d, want 130; stderr %s", code, stderr.String())
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.cancels) != 1 || f.cancels[0] != (api.PullCancelParams{Kind: "image", Ref: "deb"}) {
		t.Fatalf("cancels %+v, want one for image deb", f.cancels)
	}
}

func TestImagePullCancelFlag(t *testing.T) {
	f := newFakePullDaemon(t, false)
	var stdout, stderr bytes.Buffer
	a := &app{stdout: &stdout, stderr: &stderr}
	if code := a.main(context.Background(), []string{"banger", "--config", f.cfg, "--socket", f.sock, "image", "pull", "--cancel", "deb"}); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if len(f.cancels) != 1 || f.cancels[0].Ref != "deb" || f.cancels[0].Kind != "image" {
		t.Fatalf("cancels %+v", f.cancels)
	}
}

// Local OCI sources reach the daemon as absolute paths.
func TestImagePullLocalPaths(t *testing.T) {
	f := newFakePullDaemon(t, false)
	wd, _ := os.Getwd()
	for ref, want := range map[string]string{
		"oci:rel/layout":         "oci:" + filepath.Join(wd, "rel/layout"),
		"oci:rel/layout:web":     "oci:" + filepath.Join(wd, "rel/layout:web"),
		"docker-archive:app.tar": "docker-archive:" + filepath.Join(wd, "app.tar"),
		"oci-archive:/abs/a.tar": "oci-archive:/abs/a.tar",
		"./app.tar":              filepath.Join(wd, "app.tar"),
		"nginx:1.27":             "nginx:1.27",
		"docker-daemon:app:1":    "docker-daemon:app:1",
	} {
		var stdout, stderr bytes.Buffer
		a := &app{stdout: &stdout, stderr: &stderr}
		if code := a.main(context.Background(), []string{"banger", "--config", f.cfg, "--socket", f.sock, "image", "pull", ref}); code != 0 {
			t.Fatalf("%s: exit %d: %s", ref, code, stderr.String())
		}
		if got := strings.TrimSpace(stdout.String()); got != want {
			t.Errorf("image pull %s sent %q, want %q", ref, got, want)
		}
	}
}
