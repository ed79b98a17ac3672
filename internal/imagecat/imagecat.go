// Package imagecat is banger's image catalog: the catalog compiled into
// banger (catalog.json, embedded) merged with the daemon's catalog_urls.
// The format, validation and lookups are internal/catalog's
// (docs/image-catalog.md).
package imagecat

import (
	_ "embed"

	"github.com/bangerdev/banger/internal/catalog"
)

//go:embed catalog.json
var embedded []byte

// Entry is one version of one image: its bundle (URL, Size, SHA256), the
// kernel it boots with, its default user and its local build recipe.
type Entry = catalog.Entry

// Catalog is the merged image catalog; Resolve("NAME" | "NAME@VERSION").
type Catalog = catalog.Catalog

// Builtin is the image catalog compiled into banger: Builtin().Load
// merges it with the catalog_urls, Builtin().LoadURLs reads them alone.
func Builtin() catalog.Builtin {
	return catalog.Builtin{Kind: catalog.Images, Data: embedded}
}
