#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (clang++, ASan + UBSan, build-fuzz/) and runs each
# for SECONDS_PER_TARGET seconds (default 30), one at a time, on a temporary copy of its seed
# corpus (tests/fuzz/corpus/<target>/ is never modified). Fails when a target crashes; the
# crashing input is kept under build-fuzz/artifacts/ and its path printed.
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]
# Needs clang and libclang-rt-14-dev (bash scripts/setup.sh installs them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${1:-30}
[[ $seconds =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2; }
targets=(fuzz_request fuzz_channel fuzz_http_routes fuzz_http_request fuzz_http_framing)
build=build-fuzz

command -v clang++ >/dev/null 2>&1 || { echo "fuzz.sh: clang++ not found (bash scripts/setup.sh)" >&2; exit 1; }
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DIMBUS_BUILD_FUZZERS=ON -DIMBUS_BUILD_TESTS=OFF -DIMBUS_BUILD_EXAMPLES=OFF \
  -DIMBUS_BUILD_BENCH=OFF -DIMBUS_INSTALL=OFF -DIMBUS_WITH_SQLITE=OFF >/dev/null
cmake --build "$build" -j2 --target "${targets[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

summary=()
failed=0
for t in "${targets[@]}"; do
  echo "fuzz.sh: $t for ${seconds}s"
  cp -r "tests/fuzz/corpus/$t" "$work/$t"
  artifacts="$build/artifacts/$t"
  mkdir -p "$artifacts"
  log="$build/$t.log"
  dict=()
  [ -f "tests/fuzz/$t.dict" ] && dict=(-dict="tests/fuzz/$t.dict")
  status=0
  # -timeout: an input taking 10 s is a bug too (a hang), not something to wait for.
  "$build/$t" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
    "${dict[@]}" -artifact_prefix="$artifacts/" "$work/$t" >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  if [ "$status" -eq 0 ]; then
    summary+=("$t: ${runs:-?} executions in ${took:-?} s, 0 crashes")
  else
    failed=1
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    summary+=("$t: CRASHED (exit $status) after ${runs:-?} executions; input: ${crash:-none written}; log: $log")
    grep -E "ERROR|SUMMARY|invariant broken" "$log" | head -5 >&2 || true
    [ -n "$crash" ] && echo "fuzz.sh: reproduce with: $build/$t $crash" >&2
  fi
done

echo
echo "==================== fuzz summary (${seconds}s per target) ===================="
printf '%s\n' "${summary[@]}"
exit "$failed"
