#!/usr/bin/env bash
# make-test-image.sh - build (or reuse) the guest image used by banger's
# end-to-end tests and benchmarks, entirely from Debian's archive.
#
# Usage: scripts/make-test-image.sh [OUTDIR]
#   OUTDIR defaults to ${BANGER_TESTIMAGE_DIR:-/var/cache/banger/testimage}.
#
# Outputs (see docs/test-image.md):
#   vmlinuz              bzImage of Debian's linux-image-<abi>-cloud-amd64
#   kernel-release       e.g. 6.1.0-56-cloud-amd64
#   modules/             modules/lib/modules/<release>/... (plain .ko, depmod'ed)
#   initrd.img           gzip'ed newc cpio: lib/modules/<release>/ with the boot
#                        modules only (virtio mmio/pci/blk/console/net, vsock,
#                        ext4 if modular) and their dependencies; NO /init
#   rootfs.ext4          Debian bookworm minbase + systemd, kernel modules
#   busybox-rootfs.ext4  busybox-static only, no init system
#   stamp                sha256 of this script + kernel package; written last
#
# A complete, up-to-date OUTDIR is reused (the script prints OUTDIR and exits).
# Otherwise the image is built in a temporary directory next to OUTDIR and
# renamed into place, so OUTDIR is never half-written. Concurrent runs are
# serialised with flock on OUTDIR.lock.
#
# Progress goes to stderr; the last line on stdout is OUTDIR.
# Must run as root (mmdebstrap, file ownership in the ext4 images).
set -euo pipefail

MIRROR="http://deb.debian.org/debian"
SUITE="bookworm"
KERNEL_META="linux-image-cloud-amd64"
# kmod: minbase+udev has libkmod but no modprobe/kmod binary, without which
# systemd's kmod-static-nodes.service fails on every boot.
# openssh-server and curl: the networking and SSH tests (sshd, a fetch through
# NAT); a default user "dev" (uid 1000) is what `banger vm ssh` logs in as.
ROOTFS_INCLUDE="systemd-sysv,udev,kmod,e2fsprogs,iproute2,procps,ca-certificates,openssh-server,curl"
GUEST_USER="dev"
ROOTFS_HEADROOM_MIB=300
BUSYBOX_ROOTFS_MIB=16
GUEST_HOSTNAME="banger-test"
# Modules the initrd must carry (when modular), plus their dependencies.
INITRD_MODULES=(virtio_mmio virtio_pci virtio_blk virtio_console virtio_net ext4 vmw_vsock_virtio_transport button evdev)
# Files that must exist for OUTDIR to count as complete.
OUTPUTS=(vmlinuz kernel-release modules initrd.img rootfs.ext4 busybox-rootfs.ext4 stamp)

START_SECONDS=$SECONDS
log() { printf '[make-test-image +%3ds] %s\n' "$((SECONDS - START_SECONDS))" "$*" >&2; }
die() { printf '[make-test-image] error: %s\n' "$*" >&2; exit 1; }

OUTDIR="${1:-${BANGER_TESTIMAGE_DIR:-/var/cache/banger/testimage}}"
[[ -n "$OUTDIR" ]] || die "empty OUTDIR"
OUTDIR="${OUTDIR%/}"
case "$OUTDIR" in /*) ;; *) OUTDIR="$PWD/$OUTDIR" ;; esac

SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}")"
SCRIPT_HASH="$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)"

# kernel_package prints "<versioned package> <version>" of the kernel the
# metapackage currently points at, or nothing if apt doesn't know it.
kernel_package() {
	local pkg ver
	pkg="$(apt-cache depends "$KERNEL_META" 2>/dev/null |
		sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1)" || true
	[[ -n "$pkg" ]] || return 0
	ver="$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)" || true
	[[ -n "$ver" ]] || return 0
	printf '%s %s\n' "$pkg" "$ver"
}

stamp_text() { # $1 = "<pkg> <version>"
	printf 'script-sha256 %s\nkernel-package %s\n' "$SCRIPT_HASH" "$1"
}

APT_LISTS=/var/lib/apt/lists

# cache_ok succeeds if OUTDIR holds a complete image made by this version of
# the script from the kernel package apt would pick today.
#
# Asking apt costs about a second here (Docker-style apt configs disable
# pkgcache.bin), so apt is only asked when one of its package lists was
# replaced after the stamp was written (list ctime vs stamp mtime; apt sets
# list mtimes to the server's Last-Modified, so mtime can't be used). When the
# kernel package is unchanged the stamp is touched to re-arm the fast path.
# Without any apt lists the script hash alone decides.
# Sets KPKG when it had to ask apt.
KPKG=""
cache_ok() {
	local f
	for f in "${OUTPUTS[@]}"; do
		[[ -e "$OUTDIR/$f" ]] || return 1
	done
	grep -qx "script-sha256 $SCRIPT_HASH" "$OUTDIR/stamp" || return 1
	if [[ -z "$(find "$APT_LISTS" -maxdepth 1 -type f -name '*_Packages*' \
		-cnewer "$OUTDIR/stamp" -print -quit 2>/dev/null)" ]]; then
		return 0
	fi
	[[ -n "$KPKG" ]] || KPKG="$(kernel_package)"
	[[ -n "$KPKG" ]] || return 0
	[[ "$(cat "$OUTDIR/stamp")" == "$(stamp_text "$KPKG")" ]] || return 1
	touch "$OUTDIR/stamp" 2>/dev/null || true
}

if cache_ok; then
	printf '%s\n' "$OUTDIR"
	exit 0
fi

[[ $EUID -eq 0 ]] || die "must run as root (needs mmdebstrap and root-owned files)"

mkdir -p "$(dirname "$OUTDIR")"
exec 9>"$OUTDIR.lock"
if ! flock -n 9; then
	log "another build of $OUTDIR is running; waiting for it"
	flock 9
fi
# Someone else may have finished the image while we waited.
if cache_ok; then
	printf '%s\n' "$OUTDIR"
	exit 0
fi

# --- host tools -------------------------------------------------------------
apt_updated=0
apt_update_once() {
	if [[ $apt_updated -eq 0 ]]; then
		log "apt-get update"
		apt-get update -qq >&2
		apt_updated=1
	fi
}
missing=()
need() { # command package
	command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}
need mmdebstrap mmdebstrap
need depmod kmod
need modprobe kmod
need cpio cpio
need mkfs.ext4 e2fsprogs
need dpkg-deb dpkg
need gzip gzip
need flock util-linux
if [[ "$(dpkg-query -W -f='${db:Status-Status}' busybox-static 2>/dev/null || true)" != installed ]]; then
	missing+=(busybox-static)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
	apt_update_once
	log "installing: ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
BUSYBOX=/bin/busybox
[[ -x "$BUSYBOX" ]] || die "$BUSYBOX missing after installing busybox-static"

[[ -n "$KPKG" ]] || KPKG="$(kernel_package)"
if [[ -z "$KPKG" ]]; then
	apt_update_once
	KPKG="$(kernel_package)"
	[[ -n "$KPKG" ]] || die "apt knows no $KERNEL_META (is deb.debian.org in sources.list?)"
fi
KPKG_NAME="${KPKG%% *}"
log "building $OUTDIR with kernel package $KPKG"

# --- work area next to OUTDIR (same filesystem: final rename is atomic) -----
TMP="$(mktemp -d "$OUTDIR.build.XXXXXX")"
cleanup() {
	# --one-file-system: never descend into anything left mounted in a chroot.
	rm -rf --one-file-system "$TMP"
}
trap cleanup EXIT
chmod 755 "$TMP"
WORK="$TMP/work"
OUT="$TMP/out"
mkdir -p "$WORK/deb" "$OUT"

# --- kernel -----------------------------------------------------------------
log "downloading $KPKG_NAME"
(cd "$WORK/deb" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG_NAME" >&2)
debs=("$WORK"/deb/*.deb)
[[ -f "${debs[0]}" ]] || die "apt-get download produced no .deb"
dpkg-deb -x "${debs[0]}" "$WORK/kpkg"

releases=()
for d in "$WORK"/kpkg/lib/modules/*/; do
	[[ -d "$d" ]] && releases+=("$(basename "$d")")
done
[[ ${#releases[@]} -eq 1 ]] || die "expected one lib/modules/<release> in $KPKG_NAME, found ${#releases[@]}"
REL="${releases[0]}"
[[ -f "$WORK/kpkg/boot/vmlinuz-$REL" ]] || die "no boot/vmlinuz-$REL in $KPKG_NAME"
cp "$WORK/kpkg/boot/vmlinuz-$REL" "$OUT/vmlinuz"
printf '%s\n' "$REL" >"$OUT/kernel-release"
log "kernel release $REL"

# --- modules/ ---------------------------------------------------------------
MODROOT="$OUT/modules"
MODDIR="$MODROOT/lib/modules/$REL"
mkdir -p "$MODROOT/lib/modules"
cp -a "$WORK/kpkg/lib/modules/$REL" "$MODROOT/lib/modules/"
# banger's agent loads modules with finit_module and no decompression flags,
# so ship plain .ko files.
n_xz="$(find "$MODDIR" -name '*.ko.xz' | wc -l)"
n_zst="$(find "$MODDIR" -name '*.ko.zst' | wc -l)"
n_gz="$(find "$MODDIR" -name '*.ko.gz' | wc -l)"
n_ko="$(find "$MODDIR" -name '*.ko' | wc -l)"
if [[ $((n_xz + n_zst + n_gz)) -gt 0 ]]; then
	log "modules are compressed (xz: $n_xz, zst: $n_zst, gz: $n_gz); decompressing"
	[[ $n_xz -eq 0 ]] || find "$MODDIR" -name '*.ko.xz' -exec xz -d {} +
	[[ $n_zst -eq 0 ]] || find "$MODDIR" -name '*.ko.zst' -exec zstd -q -d --rm {} +
	[[ $n_gz -eq 0 ]] || find "$MODDIR" -name '*.ko.gz' -exec gzip -d {} +
else
	log "modules are not compressed ($n_ko plain .ko files)"
fi
depmod -b "$MODROOT" "$REL"
[[ -s "$MODDIR/modules.dep" ]] || die "depmod wrote no modules.dep"

# --- initrd.img -------------------------------------------------------------
# modprobe --show-depends prints the load order ("insmod <path>", dependencies
# and soft dependencies first) or "builtin <name>".
load_order=()
builtin_mods=()
declare -A seen=()
for m in "${INITRD_MODULES[@]}"; do
	deps="$(modprobe -d "$MODROOT" -S "$REL" --show-depends "$m" 2>/dev/null)" ||
		die "module $m is neither built in nor in modules.dep"
	while read -r kind path _; do
		case "$kind" in
		insmod)
			rel="${path#"$MODDIR/"}"
			if [[ -z "${seen[$rel]:-}" ]]; then
				seen[$rel]=1
				load_order+=("$rel")
			fi
			;;
		builtin) builtin_mods+=("$path") ;;
		esac
	done <<<"$deps"
done
log "initrd: built in: ${builtin_mods[*]:-none}"
log "initrd: load order: ${load_order[*]}"

IRD="$WORK/initrd"
IMODDIR="$IRD/lib/modules/$REL"
mkdir -p "$IMODDIR"
for rel in "${load_order[@]}"; do
	mkdir -p "$IMODDIR/$(dirname "$rel")"
	cp -a "$MODDIR/$rel" "$IMODDIR/$rel"
done
cp -a "$MODDIR/modules.builtin" "$IMODDIR/"
[[ ! -f "$MODDIR/modules.builtin.modinfo" ]] || cp -a "$MODDIR/modules.builtin.modinfo" "$IMODDIR/"
# modules.order of the subset, in a valid load order (dependencies first).
printf '%s\n' "${load_order[@]}" >"$IMODDIR/modules.order"
depmod -b "$IRD" "$REL"
(cd "$IRD" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
	gzip -9 -n >"$OUT/initrd.img"

# --- rootfs.ext4 ------------------------------------------------------------
# mkfs_from_dir DIR IMAGE SIZE_MIB LABEL
mkfs_from_dir() {
	rm -f "$2"
	truncate -s "${3}M" "$2"
	mkfs.ext4 -q -F -L "$4" -d "$1" "$2" >&2
}

# Without man pages, translations and docs (copyright files stay); the dpkg
# excludes persist in the image's /etc/dpkg/dpkg.cfg.d.
log "mmdebstrap $SUITE (minbase + $ROOTFS_INCLUDE)"
ROOTDIR="$WORK/rootfs"
mmdebstrap --quiet --variant=minbase --components=main \
	--include="$ROOTFS_INCLUDE" \
	--aptopt='Acquire::Retries "3"' \
	--dpkgopt='path-exclude=/usr/share/man/*' \
	--dpkgopt='path-exclude=/usr/share/locale/*' \
	--dpkgopt='path-include=/usr/share/locale/locale.alias' \
	--dpkgopt='path-exclude=/usr/share/doc/*' \
	--dpkgopt='path-include=/usr/share/doc/*/copyright' \
	"$SUITE" "$ROOTDIR" "$MIRROR" >&2
mkdir -p "$ROOTDIR/lib/modules"
cp -a "$MODDIR" "$ROOTDIR/lib/modules/"
printf '%s\n' "$GUEST_HOSTNAME" >"$ROOTDIR/etc/hostname"
cat >"$ROOTDIR/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$GUEST_HOSTNAME
::1	localhost ip6-localhost ip6-loopback
EOF
cat >"$ROOTDIR/etc/fstab" <<'EOF'
# banger test image: the root filesystem is mounted by banger (kernel/agent).
EOF
# The root account stays locked (no password is set). The default user has no
# password either: banger authorises the user's SSH key at boot.
chroot "$ROOTDIR" useradd --create-home --uid 1000 --shell /bin/bash "$GUEST_USER"
# No SSH host keys in the image: every VM gets its own, made by banger's agent
# before sshd starts (as cloud-init does on cloud images).
rm -f "$ROOTDIR"/etc/ssh/ssh_host_*
rm -f "$ROOTDIR/etc/resolv.conf"
rm -rf "$ROOTDIR/var/lib/apt/lists/"* "$ROOTDIR/var/cache/apt/"*.bin "$ROOTDIR/var/cache/apt/archives/"*.deb
used_mib="$(du -sx --block-size=1M "$ROOTDIR" | cut -f1)"
rootfs_mib=$((used_mib + ROOTFS_HEADROOM_MIB))
log "rootfs.ext4: ${used_mib} MiB content, ${rootfs_mib} MiB image"
mkfs_from_dir "$ROOTDIR" "$OUT/rootfs.ext4" "$rootfs_mib" banger-root

# --- busybox-rootfs.ext4 (no init system) -----------------------------------
BBDIR="$WORK/busybox-rootfs"
mkdir -p "$BBDIR"/{bin,proc,sys,dev,tmp,run,etc}
chmod 1777 "$BBDIR/tmp"
cp "$BUSYBOX" "$BBDIR/bin/busybox"
chmod 755 "$BBDIR/bin/busybox"
while read -r applet; do
	case "$applet" in
	busybox | init | linuxrc | "") ;; # no init of any kind in this image
	*) ln -s busybox "$BBDIR/bin/$applet" ;;
	esac
done < <("$BUSYBOX" --list)
mkfs_from_dir "$BBDIR" "$OUT/busybox-rootfs.ext4" "$BUSYBOX_ROOTFS_MIB" banger-busybox

# --- stamp (last), then atomic rename into place -----------------------------
stamp_text "$KPKG" >"$OUT/stamp.tmp"
mv "$OUT/stamp.tmp" "$OUT/stamp"
if [[ -e "$OUTDIR" || -L "$OUTDIR" ]]; then
	mv -T "$OUTDIR" "$TMP/old"
fi
mv -T "$OUT" "$OUTDIR"
log "done: $(du -sh "$OUTDIR" | cut -f1) in $OUTDIR"
printf '%s\n' "$OUTDIR"
