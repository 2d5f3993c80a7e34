#!/usr/bin/env bash
# WebSocket benchmark of the imbus server against a "floor" (bench/floor_server.cpp: the least
# work a server can do to deliver the same frames). See bench/README.md.
#
#   bash bench/ws_bench.sh            # full run (~8 minutes), writes bench/WS_RESULTS.md
#   bash bench/ws_bench.sh --quick    # tiny sizes, a smoke test: exits 1 if any delivery failed
#
# Options:
#   --quick              tiny sizes; results go to build-bench/WS_RESULTS.quick.md
#   --seconds S          publishing time of the fan-out and latency runs (default 10; quick 2)
#   --systems LIST       comma-separated subset of: floor,memory1,sqlite1,memory2
#   --pin                pin the server to CPU 0 and the load generator to CPU 1 (taskset);
#                        default: no pinning, both processes share both cores
#   --out FILE           where to write the Markdown (default bench/WS_RESULTS.md)
#   --no-build           use the binaries already in build-bench/
# Exit status: 0 when every run delivered every notification exactly once, 1 otherwise.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build-bench
QUICK=0
PIN=0
BUILD_IT=1
RUN_SECONDS=""
SYSTEMS="floor,memory1,sqlite1,memory2"
OUT=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) QUICK=1 ;;
    --pin) PIN=1 ;;
    --no-build) BUILD_IT=0 ;;
    --seconds) RUN_SECONDS=$2; shift ;;
    --systems) SYSTEMS=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "ws_bench.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if [[ $QUICK == 1 ]]; then
  : "${RUN_SECONDS:=2}"
  FANOUT_SIZES="50 200"; LAT_SUBS=50; LAT_RATE=200; LAT_LOW_RATE=20; IDLE_CONNS=500
  : "${OUT:=$BUILD/WS_RESULTS.quick.md}"
else
  : "${RUN_SECONDS:=10}"
  FANOUT_SIZES="1000 10000"; LAT_SUBS=1000; LAT_RATE=1000; LAT_LOW_RATE=50; IDLE_CONNS=10000
  : "${OUT:=$ROOT/bench/WS_RESULTS.md}"
fi
# Fan-out: enough POSTs in flight that the publisher's connect/answer round trips (each
# behind the load generator's subscriber reads) do not limit the rate; --window bounds queues.
FANOUT_PUBLISHERS=16
# ...and at most this many notifications per subscriber published but not yet delivered:
# enough backlog to keep the server busy, bounded so that the latency is not just queueing.
FANOUT_WINDOW=20
# Latency: paced publishes; this many may be in flight, so that a slow answer delays the
# next publish as little as possible (a publish that finds none free is late; see the table).
LATENCY_PUBLISHERS=64
KEY=bench-key-$$
LOGS=$BUILD/ws_bench_logs
WORK=$(mktemp -d /tmp/ws_bench.XXXXXX)
RESULTS=$WORK/results.jsonl
: > "$RESULTS"

SERVER_PID=""
cleanup() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    sleep 0.5
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { echo "ws_bench: $*" >&2; }

# --- build --------------------------------------------------------------------------------
if [[ $BUILD_IT == 1 ]]; then
  say "building Release in $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DIMBUS_BUILD_TESTS=OFF > "$WORK/cmake.log" 2>&1 ||
    { cat "$WORK/cmake.log" >&2; exit 1; }
  cmake --build "$BUILD" -j2 --target example_server ws_loadgen floor_server > "$WORK/build.log" 2>&1 ||
    { cat "$WORK/build.log" >&2; exit 1; }
fi
for b in example_server ws_loadgen floor_server; do
  [[ -x $BUILD/$b ]] || { echo "ws_bench.sh: $BUILD/$b is missing" >&2; exit 1; }
done
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
need=$(( IDLE_CONNS + 100 ))
if (( NOFILE < need )); then
  say "warning: ulimit -n is $NOFILE, the idle run needs about $need"
fi

SERVER_CPUS=""; LOADGEN_CPUS=""
if [[ $PIN == 1 ]]; then SERVER_CPUS="taskset -c 0"; LOADGEN_CPUS="taskset -c 1"; fi

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
START_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')

# --- servers --------------------------------------------------------------------------------
PORT=""
free_port() {
  local p
  for _ in $(seq 50); do
    p=$(( 20000 + RANDOM % 12000 ))  # below the ephemeral range (32768-60999 by default)
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  echo "ws_bench.sh: no free port" >&2; exit 1
}

start_server() {  # system run-name
  local attempt
  for attempt in 1 2 3; do
    start_server_once "$@" && return 0
  done
  echo "ws_bench.sh: $1 did not start, see $LOGS/$2.server.log" >&2
  cat "$LOGS/$2.server.log" >&2
  exit 1
}

start_server_once() {  # system run-name
  local system=$1 name=$2 log=$LOGS/$2.server.log
  PORT=$(free_port)
  case $system in
    floor)   $SERVER_CPUS "$BUILD/floor_server" --port "$PORT" --api-key "$KEY" > "$log" 2>&1 & ;;
    memory1) $SERVER_CPUS "$BUILD/example_server" --port "$PORT" --api-key "$KEY" --store memory --threads 1 > "$log" 2>&1 & ;;
    memory2) $SERVER_CPUS "$BUILD/example_server" --port "$PORT" --api-key "$KEY" --store memory --threads 2 > "$log" 2>&1 & ;;
    sqlite1) rm -f "$WORK/$name.db"*
             $SERVER_CPUS "$BUILD/example_server" --port "$PORT" --api-key "$KEY" --store "sqlite:$WORK/$name.db" --threads 1 > "$log" 2>&1 & ;;
    *) echo "ws_bench.sh: unknown system $system" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.05
  done
  stop_server
  return 1
}

stop_server() {
  [[ -n $SERVER_PID ]] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

# One run: a fresh server (no leftovers in the 50 s first-poll window), one loadgen run.
run() {  # system scenario loadgen-args...
  local system=$1 scenario=$2; shift 2
  local name=$scenario.$system line rc=0
  start_server "$system" "$name"
  say "$system / $scenario: ws_loadgen $*"
  $LOADGEN_CPUS "$BUILD/ws_loadgen" "$@" --port "$PORT" --api-key "$KEY" --server-pid "$SERVER_PID" \
    --label "$system" > "$WORK/out" 2> "$LOGS/$name.loadgen.log" || rc=$?
  stop_server
  line=$(grep '^{' "$WORK/out" | tail -1 || true)
  grep '^#' "$WORK/out" >&2 || true
  if [[ -z $line ]]; then
    say "$system / $scenario: no result (exit $rc), see $LOGS/$name.loadgen.log"
    tail -5 "$LOGS/$name.loadgen.log" >&2 || true
    line="{\"mode\":\"${scenario%%-*}\",\"label\":\"$system\",\"ok\":false}"
  fi
  echo "{\"system\":\"$system\",\"scenario\":\"$scenario\",${line#\{}" >> "$RESULTS"
}

# Scenario by scenario, every system in turn: a change in the machine's load during the run
# then touches all systems of a table alike.
IFS=, read -r -a SYSTEM_LIST <<< "$SYSTEMS"
for n in $FANOUT_SIZES; do
  for system in "${SYSTEM_LIST[@]}"; do
    run "$system" "fanout-$n" fanout --subscribers "$n" --seconds "$RUN_SECONDS" --publishers "$FANOUT_PUBLISHERS" \
      --window "$FANOUT_WINDOW"
  done
done
for rate in $LAT_RATE $LAT_LOW_RATE; do
  for system in "${SYSTEM_LIST[@]}"; do
    run "$system" "latency-$LAT_SUBS-$rate" latency --subscribers "$LAT_SUBS" --rate "$rate" --seconds "$RUN_SECONDS" \
      --publishers "$LATENCY_PUBLISHERS"
  done
done
for system in "${SYSTEM_LIST[@]}"; do
  run "$system" "idle-$IDLE_CONNS" idle --connections "$IDLE_CONNS" --settle 2
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ---------------------------------------------------------------------------------
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
MEM_TOTAL=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain -- imbus.hpp 2>/dev/null | head -1)
export ROOT RESULTS QUICK RUN_SECONDS FANOUT_PUBLISHERS FANOUT_WINDOW LATENCY_PUBLISHERS CPU_MODEL MEM_TOTAL COMMIT DIRTY LOAD_START LOAD_END START_DATE PIN NOFILE
export KERNEL="$(uname -r)" NPROC="$(nproc)"
python3 - > "$WORK/report.md" <<'PY'
import json, os
rows = [json.loads(l) for l in open(os.environ["RESULTS"]) if l.strip()]
E = os.environ
names = {"floor": "floor (bench/floor_server)", "memory1": "imbus, memory store, 1 thread",
         "sqlite1": "imbus, SQLite store, 1 thread", "memory2": "imbus, memory store, 2 threads"}
out = []
p = out.append
p("# imbus WebSocket benchmark" + (" (quick smoke run)" if E["QUICK"] == "1" else ""))
p("")
p(f"Generated by `bash bench/ws_bench.sh{' --quick' if E['QUICK'] == '1' else ''}` on {E['START_DATE']}, "
  f"imbus commit {E['COMMIT']}{' + local changes to imbus.hpp' if E['DIRTY'] else ''}, Release build.")
p("")
p(f"- Machine: {E['NPROC']} CPUs ({E['CPU_MODEL']}), {E['MEM_TOTAL']}, Linux {E['KERNEL']}, `ulimit -n` {E['NOFILE']}.")
p(f"- Load average (1/5/15 min) at start: {E['LOAD_START']}; at end: {E['LOAD_END']}. Other work on the "
  "machine takes CPU from both the server and the load generator: compare figures of one run only.")
p(f"- Pinning: {'server on CPU 0, load generator on CPU 1' if E['PIN'] == '1' else 'none (server and load generator share both cores)'}.")
p("- Every run starts a fresh server (SQLite: a new database file) on 127.0.0.1 and one `bench/ws_loadgen` "
  "process (single-threaded Asio, hand-written client framing). Subscribers send "
  "`{\"event_name\":\"subscribe\",\"data\":{\"channels\":[\"bench\"],\"last\":0}}`; a warm-up notification must "
  "reach all of them before the timed phase. Publishers POST `/bus/send` (a new TCP connection per POST) "
  "with a ~100-byte payload carrying the CLOCK_MONOTONIC send time. Server and load generator each run on "
  "one thread (imbus 2 threads: two), so on 2 cores they compete with each other and with any other load.")
p("- **ratio** = figure ÷ the floor's figure in the same scenario. Throughput: above 1 is better than the "
  "floor. Latency and memory: above 1 is worse.")
p("- **complete**: every subscriber received every published notification exactly once (ids checked: "
  "no gap, no duplicate). Stragglers are awaited until everything arrived or nothing arrived for 3 s.")
p("")

by = {}
for r in rows: by.setdefault(r["scenario"], []).append(r)
def f(v, d=0):
    if v is None: return "–"
    return f"{v:,.{d}f}"
def ratio(v, base):
    if v is None or base in (None, 0): return "–"
    return f"{v / base:.2f}"
def floor_of(rs, key):
    for r in rs:
        if r["system"] == "floor": return r.get(key)
    return None
def complete(r):
    if r.get("ok"): return "yes"
    if "expected" not in r: return "**FAILED**"
    return f"**NO** ({r.get('delivered', 0):,}/{r.get('expected', 0):,}, dup {r.get('duplicates', 0)}, closed {r.get('closed_by_server', 0)})"

fail = False
for scenario, rs in by.items():
    kind = scenario.split("-")[0]
    if kind == "fanout":
        n = scenario.split("-")[1]
        p(f"## Fan-out, {int(n):,} subscribers, publishing for {E['RUN_SECONDS']} s as fast as accepted")
        p("")
        p(f"{E['FANOUT_PUBLISHERS']} publisher connections at once. "
          f"Publishers pause while more than {E['FANOUT_WINDOW']} notifications per subscriber are published but not yet "
          f"delivered (`--window {E['FANOUT_WINDOW']}`), so queues stay bounded and the figure is a sustained rate; the "
          "latency here is mostly time spent in that queue. deliveries/s = "
          "notifications received by all subscribers ÷ (first publish → last delivery).")
        p("")
        p("| system | deliveries/s | ratio | published/s | ratio | latency p50 ms | ratio | p99 ms | ratio | max ms | notifications/frame | server CPU s | loadgen CPU s | complete |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rs:
            p(f"| {names.get(r['system'], r['system'])} | {f(r.get('deliveries_per_s'))} | {ratio(r.get('deliveries_per_s'), floor_of(rs, 'deliveries_per_s'))} "
              f"| {f(r.get('published_per_s'))} | {ratio(r.get('published_per_s'), floor_of(rs, 'published_per_s'))} "
              f"| {f(r.get('lat_p50_ms'), 2)} | {ratio(r.get('lat_p50_ms'), floor_of(rs, 'lat_p50_ms'))} "
              f"| {f(r.get('lat_p99_ms'), 2)} | {ratio(r.get('lat_p99_ms'), floor_of(rs, 'lat_p99_ms'))} "
              f"| {f(r.get('lat_max_ms'), 1)} | {f(r.get('notifications_per_frame'), 2)} "
              f"| {f(r.get('server_cpu_s'), 1)} | {f(r.get('loadgen_cpu_s'), 1)} | {complete(r)} |")
            fail |= not r.get("ok")
    elif kind == "latency":
        _, n, rate = scenario.split("-")
        p(f"## Latency, {int(n):,} subscribers, {int(rate):,} publishes/s for {E['RUN_SECONDS']} s "
          f"({int(n) * int(rate):,} deliveries/s asked)")
        p("")
        p(f"Latency = receive time in the load generator − send time written by the publisher into the payload, "
          f"over every delivery. Publishes are paced (up to {E['LATENCY_PUBLISHERS']} POSTs in flight); a publish due "
          "while all are busy waits (**late**), and those still waiting at the end are dropped, so "
          "published/s below the asked rate means the system (or the machine) could not keep up. Latency "
          "is measured from the actual send, so waiting publishes are not in it. POST answer: connect + "
          "request + answer of `/bus/send`, as the publisher sees it.")
        p("")
        p("| system | published/s | late | delivered/s | p50 ms | ratio | p99 ms | ratio | max ms | ratio | POST answer p50 / p99 ms | last delivery after last publish (s) | notifications/frame | server CPU s | complete |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rs:
            p(f"| {names.get(r['system'], r['system'])} | {f(r.get('published_per_s'))} | {f(r.get('late_publishes'))} | {f(r.get('deliveries_per_s'))} "
              f"| {f(r.get('lat_p50_ms'), 2)} | {ratio(r.get('lat_p50_ms'), floor_of(rs, 'lat_p50_ms'))} "
              f"| {f(r.get('lat_p99_ms'), 2)} | {ratio(r.get('lat_p99_ms'), floor_of(rs, 'lat_p99_ms'))} "
              f"| {f(r.get('lat_max_ms'), 1)} | {ratio(r.get('lat_max_ms'), floor_of(rs, 'lat_max_ms'))} "
              f"| {f(r.get('post_p50_ms'), 1)} / {f(r.get('post_p99_ms'), 1)} "
              f"| {f(r.get('drain_after_last_answer_s'), 2)} | {f(r.get('notifications_per_frame'), 2)} "
              f"| {f(r.get('server_cpu_s'), 1)} | {complete(r)} |")
            fail |= not r.get("ok")
    elif kind == "idle":
        n = scenario.split("-")[1]
        p(f"## Idle memory, {int(n):,} subscribed connections")
        p("")
        p("Server VmRSS before the first connection and 2 s after all connections subscribed and received one "
          "warm-up notification.")
        p("")
        p("| system | RSS before MiB | RSS after MiB | KiB per connection | ratio | connect time s | ok |")
        p("|---|---:|---:|---:|---:|---:|---|")
        for r in rs:
            b, a = r.get("rss_before_kib"), r.get("rss_after_kib")
            p(f"| {names.get(r['system'], r['system'])} | {f(b / 1024 if b else None, 1)} | {f(a / 1024 if a else None, 1)} "
              f"| {f(r.get('kib_per_connection'), 2)} | {ratio(r.get('kib_per_connection'), floor_of(rs, 'kib_per_connection'))} "
              f"| {f(r.get('connect_seconds'), 2)} | {'yes' if r.get('ok') else '**NO**'} |")
            fail |= not r.get("ok")
    p("")
p("Raw results (one JSON line per run):")
p("")
p("```")
for r in rows: p(json.dumps(r, separators=(",", ":")))
p("```")
print("\n".join(out))
PY
cp "$WORK/report.md" "$OUT"
cat "$OUT"
say "wrote $OUT (logs in $LOGS)"
if grep -q '"ok":false' "$RESULTS"; then
  say "FAILED: at least one run did not deliver every notification exactly once"
  exit 1
fi
say "PASS: every run delivered every notification exactly once"
