#!/usr/bin/env bash
# publish-golden-image.sh - build the golden image (catalog entry
# debian-bookworm) from images/golden/Dockerfile, turn it into a banger bundle
# and point internal/imagecat/catalog.json's entry at it.
#
# Usage: scripts/publish-golden-image.sh [options]
#   --url-base URL    where the bundle will be served from (the catalog entry's
#                     url is URL/<bundle file>); default $BANGER_PUBLISH_URL_BASE.
#                     Without one the bundle is built but the catalog is left as is.
#   --out DIR         output directory (default build/publish)
#   --version V       the entry's version (default: today, YYYY.MM.DD)
#   --builder B       podman, buildah or docker (default: the first one found)
#   --banger PATH     the banger binary writing the bundle (default build/bin/banger)
#
# Outputs in DIR: rootfs.ext4 (the image), debian-bookworm-V-amd64.tar.zst
# (the bundle to upload to URL), debian-bookworm-V.entry.json (its catalog
# entry). The catalog entry keeps its "build": "golden" (the offline fallback).
#
# FROM debian:bookworm needs a base image. When the builder has none locally,
# one is made from Debian's archive with mmdebstrap (minbase) and imported;
# set PULL_BASE=1 to let the builder pull it from a registry instead.
#
# Reproducibility: SOURCE_DATE_EPOCH (default: the last commit of
# images/golden) fixes the ext4's timestamps (E2FSPROGS_FAKE_TIME), UUID and
# hash seed; the file list is sorted by mkfs. What isn't bit-for-bit: package
# versions move with Debian's archive and the build time of files written by
# maintainer scripts (see docs/golden-image.md).
#
# Runs as root (the image's files keep their owners).
set -euo pipefail

START_SECONDS=$SECONDS
log() { printf '[publish-golden-image +%4ds] %s\n' "$((SECONDS - START_SECONDS))" "$*" >&2; }
die() { printf '[publish-golden-image] error: %s\n' "$*" >&2; exit 1; }

cd "$(dirname "$0")/.."
ROOT="$PWD"
NAME=debian-bookworm
ARCH=amd64
KERNEL=generic-6.1
USER_NAME=dev
HEADROOM_MIB=1024
URL_BASE="${BANGER_PUBLISH_URL_BASE:-}"
OUTDIR="build/publish"
VERSION="$(date -u +%Y.%m.%d)"
BUILDER=""
BANGER="build/bin/banger"

while [[ $# -gt 0 ]]; do
	case "$1" in
	--url-base) URL_BASE="${2:?}"; shift 2 ;;
	--out) OUTDIR="${2:?}"; shift 2 ;;
	--version) VERSION="${2:?}"; shift 2 ;;
	--builder) BUILDER="${2:?}"; shift 2 ;;
	--banger) BANGER="${2:?}"; shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument $1 (see --help)" ;;
	esac
done
[[ $EUID -eq 0 ]] || die "must run as root (the image's files keep their owners)"
[[ -x "$BANGER" ]] || die "$BANGER not found: run make build first, or pass --banger"
case "$OUTDIR" in /*) ;; *) OUTDIR="$ROOT/$OUTDIR" ;; esac
mkdir -p "$OUTDIR"

if [[ -z "$BUILDER" ]]; then
	for b in podman buildah docker; do
		if command -v "$b" >/dev/null 2>&1; then BUILDER=$b; break; fi
	done
fi
[[ -n "$BUILDER" ]] || die "no image builder: install podman (apt-get install podman), buildah or docker"
command -v "$BUILDER" >/dev/null 2>&1 || die "$BUILDER is not installed"
command -v mkfs.ext4 >/dev/null 2>&1 || die "mkfs.ext4 missing (apt-get install e2fsprogs)"

SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct -- images/golden 2>/dev/null || true)}"
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-0}"
export SOURCE_DATE_EPOCH
TAG="localhost/banger-golden:$VERSION"

WORK="$(mktemp -d "$OUTDIR/work.XXXXXX")"
CTR=""
cleanup() {
	if [[ -n "$CTR" ]]; then "$BUILDER" rm -f "$CTR" >/dev/null 2>&1 || true; fi
	rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

# --- base image ---------------------------------------------------------------
has_image() {
	case "$BUILDER" in
	podman) podman image exists "$1" ;;
	buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
	docker) docker image inspect "$1" >/dev/null 2>&1 ;;
	esac
}
if [[ "${PULL_BASE:-0}" != 1 ]] && ! has_image docker.io/library/debian:bookworm && ! has_image debian:bookworm; then
	command -v mmdebstrap >/dev/null 2>&1 || die "no local debian:bookworm and no mmdebstrap to make one (apt-get install mmdebstrap, or PULL_BASE=1)"
	log "making the base image debian:bookworm with mmdebstrap (minbase)"
	mmdebstrap --quiet --variant=minbase --components=main bookworm "$WORK/base.tar"
	case "$BUILDER" in
	podman | buildah) podman import "$WORK/base.tar" docker.io/library/debian:bookworm >/dev/null ;;
	docker) docker import "$WORK/base.tar" debian:bookworm >/dev/null ;;
	esac
	rm -f "$WORK/base.tar"
fi

# --- build ----------------------------------------------------------------------
log "building $TAG from images/golden/Dockerfile with $BUILDER"
pull=(--pull=never)
[[ "${PULL_BASE:-0}" != 1 ]] || pull=()
# npm trusts what this host trusts (a TLS-intercepting proxy's CA); the
# secret is not kept in the image.
secret=()
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
[[ ! -s "$CA_BUNDLE" ]] || secret=(--secret "id=buildca,src=$CA_BUNDLE")
case "$BUILDER" in
podman) podman build --isolation=chroot "${pull[@]}" "${secret[@]}" -t "$TAG" images/golden >&2 ;;
buildah) buildah bud --isolation=chroot "${pull[@]}" "${secret[@]}" -t "$TAG" images/golden >&2 ;;
docker) DOCKER_BUILDKIT=1 docker build "${secret[@]}" -t "$TAG" images/golden >&2 ;;
esac

# --- root filesystem ---------------------------------------------------------
log "exporting the image's file system"
CTR="$("$BUILDER" create "$TAG" /sbin/init)"
ROOTDIR="$WORK/rootfs"
mkdir -p "$ROOTDIR"
"$BUILDER" export "$CTR" | tar -x --numeric-owner --xattrs --xattrs-include='*' -C "$ROOTDIR"
"$BUILDER" rm -f "$CTR" >/dev/null
CTR=""
# Files the builder keeps for itself (bind mounts during RUN) are left empty
# or missing: banger's agent writes them at boot.
rm -f "$ROOTDIR/.dockerenv" "$ROOTDIR/run/.containerenv"
for tool in tmux docker mise opencode sshd sudo; do
	chroot "$ROOTDIR" sh -c "command -v $tool" >/dev/null || die "the image has no $tool on PATH"
done
[[ -z "$(ls "$ROOTDIR"/etc/ssh/ssh_host_* 2>/dev/null)" ]] || die "the image has SSH host keys baked in"

used_mib="$(du -sx --block-size=1M "$ROOTDIR" | cut -f1)"
size_mib=$((used_mib + HEADROOM_MIB))
log "rootfs.ext4: ${used_mib} MiB content, ${size_mib} MiB image"
# Reproducible ext4: fixed timestamps, UUID and directory hash seed.
uuid="$(printf '%s' "$NAME@$VERSION" | sha256sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')"
rm -f "$OUTDIR/rootfs.ext4"
truncate -s "${size_mib}M" "$OUTDIR/rootfs.ext4"
E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" mkfs.ext4 -q -F -L banger-root -U "$uuid" \
	-E "hash_seed=$uuid,root_owner=0:0" -d "$ROOTDIR" "$OUTDIR/rootfs.ext4"
rm -rf --one-file-system "$ROOTDIR"

# --- bundle and catalog --------------------------------------------------------
BUNDLE="$NAME-$VERSION-$ARCH.tar.zst"
ENTRY="$OUTDIR/$NAME-$VERSION.entry.json"
catalog=()
if [[ -n "$URL_BASE" ]]; then
	catalog=(--url "${URL_BASE%/}/$BUNDLE" --catalog internal/imagecat/catalog.json)
fi
log "writing the bundle $OUTDIR/$BUNDLE"
# --build golden: the entry keeps its offline fallback (the local build).
"$BANGER" image bundle --kind image --name "$NAME" --version "$VERSION" --arch "$ARCH" \
	--kernel "$KERNEL" --user "$USER_NAME" --build golden --rootfs "$OUTDIR/rootfs.ext4" \
	-o "$OUTDIR/$BUNDLE" "${catalog[@]}" >"$ENTRY"
log "bundle: $(stat -c %s "$OUTDIR/$BUNDLE") bytes, sha256 $(sha256sum "$OUTDIR/$BUNDLE" | cut -d" " -f1)"
if [[ -z "$URL_BASE" ]]; then
	log "no --url-base (BANGER_PUBLISH_URL_BASE): internal/imagecat/catalog.json left as is; entry: $ENTRY"
else
	log "updated internal/imagecat/catalog.json: $NAME@$VERSION -> ${URL_BASE%/}/$BUNDLE (upload $OUTDIR/$BUNDLE there)"
fi
printf '%s\n' "$OUTDIR/$BUNDLE"
