#!/usr/bin/env bash
# Builds and runs the demo (examples/outbox.cpp). Arguments go to the program.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -f examples/outbox.cpp ]; then
  echo "demo.sh: examples/outbox.cpp does not exist yet" >&2
  exit 1
fi

bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=g++ -DIMBUS_BUILD_BENCH=OFF
cmake --build build -j2 --target example_outbox
cd build
exec ./example_outbox "$@"
