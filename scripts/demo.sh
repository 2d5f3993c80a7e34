#!/usr/bin/env bash
# The live demo: installs what is missing, builds the chat server (examples/chat/) and the outbox
# example in build-demo/, then serves the chat on http://127.0.0.1:${PORT:-8080}/ (Ctrl-C stops it).
# Arguments go to the chat server (e.g. --host 0.0.0.0). The session secret is kept in
# build-demo/chat.secret, so logins survive a restart; the data is build-demo/chat.db.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh --demo  # the compiler and the chat's libraries, not the test tool chain
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=g++ \
      -DIMBUS_BUILD_TESTS=OFF -DIMBUS_BUILD_BENCH=OFF -DIMBUS_WITH_POSTGRES=OFF -DIMBUS_WITH_TLS=OFF >/dev/null
cmake --build build-demo -j2 --target example_chat example_outbox

secret_file=build-demo/chat.secret
if [ ! -s "$secret_file" ]; then
  (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret_file")
fi

echo "The outbox pattern on its own (a message row and its notification in one SQLite transaction):"
echo "    build-demo/example_outbox"
echo "Open the chat in two browsers (or a private window) to talk to yourself."
# The secret goes through the environment, not the command line (where ps would show it).
IMBUS_CHAT_SECRET="$(cat "$secret_file")" exec build-demo/example_chat \
  --host 127.0.0.1 --port "${PORT:-8080}" --data build-demo/chat.db "$@"
