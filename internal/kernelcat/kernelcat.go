// Package kernelcat is banger's kernel catalog: the catalog compiled into
// banger (catalog.json, embedded) merged with the daemon's catalog_urls.
// The format, validation and lookups are internal/catalog's
// (docs/image-catalog.md).
package kernelcat

import (
	"context"
	_ "embed"

	"github.com/bangerdev/banger/internal/catalog"
)

//go:embed catalog.json
var embedded []byte

// Entry is one version of one kernel: its bundle (URL, Size, SHA256), its
// release (uname -r) and its local build recipe.
type Entry = catalog.Entry

// Catalog is the merged kernel catalog; Resolve("NAME" | "NAME@VERSION").
type Catalog = catalog.Catalog

// Load merges the embedded catalog with urls (paths, file://, https://,
// http:// on loopback), a later one overriding the same NAME@VERSION;
// fetch reads http(s) URLs (nil: a plain GET bound by ctx).
func Load(ctx context.Context, urls []string, fetch catalog.Fetch) (*Catalog, error) {
	return catalog.Load(ctx, catalog.Kernels, embedded, urls, fetch)
}

// LoadURLs reads urls alone, without the embedded catalog
// (embedded_catalogs = false).
func LoadURLs(ctx context.Context, urls []string, fetch catalog.Fetch) (*Catalog, error) {
	return catalog.Load(ctx, catalog.Kernels, nil, urls, fetch)
}

// Embedded is the catalog compiled into banger alone.
func Embedded() (*Catalog, error) {
	return Load(context.Background(), nil, nil)
}
