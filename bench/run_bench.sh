#!/bin/bash
# `vimgfs run` benchmark: the wall time of reading one guest file in one step, on a 4 GiB
# qcow2 guest (GPT: a small boot partition and an ext4 root with /etc/os-release and a few
# thousand files), beside libguestfs's tools doing the same when they are installed:
#   vimgfs run IMAGE -- cat etc/hostname            (root: loop device + kernel ext4)
#   vimgfs run --fuse2fs IMAGE -- cat etc/hostname  (root, fuse2fs)
#   vimgfs run ... as nobody                        (fuse2fs, no privileges)
#   virt-cat -a IMAGE /etc/hostname                 (libguestfs appliance VM)
#   virt-customize -a IMAGE --run-command 'cat /etc/hostname'   (appliance VM, writes)
# Prints the median of REPEAT runs per row and each row's time over virt-cat's (< 1: faster).
# Needs root (the loop device rows and switching to nobody).
#
# Usage: bench/run_bench.sh [VIMGFS_BINARY]
# Env: BENCH_DIR (work folder, default a temp dir under /var/tmp), REPEAT (default 5),
#      GUESTFS_REPEAT (runs of the libguestfs rows, default 1: without KVM each boots an
#      appliance VM under TCG), GUESTFS_TIMEOUT (seconds per libguestfs run, default 900).
set -euo pipefail

VIMGFS=${1:-${VIMGFS:-$(dirname "$0")/../build/vimgfs}}
REPEAT=${REPEAT:-5}
die() { echo "run_bench: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root"
for p in sfdisk mkfs.ext4 fuse2fs setpriv python3; do command -v "$p" >/dev/null || die "$p not found"; done
[ -x "$VIMGFS" ] || die "vimgfs binary not found at $VIMGFS (pass it as the first argument)"
VIMGFS=$(readlink -f "$VIMGFS")

WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/vimgfs-run-bench.XXXXXX)}
mkdir -p "$WORK"
chmod 0777 "$WORK"
fuse_mode=$(stat -c %a /dev/fuse)
cleanup() {
  chmod "$fuse_mode" /dev/fuse
  mountpoint -q "$WORK/mnt" && fusermount3 -u "$WORK/mnt"
  rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"

echo "building the 4 GiB guest in $WORK ..." >&2
img=$WORK/guest.qcow2
"$VIMGFS" create -q -f qcow2 "$img" 4G
mkdir mnt guest
"$VIMGFS" "$img" mnt
printf 'label: gpt\nsize=256M, type=L, name=boot\ntype=L, name=root\n' | sfdisk -q mnt/disk.raw
mkfs.ext4 -q -F -L boot mnt/p1
mkfs.ext4 -q -F -L root mnt/p2
mount -o loop mnt/p2 guest
mkdir -p guest/etc
echo bench-guest > guest/etc/hostname
printf 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n' > guest/etc/os-release
cp -r /usr/share/doc guest/usr-share-doc 2>/dev/null || true  # a few thousand files
umount guest
for _ in $(seq 50); do fusermount3 -u mnt 2>/dev/null && break; sleep 0.1; done
chown 65534:65534 "$img"
chmod 0666 /dev/fuse  # as Debian's udev rule sets it, for the unprivileged row

# median wall seconds of N runs of "$@", each cut off after LIMIT seconds
median() {
  local n=$1 limit=$2
  shift 2
  python3 - "$n" "$limit" "$@" <<'EOF'
import os, signal, statistics, subprocess, sys, time
repeat, limit, cmd = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
times = []
for _ in range(repeat):
    t = time.monotonic()
    # A session of its own: on a timeout the whole tree goes (libguestfs's appliance VM
    # would otherwise keep the image locked).
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        sys.exit(f"no answer within {limit:.0f} s: {' '.join(cmd)}")
    r = subprocess.CompletedProcess(cmd, p.returncode, out)
    times.append(time.monotonic() - t)
    if r.returncode != 0 or r.stdout.strip() != b"bench-guest":
        sys.exit(f"failed: {' '.join(cmd)} -> {r.returncode} {r.stdout[:80]!r}")
print(f"{statistics.median(times):.3f}")
EOF
}

declare -A secs
rows=()
n=$REPEAT
limit=120
row() { local name=$1; shift; rows+=("$name"); secs[$name]=$(median "$n" "$limit" "$@") || secs[$name]=failed; }

row "vimgfs run (root, kernel)" "$VIMGFS" run "$img" -- cat etc/hostname
row "vimgfs run --fuse2fs (root)" "$VIMGFS" run --fuse2fs "$img" -- cat etc/hostname
row "vimgfs run (nobody, fuse2fs)" setpriv --reuid=65534 --regid=65534 --clear-groups env TMPDIR="$WORK" \
  "$VIMGFS" run "$img" -- cat etc/hostname
row "vimgfs run -r (root, kernel)" "$VIMGFS" run -r "$img" -- cat etc/hostname
if command -v virt-cat >/dev/null; then
  export LIBGUESTFS_BACKEND=direct
  n=${GUESTFS_REPEAT:-1}
  limit=${GUESTFS_TIMEOUT:-900}
  row "virt-cat" virt-cat -a "$img" /etc/hostname
  # virt-customize prints its progress on stdout: keep only the command's output line.
  row "virt-customize --run-command" sh -c "virt-customize -q -a '$img' --run-command 'cat /etc/hostname' | grep -x bench-guest"
else
  echo "libguestfs (virt-cat, virt-customize) not installed: no comparison rows" >&2
fi

base=${secs[virt-cat]:-}
printf '%-34s %10s %12s\n' "row (median of $REPEAT)" seconds "/ virt-cat"
for r in "${rows[@]}"; do
  ratio=-
  if [ -n "$base" ] && [ "$base" != failed ] && [ "${secs[$r]}" != failed ]; then
    ratio=$(python3 -c "print(f'{${secs[$r]}/$base:.3f}')")
  fi
  printf '%-34s %10s %12s\n' "$r" "${secs[$r]}" "$ratio"
done
"$VIMGFS" check "$img" >/dev/null && echo "image checks clean afterwards" >&2
