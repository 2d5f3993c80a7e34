#!/usr/bin/env bash
# Soak test: example_server under a long steady load with connection churn (bench/README.md).
#
#   bash bench/soak.sh                                   # 300 s, 5,000 connections, memory store
#   bash bench/soak.sh --seconds 30 --connections 500    # the short run of .ci/run
#   bash bench/soak.sh --store sqlite
#
# Options:
#   --seconds S          publishing time (default 300); the RSS baseline is taken S/3 into it
#   --connections N      WebSocket connections, each on "p<i>" and "shared" (default 5000)
#   --store memory|sqlite
#   --rate R             personal-channel publishes per second (default 200)
#   --shared-rate R      shared-channel publishes per second (default 5)
#   --churn D            abrupt disconnects per second (default N/60: each connection about once a minute)
#   --no-build           use the binaries already in build-bench/
# The server keeps notifications for max(5, min(60, S/6)) s (--retention), so that its memory
# reaches a steady state during the warm-up instead of growing with the 24 h default.
# Exit status: 0 when every connection received every id of its channels exactly once, no fd
# leaked and RSS stayed within the tolerance after the warm-up; 1 otherwise.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build-bench
SECONDS_RUN=300
CONNECTIONS=5000
STORE=memory
RATE=200
SHARED_RATE=5
CHURN=""
BUILD_IT=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --seconds) SECONDS_RUN=$2; shift ;;
    --connections) CONNECTIONS=$2; shift ;;
    --store) STORE=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --shared-rate) SHARED_RATE=$2; shift ;;
    --churn) CHURN=$2; shift ;;
    --no-build) BUILD_IT=0 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "soak.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
case $STORE in memory|sqlite) ;; *) echo "soak.sh: --store memory or sqlite" >&2; exit 2 ;; esac
: "${CHURN:=$(( CONNECTIONS / 60 > 0 ? CONNECTIONS / 60 : 1 ))}"
RETENTION=$(( SECONDS_RUN / 6 ))
(( RETENTION < 5 )) && RETENTION=5
(( RETENTION > 60 )) && RETENTION=60
# The SQLite store keeps up to 4 idle reader connections for polls (a database and a WAL fd
# each) that a busy run opens and an idle server does not have yet.
FD_TOLERANCE=0
[[ $STORE == sqlite ]] && FD_TOLERANCE=8

say() { echo "soak: $*" >&2; }
WORK=$(mktemp -d /tmp/imbus-soak.XXXXXX)
SERVER_PID=""
cleanup() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ $BUILD_IT == 1 ]]; then
  say "building Release in $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DIMBUS_BUILD_TESTS=OFF > "$WORK/cmake.log" 2>&1 ||
    { cat "$WORK/cmake.log" >&2; exit 1; }
  cmake --build "$BUILD" -j2 --target example_server ws_loadgen > "$WORK/build.log" 2>&1 ||
    { cat "$WORK/build.log" >&2; exit 1; }
fi
for b in example_server ws_loadgen; do
  [[ -x $BUILD/$b ]] || { echo "soak.sh: $BUILD/$b is missing" >&2; exit 1; }
done
command -v python3 > /dev/null || { echo "soak.sh: python3 is needed for the summary" >&2; exit 1; }

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
need=$(( CONNECTIONS + 200 ))
(( $(ulimit -n) < need )) && say "warning: ulimit -n is $(ulimit -n), $CONNECTIONS connections need about $need"

KEY=soak-key-$$
store_arg=memory
[[ $STORE == sqlite ]] && store_arg="sqlite:$WORK/soak.db"
"$BUILD/example_server" --port 0 --api-key "$KEY" --store "$store_arg" --retention "$RETENTION" \
  --max-connections-per-address 0 \
  --gc-interval "$RETENTION" > "$WORK/server.out" 2> "$WORK/server.log" &
SERVER_PID=$!
PORT=""
for _ in $(seq 100); do
  PORT=$(sed -n '1s#.*127\.0\.0\.1:\([0-9]*\).*#\1#p' "$WORK/server.out" 2>/dev/null || true)
  [[ -n $PORT ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.1
done
[[ -n $PORT ]] || { say "the server did not start"; cat "$WORK/server.log" >&2; exit 1; }
say "example_server (store $STORE, retention $RETENTION s) on port $PORT, pid $SERVER_PID"

rc=0
"$BUILD/ws_loadgen" soak --port "$PORT" --api-key "$KEY" --server-pid "$SERVER_PID" --connections "$CONNECTIONS" \
  --seconds "$SECONDS_RUN" --rate "$RATE" --shared-rate "$SHARED_RATE" --churn "$CHURN" --fd-tolerance "$FD_TOLERANCE" \
  --label "$STORE" > "$WORK/result" || rc=$?
LINE=$(grep '^{' "$WORK/result" | tail -1 || true)
grep '^#' "$WORK/result" >&2 || true
if [[ -z $LINE ]]; then
  say "no result from ws_loadgen (exit $rc)"
  exit 1
fi
echo "$LINE"
SOAK_JSON=$LINE SOAK_STORE=$STORE SOAK_RETENTION=$RETENTION python3 - <<'EOF'
import json, os
r = json.loads(os.environ["SOAK_JSON"])
mib = lambda k: "%.1f MiB" % (r[k] / 1024.0)
print()
print("## Soak: %d connections, %s s, %s store (retention %s s)" % (r["connections"], r["seconds"], os.environ["SOAK_STORE"], os.environ["SOAK_RETENTION"]))
print()
print("| figure | value |")
print("|---|---|")
rows = [
    ("published (personal %s/s + shared %s/s)" % (r["rate"], r["shared_rate"]), "%d (errors %d, late %d)" % (r["published"], r["publish_errors"], r["late_publishes"])),
    ("abrupt disconnects (RST)", "%d (%d)" % (r["drops"], r["rst_drops"])),
    ("delivered / expected", "%d / %d" % (r["delivered"], r["expected"])),
    ("lost, duplicated, missed markers", "%d, %d, %d" % (r["lost"], r["duplicates"], r["missed_markers"])),
    ("closed by the server", "%d" % r["closed_by_server"]),
    ("server RSS idle / after warm-up (%s s) / end / max" % r["warmup_s"], "%s / %s / %s / %s" % (mib("rss_idle_kib"), mib("rss_warm_kib"), mib("rss_end_kib"), mib("rss_max_kib"))),
    ("RSS growth after warm-up (allowed)", "%s (%s)" % (mib("rss_growth_kib"), mib("rss_allowed_kib"))),
    ("server fds idle / max / after closing all", "%d / %d / %d (tolerance %d)" % (r["fd_idle"], r["fd_max"], r["fd_end"], r["fd_tolerance"])),
    ("result", "PASS" if r["ok"] else "FAIL"),
]
for k, v in rows:
    print("| %s | %s |" % (k, v))
EOF
if [[ $rc != 0 ]]; then
  say "FAILED (see the table); the end of the server log:"
  tail -20 "$WORK/server.log" >&2 || true
  exit 1
fi
say "PASS"
