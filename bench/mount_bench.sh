#!/bin/bash
# Mount benchmark: the same fio jobs on
#   vimgfs   - a 2 GiB image (qcow2, or FORMAT) mounted with vimgfs (raw view on a
#              regular-file mount point)
#   qemu     - the same kind of image exported by qemu-storage-daemon (--export type=fuse)
#   host     - a plain 2 GiB file on the host file system (the ceiling)
# Each round gives every target a fresh image, so each sees the same allocation history: a
# 1 MiB sequential write over the whole disk first (allocating), then reads of that data,
# then 4 KiB random writes in place, then the same with an fsync after every write (alone,
# and among readers: 4 jobs, 75% reads). fio uses O_DIRECT and psync on all three.
#
# Usage: bench/mount_bench.sh [VIMGFS_BINARY]   (root; needs fio, qemu-img,
#        qemu-storage-daemon from qemu-system-common). Env: BENCH_DIR (work folder, default
#        a temp dir under /var/tmp), RUNTIME (seconds per timed job, default 8), REPEAT
#        (rounds, default 2; the best round per job and target is reported), FORMAT
#        (image format of both mounted images: qcow2 (default), vhdx, vpc, vdi, vmdk).
#        The image is checked afterwards with qemu-img check (vimgfs check for vpc, which
#        qemu-img cannot check).
set -euo pipefail

VIMGFS=${1:-${VIMGFS:-$(dirname "$0")/../build/vimgfs}}
RUNTIME=${RUNTIME:-8}
REPEAT=${REPEAT:-2}
FORMAT=${FORMAT:-qcow2}
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
  "fsync-4k-j1|--rw=randwrite --bs=4k --fsync=1 --numjobs=1 --time_based --runtime=$RUNTIME"
  "fsync-rw-4k-j4|--rw=randrw --rwmixread=75 --bs=4k --fsync=1 --numjobs=4 --time_based --runtime=$RUNTIME"
)

# vpc: a size qemu keeps exactly (no CHS rounding), as Azure wants.
create_opts=()
[ "$FORMAT" = vpc ] && create_opts=(-o force_size=on)

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
peak_rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# run_job TARGET FILE NAME ARGS: appends "target job MB/s IOPS" to $WORK/results
run_job() {
  local target=$1 file=$2 name=$3 args=$4
  # shellcheck disable=SC2086
  fio --name="$name" --filename="$file" --direct=1 --ioengine=psync --group_reporting \
      --thread --output-format=json $args >"$WORK/$target-$name.json" \
    || die "fio $name on $target failed"
  python3 - "$WORK/$target-$name.json" "$target" "$name" >>"$WORK/results" <<'EOF2'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
# Reads and writes together (a mixed job counts both; the others have one of them).
bw = j["read"]["bw_bytes"] + j["write"]["bw_bytes"]
iops = j["read"]["iops"] + j["write"]["iops"]
print(sys.argv[2], sys.argv[3], "%.1f" % (bw / 1e6), "%.0f" % iops)
EOF2
}

: >"$WORK/results"
VRSS=0 QRSS=0 VCHECK=clean
for rep in $(seq "$REPEAT"); do
  # Fresh images each round, both mounted at once; every job runs on the three targets
  # back to back so that load from elsewhere on the machine hits them alike.
  truncate -s "$SIZE" "$WORK/host.raw"
  qemu-img create -q -f "$FORMAT" "${create_opts[@]}" "$WORK/vimgfs.img" "$SIZE"
  qemu-img create -q -f "$FORMAT" "${create_opts[@]}" "$WORK/qemu.img" "$SIZE"
  touch "$WORK/vimgfs.mnt" "$WORK/qemu.mnt"
  "$VIMGFS" -F "$FORMAT" "$WORK/vimgfs.img" "$WORK/vimgfs.mnt"
  VPID=$(pgrep -n -f "vimgfs.img $WORK/vimgfs.mnt" || true)
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=file,filename=$WORK/qemu.img" \
    --blockdev "driver=$FORMAT,node-name=fmt,file=file" \
    --export "type=fuse,id=exp,node-name=fmt,mountpoint=$WORK/qemu.mnt,writable=on" \
    --daemonize --pidfile "$WORK/qsd.pid"
  QPID=$(cat "$WORK/qsd.pid")
  for entry in "${JOBS[@]}"; do
    name=${entry%%|*}
    args=${entry#*|}
    run_job vimgfs "$WORK/vimgfs.mnt" "$name" "$args"
    run_job qemu "$WORK/qemu.mnt" "$name" "$args"
    run_job host "$WORK/host.raw" "$name" "$args"
  done
  v=$( [ -n "$VPID" ] && peak_rss_kib "$VPID" || echo 0); [ "$v" -gt "$VRSS" ] && VRSS=$v
  q=$(peak_rss_kib "$QPID"); [ "$q" -gt "$QRSS" ] && QRSS=$q
  fusermount3 -u "$WORK/vimgfs.mnt"
  fusermount3 -u "$WORK/qemu.mnt"
  kill "$QPID" 2>/dev/null || true
  for _ in $(seq 100); do alive "$VPID" || alive "$QPID" || break; sleep 0.1; done
  if [ "$FORMAT" = vpc ]; then
    "$VIMGFS" check "$WORK/vimgfs.img" >/dev/null 2>&1 || VCHECK="NOT CLEAN"
  else
    qemu-img check -f "$FORMAT" "$WORK/vimgfs.img" >/dev/null 2>&1 || VCHECK="NOT CLEAN"
  fi
  rm -f "$WORK/qsd.pid" "$WORK/vimgfs.img" "$WORK/qemu.img" "$WORK/host.raw"
done

# --- report ---
python3 - "$WORK/results" "$VRSS" "$QRSS" "$VCHECK" "$FORMAT" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    target, job, mbs, iops = line.split()
    cur = rows.setdefault(job, {}).get(target)
    if cur is None or float(mbs) > cur[0]:
        rows[job][target] = (float(mbs), float(iops))
print("%-16s %21s %21s %21s %8s" % ("job", "vimgfs MB/s  IOPS", "qemu MB/s  IOPS", "host MB/s  IOPS", "v/q"))
for job, r in rows.items():
    def cell(t):
        return "%10.1f %10.0f" % r[t] if t in r else "%21s" % "-"
    v, q = r.get("vimgfs"), r.get("qemu")
    ratio = "%8.2f" % (v[0] / q[0]) if v and q and q[0] > 0 else "%8s" % "-"
    print("%-16s %s %s %s %s" % (job, cell("vimgfs"), cell("qemu"), cell("host"), ratio))
print("peak RSS: vimgfs %.1f MiB, qemu-storage-daemon %.1f MiB" %
      (int(sys.argv[2]) / 1024, int(sys.argv[3]) / 1024))
print("format %s; check of the vimgfs image afterwards: %s" % (sys.argv[5], sys.argv[4]))
EOF
