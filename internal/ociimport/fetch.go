package ociimport

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/bangerdev/banger/internal/api"
	"github.com/bangerdev/banger/internal/errdefs"
	"github.com/bangerdev/banger/internal/tarcopy"
)

// ErrPlainHTTP is matched by the error of a plain-HTTP request to a
// registry that is not on this host, made without Options.Insecure.
var ErrPlainHTTP = errors.New("plain HTTP refused")

// Options tune Resolve.
type Options struct {
	// Platform is "os/arch[/variant]"; "" means the host's (linux/amd64
	// on x86-64).
	Platform string
	// Insecure lets a registry that is not on this host be reached over
	// plain HTTP or with an unverified certificate. Registries on
	// localhost, 127.0.0.0/8 and ::1 may use plain HTTP anyway, as Docker
	// allows.
	Insecure bool
	// Keychain finds registry credentials; nil means authn.DefaultKeychain:
	// $DOCKER_CONFIG/config.json or ~/.docker/config.json of the process
	// (root's, for bangerd) with its credential helpers, then Podman's
	// $REGISTRY_AUTH_FILE or $XDG_RUNTIME_DIR/containers/auth.json.
	Keychain authn.Keychain
	// Transport is the HTTP transport under the plain-HTTP gate; nil
	// means go-containerregistry's default (proxy from the environment).
	Transport http.RoundTripper
	// TempDir holds what a source needs on disk while it is read (the
	// `docker save` output of a docker-daemon: reference, an unpacked
	// oci-archive). Required for those two.
	TempDir string
	// Log receives warnings (extended attributes not set, skipped
	// entries); nil discards them.
	Log *slog.Logger
}

// Source is a resolved image: its manifest and config are read, its
// layers not yet.
type Source struct {
	// Ref is the reference as recorded: a canonical registry reference
	// ("docker.io/library/nginx:1.27"), or "oci:DIR", "docker-archive:FILE",
	// "docker-daemon:IMAGE".
	Ref string
	// Name is the local image name derived from the reference (a DNS label).
	Name string
	// Digest is the image manifest's digest ("sha256:..."); for `docker
	// save` tarballs, which carry no manifest, the image ID (the config's
	// digest) as Docker shows it.
	Digest string
	// Platform is the image's os/arch from its config ("" when unknown).
	Platform string
	// Config is the image's process configuration.
	Config *api.ImageConfig

	layers     []layerSource
	log        *slog.Logger
	cleanup    func()
	annotation string // a layout image's ref.name annotation
}

// Close releases what Resolve kept open (temporary files).
func (s *Source) Close() error {
	if s.cleanup != nil {
		s.cleanup()
		s.cleanup = nil
	}
	return nil
}

// Layers is the number of layers.
func (s *Source) Layers() int { return len(s.layers) }

// Transport prefixes of references that are not registry references.
const (
	prefixLayout       = "oci:"
	prefixOCIArchive   = "oci-archive:"
	prefixDockerArch   = "docker-archive:"
	prefixDockerDaemon = "docker-daemon:"
	prefixDocker       = "docker://"
)

// IsLocalRef reports whether ref names a local source (a layout
// directory, a tarball, the Docker daemon) rather than a registry: the
// CLI makes such paths absolute before sending them to the daemon.
func IsLocalRef(ref string) bool {
	for _, p := range []string{prefixLayout, prefixOCIArchive, prefixDockerArch, prefixDockerDaemon} {
		if strings.HasPrefix(ref, p) {
			return true
		}
	}
	return strings.HasPrefix(ref, "/") || strings.HasPrefix(ref, "./") || strings.HasPrefix(ref, "../")
}

// Resolve reads ref's manifest and config (choosing the platform's image
// from an index). ref is a registry reference ("debian:bookworm",
// "ghcr.io/x/y:tag", "REG/x@sha256:...", optionally "docker://REF"),
// "oci:DIR" or an absolute path to a directory holding an OCI layout,
// "docker-archive:FILE" or an absolute path to a `docker save` tarball,
// "oci-archive:FILE" (unpacked into opts.TempDir), "docker-daemon:IMAGE"
// (runs `docker save` into opts.TempDir). Close the Source when done.
func Resolve(ctx context.Context, ref string, opts Options) (*Source, error) {
	want, err := platformOf(opts.Platform)
	if err != nil {
		return nil, err
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var s *Source
	switch {
	case strings.HasPrefix(ref, prefixLayout):
		s, err = resolveLayout(strings.TrimPrefix(ref, prefixLayout), want)
	case strings.HasPrefix(ref, prefixDockerArch):
		s, err = resolveArchive(strings.TrimPrefix(ref, prefixDockerArch), prefixDockerArch)
	case strings.HasPrefix(ref, prefixOCIArchive):
		s, err = resolveOCIArchive(strings.TrimPrefix(ref, prefixOCIArchive), want, opts.TempDir)
	case strings.HasPrefix(ref, prefixDockerDaemon):
		s, err = resolveDaemon(ctx, strings.TrimPrefix(ref, prefixDockerDaemon), opts.TempDir)
	case strings.HasPrefix(ref, "/"):
		s, err = resolvePath(ref, want, opts.TempDir)
	case strings.HasPrefix(ref, "./") || strings.HasPrefix(ref, "../"):
		return nil, fmt.Errorf("%s: a relative path; give an absolute one: %w", ref, errdefs.ErrInvalid)
	default:
		s, err = resolveRemote(ctx, strings.TrimPrefix(ref, prefixDocker), want, opts)
	}
	if err != nil {
		return nil, err
	}
	s.log = log
	if s.Platform != "" && opts.Platform == "" && !platformMatches(s.Platform, want) {
		s.Close()
		return nil, fmt.Errorf("%s is a %s image, this host runs %s; pass --platform %s to import it anyway: %w", ref, s.Platform, want.String(), s.Platform, errdefs.ErrInvalid)
	}
	return s, nil
}

// platformOf parses an "os/arch[/variant]" platform; "" is the host's.
func platformOf(s string) (v1.Platform, error) {
	if s == "" {
		p := v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
		if runtime.GOARCH == "arm64" {
			p.Variant = "v8"
		}
		return p, nil
	}
	p, err := v1.ParsePlatform(s)
	if err != nil || p.OS == "" || p.Architecture == "" {
		return v1.Platform{}, fmt.Errorf("platform %q: want os/arch[/variant], e.g. linux/amd64: %w", s, errdefs.ErrInvalid)
	}
	return *p, nil
}

func platformMatches(got string, want v1.Platform) bool {
	p, err := v1.ParsePlatform(got)
	if err != nil {
		return false
	}
	return p.OS == want.OS && p.Architecture == want.Architecture
}

// --- registries ---

// PlainHTTPAllowed reports whether a registry host ("host" or "host:port")
// may be reached over plain HTTP without --insecure: localhost and
// loopback addresses, as Docker allows.
func PlainHTTPAllowed(host string) bool {
	h := host
	if hh, _, err := net.SplitHostPort(host); err == nil {
		h = hh
	}
	h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
	if strings.EqualFold(h, "localhost") {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// httpGate refuses plain-HTTP requests to hosts that may not get them.
// go-containerregistry falls back to plain HTTP for private addresses
// (10/8, 192.168/16, *.local) too; Docker doesn't, and neither does banger.
type httpGate struct {
	base     http.RoundTripper
	insecure bool
}

func (g httpGate) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme == "http" && !g.insecure && !PlainHTTPAllowed(req.URL.Host) {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, fmt.Errorf("registry %s over plain HTTP: only registries on localhost may use it; pass --insecure to allow it: %w", req.URL.Host, ErrPlainHTTP)
	}
	return g.base.RoundTrip(req)
}

func registryTransport(opts Options) http.RoundTripper {
	base := opts.Transport
	if base == nil {
		t := remote.DefaultTransport.(*http.Transport).Clone()
		if opts.Insecure {
			t.TLSClientConfig = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // --insecure asks for it
		}
		base = t
	}
	return httpGate{base: base, insecure: opts.Insecure}
}

// CanonicalRef is the reference as recorded and shown: Docker Hub's
// registry spelled docker.io ("docker.io/library/nginx:1.27").
func CanonicalRef(ref name.Reference) string {
	reg := ref.Context().RegistryStr()
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	repo := reg + "/" + ref.Context().RepositoryStr()
	switch r := ref.(type) {
	case name.Digest:
		return repo + "@" + r.DigestStr()
	case name.Tag:
		return repo + ":" + r.TagStr()
	}
	return ref.Name()
}

func resolveRemote(ctx context.Context, s string, want v1.Platform, opts Options) (*Source, error) {
	var nameOpts []name.Option
	if opts.Insecure {
		nameOpts = append(nameOpts, name.Insecure)
	}
	ref, err := name.ParseReference(s, nameOpts...)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %w: %w", s, err, errdefs.ErrInvalid)
	}
	kc := opts.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	ropts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(kc),
		remote.WithTransport(registryTransport(opts)),
		remote.WithPlatform(want),
	}
	canon := CanonicalRef(ref)
	desc, err := remote.Get(ref, ropts...)
	if err != nil {
		return nil, registryError(canon, err)
	}
	img, err := desc.Image()
	if err != nil {
		if desc.MediaType.IsIndex() {
			return nil, fmt.Errorf("%s: no image for %s in its index (it has %s); choose one with --platform: %w",
				canon, want.String(), indexPlatforms(desc), errdefs.ErrNotFound)
		}
		return nil, registryError(canon, err)
	}
	src, err := fromImage(img, canon)
	if err != nil {
		return nil, registryError(canon, err)
	}
	src.Name = NameFromRef(ref)
	return src, nil
}

func indexPlatforms(desc *remote.Descriptor) string {
	idx, err := desc.ImageIndex()
	if err != nil {
		return "no readable platform list"
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return "no readable platform list"
	}
	var ps []string
	for _, m := range im.Manifests {
		if m.Platform != nil && m.Platform.OS != "unknown" {
			ps = append(ps, m.Platform.String())
		}
	}
	if len(ps) == 0 {
		return "no platform listed"
	}
	return strings.Join(ps, ", ")
}

// registryError gives registry failures their kind and a hint.
func registryError(ref string, err error) error {
	if errors.Is(err, ErrPlainHTTP) {
		return fmt.Errorf("pull %s: %w: %w", ref, err, errdefs.ErrFailedPrecondition)
	}
	var terr *transport.Error
	if errors.As(err, &terr) {
		switch terr.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			return fmt.Errorf("pull %s: %w: log in with `docker login` as the user bangerd runs as (root: its ~/.docker/config.json and credential helpers are used): %w", ref, err, errdefs.ErrPermissionDenied)
		case http.StatusNotFound:
			return fmt.Errorf("pull %s: %w: %w", ref, err, errdefs.ErrNotFound)
		}
		for _, d := range terr.Errors {
			switch d.Code {
			case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
				return fmt.Errorf("pull %s: %w: %w", ref, err, errdefs.ErrNotFound)
			case transport.UnauthorizedErrorCode, transport.DeniedErrorCode:
				return fmt.Errorf("pull %s: %w: %w", ref, err, errdefs.ErrPermissionDenied)
			}
		}
	}
	return fmt.Errorf("pull %s: %w", ref, err)
}

// fromImage reads what the import needs from an image with real
// manifests (registry, OCI layout): the config, the manifest's digest and
// its layers' descriptors.
func fromImage(img v1.Image, ref string) (*Source, error) {
	digest, err := img.Digest()
	if err != nil {
		return nil, fmt.Errorf("manifest digest: %w", err)
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("read manifest: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	s := &Source{Ref: ref, Digest: digest.String(), Config: ConfigOf(cfg), Platform: configPlatform(cfg)}
	for _, d := range m.Layers {
		if !d.MediaType.IsDistributable() {
			return nil, fmt.Errorf("layer %s is a foreign (non-distributable) layer of type %s, which banger can't fetch: %w", d.Digest, d.MediaType, errdefs.ErrInvalid)
		}
		l, err := img.LayerByDigest(d.Digest)
		if err != nil {
			return nil, fmt.Errorf("layer %s: %w", d.Digest, err)
		}
		s.layers = append(s.layers, layerSource{name: d.Digest.String(), open: l.Compressed, decompress: true, size: d.Size})
	}
	return s, nil
}

func configPlatform(cfg *v1.ConfigFile) string {
	if cfg == nil || cfg.Architecture == "" {
		return ""
	}
	os := cfg.OS
	if os == "" {
		os = "linux"
	}
	p := os + "/" + cfg.Architecture
	if cfg.Variant != "" {
		p += "/" + cfg.Variant
	}
	return p
}

// --- OCI layouts ---

func isLayout(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, "oci-layout"))
	return err == nil
}

func resolveLayout(dir string, want v1.Platform) (*Source, error) {
	refName := ""
	if !isLayout(dir) {
		// oci:DIR:NAME names one image of the layout (its
		// org.opencontainers.image.ref.name annotation).
		if i := strings.LastIndex(dir, ":"); i > 0 && isLayout(dir[:i]) {
			dir, refName = dir[:i], dir[i+1:]
		}
	}
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("oci:%s: a relative path; give an absolute one: %w", dir, errdefs.ErrInvalid)
	}
	if !isLayout(dir) {
		return nil, fmt.Errorf("%s: not an OCI image layout (no oci-layout file): %w", dir, errdefs.ErrNotFound)
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("read OCI layout %s: %w", dir, err)
	}
	img, annName, err := pickFromIndex(idx, want, refName)
	if err != nil {
		return nil, fmt.Errorf("OCI layout %s: %w", dir, err)
	}
	ref := prefixLayout + dir
	if refName != "" {
		ref += ":" + refName
	}
	s, err := fromImage(img, ref)
	if err != nil {
		return nil, fmt.Errorf("OCI layout %s: %w", dir, err)
	}
	s.annotation = cmpOr(refName, annName)
	s.Name = nameFromLocal(s.annotation, filepath.Base(dir))
	return s, nil
}

const annotationRefName = "org.opencontainers.image.ref.name"

// pickFromIndex chooses the image of an index (nested indexes included)
// for the platform, and with the ref.name annotation refName when set.
func pickFromIndex(idx v1.ImageIndex, want v1.Platform, refName string) (v1.Image, string, error) {
	type cand struct {
		desc    v1.Descriptor
		idx     v1.ImageIndex
		refName string
	}
	var cands []cand
	var platforms []string
	var walk func(idx v1.ImageIndex, inherited string, depth int) error
	walk = func(idx v1.ImageIndex, inherited string, depth int) error {
		if depth > 4 {
			return fmt.Errorf("indexes nested too deep: %w", errdefs.ErrInvalid)
		}
		im, err := idx.IndexManifest()
		if err != nil {
			return err
		}
		for _, d := range im.Manifests {
			rn := cmpOr(d.Annotations[annotationRefName], inherited)
			switch {
			case d.MediaType.IsIndex():
				child, err := idx.ImageIndex(d.Digest)
				if err != nil {
					return err
				}
				if err := walk(child, rn, depth+1); err != nil {
					return err
				}
			case d.MediaType.IsImage():
				if refName != "" && rn != refName {
					continue
				}
				if d.Platform != nil {
					platforms = append(platforms, d.Platform.String())
					if d.Platform.OS != want.OS || d.Platform.Architecture != want.Architecture ||
						(want.Variant != "" && d.Platform.Variant != "" && d.Platform.Variant != want.Variant) {
						continue
					}
				}
				cands = append(cands, cand{desc: d, idx: idx, refName: rn})
			}
		}
		return nil
	}
	if err := walk(idx, "", 0); err != nil {
		return nil, "", err
	}
	switch {
	case len(cands) == 0 && refName != "":
		return nil, "", fmt.Errorf("no image named %q for %s: %w", refName, want.String(), errdefs.ErrNotFound)
	case len(cands) == 0:
		return nil, "", fmt.Errorf("no image for %s (it has %s); choose one with --platform: %w", want.String(), cmpOr(strings.Join(platforms, ", "), "none"), errdefs.ErrNotFound)
	case len(cands) > 1:
		var names []string
		for _, c := range cands {
			names = append(names, cmpOr(c.refName, c.desc.Digest.String()))
		}
		slices.Sort(names)
		names = slices.Compact(names)
		if len(names) > 1 {
			return nil, "", fmt.Errorf("it holds several images (%s); name one as oci:DIR:NAME: %w", strings.Join(names, ", "), errdefs.ErrInvalid)
		}
	}
	img, err := cands[0].idx.Image(cands[0].desc.Digest)
	if err != nil {
		return nil, "", err
	}
	return img, cands[0].refName, nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// --- docker save tarballs and the Docker daemon ---

// resolvePath takes an absolute path: an OCI layout directory, a `docker
// save` tarball or an OCI archive.
func resolvePath(p string, want v1.Platform, tempDir string) (*Source, error) {
	st, err := os.Stat(p)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: no such file or directory: %w", p, errdefs.ErrNotFound)
		}
		return nil, err
	}
	if st.IsDir() {
		return resolveLayout(p, want)
	}
	if !hasMember(p, "manifest.json") && hasMember(p, "index.json") {
		return resolveOCIArchive(p, want, tempDir)
	}
	return resolveArchive(p, prefixDockerArch)
}

func resolveArchive(file, prefix string) (*Source, error) {
	if !filepath.IsAbs(file) {
		return nil, fmt.Errorf("%s%s: a relative path; give an absolute one: %w", prefix, file, errdefs.ErrInvalid)
	}
	if _, err := os.Stat(file); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: no such file: %w", file, errdefs.ErrNotFound)
		}
		return nil, err
	}
	opener := func() (io.ReadCloser, error) { return os.Open(file) }
	m, err := tarball.LoadManifest(opener)
	if err != nil {
		if hasMember(file, "index.json") {
			return nil, fmt.Errorf("%s: an OCI archive without a docker manifest.json; pull it as oci-archive:%s: %w", file, file, errdefs.ErrInvalid)
		}
		return nil, fmt.Errorf("%s: not a `docker save` tarball: %w: %w", file, err, errdefs.ErrInvalid)
	}
	if len(m) != 1 {
		return nil, fmt.Errorf("%s: holds %d images; banger imports tarballs of one image (docker save IMAGE): %w", file, len(m), errdefs.ErrInvalid)
	}
	img, err := tarball.Image(opener, nil)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("read %s: config: %w", file, err)
	}
	id, err := img.ConfigName()
	if err != nil {
		return nil, fmt.Errorf("read %s: config: %w", file, err)
	}
	s := &Source{Ref: prefix + file, Digest: id.String(), Config: ConfigOf(cfg), Platform: configPlatform(cfg)}
	// Layers come through go-containerregistry's Uncompressed: its
	// Compressed would gzip an uncompressed `docker save` layer first.
	layers, err := img.Layers()
	if err != nil {
		return nil, fmt.Errorf("read %s: layers: %w", file, err)
	}
	for i, l := range layers {
		s.layers = append(s.layers, layerSource{name: fmt.Sprintf("%s#%d", filepath.Base(file), i+1), open: l.Uncompressed})
	}
	tag := ""
	if len(m[0].RepoTags) > 0 {
		tag = m[0].RepoTags[0]
	}
	if tag != "" {
		if ref, err := name.ParseReference(tag); err == nil {
			s.Name = NameFromRef(ref)
		}
	}
	if s.Name == "" {
		s.Name = nameFromLocal("", strings.TrimSuffix(filepath.Base(file), filepath.Ext(file)))
	}
	return s, nil
}

func hasMember(file, member string) bool {
	f, err := os.Open(file)
	if err != nil {
		return false
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if err != nil {
			return false
		}
		if path.Clean(hdr.Name) == member {
			return true
		}
	}
}

// resolveOCIArchive unpacks an OCI archive (`podman save --format
// oci-archive`, `skopeo copy ... oci-archive:`) into tempDir (refusing
// names outside it, links and special files) and reads it as a layout.
func resolveOCIArchive(file string, want v1.Platform, tempDir string) (*Source, error) {
	refName := ""
	if _, err := os.Stat(file); err != nil {
		// oci-archive:FILE:NAME, as for layouts.
		if i := strings.LastIndex(file, ":"); i > 0 {
			if _, err := os.Stat(file[:i]); err == nil {
				file, refName = file[:i], file[i+1:]
			}
		}
	}
	if !filepath.IsAbs(file) {
		return nil, fmt.Errorf("oci-archive:%s: a relative path; give an absolute one: %w", file, errdefs.ErrInvalid)
	}
	if tempDir == "" {
		return nil, fmt.Errorf("oci-archive:%s: no temporary directory given", file)
	}
	f, err := os.Open(file)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: no such file: %w", file, errdefs.ErrNotFound)
		}
		return nil, err
	}
	defer f.Close()
	dir, err := os.MkdirTemp(tempDir, "oci-archive-")
	if err != nil {
		return nil, err
	}
	cleanup := func() { os.RemoveAll(dir) }
	// Inside bangerd: other goroutines may change the umask meanwhile.
	if err := tarcopy.Extract(f, dir, tarcopy.ExtractOptions{UmaskMayChange: true}); err != nil {
		cleanup()
		return nil, fmt.Errorf("unpack %s: %w: %w", file, err, errdefs.ErrInvalid)
	}
	layoutRef := dir
	if refName != "" {
		layoutRef += ":" + refName
	}
	s, err := resolveLayout(layoutRef, want)
	if err != nil {
		cleanup()
		return nil, fmt.Errorf("oci-archive:%s: %w", file, err)
	}
	s.Ref = prefixOCIArchive + file
	if refName != "" {
		s.Ref += ":" + refName
	}
	s.Name = nameFromLocal(s.annotation, strings.TrimSuffix(filepath.Base(file), filepath.Ext(file)))
	s.cleanup = cleanup
	return s, nil
}

// resolveDaemon saves IMAGE from the Docker daemon with the docker CLI
// into tempDir and reads it as a tarball (go-containerregistry's daemon
// package would link the whole Docker client).
func resolveDaemon(ctx context.Context, image, tempDir string) (*Source, error) {
	if image == "" {
		return nil, fmt.Errorf("docker-daemon: names no image: %w", errdefs.ErrInvalid)
	}
	if tempDir == "" {
		return nil, fmt.Errorf("docker-daemon:%s: no temporary directory given", image)
	}
	docker, err := exec.LookPath("docker")
	if err != nil {
		return nil, fmt.Errorf("docker-daemon:%s: the docker CLI is not installed: %w", image, errdefs.ErrFailedPrecondition)
	}
	f, err := os.CreateTemp(tempDir, "docker-save-*.tar")
	if err != nil {
		return nil, err
	}
	path := f.Name()
	f.Close()
	cleanup := func() { os.Remove(path) }
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, docker, "save", "-o", path, image)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		cleanup()
		msg := strings.TrimSpace(stderr.String())
		switch {
		case strings.Contains(msg, "Cannot connect to the Docker daemon"), strings.Contains(msg, "Is the docker daemon running"),
			strings.Contains(msg, "connect: no such file or directory"), strings.Contains(msg, "connection refused"):
			return nil, fmt.Errorf("docker-daemon:%s: no Docker daemon answers (%s): %w", image, msg, errdefs.ErrFailedPrecondition)
		case strings.Contains(msg, "No such image"), strings.Contains(msg, "reference does not exist"):
			return nil, fmt.Errorf("docker-daemon:%s: %s: %w", image, msg, errdefs.ErrNotFound)
		}
		return nil, fmt.Errorf("docker-daemon:%s: docker save: %w: %s", image, err, msg)
	}
	s, err := resolveArchive(path, prefixDockerArch)
	if err != nil {
		cleanup()
		return nil, err
	}
	s.Ref = prefixDockerDaemon + image
	if ref, err := name.ParseReference(image); err == nil {
		s.Name = NameFromRef(ref)
	}
	s.cleanup = cleanup
	return s, nil
}

// RecordedRef is the Ref an import of ref records, for registry
// references ("nginx" → "docker.io/library/nginx:latest"), so a caller can
// find an installed image by what a user typed; ok is false for local
// sources and references that don't parse.
func RecordedRef(ref string) (string, bool) {
	if IsLocalRef(ref) {
		return "", false
	}
	r, err := name.ParseReference(strings.TrimPrefix(ref, prefixDocker))
	if err != nil {
		return "", false
	}
	return CanonicalRef(r), true
}
