package ociimport

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"golang.org/x/sys/unix"
)

// ent is one tar entry of a test layer.
type ent struct {
	name, body, link string
	typ              byte
	mode             int64
	uid, gid         int
	major, minor     int64
	xattrs           map[string]string
}

func dir(n string) ent        { return ent{name: n, typ: tar.TypeDir, mode: 0o755} }
func file(n, body string) ent { return ent{name: n, typ: tar.TypeReg, mode: 0o644, body: body} }
func symlink(n, target string) ent {
	return ent{name: n, typ: tar.TypeSymlink, link: target, mode: 0o777}
}
func hardlink(n, target string) ent {
	return ent{name: n, typ: tar.TypeLink, link: target, mode: 0o644}
}

var testTime = time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)

func layerTar(t testing.TB, ents []ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for i, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid,
			Linkname: e.link, Devmajor: e.major, Devminor: e.minor, Format: tar.FormatPAX,
			ModTime: testTime.Add(time.Duration(i) * time.Minute)}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if len(e.xattrs) > 0 {
			h.PAXRecords = map[string]string{}
			for k, v := range e.xattrs {
				h.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// testImage builds an image of these layers for linux/amd64 (arch
// overrides it) with a config.
func testImage(t testing.TB, arch string, layers ...[]ent) v1.Image {
	t.Helper()
	img := empty.Image
	for _, l := range layers {
		b := layerTar(t, l)
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
		if err != nil {
			t.Fatal(err)
		}
		img, err = mutate.AppendLayers(img, layer)
		if err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", arch
	cfg.Config.Env = []string{"PATH=/usr/bin:/bin", "A=b"}
	cfg.Config.Cmd = []string{"/bin/sh"}
	cfg.Config.WorkingDir = "/srv"
	cfg.Config.ExposedPorts = map[string]struct{}{"80/tcp": {}, "53/udp": {}}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// startRegistry serves an in-process registry on 127.0.0.1, wrapped by
// wrap when not nil. It returns the host:port.
func startRegistry(t testing.TB, wrap func(http.Handler) http.Handler) string {
	t.Helper()
	var h http.Handler = registry.New(registry.Logger(nopLogger()))
	if wrap != nil {
		h = wrap(h)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

func push(t testing.TB, ref string, img v1.Image, opts ...remote.Option) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img, opts...); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// node describes one entry of a tree, for comparisons.
type node struct {
	typ      byte
	mode     int64 // permission and special bits
	uid, gid int
	content  string // sha256 of a regular file
	link     string
	mtime    int64
	dev      string
}

func (n node) String() string {
	return fmt.Sprintf("%c %o %d:%d %s %q mtime=%d %s", n.typ, n.mode, n.uid, n.gid, n.content, n.link, n.mtime, n.dev)
}

func sum(b []byte) string { h := sha256.Sum256(b); return hex.EncodeToString(h[:8]) }

// readTree describes every entry under root (not root itself).
func readTree(t testing.TB, root string) map[string]node {
	t.Helper()
	out := map[string]node{}
	var names []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != root {
			names = append(names, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(names)
	for _, p := range names {
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			t.Fatal(err)
		}
		n := node{mode: int64(st.Mode & 0o7777), uid: int(st.Uid), gid: int(st.Gid), mtime: st.Mtim.Sec}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			n.typ = tar.TypeDir
		case unix.S_IFREG:
			n.typ = tar.TypeReg
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			n.content = sum(b)
		case unix.S_IFLNK:
			n.typ = tar.TypeSymlink
			n.link, _ = os.Readlink(p)
			n.mode = 0
		case unix.S_IFCHR:
			n.typ = tar.TypeChar
			n.dev = fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case unix.S_IFBLK:
			n.typ = tar.TypeBlock
			n.dev = fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case unix.S_IFIFO:
			n.typ = tar.TypeFifo
		}
		out[rel] = n
	}
	return out
}

// readTar describes a flattened tar the same way.
func readTar(t testing.TB, r io.Reader) map[string]node {
	t.Helper()
	out := map[string]node{}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		name := strings.TrimSuffix(strings.TrimPrefix(filepath.Clean("/"+h.Name), "/"), "/")
		if name == "" {
			continue
		}
		n := node{typ: h.Typeflag, mode: h.Mode & 0o7777, uid: h.Uid, gid: h.Gid, mtime: h.ModTime.Unix()}
		switch h.Typeflag {
		case tar.TypeReg:
			b, _ := io.ReadAll(tr)
			n.content = sum(b)
		case tar.TypeSymlink:
			n.link, n.mode = h.Linkname, 0
		case tar.TypeLink:
			n = node{typ: tar.TypeLink, link: strings.TrimPrefix(filepath.Clean("/"+h.Linkname), "/")}
		case tar.TypeChar, tar.TypeBlock:
			n.dev = fmt.Sprintf("%d:%d", h.Devmajor, h.Devminor)
		}
		out[name] = n
	}
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (owners, device nodes)")
	}
}

// resolveFlatten resolves ref and flattens it into a new root under a
// temporary directory.
func resolveFlatten(t testing.TB, ref string, opts Options) (string, *Source, error) {
	t.Helper()
	s, err := Resolve(context.Background(), ref, opts)
	if err != nil {
		return "", nil, err
	}
	t.Cleanup(func() { s.Close() })
	root := filepath.Join(t.TempDir(), "root")
	if err := emptyDir(root); err != nil {
		t.Fatal(err)
	}
	_, err = flatten(context.Background(), s.layers, root, nil, nil)
	return root, s, err
}

func statIno(t testing.TB, p string) uint64 {
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func nopLogger() *log.Logger { return log.New(io.Discard, "", 0) }
