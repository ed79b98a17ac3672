package ociimport

import (
	"context"
	"encoding/base64"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
)

func TestPlatformFromIndex(t *testing.T) {
	amd := testImage(t, "amd64", []ent{file("arch", "amd64")})
	arm := testImage(t, "arm64", []ent{file("arch", "arm64")})
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}}},
	)
	reg := startRegistry(t, nil)
	r, _ := name.ParseReference(reg + "/multi/arch:1")
	if err := remote.WriteIndex(r, idx); err != nil {
		t.Fatal(err)
	}
	push(t, reg+"/single/arm:1", arm)

	for _, c := range []struct{ platform, want string }{{"", "amd64"}, {"linux/amd64", "amd64"}, {"linux/arm64", "arm64"}, {"linux/arm64/v8", "arm64"}} {
		root, s, err := resolveFlatten(t, reg+"/multi/arch:1", Options{Platform: c.platform})
		if err != nil {
			t.Fatalf("platform %q: %v", c.platform, err)
		}
		if b, _ := os.ReadFile(filepath.Join(root, "arch")); string(b) != c.want {
			t.Errorf("platform %q: got the %s image", c.platform, b)
		}
		wantImg := amd
		if c.want == "arm64" {
			wantImg = arm
		}
		d, _ := wantImg.Digest()
		if s.Digest != d.String() || s.Platform != "linux/"+c.want {
			t.Errorf("platform %q: digest %s platform %s, want %s", c.platform, s.Digest, s.Platform, d)
		}
	}
	_, err := Resolve(t.Context(), reg+"/multi/arch:1", Options{Platform: "linux/s390x"})
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "linux/arm64") {
		t.Errorf("s390x: %v; want not found listing the platforms", err)
	}
	// A single-platform image for another architecture is refused unless
	// asked for.
	_, err = Resolve(t.Context(), reg+"/single/arm:1", Options{})
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "--platform linux/arm64") {
		t.Errorf("arm64 image on amd64: %v", err)
	}
	if _, err := Resolve(t.Context(), reg+"/single/arm:1", Options{Platform: "linux/arm64"}); err != nil {
		t.Errorf("arm64 image with --platform: %v", err)
	}
	if _, err := Resolve(t.Context(), reg+"/x:1", Options{Platform: "linux"}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("bad platform: %v", err)
	}
}

func TestPlainHTTPAllowed(t *testing.T) {
	for host, want := range map[string]bool{
		"localhost": true, "localhost:5000": true, "LOCALHOST:1": true, "127.0.0.1:5000": true, "127.1.2.3": true,
		"[::1]:5000": true, "::1": true,
		"10.0.0.1:5000": false, "192.168.1.2": false, "registry.local:5000": false, "example.com": false,
		"localhost.example.com": false, "[::2]:5000": false, "0.0.0.0:5000": false,
	} {
		if got := PlainHTTPAllowed(host); got != want {
			t.Errorf("PlainHTTPAllowed(%q) = %v, want %v", host, got, want)
		}
	}
}

type recordRT struct{ calls []string }

func (r *recordRT) RoundTrip(req *http.Request) (*http.Response, error) {
	r.calls = append(r.calls, req.URL.String())
	return nil, errors.New("recorded")
}

func TestHTTPGate(t *testing.T) {
	for _, c := range []struct {
		url      string
		insecure bool
		passes   bool
	}{
		{"http://10.0.0.1:5000/v2/", false, false},
		{"http://10.0.0.1:5000/v2/", true, true},
		{"https://10.0.0.1:5000/v2/", false, true},
		{"http://127.0.0.1:5000/v2/", false, true},
		{"http://localhost:5000/v2/", false, true},
		{"http://registry.example:80/v2/", false, false},
	} {
		rec := &recordRT{}
		req, _ := http.NewRequest(http.MethodGet, c.url, nil)
		_, err := httpGate{base: rec, insecure: c.insecure}.RoundTrip(req)
		if passed := len(rec.calls) == 1; passed != c.passes {
			t.Errorf("%s insecure=%v: passed=%v, want %v (%v)", c.url, c.insecure, passed, c.passes, err)
		}
		if !c.passes && !errors.Is(err, ErrPlainHTTP) {
			t.Errorf("%s: error %v, want ErrPlainHTTP", c.url, err)
		}
	}
}

// loopbackTransport dials addr whatever the request's host: a registry
// named by a private address is served from loopback, no packet leaves.
func loopbackTransport(addr string) http.RoundTripper {
	return &http.Transport{DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}
}

func TestPrivateRegistryNeedsInsecure(t *testing.T) {
	reg := startRegistry(t, nil)
	push(t, reg+"/p/x:1", testImage(t, "amd64", []ent{file("f", "x")}))
	_, port, _ := net.SplitHostPort(reg)
	// go-containerregistry would fall back to plain HTTP for 10.0.0.0/8;
	// banger refuses unless --insecure.
	ref := "10.255.0.1:" + port + "/p/x:1"
	_, err := Resolve(t.Context(), ref, Options{Transport: loopbackTransport(reg)})
	if !errors.Is(err, ErrPlainHTTP) || !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "--insecure") {
		t.Fatalf("plain HTTP to %s without --insecure: %v", ref, err)
	}
	t.Logf("refused: %v", err)
	s, err := Resolve(t.Context(), ref, Options{Transport: loopbackTransport(reg), Insecure: true})
	if err != nil {
		t.Fatalf("with --insecure: %v", err)
	}
	s.Close()
}

func TestCredentialsFromDockerConfig(t *testing.T) {
	const user, pass = "banger", "s3cret"
	reg := startRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			u, p, ok := r.BasicAuth()
			if !ok || u != user || p != pass {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"log in"}]}`, http.StatusUnauthorized)
				return
			}
			h.ServeHTTP(w, r)
		})
	})
	push(t, reg+"/private/x:1", testImage(t, "amd64", []ent{file("secret", "s")}),
		remote.WithAuth(&authn.Basic{Username: user, Password: pass}))

	empty := t.TempDir()
	t.Setenv("DOCKER_CONFIG", empty)
	t.Setenv("REGISTRY_AUTH_FILE", filepath.Join(empty, "none.json"))
	_, err := Resolve(t.Context(), reg+"/private/x:1", Options{})
	if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "docker login") {
		t.Fatalf("without credentials: %v; want permission denied with a hint", err)
	}

	cfgDir := t.TempDir()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if err := os.WriteFile(filepath.Join(cfgDir, "config.json"), []byte(`{"auths":{"`+reg+`":{"auth":"`+auth+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOCKER_CONFIG", cfgDir)
	root, _, err := resolveFlatten(t, reg+"/private/x:1", Options{})
	if err != nil {
		t.Fatalf("with DOCKER_CONFIG credentials: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "secret")); string(b) != "s" {
		t.Errorf("secret: %q", b)
	}
}

func TestLocalSources(t *testing.T) {
	img := testImage(t, "amd64", []ent{dir("etc/"), file("etc/os-release", "ID=test\n")}, []ent{file("etc/.wh.os-release", ""), file("etc/hostname", "h")})
	d, _ := img.Digest()
	id, _ := img.ConfigName()
	tmp := t.TempDir()

	// docker save tarball
	tarPath := filepath.Join(tmp, "app.tar")
	tag, _ := name.NewTag("example.com/team/app:2.0")
	if err := tarball.WriteToFile(tarPath, tag, img); err != nil {
		t.Fatal(err)
	}
	// OCI layout with a ref.name annotation
	layoutDir := filepath.Join(tmp, "layout")
	p, err := layout.Write(layoutDir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{annotationRefName: "web"}),
		layout.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"})); err != nil {
		t.Fatal(err)
	}

	// An OCI archive (podman save --format oci-archive): the layout, tarred.
	archive := filepath.Join(tmp, "app-oci.tar")
	if out, err := exec.Command("tar", "-C", layoutDir, "-cf", archive, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v: %s", err, out)
	}

	for _, c := range []struct{ ref, wantRef, wantName, wantDigest string }{
		{"docker-archive:" + tarPath, "docker-archive:" + tarPath, "app-2-0", id.String()},
		{tarPath, "docker-archive:" + tarPath, "app-2-0", id.String()},
		{"oci:" + layoutDir, "oci:" + layoutDir, "layout-web", d.String()},
		{layoutDir, "oci:" + layoutDir, "layout-web", d.String()},
		{"oci:" + layoutDir + ":web", "oci:" + layoutDir + ":web", "layout-web", d.String()},
		{"oci-archive:" + archive, "oci-archive:" + archive, "app-oci-web", d.String()},
		{archive, "oci-archive:" + archive, "app-oci-web", d.String()},
		{"oci-archive:" + archive + ":web", "oci-archive:" + archive + ":web", "app-oci-web", d.String()},
	} {
		root, s, err := resolveFlatten(t, c.ref, Options{TempDir: t.TempDir()})
		if err != nil {
			t.Errorf("%s: %v", c.ref, err)
			continue
		}
		if s.Ref != c.wantRef || s.Name != c.wantName || s.Digest != c.wantDigest {
			t.Errorf("%s: ref %q name %q digest %s; want %q %q %s", c.ref, s.Ref, s.Name, s.Digest, c.wantRef, c.wantName, c.wantDigest)
		}
		if b, _ := os.ReadFile(filepath.Join(root, "etc/hostname")); string(b) != "h" {
			t.Errorf("%s: etc/hostname %q", c.ref, b)
		}
		if _, err := os.Lstat(filepath.Join(root, "etc/os-release")); !os.IsNotExist(err) {
			t.Errorf("%s: whited-out etc/os-release is there: %v", c.ref, err)
		}
		if s.Config == nil || s.Config.WorkingDir != "/srv" {
			t.Errorf("%s: config %+v", c.ref, s.Config)
		}
	}

	for _, c := range []struct {
		ref  string
		kind error
	}{
		{"oci:" + layoutDir + ":nope", errdefs.ErrNotFound},
		{"oci:relative/dir", errdefs.ErrInvalid},
		{"./app.tar", errdefs.ErrInvalid},
		{filepath.Join(tmp, "missing.tar"), errdefs.ErrNotFound},
		{"docker-archive:" + filepath.Join(tmp, "layout", "oci-layout"), errdefs.ErrInvalid},
		{"oci-archive:" + tarPath, errdefs.ErrNotFound}, // a docker save tarball has no oci-layout
		{"Bad Ref!", errdefs.ErrInvalid},
	} {
		if _, err := Resolve(t.Context(), c.ref, Options{TempDir: t.TempDir()}); !errors.Is(err, c.kind) {
			t.Errorf("%s: %v, want %v", c.ref, err, c.kind)
		}
	}
}

func TestDockerDaemonWithoutDaemon(t *testing.T) {
	t.Setenv("DOCKER_HOST", "unix://"+filepath.Join(t.TempDir(), "no-docker.sock"))
	_, err := Resolve(t.Context(), "docker-daemon:busybox:latest", Options{TempDir: t.TempDir()})
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("docker-daemon with no daemon: %v; want failed precondition", err)
	}
	t.Logf("docker-daemon: %v", err)
	if _, lerr := exec.LookPath("docker"); lerr == nil && !strings.Contains(err.Error(), "no Docker daemon") {
		t.Errorf("message: %v", err)
	}
}

func TestNameFromRef(t *testing.T) {
	for ref, want := range map[string]string{
		"docker.io/library/nginx:1.27": "nginx-1-27",
		"nginx":                        "nginx",
		"debian:bookworm":              "debian-bookworm",
		"ghcr.io/x/y:tag":              "y-tag",
		"127.0.0.1:5000/a/b_c:V1.2":    "b-c-v1-2",
		"reg.example/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef": "x-0123456789ab",
		"reg.example/9lives:1": "img-9lives-1",
		"reg.example/" + strings.Repeat("a", 70) + ":" + strings.Repeat("t", 20): strings.Repeat("a", 42) + "-" + strings.Repeat("t", 20),
	} {
		r, err := name.ParseReference(ref)
		if err != nil {
			t.Fatal(err)
		}
		if got := NameFromRef(r); got != want {
			t.Errorf("NameFromRef(%s) = %q, want %q", ref, got, want)
		}
	}
}

func TestCanonicalRef(t *testing.T) {
	for ref, want := range map[string]string{
		"nginx":           "docker.io/library/nginx:latest",
		"debian:bookworm": "docker.io/library/debian:bookworm",
		"ghcr.io/x/y:tag": "ghcr.io/x/y:tag",
		"127.0.0.1:5000/x@sha256:" + strings.Repeat("a", 64): "127.0.0.1:5000/x@sha256:" + strings.Repeat("a", 64),
	} {
		r, _ := name.ParseReference(ref)
		if got := CanonicalRef(r); got != want {
			t.Errorf("CanonicalRef(%s) = %q, want %q", ref, got, want)
		}
	}
}

func TestConfigOf(t *testing.T) {
	img := testImage(t, "amd64", []ent{file("f", "x")})
	cfg, _ := img.ConfigFile()
	cfg.Config.Entrypoint = []string{"/entry"}
	cfg.Config.User = "1000:1000"
	cfg.Config.StopSignal = "SIGQUIT"
	got := ConfigOf(cfg)
	want := api.ImageConfig{Env: []string{"PATH=/usr/bin:/bin", "A=b"}, WorkingDir: "/srv", User: "1000:1000",
		Entrypoint: []string{"/entry"}, Cmd: []string{"/bin/sh"}, ExposedPorts: []string{"53/udp", "80/tcp"}, StopSignal: "SIGQUIT"}
	if g, w := strings.Join(append(append(got.Env, got.Entrypoint...), got.ExposedPorts...), ","), strings.Join(append(append(want.Env, want.Entrypoint...), want.ExposedPorts...), ","); g != w ||
		got.WorkingDir != want.WorkingDir || got.User != want.User || got.StopSignal != want.StopSignal || strings.Join(got.Cmd, ",") != "/bin/sh" {
		t.Errorf("ConfigOf = %+v, want %+v", got, want)
	}
	if ConfigOf(nil) != nil {
		t.Error("ConfigOf(nil) != nil")
	}
}

func TestRecordedRef(t *testing.T) {
	for ref, want := range map[string]string{
		"nginx": "docker.io/library/nginx:latest", "docker://ghcr.io/x/y:1": "ghcr.io/x/y:1", "127.0.0.1:5000/a:b": "127.0.0.1:5000/a:b",
		"oci:/x": "", "/x/y.tar": "", "docker-daemon:nginx": "", "Bad!": "",
	} {
		got, ok := RecordedRef(ref)
		if got != want || ok != (want != "") {
			t.Errorf("RecordedRef(%q) = %q, %v; want %q", ref, got, ok, want)
		}
	}
}
