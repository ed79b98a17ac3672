#!/bin/bash
# provision.sh - the golden image's one package list and set-up.
#
# Runs as root inside a Debian bookworm root filesystem that has apt and
# network access: the Dockerfile next to it RUNs it (FROM debian:bookworm), and
# banger's local build (internal/localbuild) runs it in an mmdebstrap chroot.
# Whatever the golden image holds is decided here and nowhere else.
#
# Environment (all optional):
#   GOLDEN_USER            the default user (default: dev, uid 1000)
#   NPM_CONFIG_REGISTRY    npm registry to install mise and opencode from
#   BUILD_CA_BUNDLE        a PEM bundle npm trusts during the build, for hosts
#                          behind a TLS-intercepting proxy (the build passes
#                          the host's); it is not kept in the image
set -euo pipefail

# Debian packages (bookworm). systemd-sysv: the init; udev and kmod: devices
# and modules (docker loads overlay, br_netfilter, nf_*); iptables: docker's
# firewall (iptables-nft); the rest is the development set.
PACKAGES=(
	systemd-sysv udev kmod dbus
	openssh-server sudo ca-certificates
	curl git tmux iproute2 iputils-ping procps less nano vim-tiny
	xz-utils zstd unzip
	docker.io iptables
	nodejs npm
)
# npm packages, pinned: the same script gives the same tools.
NPM_PACKAGES=(
	@jdxcode/mise@2026.9.15
	opencode-ai@1.18.33
)
USER_NAME="${GOLDEN_USER:-dev}"
USER_UID=1000

log() { printf '[provision] %s\n' "$*" >&2; }

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C.UTF-8
export HOME=/root
if [[ -n "${BUILD_CA_BUNDLE:-}" && -s "$BUILD_CA_BUNDLE" ]]; then
	export NODE_EXTRA_CA_CERTS="$BUILD_CA_BUNDLE"
fi

# No daemon starts while packages install (a chroot or a container build has
# no init to talk to). Only ours is removed at the end.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
	printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod 755 /usr/sbin/policy-rc.d
	trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi

# No manuals, translations or docs (copyright files stay); the excludes stay in
# the image for what users install later.
cat >/etc/dpkg/dpkg.cfg.d/90-banger-golden-excludes <<'EOF'
path-exclude=/usr/share/man/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
EOF

log "apt: ${PACKAGES[*]}"
apt-get update -q
apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"

log "npm: ${NPM_PACKAGES[*]}"
# --omit=optional: opencode-ai lists a binary package per platform (four match
# linux-x64, ~100 MB each); its postinstall fetches the one this CPU runs.
npm install --global --no-audit --no-fund --no-update-notifier --omit=optional "${NPM_PACKAGES[@]}"
for tool in mise opencode; do
	command -v "$tool" >/dev/null || { log "error: $tool is not on PATH after npm install"; exit 1; }
	log "$tool $("$tool" --version 2>&1 | head -n 1)"
done

log "user $USER_NAME (uid $USER_UID, passwordless sudo, group docker)"
if ! id "$USER_NAME" >/dev/null 2>&1; then
	useradd --create-home --uid "$USER_UID" --shell /bin/bash --groups sudo,docker "$USER_NAME"
fi
printf '%s ALL=(ALL) NOPASSWD:ALL\n' "$USER_NAME" >"/etc/sudoers.d/90-$USER_NAME"
chmod 0440 "/etc/sudoers.d/90-$USER_NAME"
visudo -cf "/etc/sudoers.d/90-$USER_NAME" >/dev/null
# mise's shims on the user's PATH in login and interactive shells.
cat >/etc/profile.d/mise.sh <<'EOF'
# mise (installed from npm by the golden image's provision.sh)
if [ -n "${BASH_VERSION:-}" ] && command -v mise >/dev/null 2>&1; then
	eval "$(mise activate bash)"
fi
EOF

log "services: ssh, docker enabled"
systemctl enable ssh.service docker.service
# No SSH host keys in the image: every VM gets its own, made by banger's agent
# at boot (as cloud-init does on cloud images).
rm -f /etc/ssh/ssh_host_*
# A machine-id is made at first boot.
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id

log "cleaning caches"
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
	/root/.npm /root/.cache /tmp/* /var/tmp/* \
	/var/log/apt/* /var/log/dpkg.log /var/log/alternatives.log
log "done"
