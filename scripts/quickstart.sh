#!/usr/bin/env bash
# banger's main job on a fresh Debian 12 machine, as root: install what banger
# needs, build it, start bangerd, run a command in a VM of the default image
# (debian-bookworm, the golden development image) and, on a terminal, end in
# a shell of a new VM of that image. Nothing is prepared by hand: `vm run`
# pulls the image and its kernel from banger's catalogs, and where their
# bundles can't be downloaded (machines that reach only Debian's archive and
# npm) bangerd builds both from Debian's archive (docs/golden-image.md; the
# first run takes several minutes, with progress). Re-running it reuses what
# the first run made.
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
"$banger" doctor || true
# The default image is pulled (or built) on first use.
# shellcheck disable=SC2016 # expanded in the guest
"$banger" vm run --rm -- sh -c '
  echo "hello from $(hostname): $(uname -sr), $(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "tmux:     $(tmux -V)"
  echo "docker:   $(docker --version)"
  echo "mise:     $(mise --version)"
  echo "opencode: $(opencode --version)"
  echo "sshd:     $(systemctl is-active ssh)"
  echo "user:     $(id dev)"'
# On a terminal, end where a user starts: a shell in a new VM of the golden
# image (removed when the shell exits).
if [ -t 0 ] && [ -t 1 ]; then
  exec "$banger" vm run --rm
fi
