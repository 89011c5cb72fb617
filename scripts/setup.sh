#!/usr/bin/env bash
# Install everything kpipe, its tests and its lab need on a fresh Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
  openssh-server openssh-client openssh-sftp-server \
  linux-headers-amd64 build-essential bc libelf-dev \
  qemu-system-x86 qemu-system-arm busybox-static dropbear-bin cpio kmod \
  xz-utils zstd gzip openssl util-linux iproute2 procps ca-certificates
# The kernel forge (kpipe lab forge) and its kpatch-build build host: mmdebstrap makes a chroot of the
# source's suite (with its own apt sources; the host's are never changed), unshare gives it private mounts.
$SUDO apt-get install -y -q --no-install-recommends mmdebstrap debian-archive-keyring util-linux
# `kpipe lab up --rootfs debian`: the image (mkfs.ext4 -d) and each VM's copy-on-write overlay (qemu-img).
$SUDO apt-get install -y -q --no-install-recommends e2fsprogs qemu-utils
# The rollout gate's Prometheus check is tested against a real server (tests/test_gates_prometheus.py; the test
# starts its own on a free loopback port; the package's service is not needed).
$SUDO apt-get install -y -q --no-install-recommends prometheus
# The kernel's own sign-file comes with linux-kbuild-<version>, a dependency of the headers.
ls /usr/lib/linux-kbuild-*/scripts/sign-file >/dev/null

python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python3 -m pip install -q -e '.[test]'
