package ociimport

import (
	"strings"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/bangerdev/banger/internal/vmname"
)

// NameFromRef derives a local image name (a DNS label) from a registry
// reference: the repository's last component, then the tag unless it is
// "latest", or the digest's first 12 hex digits:
//
//	docker.io/library/nginx:1.27 → nginx-1-27 (no dots in a DNS label)
//	debian:bookworm              → debian-bookworm
//	ghcr.io/x/y                  → y
//	REG/x@sha256:0123456789ab…   → x-0123456789ab
func NameFromRef(ref name.Reference) string {
	repo := ref.Context().RepositoryStr()
	if i := strings.LastIndex(repo, "/"); i >= 0 {
		repo = repo[i+1:]
	}
	suffix := ""
	switch r := ref.(type) {
	case name.Tag:
		if r.TagStr() != "latest" {
			suffix = r.TagStr()
		}
	case name.Digest:
		d := r.DigestStr()
		if i := strings.Index(d, ":"); i >= 0 {
			d = d[i+1:]
		}
		if len(d) > 12 {
			d = d[:12]
		}
		suffix = d
	}
	return label(repo, suffix)
}

// nameFromLocal derives a name for a local source from its ref.name
// annotation or tag and its file or directory name: a full reference
// ("localhost/app:1") names it as a registry reference would, a bare tag
// ("1.27", as `skopeo copy ... oci:DIR:1.27` writes) follows the base
// name ("nginx-1-27"), no annotation leaves the base name.
func nameFromLocal(refName, base string) string {
	if refName != "" && strings.ContainsAny(refName, "/:@") {
		if ref, err := name.ParseReference(refName); err == nil {
			return NameFromRef(ref)
		}
	}
	return label(base, refName)
}

// label makes a DNS label of base and suffix: lowercase, every other
// character turned into '-', runs of '-' collapsed, starting with a letter
// ("img-" is put before a leading digit), at most 63 characters; the
// suffix is kept whole when it can be.
func label(base, suffix string) string {
	clean := func(s string) string {
		var b strings.Builder
		dash := false
		for _, c := range strings.ToLower(s) {
			if ('a' <= c && c <= 'z') || ('0' <= c && c <= '9') {
				b.WriteRune(c)
				dash = false
			} else if !dash && b.Len() > 0 {
				b.WriteByte('-')
				dash = true
			}
		}
		return strings.Trim(b.String(), "-")
	}
	base, suffix = clean(base), clean(suffix)
	if base == "" {
		base = "image"
	}
	if base[0] < 'a' || base[0] > 'z' {
		base = "img-" + base
	}
	if suffix != "" {
		if max := vmname.MaxLen - len(suffix) - 1; len(base) > max && max >= 8 {
			base = strings.TrimRight(base[:max], "-")
		}
		base += "-" + suffix
	}
	if len(base) > vmname.MaxLen {
		base = base[:vmname.MaxLen]
	}
	return strings.TrimRight(base, "-")
}
