#!/bin/bash
# Convert benchmark: vimgfs vs qemu-img on the same 2 GiB mixed image (random data,
# text-like data and zero regions, a third each, in 64 MiB stripes), best of REPEAT runs:
#   raw->qcow2, qcow2->raw, qcow2->raw and raw->qcow2 with -t none (O_DIRECT),
#   raw->qcow2 -c (zlib), raw->qcow2 -c zstd,
#   qcow2->vmdk streamOptimized, vmdk->qcow2, vdi->qcow2, qcow2->vpc, vpc->qcow2,
#   qcow2->vhdx, vhdx->qcow2, check (qcow2, vhdx)
# Prints seconds (best of REPEAT runs each), the vimgfs/qemu-img time ratio (< 1: vimgfs
# faster) and peak RSS per row. Both tools run with their defaults: no flush at the end
# (qemu-img convert's cache mode is "unsafe", and so is vimgfs's).
# Each output is verified with `qemu-img compare` against the source.
#
# Usage: bench/convert_bench.sh [VIMGFS_BINARY]
# Env: BENCH_DIR (work folder, default a temp dir under /var/tmp), SIZE_MIB (default 2048),
#      REPEAT (runs per row and tool, default 3; the best of each is reported),
#      ONLY (a bash regex: only the rows whose name matches, e.g. 'qcow2->raw|vdi->qcow2').
set -euo pipefail
BENCH_SRC=$(cd "$(dirname "$0")" && pwd)

VIMGFS=${1:-${VIMGFS:-$(dirname "$0")/../build/vimgfs}}
SIZE_MIB=${SIZE_MIB:-2048}
REPEAT=${REPEAT:-3}

die() { echo "convert_bench: $*" >&2; exit 1; }
for p in qemu-img python3 /usr/bin/time; do command -v "$p" >/dev/null || die "$p not found"; done
[ -x "$VIMGFS" ] || die "vimgfs binary not found at $VIMGFS (pass it as the first argument)"
VIMGFS=$(readlink -f "$VIMGFS")

WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/vimgfs-convert-bench.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

echo "building the ${SIZE_MIB} MiB mixed source image in $WORK ..." >&2
python3 "$BENCH_SRC/mixed_image.py" "$SIZE_MIB" src.raw
qemu-img convert -f raw -O qcow2 src.raw src.qcow2
qemu-img convert -f raw -O vmdk src.raw src.vmdk
qemu-img convert -f raw -O vdi src.raw src.vdi
qemu-img convert -f raw -O vpc -o force_size=on src.raw src.vpc
qemu-img convert -f raw -O vhdx src.raw src.vhdx
sync

# run TOOL ARGS...: prints "seconds peak_rss_kib" of one run
run() {
  /usr/bin/time -o "$WORK/time.out" -f "%e %M" "$@" >/dev/null 2>"$WORK/err.out" || true
  tail -1 "$WORK/time.out"
}

# best "SECONDS RSS" of two: the lower time
best() {
  if [ -z "$1" ]; then echo "$2"; return; fi
  python3 -c "import sys; a=sys.argv[1].split(); b=sys.argv[2].split(); print(' '.join(a if float(a[0]) <= float(b[0]) else b))" "$1" "$2"
}

# row NAME SRC OUT_ARGS...: times "convert ARGS" for both tools REPEAT times, alternating
# which goes first (the page cache and writeback favour neither), keeps each tool's best
# run, and checks both outputs
ROWS=()
row() {
  local name=$1 src=$2; shift 2
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then return; fi
  local v="" q="" i
  for ((i = 0; i < REPEAT; i++)); do
    rm -f out.v out.q
    sync
    if ((i % 2 == 0)); then
      v=$(best "$v" "$(run "$VIMGFS" convert "$@" "$src" out.v)"); sync
      q=$(best "$q" "$(run qemu-img convert "$@" "$src" out.q)")
    else
      q=$(best "$q" "$(run qemu-img convert "$@" "$src" out.q)"); sync
      v=$(best "$v" "$(run "$VIMGFS" convert "$@" "$src" out.v)")
    fi
  done
  local ok=ok
  qemu-img compare -q "$src" out.v || ok=MISMATCH
  # qemu-img cannot check VHD (exit 63): vimgfs's own check stands in (raw: neither checks).
  if qemu-img check -q out.v 2>/dev/null; then :
  elif [ $? = 63 ]; then "$VIMGFS" check -q out.v >/dev/null 2>&1 || [ $? = 63 ] || ok="$ok,CHECK-FAILED"
  else ok="$ok,CHECK-FAILED"; fi
  local vs qs
  vs=$(stat -c %s out.v); qs=$(stat -c %s out.q)
  ROWS+=("$name|$v|$q|$ok|$vs|$qs")
}

row "raw->qcow2"              src.raw   -f raw -O qcow2
row "qcow2->raw"              src.qcow2 -f qcow2 -O raw
# The cache mode OpenStack converts with: both files around the host's page cache.
row "qcow2->raw -t none -T none" src.qcow2 -f qcow2 -O raw -t none -T none
row "raw->qcow2 -t none"       src.raw   -f raw -O qcow2 -t none
row "raw->qcow2 -c zlib"      src.raw   -f raw -O qcow2 -c
row "raw->qcow2 -c zstd"      src.raw   -f raw -O qcow2 -c -o compression_type=zstd
row "qcow2->vmdk streamOpt"   src.qcow2 -f qcow2 -O vmdk -o subformat=streamOptimized
row "vmdk->qcow2"             src.vmdk  -f vmdk -O qcow2
row "vdi->qcow2"              src.vdi   -f vdi -O qcow2
row "qcow2->vpc"              src.qcow2 -f qcow2 -O vpc -o force_size=on
row "vpc->qcow2"              src.vpc   -f vpc -O qcow2
row "qcow2->vhdx"             src.qcow2 -f qcow2 -O vhdx
row "vhdx->qcow2"             src.vhdx  -f vhdx -O qcow2
for fmt in qcow2 vhdx; do
  if [ -n "${ONLY:-}" ] && ! [[ "check $fmt" =~ $ONLY ]]; then continue; fi
  v=""; q=""
  for ((i = 0; i < REPEAT; i++)); do
    v=$(best "$v" "$(run "$VIMGFS" check "src.$fmt")")
    q=$(best "$q" "$(run qemu-img check "src.$fmt")")
  done
  ROWS+=("check $fmt|$v|$q|ok|-|-")
done

printf '%-24s %10s %10s %7s %12s %12s %14s %14s  %s\n' operation vimgfs_s qemu_s ratio \
  vimgfs_rss_MiB qemu_rss_MiB vimgfs_bytes qemu_bytes verify
for r in "${ROWS[@]}"; do
  IFS='|' read -r name v q ok vs qs <<<"$r"
  read -r vt vm <<<"$v"
  read -r qt qm <<<"$q"
  ratio=$(python3 -c "print('%.2f' % ($vt / $qt) if $qt > 0 else '-')")
  printf '%-24s %10s %10s %7s %12s %12s %14s %14s  %s\n' "$name" "$vt" "$qt" "$ratio" \
    "$((vm / 1024))" "$((qm / 1024))" "$vs" "$qs" "$ok"
done
echo "cores: $(nproc); image: ${SIZE_MIB} MiB (1/3 random, 1/3 text, 1/3 zero)"
