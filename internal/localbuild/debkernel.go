package localbuild

import (
	"bufio"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
)

// DefaultKeyring is Debian's archive keyring (package debian-archive-keyring).
const DefaultKeyring = "/usr/share/keyrings/debian-archive-keyring.gpg"

// KernelOptions configures FetchDebianKernel. Zero values mean the defaults.
type KernelOptions struct {
	Mirror  string // DefaultMirror
	Suite   string // "bookworm"
	Arch    string // "amd64"
	Package string // the metapackage, "linux-image-cloud-amd64"
	Keyring string // DefaultKeyring
	Gpgv    string // "gpgv"
	Client  *http.Client
	// Progress: phase "download" (bytes) for the index and the package.
	Progress Progress
	Log      *slog.Logger
	LogFile  io.Writer
}

// DebianKernel is a downloaded, verified kernel package.
type DebianKernel struct {
	Path    string // the .deb
	Package string // linux-image-6.1.0-28-cloud-amd64
	Version string // 6.1.119-1
	SHA256  string
}

// FetchDebianKernel downloads the kernel package Package depends on from
// Debian's archive into dir: the suite's InRelease, checked with gpgv
// against the archive keyring, then the Packages index it signs (size and
// SHA256 checked), then the versioned package named by the metapackage's
// Depends (size and SHA256 checked). Nothing is trusted that the signature
// doesn't cover.
func FetchDebianKernel(ctx context.Context, dir string, o KernelOptions) (DebianKernel, error) {
	if o.Mirror == "" {
		o.Mirror = DefaultMirror
	}
	if o.Suite == "" {
		o.Suite = "bookworm"
	}
	if o.Arch == "" {
		o.Arch = "amd64"
	}
	if o.Package == "" {
		o.Package = "linux-image-cloud-" + o.Arch
	}
	if o.Keyring == "" {
		o.Keyring = DefaultKeyring
	}
	if o.Gpgv == "" {
		o.Gpgv = "gpgv"
	}
	if o.Client == nil {
		o.Client = &http.Client{Transport: &http.Transport{Proxy: http.ProxyFromEnvironment, ResponseHeaderTimeout: 60 * time.Second}}
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if !fileExists(o.Keyring) {
		return DebianKernel{}, fmt.Errorf("debian kernel: no archive keyring at %s to verify Debian's archive (apt-get install debian-archive-keyring): %w", o.Keyring, errdefs.ErrFailedPrecondition)
	}
	base := strings.TrimSuffix(o.Mirror, "/")

	inrelease := filepath.Join(dir, "InRelease")
	if _, err := download(ctx, o.Client, base+"/dists/"+o.Suite+"/InRelease", inrelease, -1, "", "download: InRelease", o.Progress); err != nil {
		return DebianKernel{}, fmt.Errorf("debian kernel: %w", err)
	}
	release := filepath.Join(dir, "Release")
	if err := (command{name: o.Gpgv, args: []string{"--keyring", o.Keyring, "--output", release, inrelease}, log: o.LogFile}).run(ctx); err != nil {
		return DebianKernel{}, fmt.Errorf("debian kernel: %s/dists/%s/InRelease is not signed by a key of %s: %w", base, o.Suite, o.Keyring, err)
	}
	rel, err := os.ReadFile(release)
	if err != nil {
		return DebianKernel{}, fmt.Errorf("debian kernel: %w", err)
	}
	index := "main/binary-" + o.Arch + "/Packages.gz"
	sum, size, err := releaseSum(rel, index)
	if err != nil {
		return DebianKernel{}, fmt.Errorf("debian kernel: %s/dists/%s: %w", base, o.Suite, err)
	}
	packages := filepath.Join(dir, "Packages.gz")
	if _, err := download(ctx, o.Client, base+"/dists/"+o.Suite+"/"+index, packages, size, sum, "download: Packages", o.Progress); err != nil {
		return DebianKernel{}, fmt.Errorf("debian kernel: %w", err)
	}
	meta, pkg, err := findKernelPackage(packages, o.Package)
	if err != nil {
		return DebianKernel{}, fmt.Errorf("debian kernel: %s %s: %w", base, o.Suite, err)
	}
	o.Log.Info("debian kernel: package", "meta", o.Package, "meta_version", meta.Version, "package", pkg.Package, "version", pkg.Version)
	name := path.Base(pkg.Filename)
	if name == "." || name == "/" || !strings.HasSuffix(name, ".deb") || strings.Contains(pkg.Filename, "..") {
		return DebianKernel{}, fmt.Errorf("debian kernel: bad Filename %q in the index", pkg.Filename)
	}
	deb := filepath.Join(dir, name)
	if _, err := download(ctx, o.Client, base+"/"+pkg.Filename, deb, pkg.Size, pkg.SHA256, "download: "+pkg.Package, o.Progress); err != nil {
		return DebianKernel{}, fmt.Errorf("debian kernel: %w", err)
	}
	return DebianKernel{Path: deb, Package: pkg.Package, Version: pkg.Version, SHA256: pkg.SHA256}, nil
}

// releaseSum finds name's SHA256 and size in a Release file.
func releaseSum(release []byte, name string) (string, int64, error) {
	in := false
	for _, line := range strings.Split(string(release), "\n") {
		if !strings.HasPrefix(line, " ") {
			in = strings.TrimSpace(line) == "SHA256:"
			continue
		}
		if !in {
			continue
		}
		f := strings.Fields(line)
		if len(f) == 3 && f[2] == name {
			size, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil || len(f[0]) != 64 {
				return "", 0, fmt.Errorf("bad SHA256 line for %s in Release", name)
			}
			return f[0], size, nil
		}
	}
	return "", 0, fmt.Errorf("no SHA256 for %s in the Release file", name)
}

// stanza is what FetchDebianKernel reads of a Packages entry.
type stanza struct {
	Package, Version, Depends, Filename, SHA256 string
	Size                                        int64
}

// reKernelDep is the versioned kernel package a metapackage depends on.
var reKernelDep = regexp.MustCompile(`^(linux-image-[0-9][^ ,(|]*)`)

// findKernelPackage reads a gzip'ed Packages index: the metapackage's
// stanza, then the one of the linux-image-<abi>-<flavour> it depends on
// (the newest version when there are several).
func findKernelPackage(packagesGz, meta string) (stanza, stanza, error) {
	all, err := readStanzas(packagesGz, func(name string) bool {
		return name == meta || strings.HasPrefix(name, "linux-image-")
	})
	if err != nil {
		return stanza{}, stanza{}, err
	}
	var m *stanza
	for i := range all {
		if all[i].Package == meta && (m == nil || versionLess(m.Version, all[i].Version)) {
			m = &all[i]
		}
	}
	if m == nil {
		return stanza{}, stanza{}, fmt.Errorf("no package %s in the index: %w", meta, errdefs.ErrNotFound)
	}
	var dep string
	for _, alt := range strings.Split(m.Depends, ",") {
		if d := reKernelDep.FindString(strings.TrimSpace(alt)); d != "" {
			dep = d
			break
		}
	}
	if dep == "" {
		return stanza{}, stanza{}, fmt.Errorf("%s %s depends on no linux-image-<version> package (Depends: %s)", meta, m.Version, m.Depends)
	}
	var p *stanza
	for i := range all {
		if all[i].Package == dep && (p == nil || versionLess(p.Version, all[i].Version)) {
			p = &all[i]
		}
	}
	if p == nil {
		return stanza{}, stanza{}, fmt.Errorf("%s depends on %s, which the index lacks: %w", meta, dep, errdefs.ErrNotFound)
	}
	if p.Filename == "" || p.Size <= 0 || len(p.SHA256) != 64 {
		return stanza{}, stanza{}, fmt.Errorf("index entry of %s %s lacks Filename, Size or SHA256", p.Package, p.Version)
	}
	return *m, *p, nil
}

func readStanzas(packagesGz string, want func(string) bool) ([]stanza, error) {
	f, err := os.Open(packagesGz)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", filepath.Base(packagesGz), err)
	}
	var out []stanza
	var cur stanza
	keep := false
	flush := func() {
		if keep && cur.Package != "" {
			out = append(out, cur)
		}
		cur, keep = stanza{}, false
	}
	sc := bufio.NewScanner(zr)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			flush()
			continue
		}
		if line[0] == ' ' || line[0] == '\t' {
			continue
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "Package":
			cur.Package = v
			keep = want(v)
		case "Version":
			cur.Version = v
		case "Depends":
			cur.Depends = v
		case "Filename":
			cur.Filename = v
		case "SHA256":
			cur.SHA256 = v
		case "Size":
			cur.Size, _ = strconv.ParseInt(v, 10, 64)
		}
	}
	flush()
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", filepath.Base(packagesGz), err)
	}
	return out, nil
}

// versionLess compares Debian versions well enough for kernel packages:
// the numeric runs compare as numbers, the rest byte-wise, '~' first.
func versionLess(a, b string) bool {
	for a != "" || b != "" {
		na, ra := leadingDigits(a)
		nb, rb := leadingDigits(b)
		if na != nb {
			return na < nb
		}
		a, b = ra, rb
		ta, ra2 := leadingNonDigits(a)
		tb, rb2 := leadingNonDigits(b)
		if ta != tb {
			return lexLess(ta, tb)
		}
		a, b = ra2, rb2
	}
	return false
}

func leadingDigits(s string) (int64, string) {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	n, _ := strconv.ParseInt(s[:i], 10, 64)
	return n, s[i:]
}

func leadingNonDigits(s string) (string, string) {
	i := 0
	for i < len(s) && (s[i] < '0' || s[i] > '9') {
		i++
	}
	return s[:i], s[i:]
}

// lexLess orders as dpkg does: '~' before anything, even the end.
func lexLess(a, b string) bool {
	order := func(c byte) int {
		switch {
		case c == '~':
			return -1
		case c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z':
			return int(c)
		default:
			return int(c) + 256
		}
	}
	for i := 0; i < len(a) || i < len(b); i++ {
		var ca, cb int
		if i < len(a) {
			ca = order(a[i])
		}
		if i < len(b) {
			cb = order(b[i])
		}
		if ca != cb {
			return ca < cb
		}
	}
	return false
}

// download fetches url into file, checking size (-1: any) and sha256 (""
// : none) as it streams; on any failure the file is removed.
func download(ctx context.Context, c *http.Client, url, file string, size int64, sum, phase string, p Progress) (int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, fmt.Errorf("fetch %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("fetch %s: %s", url, resp.Status)
	}
	total := size
	if total < 0 {
		total = resp.ContentLength
	}
	f, err := os.OpenFile(file, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return 0, err
	}
	h := sha256.New()
	var n int64
	buf := make([]byte, 256<<10)
	last := time.Time{}
	fail := func(err error) (int64, error) {
		f.Close()
		os.Remove(file)
		return n, err
	}
	for {
		m, rerr := resp.Body.Read(buf)
		if m > 0 {
			if size >= 0 && n+int64(m) > size {
				return fail(fmt.Errorf("fetch %s: more than the %d bytes the signed index gives", url, size))
			}
			if _, err := f.Write(buf[:m]); err != nil {
				return fail(err)
			}
			h.Write(buf[:m])
			n += int64(m)
			if time.Since(last) > 200*time.Millisecond {
				last = time.Now()
				p.send(phase, n, max(total, 0), "bytes")
			}
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			return fail(fmt.Errorf("fetch %s: %w", url, rerr))
		}
	}
	p.send(phase, n, max(total, n), "bytes")
	if size >= 0 && n != size {
		return fail(fmt.Errorf("fetch %s: %d bytes, the signed index says %d", url, n, size))
	}
	if got := hex.EncodeToString(h.Sum(nil)); sum != "" && got != sum {
		return fail(fmt.Errorf("fetch %s: sha256 %s, the signed index says %s", url, got, sum))
	}
	if err := f.Close(); err != nil {
		os.Remove(file)
		return n, err
	}
	return n, nil
}
