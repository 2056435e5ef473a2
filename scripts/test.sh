#!/usr/bin/env bash
# Installs dependencies, builds, and runs every test: the GoogleTest suites on a normal
# build (warnings are errors), the CI subset of qemu's iotests (tests/iotests/ci.txt), then the
# suites again under AddressSanitizer + UndefinedBehaviorSanitizer, then every libFuzzer
# target for a short time (scripts/fuzz.sh; VIMGFS_FUZZ_SECONDS per target). End-to-end
# mount tests need root, /dev/fuse and loop devices; without them they skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/check-format.sh

# qemu's source at the installed version: its iotests run below, and the oracle tests read
# its sample images (bochs, cloop, dmg, parallels, ...), which never enter the repository.
export VIMGFS_QEMU_SOURCE=$(scripts/iotests.sh --fetch | tail -1)

jobs=$(nproc)
scripts/build.sh build -DVIMGFS_WERROR=ON
(cd build && ctest --output-on-failure -j"$jobs" --timeout 1500)

# qemu's own iotests with vimgfs as qemu-img: the CI subset (docs/TESTING.md).
scripts/iotests.sh --ci

scripts/build.sh build-asan -DVIMGFS_SANITIZE=ON
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# The differential check test spawns thousands of processes; under the sanitizers a
# quarter of its mutants keeps it within the test timeout (the normal build ran them all).
export VIMGFS_CHECK_DIFF_SCALE=0.25
(cd build-asan && ctest --output-on-failure -j"$jobs" --timeout 1500)

# Every libFuzzer target (clang build in build-fuzz/) on seeds qemu-img makes, for
# VIMGFS_FUZZ_SECONDS each (default 20): about 5 minutes with the build.
scripts/fuzz.sh
