#!/usr/bin/env bash
# The seed workflow on a demo image: create a qcow2, mount it, put a file system and a
# guest file in it, unmount, check the image, mount it read-only and show the file.
# Needs root (loop mounts) and /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh build >/dev/null
v=$PWD/build/vimgfs

work=$(mktemp -d /tmp/vimgfs-demo.XXXXXX)
cleanup() {
  mountpoint -q "$work/guest" && umount "$work/guest"
  mountpoint -q "$work/mnt" && fusermount3 -u "$work/mnt"
  rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/mnt" "$work/guest"
img=$work/demo.qcow2

set -x
"$v" create -f qcow2 "$img" 256M
"$v" "$img" "$work/mnt"                      # raw view at $work/mnt/disk.raw
mkfs.ext4 -q -F "$work/mnt/disk.raw"
mount -o loop "$work/mnt/disk.raw" "$work/guest"
mkdir -p "$work/guest/etc/security"
echo "*  soft  nofile  65536   # written by the vimgfs demo" > "$work/guest/etc/security/limits.conf"
umount "$work/guest"
fusermount3 -u "$work/mnt"
"$v" check "$img"
"$v" info "$img"
"$v" -r "$img" "$work/mnt"
mount -o loop,ro "$work/mnt/disk.raw" "$work/guest"
cat "$work/guest/etc/security/limits.conf"
umount "$work/guest"
fusermount3 -u "$work/mnt"
