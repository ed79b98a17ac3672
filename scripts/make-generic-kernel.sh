#!/usr/bin/env bash
# make-generic-kernel.sh - build banger's generic guest kernel from Debian's
# linux-source-6.1: everything a banger guest needs is built in (no modules),
# so it boots any image, with or without a modules tree of its own.
#
# Usage: scripts/make-generic-kernel.sh [OUTDIR]
#   OUTDIR defaults to build/kernel/generic-6.1.
#
# Outputs:
#   vmlinuz         bzImage (QEMU, Cloud Hypervisor)
#   vmlinux         uncompressed ELF kernel (Firecracker)
#   config          the kernel's .config
#   kernel-release  e.g. 6.1.158-banger
#   source-version  the linux-source-6.1 package version it was built from
#
# The configuration is `make allnoconfig` with the fragment below as its base
# (KCONFIG_ALLCONFIG): x86-64 SMP, ACPI, PCI, virtio mmio/pci/blk/net/console/
# balloon/rng, vsock, ext4, overlayfs, FUSE, what systemd needs and what
# Docker needs (namespaces, cgroups, bridge, veth, netfilter with nf_tables
# for iptables-nft), CONFIG_MODULES off: everything built in, nothing else.
# Build environment pinned for reproducible output: KBUILD_BUILD_TIMESTAMP,
# KBUILD_BUILD_USER/HOST, and the source's own version.
#
# Environment: JOBS (default: nproc), NICE (default 10). Runs as any user with
# the build tools installed (as root, missing ones are installed with apt).
set -euo pipefail

START_SECONDS=$SECONDS
log() { printf '[make-generic-kernel +%4ds] %s\n' "$((SECONDS - START_SECONDS))" "$*" >&2; }
die() { printf '[make-generic-kernel] error: %s\n' "$*" >&2; exit 1; }

cd "$(dirname "$0")/.."
OUTDIR="${1:-build/kernel/generic-6.1}"
OUTDIR="${OUTDIR%/}"
case "$OUTDIR" in /*) ;; *) OUTDIR="$PWD/$OUTDIR" ;; esac
JOBS="${JOBS:-$(nproc)}"
NICE="${NICE:-10}"
LOCALVERSION="-banger"
SRC_TAR=/usr/src/linux-source-6.1.tar.xz

# --- host tools -------------------------------------------------------------
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need gcc gcc
need make make
need bc bc
need flex flex
need bison bison
need perl perl
need xz xz-utils
[[ -e /usr/include/libelf.h ]] || missing+=(libelf-dev)
[[ -e /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
[[ -e "$SRC_TAR" ]] || missing+=(linux-source-6.1)
if [[ ${#missing[@]} -gt 0 ]]; then
	[[ $EUID -eq 0 ]] || die "missing packages: ${missing[*]} (apt-get install them, or run as root)"
	log "installing: ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
		{ apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
fi
SRC_VERSION="$(dpkg-query -W -f='${Version}' linux-source-6.1)"

# --- work area --------------------------------------------------------------
mkdir -p "$(dirname "$OUTDIR")"
exec 9>"$OUTDIR.lock"
flock -n 9 || die "another build of $OUTDIR is running"
TMP="$(mktemp -d "$OUTDIR.build.XXXXXX")"
trap 'rm -rf --one-file-system "$TMP"' EXIT
log "unpacking linux-source-6.1 $SRC_VERSION"
tar -xJf "$SRC_TAR" -C "$TMP"
KSRC="$TMP/linux-source-6.1"
[[ -d "$KSRC" ]] || die "$SRC_TAR has no linux-source-6.1/ directory"

cat >"$TMP/banger.config" <<'EOF'
# x86-64, no modules: everything below is built in.
CONFIG_64BIT=y
# CONFIG_MODULES is not set
# CONFIG_LOCALVERSION_AUTO is not set
CONFIG_SMP=y
CONFIG_NR_CPUS=64
CONFIG_HIGH_RES_TIMERS=y
CONFIG_NO_HZ_IDLE=y
CONFIG_HYPERVISOR_GUEST=y
CONFIG_PARAVIRT=y
CONFIG_KVM_GUEST=y
CONFIG_PVH=y
CONFIG_ACPI=y
CONFIG_PCI=y
CONFIG_PCI_MSI=y
CONFIG_RTC_CLASS=y
CONFIG_RTC_DRV_CMOS=y
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=y
CONFIG_DEVTMPFS=y
CONFIG_DEVTMPFS_MOUNT=y
CONFIG_TTY=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_HW_RANDOM=y
CONFIG_HW_RANDOM_VIRTIO=y
# virtio: transports, disk, network, console (virtio-serial), balloon, vsock.
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_MMIO=y
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y
CONFIG_BLK_DEV=y
CONFIG_VIRTIO_BLK=y
CONFIG_NETDEVICES=y
CONFIG_NET_CORE=y
CONFIG_VIRTIO_NET=y
CONFIG_VIRTIO_CONSOLE=y
CONFIG_VIRTIO_BALLOON=y
CONFIG_NET=y
CONFIG_INET=y
CONFIG_IPV6=y
CONFIG_UNIX=y
CONFIG_PACKET=y
CONFIG_VSOCKETS=y
CONFIG_VIRTIO_VSOCKETS=y
# Filesystems.
CONFIG_EXT4_FS=y
CONFIG_EXT4_FS_POSIX_ACL=y
CONFIG_EXT4_FS_SECURITY=y
CONFIG_OVERLAY_FS=y
CONFIG_TMPFS=y
CONFIG_TMPFS_POSIX_ACL=y
CONFIG_TMPFS_XATTR=y
CONFIG_FUSE_FS=y
CONFIG_AUTOFS_FS=y
CONFIG_PROC_FS=y
CONFIG_SYSFS=y
# systemd.
CONFIG_SYSVIPC=y
CONFIG_POSIX_MQUEUE=y
CONFIG_CGROUPS=y
CONFIG_MEMCG=y
CONFIG_BLK_CGROUP=y
CONFIG_CGROUP_SCHED=y
CONFIG_FAIR_GROUP_SCHED=y
CONFIG_CGROUP_PIDS=y
CONFIG_CGROUP_FREEZER=y
CONFIG_CGROUP_DEVICE=y
CONFIG_CGROUP_CPUACCT=y
CONFIG_CGROUP_BPF=y
CONFIG_CPUSETS=y
CONFIG_BPF_SYSCALL=y
CONFIG_FHANDLE=y
CONFIG_INOTIFY_USER=y
CONFIG_SECCOMP=y
CONFIG_SECCOMP_FILTER=y
# Docker: namespaces, bridge, veth, overlay, netfilter (iptables-nft and legacy).
CONFIG_NAMESPACES=y
CONFIG_UTS_NS=y
CONFIG_IPC_NS=y
CONFIG_USER_NS=y
CONFIG_PID_NS=y
CONFIG_NET_NS=y
CONFIG_KEYS=y
CONFIG_VETH=y
CONFIG_TUN=y
CONFIG_MACVLAN=y
CONFIG_VXLAN=y
CONFIG_BRIDGE=y
CONFIG_VLAN_8021Q=y
CONFIG_BRIDGE_VLAN_FILTERING=y
CONFIG_NETFILTER=y
CONFIG_NETFILTER_ADVANCED=y
CONFIG_BRIDGE_NETFILTER=y
CONFIG_NF_CONNTRACK=y
CONFIG_NF_NAT=y
CONFIG_NF_TABLES=y
CONFIG_NF_TABLES_INET=y
CONFIG_NF_TABLES_IPV4=y
CONFIG_NF_TABLES_IPV6=y
CONFIG_NFT_CT=y
CONFIG_NFT_NAT=y
CONFIG_NFT_MASQ=y
CONFIG_NFT_REDIR=y
CONFIG_NFT_COMPAT=y
CONFIG_NFT_LIMIT=y
CONFIG_NFT_REJECT=y
CONFIG_NETFILTER_XTABLES=y
CONFIG_NETFILTER_XT_MARK=y
CONFIG_NETFILTER_XT_TARGET_MASQUERADE=y
CONFIG_NETFILTER_XT_MATCH_ADDRTYPE=y
CONFIG_NETFILTER_XT_MATCH_CONNTRACK=y
CONFIG_NETFILTER_XT_MATCH_MULTIPORT=y
CONFIG_NETFILTER_XT_MATCH_STATE=y
CONFIG_NETFILTER_XT_MATCH_COMMENT=y
CONFIG_IP_NF_IPTABLES=y
CONFIG_IP_NF_FILTER=y
CONFIG_IP_NF_NAT=y
CONFIG_IP_NF_TARGET_MASQUERADE=y
CONFIG_IP_NF_TARGET_REJECT=y
CONFIG_IP_NF_MANGLE=y
CONFIG_IP6_NF_IPTABLES=y
CONFIG_IP6_NF_FILTER=y
CONFIG_IP6_NF_NAT=y
CONFIG_IP6_NF_TARGET_MASQUERADE=y
CONFIG_IP6_NF_MANGLE=y
CONFIG_NET_SCHED=y
CONFIG_NET_CLS_CGROUP=y
CONFIG_CGROUP_NET_PRIO=y
EOF

# A fixed build identity: the same source and script give the same kernel
# (the timestamp is the source package's, dpkg keeps its files' mtimes).
KBUILD_BUILD_TIMESTAMP="$(date -u -R -d @"$(stat -c %Y "$SRC_TAR")")"
export KBUILD_BUILD_TIMESTAMP KBUILD_BUILD_USER=banger KBUILD_BUILD_HOST=banger

kmake() { nice -n "$NICE" make -C "$KSRC" -s LOCALVERSION="$LOCALVERSION" "$@"; }
# allnoconfig with the fragment as its base (KCONFIG_ALLCONFIG): only what a
# banger guest needs is built (a defconfig kernel takes hours on two busy cores).
log "configuring (allnoconfig + banger fragment)"
kmake KCONFIG_ALLCONFIG="$TMP/banger.config" allnoconfig >&2
kmake olddefconfig >&2
# Check that the fragment stuck: a symbol Kconfig dropped (a missing
# dependency) would give a kernel that doesn't boot or can't run Docker.
bad=()
while IFS= read -r line; do
	case "$line" in
	CONFIG_*=y)
		grep -qx "$line" "$KSRC/.config" || bad+=("${line%=y}")
		;;
	esac
done <"$TMP/banger.config"
grep -q '^CONFIG_MODULES=y' "$KSRC/.config" && bad+=(CONFIG_MODULES-still-on)
[[ ${#bad[@]} -eq 0 ]] || die "configuration lacks: ${bad[*]}"

log "building bzImage and vmlinux with $JOBS jobs (nice $NICE)"
kmake -j"$JOBS" bzImage >&2
REL="$(kmake -s kernelrelease)"

OUT="$TMP/out"
mkdir -p "$OUT"
cp "$KSRC/arch/x86/boot/bzImage" "$OUT/vmlinuz"
cp "$KSRC/vmlinux" "$OUT/vmlinux"
strip --strip-debug "$OUT/vmlinux" 2>/dev/null || true
cp "$KSRC/.config" "$OUT/config"
printf '%s\n' "$REL" >"$OUT/kernel-release"
printf '%s\n' "$SRC_VERSION" >"$OUT/source-version"
if [[ -e "$OUTDIR" || -L "$OUTDIR" ]]; then
	mv -T "$OUTDIR" "$TMP/old"
fi
mv -T "$OUT" "$OUTDIR"
log "done: $REL in $OUTDIR ($(du -h "$OUTDIR/vmlinuz" | cut -f1) bzImage, $(du -h "$OUTDIR/vmlinux" | cut -f1) vmlinux)"
printf '%s\n' "$OUTDIR"
