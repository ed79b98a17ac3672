#!/usr/bin/env bash
# publish-kernel.sh - bundle a kernel built by make-generic-kernel.sh and
# point internal/kernelcat/catalog.json's entry NAME at it.
#
# Usage: scripts/publish-kernel.sh NAME [options]
#   --from DIR        the kernel (make-generic-kernel.sh's OUTDIR; default
#                     build/kernel/NAME): vmlinuz, vmlinux, kernel-release
#   --url-base URL    where the bundle will be served from (the entry's url is
#                     URL/<bundle file>); default $BANGER_PUBLISH_URL_BASE.
#                     Without one the bundle is built, the catalog left as is.
#   --out DIR         output directory (default build/publish)
#   --version V       the entry's version (default: today, YYYY.MM.DD)
#   --banger PATH     the banger binary writing the bundle (default build/bin/banger)
#
# Outputs in DIR: NAME-V-amd64.tar.zst and NAME-V.entry.json. With a URL
# base, the catalog's entry NAME is replaced (added when missing); it keeps
# its description and "build" (the offline fallback, e.g. debian-cloud).
# A modules/ directory in DIR (lib/modules/RELEASE) goes into the bundle too.
set -euo pipefail

log() { printf '[publish-kernel] %s\n' "$*" >&2; }
die() { printf '[publish-kernel] error: %s\n' "$*" >&2; exit 1; }

cd "$(dirname "$0")/.."
[[ $# -ge 1 && "$1" != -* ]] || die "usage: $0 NAME [--from DIR] [--url-base URL] [--out DIR] [--version V]"
NAME="$1"
shift
ARCH=amd64
FROM="build/kernel/$NAME"
URL_BASE="${BANGER_PUBLISH_URL_BASE:-}"
OUTDIR="build/publish"
VERSION="$(date -u +%Y.%m.%d)"
BANGER="build/bin/banger"
while [[ $# -gt 0 ]]; do
	case "$1" in
	--from) FROM="${2:?}"; shift 2 ;;
	--url-base) URL_BASE="${2:?}"; shift 2 ;;
	--out) OUTDIR="${2:?}"; shift 2 ;;
	--version) VERSION="${2:?}"; shift 2 ;;
	--banger) BANGER="${2:?}"; shift 2 ;;
	*) die "unknown argument $1" ;;
	esac
done
[[ "$NAME" =~ ^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$ ]] || die "bad kernel name $NAME (a DNS label: a-z, 0-9, '-', '.')"
[[ -x "$BANGER" ]] || die "$BANGER not found: run make build first, or pass --banger"
for f in vmlinuz kernel-release; do
	[[ -s "$FROM/$f" ]] || die "$FROM/$f missing: build the kernel first (scripts/make-generic-kernel.sh $FROM)"
done
RELEASE="$(cat "$FROM/kernel-release")"
mkdir -p "$OUTDIR"

BUNDLE="$NAME-$VERSION-$ARCH.tar.zst"
ENTRY="$OUTDIR/$NAME-$VERSION.entry.json"
files=(--kernel-file "$FROM/vmlinuz")
[[ ! -s "$FROM/vmlinux" ]] || files+=(--vmlinux "$FROM/vmlinux")
[[ ! -d "$FROM/modules" ]] || files+=(--modules "$FROM/modules")
catalog=()
if [[ -n "$URL_BASE" ]]; then
	catalog=(--url "${URL_BASE%/}/$BUNDLE" --catalog internal/kernelcat/catalog.json)
fi
log "writing $OUTDIR/$BUNDLE (release $RELEASE)"
"$BANGER" image bundle --kind kernel --name "$NAME" --version "$VERSION" --arch "$ARCH" \
	--release "$RELEASE" "${files[@]}" -o "$OUTDIR/$BUNDLE" "${catalog[@]}" >"$ENTRY"
log "bundle: $(stat -c %s "$OUTDIR/$BUNDLE") bytes, sha256 $(sha256sum "$OUTDIR/$BUNDLE" | cut -d" " -f1)"
if [[ -z "$URL_BASE" ]]; then
	log "no --url-base (BANGER_PUBLISH_URL_BASE): internal/kernelcat/catalog.json left as is; entry: $ENTRY"
else
	log "updated internal/kernelcat/catalog.json: $NAME@$VERSION -> ${URL_BASE%/}/$BUNDLE (upload $OUTDIR/$BUNDLE there)"
fi
printf '%s\n' "$OUTDIR/$BUNDLE"
