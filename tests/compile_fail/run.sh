#!/usr/bin/env bash
# Builds the target of tests/compile_fail/policy_near_miss.cpp, which must fail, and checks that
# the compiler names every near-miss hook with imbus's message.
#   run.sh <cmake> <build dir> <target>
set -uo pipefail
cmake=$1 build=$2 target=$3
out=$("$cmake" --build "$build" --target "$target" 2>&1)
status=$?
if [ "$status" -eq 0 ]; then
  echo "compile_fail: $target compiled, but every policy in it has a hook with a wrong signature" >&2
  exit 1
fi
missing=0
for hook in channels still_valid on_event on_open on_close on_subscribe; do
  if ! grep -q "has a member named \`$hook\` that is not" <<<"$out"; then
    echo "compile_fail: no readable error for the near-miss \`$hook\`" >&2
    missing=1
  fi
done
if [ "$missing" -ne 0 ]; then
  echo "--- compiler output (head) ---" >&2
  head -60 <<<"$out" >&2
  exit 1
fi
echo "compile_fail: $target fails with imbus's message for each of the 6 hooks"
