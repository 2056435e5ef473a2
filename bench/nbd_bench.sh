#!/bin/bash
# NBD benchmark, vimgfs beside qemu on the same 2 GiB mixed qcow2 (random, text-like and
# zero 64 MiB stripes, a third each), best of REPEAT runs per row:
#   serve:   nbdcopy --connections=4 of the guest view to null:, from
#            nbdkit vimgfs (the plugin), qemu-nbd, and qemu-storage-daemon's NBD export
#   convert: the qcow2 served as raw bytes by nbdkit's file plugin, converted to a local
#            raw file by `vimgfs convert nbd+unix://...` and `qemu-img convert nbd+unix://...`
#            (the two alternate, round by round)
# Prints seconds and the ratio to the best qemu row (< 1: vimgfs faster).
#
# Usage: bench/nbd_bench.sh [VIMGFS_BINARY [PLUGIN.so]]
# Env: BENCH_DIR (work folder, default a temp dir under /var/tmp), SIZE_MIB (2048), REPEAT (3).
set -euo pipefail
BENCH_SRC=$(cd "$(dirname "$0")" && pwd)

VIMGFS=${1:-${VIMGFS:-$(dirname "$0")/../build/vimgfs}}
PLUGIN=${2:-$(dirname "$VIMGFS")/nbdkit-vimgfs-plugin.so}
SIZE_MIB=${SIZE_MIB:-2048}
REPEAT=${REPEAT:-3}
die() { echo "nbd_bench: $*" >&2; exit 1; }
for p in qemu-img qemu-nbd qemu-storage-daemon nbdkit nbdcopy python3; do
  command -v "$p" >/dev/null || die "$p not found (apt-get install qemu-utils qemu-system-common nbdkit libnbd-bin)"
done
[ -x "$VIMGFS" ] || die "vimgfs binary not found at $VIMGFS"
[ -f "$PLUGIN" ] || die "the plugin is not at $PLUGIN (build with nbdkit-plugin-dev installed)"
VIMGFS=$(readlink -f "$VIMGFS")
PLUGIN=$(readlink -f "$PLUGIN")

WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/vimgfs-nbd-bench.XXXXXX)}
mkdir -p "$WORK"
SERVER_PID=
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
  rm -f "$WORK/s.sock"
}
trap 'stop_server; rm -rf "$WORK"' EXIT
cd "$WORK"

echo "building the ${SIZE_MIB} MiB mixed image in $WORK ..." >&2
python3 "$BENCH_SRC/mixed_image.py" "$SIZE_MIB" src.raw
mkdir exports
qemu-img convert -f raw -O qcow2 src.raw exports/img.qcow2
rm src.raw
sync

# wait_socket EXPORT: until the server answers for that export
wait_socket() {
  for _ in $(seq 500); do
    [ -S s.sock ] && nbdinfo --size "nbd+unix:///$1?socket=$WORK/s.sock" >/dev/null 2>&1 && return
    sleep 0.02
  done
  die "server did not come up"
}
# best seconds of REPEAT runs of "$@"
best_of() {
  python3 - "$REPEAT" "$@" <<'EOF'
import subprocess, sys, time
best = None
for _ in range(int(sys.argv[1])):
    t = time.monotonic()
    subprocess.run(sys.argv[2:], check=True, stdout=subprocess.DEVNULL)
    dt = time.monotonic() - t
    best = dt if best is None or dt < best else best
print(f"{best:.3f}")
EOF
}

# best seconds of REPEAT alternating runs of two commands (A then B each round, so neither
# always meets the host's writeback of what the other just wrote): prints "bestA bestB".
# Usage: best_of_pair CMD_A... -- CMD_B...
best_of_pair() {
  python3 - "$REPEAT" "$@" <<'EOF'
import subprocess, sys, time
args = sys.argv[2:]
cut = args.index("--")
cmds = [args[:cut], args[cut + 1:]]
best = [None, None]
for _ in range(int(sys.argv[1])):
    for i, cmd in enumerate(cmds):
        t = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        dt = time.monotonic() - t
        best[i] = dt if best[i] is None or dt < best[i] else best[i]
print(f"{best[0]:.3f} {best[1]:.3f}")
EOF
}

declare -A secs
# serve rows: start the server, nbdcopy from it
nbdkit -f -U s.sock "$PLUGIN" file=exports/img.qcow2 readonly=true & SERVER_PID=$!
wait_socket ""
secs[serve_vimgfs]=$(best_of nbdcopy --connections=4 "nbd+unix:///?socket=$WORK/s.sock" null:)
stop_server
qemu-nbd -r -t -f qcow2 --shared=4 -k "$WORK/s.sock" exports/img.qcow2 & SERVER_PID=$!
wait_socket ""
secs[serve_qemu_nbd]=$(best_of nbdcopy --connections=4 "nbd+unix:///?socket=$WORK/s.sock" null:)
stop_server
qemu-storage-daemon --blockdev driver=file,node-name=f,filename=exports/img.qcow2,read-only=on \
  --blockdev driver=qcow2,node-name=q,file=f,read-only=on \
  --nbd-server addr.type=unix,addr.path="$WORK/s.sock" --export type=nbd,id=e,node-name=q,name=img & SERVER_PID=$!
wait_socket img
secs[serve_qsd]=$(best_of nbdcopy --connections=4 "nbd+unix:///img?socket=$WORK/s.sock" null:)
stop_server

# convert rows: the qcow2 file itself on an NBD server
nbdkit -f -U s.sock file dir=exports & SERVER_PID=$!
wait_socket img.qcow2
uri="nbd+unix:///img.qcow2?socket=$WORK/s.sock"
read -r "secs[convert_vimgfs]" "secs[convert_qemu]" < <(best_of_pair "$VIMGFS" convert -O raw "$uri" out.v -- \
  qemu-img convert -f qcow2 -O raw "$uri" out.q)
cmp out.v out.q || die "the two conversions differ"
stop_server

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
best_qemu_serve=$(python3 -c "print(min(${secs[serve_qemu_nbd]}, ${secs[serve_qsd]}))")
printf '%-46s %9s %8s\n' "row (best of $REPEAT)" seconds ratio
printf '%-46s %9s %8s\n' "nbdcopy x4 <- nbdkit vimgfs" "${secs[serve_vimgfs]}" "$(ratio "${secs[serve_vimgfs]}" "$best_qemu_serve")"
printf '%-46s %9s %8s\n' "nbdcopy x4 <- qemu-nbd --shared=4" "${secs[serve_qemu_nbd]}" -
printf '%-46s %9s %8s\n' "nbdcopy x4 <- qemu-storage-daemon nbd export" "${secs[serve_qsd]}" -
printf '%-46s %9s %8s\n' "vimgfs convert nbd+unix://img.qcow2 -> raw" "${secs[convert_vimgfs]}" "$(ratio "${secs[convert_vimgfs]}" "${secs[convert_qemu]}")"
printf '%-46s %9s %8s\n' "qemu-img convert nbd+unix://img.qcow2 -> raw" "${secs[convert_qemu]}" -
echo "serve ratio: vimgfs / the faster of qemu-nbd and qemu-storage-daemon; cores: $(nproc); image: ${SIZE_MIB} MiB"
