#!/bin/bash
# Mount benchmark: the same fio jobs on
#   vimgfs   - a 2 GiB image (qcow2, or FORMAT) mounted with vimgfs (raw view on a
#              regular-file mount point)
#   qemu     - the same kind of image exported by qemu-storage-daemon (--export type=fuse)
#   host     - a plain 2 GiB file on the host file system (the ceiling)
# Each round gives every target a fresh image, so each sees the same allocation history: a
# 1 MiB sequential write over the whole disk first (allocating), then reads of that data,
# then 4 KiB random writes in place, then the same with an fsync after every write (alone,
# and among readers: 4 jobs, 75% reads), all with O_DIRECT; then the buffered rows (b-*,
# through the page cache: what cp, dd, mkfs and a loop device do), writes ending with an
# fsync; fio drops the file's cached pages before each (its default, invalidate=1), so
# reads start cold. Then the w-* rows read without that drop, after b-seqread read the
# whole disk: what each target kept cached (a warm page cache, as a guest that rereads
# its disk sees). fio uses psync on all three. The order of the three targets rotates
# from round to round, so write-back left behind by one lands on each alike.
# Then the e2e rows, each on fresh 4 GiB images: losetup (default, and --direct-io=on),
# mkfs.ext4, mount, copy a 300 MB tree of 18k files, sync, umount, losetup -d, check;
# timed as a whole (median of E2E_REPEAT runs).
#
# Usage: bench/mount_bench.sh [VIMGFS_BINARY]   (root; needs fio, qemu-img,
#        qemu-storage-daemon from qemu-system-common). Env: BENCH_DIR (work folder, default
#        a temp dir under /var/tmp), RUNTIME (seconds per timed job, default 8), REPEAT
#        (rounds, default 2; the best round per job and target is reported), FORMAT
#        (image format of both mounted images: qcow2 (default), vhdx, vpc, vdi, vmdk).
#        The image is checked afterwards with qemu-img check (vimgfs check for vpc, which
#        qemu-img cannot check). E2E_REPEAT (default 3; 0 skips the e2e rows).
#        VIMGFS_OPTS: extra mount options for vimgfs (e.g. "-o nowriteback_cache",
#        "-o cache=none"). JOBS_MATCH: a regular expression; only the fio jobs whose names
#        match run (default: all; "^$" runs none, for the e2e rows alone).
set -euo pipefail

VIMGFS=${1:-${VIMGFS:-$(dirname "$0")/../build/vimgfs}}
RUNTIME=${RUNTIME:-8}
REPEAT=${REPEAT:-2}
FORMAT=${FORMAT:-qcow2}
SIZE=2G
E2E_REPEAT=${E2E_REPEAT:-3}
JOBS_MATCH=${JOBS_MATCH:-.}
read -r -a VIMGFS_EXTRA <<<"${VIMGFS_OPTS:-}"

die() { echo "mount_bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (FUSE mounts)"
for p in fio qemu-img qemu-storage-daemon fusermount3 python3 losetup mkfs.ext4 e2fsck; do
  command -v "$p" >/dev/null || die "$p not found${p/qemu-storage-daemon/ (apt-get install qemu-system-common)}"
done
[ -x "$VIMGFS" ] || die "vimgfs binary not found at $VIMGFS (pass it as the first argument)"
VIMGFS=$(readlink -f "$VIMGFS")

WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/vimgfs-bench.XXXXXX)}
mkdir -p "$WORK"
cleanup() {
  mountpoint -q "$WORK/fs" 2>/dev/null && umount "$WORK/fs" || true
  [ -n "${LOOPDEV:-}" ] && losetup -d "$LOOPDEV" 2>/dev/null || true
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
  "b-seqwrite-1M|--direct=0 --rw=write --bs=1M --numjobs=1 --size=$SIZE --end_fsync=1"
  "b-randwrite-4k-j4|--direct=0 --rw=randwrite --bs=4k --numjobs=4 --time_based --runtime=$RUNTIME --end_fsync=1"
  "b-randread-4k-j1|--direct=0 --rw=randread --bs=4k --numjobs=1 --time_based --runtime=$RUNTIME"
  "b-randread-4k-j4|--direct=0 --rw=randread --bs=4k --numjobs=4 --time_based --runtime=$RUNTIME"
  "b-seqread-1M|--direct=0 --rw=read --bs=1M --numjobs=1 --size=$SIZE"
  "w-seqread-1M|--direct=0 --invalidate=0 --rw=read --bs=1M --numjobs=1 --size=$SIZE --time_based --runtime=$RUNTIME"
  "w-randread-4k-j1|--direct=0 --invalidate=0 --rw=randread --bs=4k --numjobs=1 --time_based --runtime=$RUNTIME"
  "w-randread-4k-j4|--direct=0 --invalidate=0 --rw=randread --bs=4k --numjobs=4 --time_based --runtime=$RUNTIME"
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
  # --direct=1 unless the job says otherwise (the last --direct wins)
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

# The three targets; the order rotates with the round ($1), so that write-back one of them
# leaves behind lands on each alike.
targets=(vimgfs qemu host)
files=("$WORK/vimgfs.mnt" "$WORK/qemu.mnt" "$WORK/host.raw")
target_order() { for k in 0 1 2; do echo $(((k + $1) % 3)); done; }

# start_targets SIZE: fresh images of SIZE, both mounted at once (VPID, QPID)
start_targets() {
  truncate -s "$1" "$WORK/host.raw"
  qemu-img create -q -f "$FORMAT" "${create_opts[@]}" "$WORK/vimgfs.img" "$1"
  qemu-img create -q -f "$FORMAT" "${create_opts[@]}" "$WORK/qemu.img" "$1"
  touch "$WORK/vimgfs.mnt" "$WORK/qemu.mnt"
  "$VIMGFS" "${VIMGFS_EXTRA[@]}" -F "$FORMAT" "$WORK/vimgfs.img" "$WORK/vimgfs.mnt"
  VPID=$(pgrep -n -f "vimgfs.img $WORK/vimgfs.mnt" || true)
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=file,filename=$WORK/qemu.img" \
    --blockdev "driver=$FORMAT,node-name=fmt,file=file" \
    --export "type=fuse,id=exp,node-name=fmt,mountpoint=$WORK/qemu.mnt,writable=on" \
    --daemonize --pidfile "$WORK/qsd.pid"
  QPID=$(cat "$WORK/qsd.pid")
}

# stop_targets: unmounts both, waits for the daemons, checks the vimgfs image (VCHECK)
stop_targets() {
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
}

: >"$WORK/results"
VRSS=0 QRSS=0 VCHECK=clean
for rep in $(seq "$REPEAT"); do
  # Fresh images each round; every job runs on the three targets back to back so that
  # load from elsewhere on the machine hits them alike.
  start_targets "$SIZE"
  for entry in "${JOBS[@]}"; do
    name=${entry%%|*}
    args=${entry#*|}
    [[ "$name" =~ $JOBS_MATCH ]] || continue
    for t in $(target_order "$rep"); do
      run_job "${targets[$t]}" "${files[$t]}" "$name" "$args"
    done
  done
  v=$( [ -n "$VPID" ] && peak_rss_kib "$VPID" || echo 0); [ "$v" -gt "$VRSS" ] && VRSS=$v
  q=$(peak_rss_kib "$QPID"); [ "$q" -gt "$QRSS" ] && QRSS=$q
  stop_targets
done

# --- e2e rows ---
# A tree of 18k files, 300 MB (sizes spread from 1 KiB to 64 KiB, random bytes).
e2e_tree() {
  python3 - "$WORK/tree" <<'EOF3'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(1)
total, n = 0, 0
blob = os.urandom(1 << 20)
while n < 18000:
    d = os.path.join(root, "d%03d" % (n // 200))
    os.makedirs(d, exist_ok=True)
    size = min(int(rnd.paretovariate(1.2) * 6000), 400000)
    off = rnd.randrange(0, len(blob) - size)
    with open(os.path.join(d, "f%05d" % n), "wb") as f:
        f.write(blob[off:off + size])
    total += size
    n += 1
# top up to 300 MB with a few larger files
i = 0
while total < 300_000_000:
    with open(os.path.join(root, "big%02d" % i), "wb") as f:
        for _ in range(16):
            f.write(blob)
    total += 16 << 20
    i += 1
EOF3
}

# e2e_once FILE LOOPMODE: prints the seconds of losetup, mkfs.ext4, mount, cp -a, sync,
# umount, losetup -d, e2fsck -fn on the image's raw view (or the host file)
e2e_once() {
  local file=$1 mode=$2 start end
  local dio=()
  [ "$mode" = direct ] && dio=(--direct-io=on)
  start=$(date +%s.%N)
  LOOPDEV=$(losetup --find --show "${dio[@]}" "$file")
  mkfs.ext4 -q -F "$LOOPDEV"
  mkdir -p "$WORK/fs"
  local ok=1
  if mount "$LOOPDEV" "$WORK/fs"; then
    cp -a "$WORK/tree" "$WORK/fs/" || ok=0
    sync
    umount "$WORK/fs"
  else
    ok=0
  fi
  losetup -d "$LOOPDEV"
  LOOPDEV=
  end=$(date +%s.%N)
  e2fsck -fn "$file" >/dev/null 2>&1 || ok=0
  if [ "$ok" = 1 ]; then
    python3 -c "print('%.2f' % ($end - $start))"
  else
    echo "e2e on $file failed (mount, copy or e2fsck)" >&2
    echo fail
  fi
}

: >"$WORK/e2e"
if [ "$E2E_REPEAT" -gt 0 ]; then
  e2e_tree
  for rep in $(seq "$E2E_REPEAT"); do
    for mode in buffered direct; do
      start_targets 4G
      for t in $(target_order "$rep"); do
        echo "${targets[$t]} e2e-loop-$mode $(e2e_once "${files[$t]}" "$mode")" >>"$WORK/e2e"
      done
      stop_targets
    done
  done
fi

# --- report ---
python3 - "$WORK/results" "$VRSS" "$QRSS" "$VCHECK" "$FORMAT" "$WORK/e2e" <<'EOF'
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
times = {}
for line in open(sys.argv[6]):
    target, job, secs = line.split()
    times.setdefault(job, {}).setdefault(target, []).append(secs)
if times:
    print()
    print("%-20s %10s %10s %10s %8s %8s" % ("e2e (median s)", "vimgfs", "qemu", "host", "q/v", "v/host"))
    for job, r in times.items():
        med = {}
        for t, v in r.items():
            ok = sorted(float(x) for x in v if x != "fail")
            med[t] = ok[len(ok) // 2] if ok else None
        cell = lambda t: "%10.2f" % med[t] if med.get(t) else "%10s" % "failed"
        ratio = lambda a, b: "%8.2f" % (med[a] / med[b]) if med.get(a) and med.get(b) else "%8s" % "-"
        print("%-20s %s %s %s %s %s" % (job, cell("vimgfs"), cell("qemu"), cell("host"),
              ratio("qemu", "vimgfs"), ratio("vimgfs", "host")))
        fails = {t: sum(x == "fail" for x in v) for t, v in r.items()}
        if any(fails.values()):
            print("  failed runs: " + ", ".join("%s %d" % (t, n) for t, n in fails.items() if n))
print("peak RSS: vimgfs %.1f MiB, qemu-storage-daemon %.1f MiB" %
      (int(sys.argv[2]) / 1024, int(sys.argv[3]) / 1024))
print("format %s; check of the vimgfs image afterwards: %s" % (sys.argv[5], sys.argv[4]))
EOF
