#!/usr/bin/env bash
# Installs what imbus's build and tests need: the Debian packages, then the browser tests'
# npm package (playwright-core, from tests/browser/package-lock.json). Idempotent: calls apt
# only for missing packages and npm only when tests/browser/node_modules is missing or older
# than the lock file. Uses sudo when not run as root.
#   bash scripts/setup.sh          everything (scripts/test.sh)
#   bash scripts/setup.sh --demo   only what the chat demo's build needs (scripts/demo.sh)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

case "${1:-}" in
  "") demo=false ;;
  --demo) demo=true ;;
  *) echo "usage: $0 [--demo]" >&2; exit 2 ;;
esac

# The demo (examples/chat, examples/outbox.cpp): a compiler, CMake and the headers and libraries
# of imbus::server and imbus::sqlite. demo.sh configures without PostgreSQL, TLS and the tests.
packages=(
  build-essential cmake
  libasio-dev libwebsocketpp-dev nlohmann-json3-dev libsqlite3-dev
)
if [ "$demo" = false ]; then
  packages+=(
    clang libclang-rt-14-dev doctest-dev libpq-dev
    libssl-dev openssl  # wss:// (imbus::tls) and the TLS tests' throwaway certificates
    postgresql  # the PostgreSQL tests run on a throwaway cluster (scripts/pg_cluster.sh)
    chromium  # the browser tests (tests/browser) drive /usr/bin/chromium
  )
  # Debian's nodejs/npm only where there is no node or npm at all: a node from elsewhere (e.g.
  # NodeSource) ships its own npm, which Debian's npm package would conflict with.
  command -v node >/dev/null 2>&1 || packages+=(nodejs)
  command -v npm >/dev/null 2>&1 || packages+=(npm)
fi

fail() {
  echo "setup.sh: $*" >&2
  exit 1
}

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup.sh: not a Debian/Ubuntu system; install the equivalents of:" >&2
  echo "  ${packages[*]}" >&2
else
  missing=()
  for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    [[ $status == ii* ]] || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
      command -v sudo >/dev/null 2>&1 || fail "need root or sudo to install: ${missing[*]}"
      sudo=(sudo)
    fi
    echo "setup.sh: installing ${missing[*]}"
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    if ! { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
           "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } >"$log" 2>&1; then
      cat "$log" >&2
      fail "package installation failed"
    fi
  fi
fi

if [ "$demo" = true ]; then exit 0; fi  # the demo needs no npm package

# playwright-core for the browser tests, exactly as locked. Without it CMake skips the browser
# tests with a message (CI, which configures with IMBUS_REQUIRE_BROWSER_TESTS=ON, fails instead).
browser="$root/tests/browser"
if [ ! -f "$browser/node_modules/.package-lock.json" ] ||
   [ "$browser/package-lock.json" -nt "$browser/node_modules/.package-lock.json" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    [ "${CI:-}" = true ] && fail "npm not found: cannot install the browser tests' playwright-core"
    echo "setup.sh: npm not found; the browser tests will be skipped" >&2
  else
    echo "setup.sh: npm ci in tests/browser (playwright-core)"
    if ! (cd "$browser" && npm ci --no-audit --no-fund --loglevel=error); then
      [ "${CI:-}" = true ] && fail "npm ci in tests/browser failed"
      echo "setup.sh: npm ci in tests/browser failed; the browser tests will be skipped" >&2
    fi
  fi
fi
