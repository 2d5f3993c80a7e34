#!/usr/bin/env bash
# Builds imbus and runs all tests.
#   bash scripts/test.sh         g++, build/       (Debug)
#   bash scripts/test.sh asan    clang++, build-asan/ (AddressSanitizer + UBSan)
#   bash scripts/test.sh tsan    clang++, build-tsan/ (ThreadSanitizer)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD  # the exit trap below runs after the cd into the build directory

mode=${1:-}
case "$mode" in
  "")   build=build      cxx=g++     sanitize="" ;;
  asan) build=build-asan cxx=clang++ sanitize=address
        export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
        export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ;;
  tsan) build=build-tsan cxx=clang++ sanitize=thread
        export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 ;;
  *)    echo "usage: $0 [asan|tsan]" >&2; exit 2 ;;
esac

bash scripts/setup.sh

# Locally, the browser tests are skipped (with a CMake message) when Chromium, node or
# playwright-core is missing; in CI that is an error.
require_browser=OFF
[ "${CI:-}" = true ] && require_browser=ON

# The PostgreSQL tests need a server: without IMBUS_PG_CONNINFO, a throwaway cluster for this
# run (removed on exit). Where none can start, CMake leaves them out with a message; in CI
# they are required, so they fail instead.
require_postgres=OFF
[ "${CI:-}" = true ] && require_postgres=ON
if [ -z "${IMBUS_PG_CONNINFO:-}" ]; then
  if cluster=$(bash scripts/pg_cluster.sh start); then
    eval "$cluster"
    trap 'status=$?; bash "$root/scripts/pg_cluster.sh" stop "$IMBUS_PG_CLUSTER"; exit $status' EXIT
  else
    echo "test.sh: could not start a PostgreSQL cluster" >&2
  fi
fi

# Line tables only (-g1): enough for sanitizer reports and a failing test's stack, and the
# build is about a tenth shorter than with full debug information.
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-g1 -DCMAKE_CXX_COMPILER="$cxx" \
  -DIMBUS_SANITIZE="$sanitize" -DIMBUS_BUILD_BENCH=OFF -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
  -DIMBUS_REQUIRE_BROWSER_TESTS="$require_browser" -DIMBUS_REQUIRE_POSTGRES_TESTS="$require_postgres"
cmake --build "$build" -j2
cd "$build"
ctest --output-on-failure -j2
