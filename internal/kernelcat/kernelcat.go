// Package kernelcat is banger's kernel catalog: the catalog compiled into
// banger (catalog.json, embedded) merged with the daemon's catalog_urls.
// The format, validation and lookups are internal/catalog's
// (docs/image-catalog.md).
package kernelcat

import (
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

// Builtin is the kernel catalog compiled into banger: Builtin().Load
// merges it with the catalog_urls, Builtin().LoadURLs reads them alone.
func Builtin() catalog.Builtin {
	return catalog.Builtin{Kind: catalog.Kernels, Data: embedded}
}
