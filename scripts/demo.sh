#!/usr/bin/env bash
# The seed workflow on a demo image: create a qcow2, mount it, partition it, put a file
# system and a guest file in its first partition, unmount, check the image, and show the
# file with `vimgfs run`.
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
echo 'type=L' | sfdisk -q "$work/mnt/disk.raw"   # one partition: the file $work/mnt/p1
mkfs.ext4 -q -F "$work/mnt/p1"
mount -o loop "$work/mnt/p1" "$work/guest"
mkdir -p "$work/guest/etc/security"
echo "*  soft  nofile  65536   # written by the vimgfs demo" > "$work/guest/etc/security/limits.conf"
umount "$work/guest"
# The loop device lets go of p1 a moment after umount: retry while the mount is busy.
for _ in $(seq 50); do fusermount3 -u "$work/mnt" 2>/dev/null && break; sleep 0.1; done
"$v" check "$img"
"$v" info "$img"
# The same file in one step: mount, guest mount, command, teardown.
"$v" run -r "$img" -- cat etc/security/limits.conf
