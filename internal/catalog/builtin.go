package catalog

import "context"

// Builtin is a catalog of one kind compiled into banger: the catalog.json
// that internal/imagecat or internal/kernelcat embeds.
type Builtin struct {
	Kind Kind
	Data []byte
}

// Load merges the embedded catalog with urls (paths, file://, https://,
// http:// on loopback), a later one overriding the same NAME@VERSION;
// fetch reads http(s) URLs (nil: a plain GET bound by ctx).
func (b Builtin) Load(ctx context.Context, urls []string, fetch Fetch) (*Catalog, error) {
	return Load(ctx, b.Kind, b.Data, urls, fetch)
}

// LoadURLs reads urls alone, without the embedded catalog
// (embedded_catalogs = false).
func (b Builtin) LoadURLs(ctx context.Context, urls []string, fetch Fetch) (*Catalog, error) {
	return Load(ctx, b.Kind, nil, urls, fetch)
}

// Embedded is the catalog compiled into banger alone.
func (b Builtin) Embedded() (*Catalog, error) {
	return b.Load(context.Background(), nil, nil)
}
