package catalog

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/bangerdev/banger/internal/errdefs"
)

const sum = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func entryJSON(name, version, extra string) string {
	return fmt.Sprintf(`{"name":%q,"version":%q,"arch":%q,"url":"https://example.test/%s-%s.tar.zst","size":10,"sha256":%q%s}`,
		name, version, runtime.GOARCH, name, version, sum, extra)
}

func catalogJSON(images ...string) []byte {
	return []byte(`{"schema":1,"images":[` + strings.Join(images, ",") + `]}`)
}

func TestResolveNewestAndPinned(t *testing.T) {
	emb := catalogJSON(entryJSON("deb", "2026.9.1", ""), entryJSON("deb", "2026.10.2", ""), entryJSON("deb", "2026.10.10", ""))
	c, err := Load(context.Background(), Images, emb, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	e, err := c.Resolve("deb")
	if err != nil || e.Version != "2026.10.10" {
		t.Fatalf("newest: %+v, %v; want 2026.10.10 (numeric, not lexical)", e, err)
	}
	e, err = c.Resolve("deb@2026.9.1")
	if err != nil || e.Version != "2026.9.1" || e.Catalog != EmbeddedName {
		t.Fatalf("pinned: %+v, %v", e, err)
	}
	_, err = c.Resolve("deb@1.0")
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "versions: 2026.10.10, 2026.10.2, 2026.9.1") {
		t.Fatalf("missing version: %v", err)
	}
	_, err = c.Resolve("nope")
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "catalogs searched (embedded)") {
		t.Fatalf("missing name: %v", err)
	}
}

func TestCompareVersions(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{{"1.10", "1.9", 1}, {"1.2", "1.2", 0}, {"1.2", "1.2.1", -1}, {"b", "a", 1}, {"1.x", "1.9", 1}} {
		if got := CompareVersions(tc.a, tc.b); got != tc.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

func TestLoadMergesURLs(t *testing.T) {
	dir := t.TempDir()
	override := catalogJSON(entryJSON("deb", "1", `,"description":"from file"`), `{"name":"rel","version":"2","arch":"`+runtime.GOARCH+`","url":"b/rel.tar.zst","size":1,"sha256":"`+sum+`"}`)
	path := filepath.Join(dir, "cat.json")
	if err := os.WriteFile(path, override, 0o644); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/c.json" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write(catalogJSON(entryJSON("web", "3", "")))
	}))
	defer srv.Close()
	c, err := Load(context.Background(), Images, catalogJSON(entryJSON("deb", "1", "")), []string{path, srv.URL + "/c.json"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if e, _ := c.Resolve("deb"); e.Description != "from file" || e.Catalog != path {
		t.Errorf("later catalog should override: %+v", e)
	}
	if e, _ := c.Resolve("rel"); e.URL != "file://"+dir+"/b/rel.tar.zst" {
		t.Errorf("relative url resolved to %q", e.URL)
	}
	if _, err := c.Resolve("web"); err != nil {
		t.Error(err)
	}
	if got := len(c.Sources()); got != 3 {
		t.Errorf("sources %v", c.Sources())
	}
	_, err = Load(context.Background(), Images, catalogJSON(), []string{srv.URL + "/missing.json"}, nil)
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "/missing.json") {
		t.Errorf("404: %v", err)
	}
	_, err = Load(context.Background(), Images, catalogJSON(), []string{"http://example.test/c.json", "ftp://x/y"}, nil)
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "only to a loopback host") {
		t.Errorf("non-loopback http: %v", err)
	}
}

func TestParseRejectsBadEntries(t *testing.T) {
	arch := runtime.GOARCH
	for _, tc := range []struct{ entry, want string }{
		{`{"name":"Bad_Name","version":"1","arch":"` + arch + `","build":"x"}`, "invalid image name"},
		{`{"name":"a","version":"","arch":"` + arch + `","build":"x"}`, "version"},
		{`{"name":"a","version":"1","arch":"sparc","build":"x"}`, `arch "sparc"`},
		{`{"name":"a","version":"1","arch":"` + arch + `"}`, "no url and no build"},
		{`{"name":"a","version":"1","arch":"` + arch + `","url":"https://x/y","sha256":"` + sum + `"}`, "positive size"},
		{`{"name":"a","version":"1","arch":"` + arch + `","url":"https://x/y","size":3,"sha256":"abc"}`, "64 lowercase hex"},
		{`{"name":"a","version":"1","arch":"` + arch + `","url":"http://example.test/y","size":3,"sha256":"` + sum + `"}`, "loopback"},
		{`{"name":"a","version":"1","arch":"` + arch + `","url":"y.tar.zst","size":3,"sha256":"` + sum + `"}`, "relative url"},
		{`{"name":"a","version":"1","arch":"` + arch + `","build":"x","bogus":1}`, "unknown field"},
		{entryJSON("a", "1", "") + "," + entryJSON("a", "1", ""), "listed twice"},
	} {
		_, err := Parse(EmbeddedName, catalogJSON(tc.entry))
		if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "catalog embedded") {
			t.Errorf("entry %s: error %v, want one containing %q", tc.entry, err, tc.want)
		}
	}
	if _, err := Parse("x", []byte(`{"schema":2}`)); err == nil || !strings.Contains(err.Error(), "schema 2") {
		t.Errorf("schema: %v", err)
	}
}

func TestKernelNames(t *testing.T) {
	for _, n := range []string{"generic-6.1", "k", "linux-6.12.3"} {
		if err := ValidateName(Kernels, n); err != nil {
			t.Errorf("%q: %v", n, err)
		}
	}
	for _, n := range []string{"", "6.1", "a..b", "a.", "A", "a/b"} {
		if err := ValidateName(Kernels, n); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%q accepted", n)
		}
	}
	if err := ValidateName(Images, "generic-6.1"); !errors.Is(err, errdefs.ErrInvalid) {
		t.Error("an image name must be a DNS label")
	}
}

func TestSetEntry(t *testing.T) {
	path := filepath.Join(t.TempDir(), "catalog.json")
	e := Entry{Name: "k", Version: "1", Arch: "amd64", Build: "debian-cloud", Description: "kernel"}
	if err := SetEntry(path, Kernels, e); err != nil {
		t.Fatal(err)
	}
	e.Version, e.Build, e.Description, e.URL, e.Size, e.SHA256 = "2", "", "", "k-2.tar.zst", 5, sum
	if err := SetEntry(path, Kernels, e); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(path)
	f, err := Parse(path, data)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Kernels) != 1 || f.Kernels[0].Version != "2" || f.Kernels[0].Description != "kernel" || f.Kernels[0].URL != "k-2.tar.zst" || f.Kernels[0].Build != "debian-cloud" {
		t.Fatalf("catalog after update: %s", data)
	}
}

// A catalog fetched over http(s), or the embedded one, can't point the
// daemon at local files (absolute or relative file URLs); a catalog that
// is a local file may.
func TestFileURLsOnlyFromFileCatalogs(t *testing.T) {
	for _, tc := range []struct {
		catalog, url string
		ok           bool
	}{
		{"https://cat.example.test/catalog.json", "file:///etc/shadow", false},
		{"http://127.0.0.1:8080/catalog.json", "file:///root/x.tar.zst", false},
		{EmbeddedName, "file:///etc/shadow", false},
		{"https://cat.example.test/catalog.json", "b.tar.zst", true},
		{"https://cat.example.test/catalog.json", "https://other.example.test/b.tar.zst", true},
		{"https://cat.example.test/catalog.json", "http://cdn.example.test/b.tar.zst", false},
		{"http://127.0.0.1:8080/catalog.json", "http://127.0.0.1:8080/b.tar.zst", true},
		{"/srv/catalog.json", "file:///srv/b.tar.zst", true},
		{"/srv/catalog.json", "b.tar.zst", true},
		{"file:///srv/catalog.json", "file:///srv/b.tar.zst", true},
	} {
		got, err := ResolveURL(tc.catalog, tc.url)
		if tc.ok && err != nil {
			t.Errorf("%s in %s: %v", tc.url, tc.catalog, err)
		}
		if !tc.ok && (err == nil || !errors.Is(err, errdefs.ErrInvalid)) {
			t.Errorf("%s in %s: accepted as %q (%v)", tc.url, tc.catalog, got, err)
		}
	}
	// Through Load too: a remote catalog with a file entry is an error.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write(catalogJSON(strings.Replace(entryJSON("deb", "1", ""), "https://example.test/", "file:///etc/", 1)))
	}))
	defer srv.Close()
	if _, err := Load(context.Background(), Images, nil, []string{srv.URL + "/catalog.json"}, nil); err == nil || !strings.Contains(err.Error(), "file url") {
		t.Errorf("a remote catalog with a file url loaded: %v", err)
	}
}
