#!/usr/bin/env bash
# Builds the libFuzzer targets with clang into build-fuzz/, makes seeds with qemu-img
# (scripts/make-fuzz-seeds.sh) and runs each target for a fixed time. Any crash, sanitizer
# report, leak, input slower than the per-input timeout, or memory use over the limits is
# a failure: the script goes on with the other targets, then prints each reproducer and
# exits 1. CI runs it from scripts/test.sh; docs/TESTING.md explains the rest.
#
#   scripts/fuzz.sh                     # every target in build-fuzz/tests/fuzz/fuzzers.txt
#   scripts/fuzz.sh qcow2_fuzzer        # some targets
#
# Environment (defaults in brackets):
#   VIMGFS_FUZZ_SECONDS   run time per target [20]
#   VIMGFS_FUZZ_TIMEOUT   seconds one input may take before it counts as a hang [15]
#   VIMGFS_FUZZ_RSS_MB    resident memory limit [2048]
#   VIMGFS_FUZZ_MALLOC_MB largest single allocation allowed [512]; the inputs are at most a
#                         few MiB, so a bigger one means a size field was trusted
#   VIMGFS_FUZZ_DIR       seeds, corpus and crash artifacts [/var/tmp/vimgfs-fuzz]; the
#                         corpus the fuzzers grow is kept there and reused by the next run
#   VIMGFS_FUZZ_BUILD     build folder [build-fuzz]; VIMGFS_FUZZ_NO_BUILD=1 skips the build
#   VIMGFS_FUZZ_NO_SEEDS=1  reuse the seeds of the last run
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${VIMGFS_FUZZ_SECONDS:-20}
per_input=${VIMGFS_FUZZ_TIMEOUT:-15}
rss=${VIMGFS_FUZZ_RSS_MB:-2048}
malloc=${VIMGFS_FUZZ_MALLOC_MB:-512}
work=${VIMGFS_FUZZ_DIR:-/var/tmp/vimgfs-fuzz}
build=${VIMGFS_FUZZ_BUILD:-build-fuzz}

t0=$(date +%s)
if [ -z "${VIMGFS_FUZZ_NO_BUILD:-}" ]; then
  cxx=${CXX:-}
  [[ $cxx == *clang++* ]] || cxx=$(command -v clang++ || command -v clang++-14 || true)
  [ -n "$cxx" ] || { echo "fuzz: clang++ not found (scripts/install-deps.sh installs it)" >&2; exit 2; }
  launcher=()
  command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  # -O1 and line tables only: the usual fuzzing build, and quicker to compile than -O2 -g.
  CXX=$cxx cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" \
    -DVIMGFS_FUZZ=ON -DVIMGFS_TESTS=OFF "${launcher[@]}" >/dev/null
  ninja -C "$build" fuzzers
fi
t_build=$(( $(date +%s) - t0 ))

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(grep -v '^$' "$build/tests/fuzz/fuzzers.txt")
fi

seeds=$work/seeds
[ -n "${VIMGFS_FUZZ_NO_SEEDS:-}" ] && [ -d "$seeds" ] || scripts/make-fuzz-seeds.sh "$seeds"

export ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0:handle_abort=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
failed=()
summary=()
for t in "${targets[@]}"; do
  bin=$build/tests/fuzz/$t
  fmt=${t%_fuzzer}
  [ -x "$bin" ] || { echo "fuzz: no such target: $bin" >&2; exit 2; }
  [ -d "$seeds/$fmt" ] || { echo "fuzz: no seeds for $t in $seeds/$fmt" >&2; exit 2; }
  corpus=$work/corpus/$t
  art=$work/artifacts/$t
  log=$work/logs/$t.log
  mkdir -p "$corpus" "$art" "$work/logs"
  # Inputs may grow to the largest seed (libFuzzer's default stops at 1 MiB and would cut
  # the larger seeds), never below 64 KiB.
  maxlen=$(find -L "$seeds/$fmt" "$corpus" -type f -printf '%s\n' | sort -n | tail -1)
  [ "${maxlen:-0}" -ge 65536 ] || maxlen=65536
  echo "=== $t: ${secs}s, seeds $seeds/$fmt, corpus $corpus"
  rc=0
  "$bin" -max_total_time="$secs" -timeout="$per_input" -rss_limit_mb="$rss" \
    -malloc_limit_mb="$malloc" -max_len="$maxlen" -detect_leaks=1 -print_final_stats=1 \
    -artifact_prefix="$art/" "$corpus" "$seeds/$fmt" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  rssmb=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    summary+=("$(printf '%-24s FAILED (exit %s) after %s execs' "$t" "$rc" "${execs:-?}")")
    echo "--- $t failed (exit $rc); the end of its log ($log):"
    grep -v '^#[0-9]' "$log" | tail -60
    repro=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    if [ -n "$repro" ]; then
      echo "--- reproducer: $repro"
      echo "--- rerun it:   $bin $repro"
    fi
  else
    summary+=("$(printf '%-24s ok: %s execs in %ss, cov %s, peak rss %s MB' "$t" "${execs:-?}" "$secs" "${cov:-?}" "${rssmb:-?}")")
  fi
done

echo "=== fuzz summary (build ${t_build}s, total $(( $(date +%s) - t0 ))s)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]} (logs and reproducers in $work)" >&2
  exit 1
fi
