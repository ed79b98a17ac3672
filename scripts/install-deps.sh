#!/usr/bin/env bash
# Installs the Debian packages banger needs on this host, skipping what is
# already there (so it is cheap to run every time). With --test it also
# installs what the test suite needs (make check). Runs apt-get, so it must
# run as root when anything is missing.
#
#   scripts/install-deps.sh          # to run banger (quickstart.sh)
#   scripts/install-deps.sh --test   # to run the tests too (make check, .ci/run)
set -euo pipefail

# command:package pairs; a command found on PATH means its package is there.
run_deps=(
  qemu-system-x86_64:qemu-system-x86
  qemu-img:qemu-utils
  mmdebstrap:mmdebstrap
  mkfs.ext4:e2fsprogs
  depmod:kmod
  setpriv:util-linux
  gpgv:gpgv
)
test_deps=(
  shellcheck:shellcheck
  cpio:cpio
  mkfs.xfs:xfsprogs
  git:git
  make:make
  gcc:gcc
  dbus-daemon:dbus-daemon
  ip:iproute2
  nsenter:util-linux
  nft:nftables
  iptables:iptables
  ssh:openssh-client
  zstd:zstd
  curl:curl
)

deps=("${run_deps[@]}")
case "${1:-}" in
  --test) deps+=("${test_deps[@]}") ;;
  "") ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

need=()
for d in "${deps[@]}"; do
  command -v "${d%%:*}" >/dev/null 2>&1 || need+=("${d##*:}")
done
# The test image's init-less rootfs needs the static busybox, not just any busybox.
if [ "$(dpkg-query -W -f='${db:Status-Status}' busybox-static 2>/dev/null || true)" != installed ]; then
  need+=(busybox-static)
fi
# Local builds of the default image and kernel verify Debian's archive with its keyring.
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
# TLS roots for the Debian mirror mmdebstrap uses.
[ -e /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)

if [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "missing packages: ${need[*]}: run as root (sudo $0 $*) or apt-get install them" >&2
  exit 1
fi
echo "installing: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
