#!/usr/bin/env bash
# Fails on any C++ file of the repository that clang-format (.clang-format) would change;
# with --fix, rewrites them instead.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.cc' '*.h')
if [ "${1-}" = "--fix" ]; then
  clang-format -i "${files[@]}"
else
  clang-format --dry-run --Werror "${files[@]}" || {
    echo "check-format: the files above differ from .clang-format; scripts/check-format.sh --fix" >&2
    exit 1
  }
fi
