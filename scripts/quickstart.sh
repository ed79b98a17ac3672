#!/usr/bin/env bash
# banger's main job on a fresh Debian 12 machine, as root: install what banger
# needs, build it, make a Debian test image, start bangerd, and boot a VM that
# runs a command. Re-running it reuses what the first run made.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "run as root (sudo $0)" >&2
  exit 1
fi

scripts/install-deps.sh
export PATH="/usr/local/go/bin:$PATH"
if ! command -v go >/dev/null; then
  echo "Go is needed to build banger: install Go $(sed -n 's/^go //p' go.mod) or newer into /usr/local/go" >&2
  exit 1
fi

make build
img=$(scripts/make-test-image.sh | tail -n 1)

socket=${BANGER_SOCKET:-/run/banger/bangerd.sock}
export BANGER_SOCKET=$socket
banger=build/bin/banger
if ! "$banger" vm ls >/dev/null 2>&1; then
  mkdir -p /var/log/banger
  nohup build/bin/bangerd --socket "$socket" >>/var/log/banger/bangerd.log 2>&1 &
  for _ in $(seq 100); do
    "$banger" vm ls >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "bangerd started (log: /var/log/banger/bangerd.log)" >&2
fi
if ! "$banger" image inspect default >/dev/null 2>&1; then
  "$banger" image register default --rootfs "$img/rootfs.ext4" --kernel "$img/vmlinuz" --initrd "$img/initrd.img" --user dev
fi
"$banger" doctor || true
# shellcheck disable=SC2016 # expanded in the guest
"$banger" vm run --rm -- sh -c 'echo "hello from $(hostname): $(uname -sr)"'
