#!/usr/bin/env bash
# Builds tests/consumer against an imbus checkout in three ways, as users would:
#   1. add_subdirectory   2. find_package after `cmake --install`   3. FetchContent
# Works offline. Usage: run.sh <imbus_source_dir> <scratch_build_dir>
# Environment (set by the ctest entry): CMAKE, CXX, IMBUS_WITH_SQLITE.
set -euo pipefail

src=$(cd "$1" && pwd)
out=$2
cmake_bin=${CMAKE:-cmake}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)

common=(-DIMBUS_WITH_SQLITE="${IMBUS_WITH_SQLITE:-ON}")
if [ -n "${CXX:-}" ]; then common+=(-DCMAKE_CXX_COMPILER="$CXX"); fi

# Runs a command with its output in a log; shows the log only when it fails.
step() {
  local log="$out/step.log"
  if ! "$@" >"$log" 2>&1; then
    echo "FAILED: $*" >&2
    cat "$log" >&2
    exit 1
  fi
}

# consume <mode> <extra cmake args...>: configure, build and run the consumer.
# CONSUMER_DIR_SUFFIX tells two runs of one mode apart; CONSUMER_CONFIGURE_ONLY=1 stops after
# the configure (what a missing optional dependency used to break).
consume() {
  local mode=$1; shift
  local dir="$out/consumer-$mode${CONSUMER_DIR_SUFFIX:-}"
  step "$cmake_bin" -S "$here" -B "$dir" "${common[@]}" -DIMBUS_CONSUMER_MODE="$mode" "$@"
  if [ "${CONSUMER_CONFIGURE_ONLY:-0}" = 1 ]; then echo "ok: $mode${CONSUMER_DIR_SUFFIX:-} (configure)"; return; fi
  step "$cmake_bin" --build "$dir" -j2
  step "$dir/consumer"
  if [ "${IMBUS_WITH_SQLITE:-ON}" = ON ]; then
    step "$dir/consumer_sqlite"
  fi
  echo "ok: $mode"
}

consume subdirectory -DIMBUS_SOURCE_DIR="$src"
# A project that uses neither PostgreSQL nor TLS builds on a machine without libpq and OpenSSL.
hide=(-DCMAKE_DISABLE_FIND_PACKAGE_PostgreSQL=ON -DCMAKE_DISABLE_FIND_PACKAGE_OpenSSL=ON -DIMBUS_CONSUMER_WITHOUT_PQ_SSL=ON)
CONSUMER_DIR_SUFFIX=-no-pq-ssl CONSUMER_CONFIGURE_ONLY=1 consume subdirectory -DIMBUS_SOURCE_DIR="$src" "${hide[@]}"

step "$cmake_bin" -S "$src" -B "$out/imbus-build" "${common[@]}" \
  -DIMBUS_BUILD_TESTS=OFF -DIMBUS_BUILD_EXAMPLES=OFF -DIMBUS_BUILD_BENCH=OFF \
  -DCMAKE_INSTALL_PREFIX="$out/prefix"
step "$cmake_bin" --install "$out/imbus-build"
consume package -DCMAKE_PREFIX_PATH="$out/prefix"
CONSUMER_DIR_SUFFIX=-no-pq-ssl CONSUMER_CONFIGURE_ONLY=1 consume package -DCMAKE_PREFIX_PATH="$out/prefix" "${hide[@]}"
# Make sure the package came from our prefix, not from somewhere on the system.
if ! grep -qF "imbus_DIR:PATH=$out/prefix/" "$out/consumer-package/CMakeCache.txt"; then
  echo "FAILED: find_package(imbus) did not use $out/prefix" >&2
  grep '^imbus_DIR' "$out/consumer-package/CMakeCache.txt" >&2 || true
  exit 1
fi

consume fetchcontent -DFETCHCONTENT_SOURCE_DIR_IMBUS="$src" -DFETCHCONTENT_FULLY_DISCONNECTED=ON
