//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/test/harness"
)

// The main process of init-less OCI images: images FROM scratch holding
// one static Go binary, built by the test and pushed to a registry it
// serves on 127.0.0.1, pulled with banger image pull.

// helloProgram prints its arguments, environment and directory, and exits
// with its first argument as status.
const helloProgram = `package main

import (
	"fmt"
	"os"
	"strconv"
)

func main() {
	wd, _ := os.Getwd()
	fmt.Printf("hello args=%v FOO=%s wd=%s uid=%d\n", os.Args[1:], os.Getenv("FOO"), wd, os.Getuid())
	fmt.Fprintln(os.Stderr, "hello stderr")
	code := 0
	if len(os.Args) > 1 {
		code, _ = strconv.Atoi(os.Args[1])
	}
	os.Exit(code)
}
`

// serverProgram serves HTTP on :8080 (the nginx of these tests).
const serverProgram = `package main

import (
	"fmt"
	"net/http"
	"os"
)

func main() {
	fmt.Println("static server listening on :8080")
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "served by the main process of %s\n", os.Getenv("HOSTNAME"))
	})
	if err := http.ListenAndServe(":8080", nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
`

// buildStatic compiles a Go program as a static linux/amd64 binary.
func buildStatic(t *testing.T, src string) []byte {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module prog\n\ngo 1.22\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "prog")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=-mod=mod")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build static program: %v\n%s", err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// scratchImage is an image FROM scratch: one file, the given config.
func scratchImage(t *testing.T, file string, body []byte, cfg v1.Config) v1.Image {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: file, Mode: 0o755, Size: int64(len(body)), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(body); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Config = "linux", "amd64", cfg
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// serveRegistry starts an OCI registry on 127.0.0.1 and returns its host.
func serveRegistry(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

func push(t *testing.T, ref string, img v1.Image) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// pullOCI pulls ref as image local, booting with the kernel (and modules) of
// the busybox test image.
func pullOCI(t *testing.T, e *harness.Env, ref, local string) {
	t.Helper()
	e.Must("image", "pull", ref, "--name", local, "--kernel", "tiny")
}

// TestMainProcessScratch: vm run on a FROM scratch image holding one
// static binary (no shell, no /etc, no /tmp) prints its main process's
// output and exits with its code; ARGS replace the image's Cmd; the
// image's Env and WorkingDir hold; --rm leaves nothing.
func TestMainProcessScratch(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	host := serveRegistry(t)
	push(t, host+"/hello:1", scratchImage(t, "hello", buildStatic(t, helloProgram), v1.Config{
		Entrypoint: []string{"/hello"}, Cmd: []string{"3", "from-cmd"}, Env: []string{"FOO=bar", "PATH=/"}, WorkingDir: "/app",
	}))
	pullOCI(t, e, host+"/hello:1", "hello")

	start := time.Now()
	out, errOut, code := e.Banger("vm", "run", "--rm", "--image", "hello")
	t.Logf("vm run --rm --image hello: %s", time.Since(start).Round(time.Millisecond))
	if code != 3 || out != "hello args=[3 from-cmd] FOO=bar wd=/app uid=0\n" || !strings.Contains(errOut, "hello stderr") {
		t.Errorf("vm run: code %d stdout %q stderr %q; want 3, the Cmd's args, Env and WorkingDir", code, out, errOut)
	}
	out, _, code = e.Banger("vm", "run", "--rm", "--image", "hello", "--", "0", "mine")
	if code != 0 || out != "hello args=[0 mine] FOO=bar wd=/app uid=0\n" {
		t.Errorf("vm run -- 0 mine: code %d stdout %q; want 0 and the args replacing Cmd", code, out)
	}
	if ls := strings.TrimSpace(e.Must("vm", "ls", "-q")); ls != "" {
		t.Errorf("vms left after vm run --rm: %q", ls)
	}
	// -d --rm: the VM goes once its main process has ended.
	bg := strings.TrimSpace(e.Must("vm", "run", "-d", "--rm", "--image", "hello", "--", "0"))
	harness.WaitFor(t, 60*time.Second, "vm "+bg+" removed after its main process ended", func() bool {
		return strings.TrimSpace(e.Must("vm", "ls", "-q")) == ""
	})

	// Without --rm the VM stays, stopped, its exit code in vm inspect and
	// its output in vm logs.
	name := uniq("hello")
	if _, _, code := e.Banger("vm", "run", "--name", name, "--image", "hello", "--", "7"); code != 7 {
		t.Errorf("vm run -- 7: code %d", code)
	}
	harness.WaitFor(t, 30*time.Second, "the vm to stop", func() bool { return e.Inspect(name).State == api.StateStopped })
	vm := e.Inspect(name)
	if vm.MainExitCode == nil || *vm.MainExitCode != 7 || strings.Join(vm.MainProcess, " ") != "/hello 7" {
		t.Errorf("vm inspect: main process %q exit code %v; want /hello 7 and 7", vm.MainProcess, vm.MainExitCode)
	}
	if logs := e.Must("vm", "logs", name); !strings.Contains(logs, "hello args=[7]") || !strings.Contains(logs, "main process exited with code 7") {
		t.Errorf("vm logs lacks the main process's output and exit:\n%s", logs)
	}
	if out, _, code := e.Banger("vm", "attach", name); code != 7 || !strings.Contains(out, "hello args=[7]") {
		t.Errorf("vm attach of the stopped vm: code %d out %q", code, out)
	}
}

// freePort returns a TCP port free on 127.0.0.1 right now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestMainProcessDetachedServer: vm run -d on an image whose Entrypoint is
// an HTTP server (the `vm run -d --image nginx` of these tests) returns
// with the VM's name; the server answers on the forwarded port (user-mode
// network, 127.0.0.1 only); vm stop stops it with its stop signal.
func TestMainProcessDetachedServer(t *testing.T) {
	e := newEnv(t)
	e.RegisterImages()
	host := serveRegistry(t)
	push(t, host+"/srv:1", scratchImage(t, "server", buildStatic(t, serverProgram), v1.Config{
		Entrypoint: []string{"/server"}, ExposedPorts: map[string]struct{}{"8080/tcp": {}},
	}))
	pullOCI(t, e, host+"/srv:1", "srv")

	port := freePort(t)
	name := uniq("srv")
	out := e.Must("vm", "run", "-d", "--name", name, "--image", "srv", "--network", "user", "-p", fmt.Sprintf("127.0.0.1:%d:8080", port))
	if strings.TrimSpace(out) != name {
		t.Errorf("vm run -d printed %q, want the name %s", out, name)
	}
	vm := e.Inspect(name)
	if vm.State != api.StateRunning || vm.MainState != "running" {
		t.Fatalf("after vm run -d: state %s, main state %q", vm.State, vm.MainState)
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	var body string
	harness.WaitFor(t, 60*time.Second, "the server to answer on "+url, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		body = string(b)
		return resp.StatusCode == http.StatusOK
	})
	if body != "served by the main process of "+name+"\n" {
		t.Errorf("GET %s = %q", url, body)
	}
	if logs := e.Must("vm", "logs", name); !strings.Contains(logs, "static server listening on :8080") {
		t.Errorf("vm logs lacks the server's output")
	}
	e.Must("vm", "stop", name)
	vm = e.Inspect(name)
	// Go's default SIGTERM handling: killed by the signal, 128+15.
	if vm.State != api.StateStopped || vm.MainExitCode == nil || *vm.MainExitCode != 143 {
		t.Errorf("after vm stop: state %s main exit code %v, want stopped and 143", vm.State, vm.MainExitCode)
	}
	t.Logf("stopped %s: main exit code %s", name, strconv.Itoa(*vm.MainExitCode))
}
