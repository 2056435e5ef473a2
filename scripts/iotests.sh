#!/usr/bin/env bash
# Runs qemu's own qemu-iotests (from Debian's source package of the installed qemu-utils)
# with vimgfs as QEMU_IMG_PROG, and once with qemu-img itself, and prints per format the
# tests that pass with qemu-img and fail with vimgfs. See docs/TESTING.md.
#
#   scripts/iotests.sh                       every test, formats qcow2 vmdk vdi raw vpc vhdx
#                                            qed qcow parallels bochs cloop dmg luks
#   scripts/iotests.sh -f qcow2 -f raw       only these formats
#   scripts/iotests.sh -f qcow2 020 292      only these tests
#   scripts/iotests.sh --ci                  the list in tests/iotests/ci.txt, vimgfs only:
#                                            each must pass (CI runs this)
#   scripts/iotests.sh --vimgfs-only ...     skip the qemu-img baseline run
#   scripts/iotests.sh --fetch               only fetch qemu's source (the oracle tests read
#                                            its sample images) and print its folder
#
# vimgfs serves every qemu-img command (create/info/check/convert/compare/map/resize/
# snapshot/rebase/commit/measure/dd/bench/amend/bitmap) through a small front end run
# under the name qemu-img (so messages say "qemu-img:"); anything else (--version) goes
# to qemu-img.
# VM tests run qemu-system-x86_64 under TCG (Debian's build has no qtest accelerator).
# Needs root for apt-get; the fetched tree lives in $VIMGFS_IOTESTS_DIR
# (default /var/tmp/vimgfs-iotests) and is reused. Nothing of qemu's enters the repository.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cache=${VIMGFS_IOTESTS_DIR:-/var/tmp/vimgfs-iotests}
vimgfs=${VIMGFS:-$top/build/vimgfs}
formats=()
tests=()
ci=0
baseline=1
fetch_only=0
jobs=${IOTESTS_JOBS:-$(nproc)}
while [ $# -gt 0 ]; do
  case "$1" in
    -f) formats+=("$2"); shift 2 ;;
    --ci) ci=1; baseline=0; shift ;;
    --vimgfs-only) baseline=0; shift ;;
    --fetch) fetch_only=1; shift ;;
    -j) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) tests+=("$1"); shift ;;
  esac
done
[ ${#formats[@]} -gt 0 ] || formats=(qcow2 vmdk vdi raw vpc vhdx qed qcow parallels bochs cloop dmg luks)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
need=()
for p in qemu-utils qemu-system-x86 qemu-block-extra dpkg-dev python3 xz-utils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# qemu's source at the installed version, Debian's patches applied.
version=$(dpkg-query -W -f='${source:Version}' qemu-utils)
src="$cache/${version#*:}"  # no epoch: a colon would split PYTHONPATH
if [ ! -x "$src/tests/qemu-iotests/check" ]; then
  if ! apt-get source --print-uris -qq "qemu=$version" >/dev/null 2>&1; then
    # deb-src entries for the suites apt already uses.
    for f in /etc/apt/sources.list.d/*.sources; do
      grep -q '^Types: deb$' "$f" 2>/dev/null || continue
      sed 's/^Types: deb$/Types: deb-src/' "$f" | $SUDO tee "/etc/apt/sources.list.d/vimgfs-src-$(basename "$f")" >/dev/null
    done
    if [ -f /etc/apt/sources.list ]; then
      grep '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' |
        $SUDO tee /etc/apt/sources.list.d/vimgfs-src.list >/dev/null
    fi
    $SUDO apt-get update -qq
  fi
  rm -rf "$src.tmp" && mkdir -p "$src.tmp"
  (cd "$src.tmp" && apt-get source -qq "qemu=$version" >/dev/null 2>&1)
  mv "$src.tmp"/qemu-*/ "$src"
  rm -rf "$src.tmp"
  sed -i "s/-accel qtest'/-accel tcg'/" "$src/tests/qemu-iotests/testenv.py"
fi
iotests="$src/tests/qemu-iotests"
if [ $fetch_only -eq 1 ]; then echo "$src"; exit 0; fi
[ -x "$vimgfs" ] || "$top/scripts/build.sh" build

# The front end: vimgfs's commands to vimgfs (named qemu-img), the rest to qemu-img.
frontend="$cache/frontend"
mkdir -p "$frontend"
cat > "$frontend/qemu-img" <<EOF
#!/bin/bash
case "\${1-}" in
  create|info|check|convert|compare|map|resize|snapshot|rebase|commit|measure|dd|bench|amend|bitmap) exec -a qemu-img "$vimgfs" "\$@" ;;
  *) exec /usr/bin/qemu-img "\$@" ;;
esac
EOF
chmod +x "$frontend/qemu-img"

export QEMU_PROG=/usr/bin/qemu-system-x86_64 QEMU_IO_PROG=/usr/bin/qemu-io
export QEMU_NBD_PROG=/usr/bin/qemu-nbd QSD_PROG=/usr/bin/qemu-storage-daemon

# run NAME TOOL FORMAT OUT: TAP results of one run ("ok NNN", "not ok NNN", "... # SKIP").
run() {
  local name=$1 tool=$2 fmt=$3 out=$4 list=()
  if [ $ci -eq 1 ]; then
    mapfile -t list < <(awk -v f="$fmt" '$1 == f { for (i = 2; i <= NF && $i !~ /^#/; i++) print $i }' \
                          "$top/tests/iotests/ci.txt")
    [ ${#list[@]} -gt 0 ] || { : > "$out"; return; }
  else
    list=("${tests[@]+"${tests[@]}"}")
  fi
  local scratch="$cache/scratch-$name-$fmt"
  rm -rf "$scratch" && mkdir -p "$scratch"
  (cd "$iotests" && TEST_DIR="$scratch" QEMU_IMG_PROG="$tool" \
     ./check -tap -j "$jobs" "-$fmt" "${list[@]+"${list[@]}"}" > "$out" 2>&1) || true
}

# TAP lines: "ok FMT TEST", "ok FMT TEST # SKIP", "not ok FMT TEST".
passed() { awk '$1 == "ok" && NF == 3 { print $3 }' "$1" | sort; }
failed() { awk '$1 == "not" && $2 == "ok" { print $4 }' "$1" | sort; }

status=0
for fmt in "${formats[@]}"; do
  res="$cache/results"
  mkdir -p "$res"
  run vimgfs "$frontend/qemu-img" "$fmt" "$res/$fmt.vimgfs.tap"
  passed_v=$(passed "$res/$fmt.vimgfs.tap")
  failed_v=$(failed "$res/$fmt.vimgfs.tap")
  if [ $ci -eq 1 ] && [ -n "$failed_v" ]; then
    # The VM tests watch a guest under TCG, and a loaded machine reorders their job
    # events (095 once saw an extra pause): a failure counts only if it fails again alone.
    echo "$fmt: failed once, run again one at a time: $(echo $failed_v)"
    asked_ci=$ci; ci=0; asked_jobs=$jobs; jobs=1
    asked=("${tests[@]+"${tests[@]}"}"); tests=($failed_v)
    run vimgfs "$frontend/qemu-img" "$fmt" "$res/$fmt.vimgfs-again.tap"
    tests=("${asked[@]+"${asked[@]}"}"); ci=$asked_ci; jobs=$asked_jobs
    passed_v=$( (echo "$passed_v"; passed "$res/$fmt.vimgfs-again.tap") | grep . | sort || true)
    failed_v=$(failed "$res/$fmt.vimgfs-again.tap")
  fi
  nv=$(echo "$passed_v" | grep -c . || true)
  if [ $baseline -eq 1 ]; then
    # The baseline: qemu-img on the tests vimgfs failed (a test vimgfs passes needs none).
    if [ -n "$failed_v" ]; then
      asked=("${tests[@]+"${tests[@]}"}")
      tests=($failed_v)
      run qemu-img /usr/bin/qemu-img "$fmt" "$res/$fmt.qemu-img.tap"
      tests=("${asked[@]+"${asked[@]}"}")
      regress=$(passed "$res/$fmt.qemu-img.tap" | grep . || true)
    else
      regress=""
    fi
    nr=$(echo "$regress" | grep -c . || true)
    echo "$fmt: $nv of the $((nv + nr)) tests that pass with qemu-img pass with vimgfs"
    if [ -n "$regress" ]; then
      echo "  pass with qemu-img, fail with vimgfs: $(echo $regress)"
      status=1
    fi
  else
    echo "$fmt: $nv passed with vimgfs"
    if [ -n "$failed_v" ]; then
      echo "  failed with vimgfs: $(echo $failed_v)"
      status=1
      if [ $ci -eq 1 ]; then  # CI keeps no files: show what went wrong
        for t in $failed_v; do
          bad="$cache/scratch-vimgfs-$fmt/$t/$t.out.bad"
          [ -f "$bad" ] || bad="$cache/scratch-vimgfs-$fmt/$t.out.bad"
          ref="$iotests/$t.out.$fmt"; [ -f "$ref" ] || ref="$iotests/$t.out"
          [ -f "$ref" ] || ref="$iotests/tests/$t.out"
          echo "---- $fmt $t: expected vs vimgfs"
          diff -u "$ref" "$bad" 2>&1 | head -60 || true
        done
      fi
    fi
  fi
done
echo "TAP results: $cache/results; output of failed tests: $cache/scratch-*/TEST/TEST.out.bad"
exit $status
