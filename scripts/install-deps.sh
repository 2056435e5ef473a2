#!/usr/bin/env bash
# Installs what vimgfs needs to build, test and run on Debian 12 (as root, or with sudo).
set -euo pipefail
pkgs=(build-essential cmake ninja-build pkg-config
      libfuse3-dev fuse3 zlib1g-dev libzstd-dev libdeflate-dev libbz2-dev libgcrypt20-dev libfmt-dev
      libgtest-dev libgmock-dev libcli11-dev nlohmann-json3-dev
      qemu-utils e2fsprogs fuse2fs fdisk gdisk util-linux kmod bzip2 strace
      nbdkit nbdkit-plugin-dev libnbd-bin libnbd-dev
      clang libclang-rt-14-dev clang-format)  # fuzz.sh (clang, runtimes); check-format.sh
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# FUSE needs its device node; loop devices need the loop module (both present on most hosts).
[ -e /dev/fuse ] || { [ "$(id -u)" -eq 0 ] && modprobe fuse 2>/dev/null || true; }
[ -e /dev/loop-control ] || { [ "$(id -u)" -eq 0 ] && modprobe loop 2>/dev/null || true; }
