#!/bin/bash
# Mount benchmark: the same fio jobs on
#   vimgfs   - a 2 GiB qcow2 mounted with vimgfs (raw view on a regular-file mount point)
#   qemu     - the same kind of qcow2 exported by qemu-storage-daemon (--export type=fuse)
#   host     - a plain 2 GiB file on the host file system (the ceiling)
# Each target gets a fresh image, so each sees the same allocation history: a 1 MiB
# sequential write over the whole disk first (allocating), then reads of that data, then
# 4 KiB random writes in place.
#
# Usage: bench/mount_bench.sh [VIMGFS_BINARY]   (root; needs fio, qemu-img,
#        qemu-storage-daemon from qemu-system-common). Env: BENCH_DIR (work folder, default
#        a temp dir under /var/tmp), RUNTIME (seconds per timed job, default 8).
set -euo pipefail

VIMGFS=${1:-${VIMGFS:-$(dirname "$0")/../build/vimgfs}}
RUNTIME=${RUNTIME:-8}
SIZE=2G

die() { echo "mount_bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (FUSE mounts)"
for p in fio qemu-img qemu-storage-daemon fusermount3 python3; do
  command -v "$p" >/dev/null || die "$p not found${p/qemu-storage-daemon/ (apt-get install qemu-system-common)}"
done
[ -x "$VIMGFS" ] || die "vimgfs binary not found at $VIMGFS (pass it as the first argument)"
VIMGFS=$(readlink -f "$VIMGFS")

WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/vimgfs-bench.XXXXXX)}
mkdir -p "$WORK"
cleanup() {
  for m in "$WORK"/vimgfs.mnt "$WORK"/qemu.mnt; do
    mountpoint -q "$m" 2>/dev/null && fusermount3 -u "$m" 2>/dev/null || true
  done
  [ -f "$WORK/qsd.pid" ] && kill "$(cat "$WORK/qsd.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# job name | fio arguments
JOBS=(
  "seqwrite-1M|--rw=write --bs=1M --numjobs=1 --size=$SIZE"
  "seqread-1M|--rw=read --bs=1M --numjobs=1 --size=$SIZE --time_based --runtime=$RUNTIME"
  "randread-4k-j1|--rw=randread --bs=4k --numjobs=1 --time_based --runtime=$RUNTIME"
  "randread-4k-j4|--rw=randread --bs=4k --numjobs=4 --time_based --runtime=$RUNTIME"
  "randwrite-4k-j1|--rw=randwrite --bs=4k --numjobs=1 --time_based --runtime=$RUNTIME"
  "randwrite-4k-j4|--rw=randwrite --bs=4k --numjobs=4 --time_based --runtime=$RUNTIME"
)

# run_jobs TARGET FILE: one line "target job MB/s IOPS" per job into $WORK/results
run_jobs() {
  local target=$1 file=$2 entry name args
  for entry in "${JOBS[@]}"; do
    name=${entry%%|*}
    args=${entry#*|}
    # shellcheck disable=SC2086
    fio --name="$name" --filename="$file" --direct=1 --ioengine=psync --group_reporting \
        --thread --output-format=json $args >"$WORK/$target-$name.json" \
      || die "fio $name on $target failed"
    python3 - "$WORK/$target-$name.json" "$target" "$name" >>"$WORK/results" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
io = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
print(sys.argv[2], sys.argv[3], "%.1f" % (io["bw_bytes"] / 1e6), "%.0f" % io["iops"])
EOF
  done
}

peak_rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

: >"$WORK/results"

# --- host file ceiling ---
truncate -s "$SIZE" "$WORK/host.raw"
run_jobs host "$WORK/host.raw"
rm -f "$WORK/host.raw"

# --- vimgfs ---
qemu-img create -q -f qcow2 "$WORK/vimgfs.qcow2" "$SIZE"
touch "$WORK/vimgfs.mnt"
"$VIMGFS" "$WORK/vimgfs.qcow2" "$WORK/vimgfs.mnt"
VPID=$(pgrep -n -f "vimgfs.qcow2 $WORK/vimgfs.mnt" || true)
run_jobs vimgfs "$WORK/vimgfs.mnt"
VRSS=$( [ -n "$VPID" ] && peak_rss_kib "$VPID" || echo 0)
fusermount3 -u "$WORK/vimgfs.mnt"
for _ in $(seq 100); do [ -n "$VPID" ] && kill -0 "$VPID" 2>/dev/null || break; sleep 0.1; done
VCHECK=$(qemu-img check "$WORK/vimgfs.qcow2" >/dev/null 2>&1 && echo clean || echo "NOT CLEAN")
rm -f "$WORK/vimgfs.qcow2"

# --- qemu-storage-daemon FUSE export ---
qemu-img create -q -f qcow2 "$WORK/qemu.qcow2" "$SIZE"
touch "$WORK/qemu.mnt"
qemu-storage-daemon \
  --blockdev "driver=file,node-name=file,filename=$WORK/qemu.qcow2" \
  --blockdev driver=qcow2,node-name=fmt,file=file \
  --export "type=fuse,id=exp,node-name=fmt,mountpoint=$WORK/qemu.mnt,writable=on" \
  --daemonize --pidfile "$WORK/qsd.pid"
QPID=$(cat "$WORK/qsd.pid")
run_jobs qemu "$WORK/qemu.mnt"
QRSS=$(peak_rss_kib "$QPID")
fusermount3 -u "$WORK/qemu.mnt"
kill "$QPID" 2>/dev/null || true
for _ in $(seq 100); do kill -0 "$QPID" 2>/dev/null || break; sleep 0.1; done
rm -f "$WORK/qsd.pid" "$WORK/qemu.qcow2"

# --- report ---
python3 - "$WORK/results" "$VRSS" "$QRSS" "$VCHECK" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    target, job, mbs, iops = line.split()
    rows.setdefault(job, {})[target] = (float(mbs), float(iops))
print("%-16s %21s %21s %21s %8s" % ("job", "vimgfs MB/s  IOPS", "qemu MB/s  IOPS", "host MB/s  IOPS", "v/q"))
for job, r in rows.items():
    def cell(t):
        return "%10.1f %10.0f" % r[t] if t in r else "%21s" % "-"
    v, q = r.get("vimgfs"), r.get("qemu")
    ratio = "%8.2f" % (v[0] / q[0]) if v and q and q[0] > 0 else "%8s" % "-"
    print("%-16s %s %s %s %s" % (job, cell("vimgfs"), cell("qemu"), cell("host"), ratio))
print("peak RSS: vimgfs %.1f MiB, qemu-storage-daemon %.1f MiB" %
      (int(sys.argv[2]) / 1024, int(sys.argv[3]) / 1024))
print("qemu-img check of the vimgfs image afterwards:", sys.argv[4])
EOF
