#!/usr/bin/env bash
# WebSocket benchmark: the imbus server side by side with the peers people would pick instead
# (Node `ws`, Socket.IO, uWebSockets.js, nginx + nchan) and with a "floor" (bench/floor_server.cpp:
# the least work a server can do to deliver the same frames). See bench/README.md.
#
#   bash bench/ws_bench.sh            # full run (~14 minutes on 2 cores), writes bench/RESULTS.md
#   bash bench/ws_bench.sh --quick    # tiny sizes, a smoke test: exits 1 if any delivery failed
#
# Options:
#   --quick              tiny sizes, one fan-out size and one latency rate; results go to
#                        build-bench/RESULTS.quick.md
#   --seconds S          publishing time of the fan-out, many-channels and latency runs (default 10; quick 2)
#   --systems LIST       comma-separated subset of: floor,memory1,sqlite1,memory2,ws,socketio,uws,nchan
#   --scenarios LIST     comma-separated subset of: fanout,channels,latency,idle,storm,pingflood,slowreaders
#                        (pingflood and slowreaders, the hostile clients, run for the imbus systems only;
#                        --quick runs them for one imbus system: memory1, or the first one listed)
#   --attack-seconds S   length of the pingflood and slowreaders attacks (default 30; quick 5)
#   --no-pin             do not pin (default: server on CPU 0, load generator on CPU 1 with taskset;
#                        imbus with 2 threads gets CPUs 0 and 1)
#   --out FILE           where to write the Markdown (default bench/RESULTS.md)
#   --no-build           use the binaries already in build-bench/
#   --no-install         do not install missing peers (npm ci in bench/peers, apt-get for nchan)
# Exit status: 0 when every run delivered every notification exactly once (reconnect storm: every
# client live again, nothing lost where the system resumes; pingflood, slowreaders: the canary got
# every notification), 1 otherwise.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build-bench
PEERS=$ROOT/bench/peers
QUICK=0
PIN=1
BUILD_IT=1
INSTALL=1
RUN_SECONDS=""
ATTACK_SECONDS=""
SYSTEMS="floor,memory1,sqlite1,memory2,ws,socketio,uws,nchan"
SCENARIOS="fanout,channels,latency,idle,storm,pingflood,slowreaders"
OUT=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) QUICK=1 ;;
    --pin) PIN=1 ;;
    --no-pin) PIN=0 ;;
    --no-build) BUILD_IT=0 ;;
    --no-install) INSTALL=0 ;;
    --seconds) RUN_SECONDS=$2; shift ;;
    --attack-seconds) ATTACK_SECONDS=$2; shift ;;
    --systems) SYSTEMS=$2; shift ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "ws_bench.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

if [[ $QUICK == 1 ]]; then
  : "${RUN_SECONDS:=2}"
  # One size and one rate of each: a smoke test of every system and scenario, not a measurement.
  FANOUT_SIZES="50"; CHANNEL_SUBS=200; LAT_SUBS=50; LAT_RATE=200; LAT_LOW_RATE=""; IDLE_CONNS=500
  STORM_SUBS=200; STORM_AWAY=100
  : "${ATTACK_SECONDS:=5}"; SLOW_READERS=50; SLOW_HISTORY=200
  : "${OUT:=$BUILD/RESULTS.quick.md}"
else
  : "${RUN_SECONDS:=10}"
  FANOUT_SIZES="1000 10000"; CHANNEL_SUBS=10000; LAT_SUBS=1000; LAT_RATE=1000; LAT_LOW_RATE=50; IDLE_CONNS=10000
  STORM_SUBS=10000; STORM_AWAY=1000
  : "${ATTACK_SECONDS:=30}"; SLOW_READERS=1000; SLOW_HISTORY=1000
  : "${OUT:=$ROOT/bench/RESULTS.md}"
fi
# Fan-out: enough POSTs in flight that the publisher's connect/answer round trips (each
# behind the load generator's subscriber reads) do not limit the rate; --window bounds queues.
FANOUT_PUBLISHERS=16
# ...and at most this many notifications per subscriber published but not yet delivered:
# enough backlog to keep the server busy, bounded so that the latency is not just queueing.
FANOUT_WINDOW=20
# Many channels: one delivery per publish, so the rate is the publish rate: more POSTs in
# flight, and at most this many notifications published but not yet delivered in all.
CHANNEL_PUBLISHERS=32
CHANNEL_WINDOW=1000
# Latency: paced publishes; this many may be in flight, so that a slow answer delays the
# next publish as little as possible (a publish that finds none free is late; see the table).
LATENCY_PUBLISHERS=64
# Reconnect storm: publishers of the notifications sent while the clients are away.
STORM_PUBLISHERS=16
# Hostile clients (pingflood, slowreaders): the busy channel gets SLOW_RATE publishes/s of
# SLOW_PAYLOAD bytes, after a history of SLOW_HISTORY that the readers ask for ("last": 1);
# imbus runs with this per-client outbound bound; the canary gets a publish every 20 ms.
SLOW_RATE=200
SLOW_PAYLOAD=1000
SLOW_MAX_OUTBOUND=262144
KEY=bench-key-$$
LOGS=$BUILD/ws_bench_logs
WORK=$(mktemp -d /tmp/ws_bench.XXXXXX)
chmod 711 "$WORK"  # nginx's worker runs unprivileged and keeps its temp files below it
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

IFS=, read -r -a SYSTEM_LIST <<< "$SYSTEMS"
IFS=, read -r -a SCENARIO_LIST <<< "$SCENARIOS"
for system in "${SYSTEM_LIST[@]}"; do
  case $system in floor|memory1|sqlite1|memory2|ws|socketio|uws|nchan) ;; *) echo "ws_bench.sh: unknown system $system" >&2; exit 2 ;; esac
done
for scenario in "${SCENARIO_LIST[@]}"; do
  case $scenario in fanout|channels|latency|idle|storm|pingflood|slowreaders) ;; *) echo "ws_bench.sh: unknown scenario $scenario" >&2; exit 2 ;; esac
done
has_system() { [[ ",$SYSTEMS," == *",$1,"* ]]; }
has_scenario() { [[ ",$SCENARIOS," == *",$1,"* ]]; }

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

# --- peers (installed from the registries, never committed) ------------------------------------
NCHAN_MODULE=/usr/lib/nginx/modules/ngx_nchan_module.so
UNAVAILABLE=""  # systems whose peer could not be installed

# npm ci into bench/peers/node_modules, again only when package-lock.json changed.
ensure_node_peers() {
  if ! command -v node > /dev/null || ! command -v npm > /dev/null; then
    say "node and npm are missing (Debian: apt-get install -y nodejs npm)"
    return 1
  fi
  local stamp=$PEERS/node_modules/.imbus-bench-lock want
  want=$(sha256sum "$PEERS/package-lock.json" | cut -d' ' -f1)
  [[ -f $stamp && $(cat "$stamp") == "$want" ]] && return 0
  [[ $INSTALL == 1 ]] || { say "bench/peers/node_modules is missing or stale (run without --no-install)"; return 1; }
  say "installing the Node peers: npm ci in bench/peers"
  if ! (cd "$PEERS" && npm ci --no-audit --no-fund --loglevel=error) > "$LOGS/npm-ci.log" 2>&1; then
    cat "$LOGS/npm-ci.log" >&2
    return 1
  fi
  echo "$want" > "$stamp"
}

# Debian nginx + nchan; the package must not leave its service running.
ensure_nchan() {
  command -v nginx > /dev/null && [[ -f $NCHAN_MODULE ]] && return 0
  [[ $INSTALL == 1 ]] || { say "nginx or $NCHAN_MODULE is missing (run without --no-install)"; return 1; }
  [[ $(id -u) == 0 ]] || { say "nginx + libnginx-mod-nchan are missing; installing them needs root"; return 1; }
  say "installing nginx + libnginx-mod-nchan (apt-get)"
  local policy=/usr/sbin/policy-rc.d made_policy=0 rc=0
  if [[ ! -e $policy ]]; then  # tell the package scripts not to start the service
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
  fi
  {
    DEBIAN_FRONTEND=noninteractive apt-get install -y nginx libnginx-mod-nchan ||
      { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nginx libnginx-mod-nchan; }
  } > "$LOGS/apt-nchan.log" 2>&1 || rc=$?
  [[ $made_policy == 1 ]] && rm -f "$policy"
  # Should the service have started anyway (no policy-rc.d honoured), stop it.
  if [[ -s /run/nginx.pid ]] && kill -0 "$(cat /run/nginx.pid)" 2> /dev/null; then
    say "stopping the nginx service the package started"
    nginx -s stop 2> /dev/null || true
  fi
  if [[ $rc != 0 ]] || [[ ! -f $NCHAN_MODULE ]]; then
    tail -20 "$LOGS/apt-nchan.log" >&2
    return 1
  fi
}

# python3 writes the report (bench/ws_report.py); a minimal Debian may lack it.
if ! command -v python3 > /dev/null; then
  [[ $INSTALL == 1 && $(id -u) == 0 ]] || { echo "ws_bench.sh: python3 is missing" >&2; exit 1; }
  say "installing python3 (apt-get)"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y python3 ||
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3; }; } > "$LOGS/apt-python.log" 2>&1 ||
    { tail -20 "$LOGS/apt-python.log" >&2; exit 1; }
fi

if has_system ws || has_system socketio || has_system uws; then
  if ! ensure_node_peers; then
    for s in ws socketio uws; do has_system "$s" && UNAVAILABLE+=" $s"; done
  fi
fi
if has_system nchan && ! ensure_nchan; then UNAVAILABLE+=" nchan"; fi
[[ -n $UNAVAILABLE ]] && say "not available, counted as failed:$UNAVAILABLE"

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
need=$(( IDLE_CONNS + 100 ))
if (( NOFILE < need )); then
  say "warning: ulimit -n is $NOFILE, the idle run needs about $need"
fi

if [[ $PIN == 1 ]] && ! { taskset -c 0 true && taskset -c 1 true; } 2>/dev/null; then
  say "warning: taskset cannot pin to CPUs 0 and 1 here: running unpinned"
  PIN=0
fi
server_cpus() {  # system
  [[ $PIN == 1 ]] || return 0
  if [[ $1 == memory2 ]]; then echo "taskset -c 0,1"; else echo "taskset -c 0"; fi
}
LOADGEN_CPUS=""
[[ $PIN == 1 ]] && LOADGEN_CPUS="taskset -c 1"

protocol_of() {
  case $1 in
    floor) echo floor ;;
    memory1|sqlite1|memory2) echo imbus ;;
    *) echo "$1" ;;
  esac
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
START_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')

# --- servers --------------------------------------------------------------------------------
PORT=""
METRIC_PID=""  # the process whose RSS and CPU time are measured (nginx: the worker)
IMBUS_EXTRA=()  # extra example_server options of the current run (slowreaders: the outbound bound)
# Every client of the bench comes from 127.0.0.1: no per-address limit (an older build has no flag).
OPEN=""
if { "$BUILD/example_server" --help 2>&1 || true; } | grep -q -- --max-connections-per-address; then OPEN="--max-connections-per-address 0"; fi
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
  say "$1 did not start, see $LOGS/$2.server.log"
  tail -20 "$LOGS/$2.server.log" >&2 || true
  return 1
}

start_server_once() {  # system run-name
  local system=$1 name=$2 log=$LOGS/$2.server.log cpus
  cpus=$(server_cpus "$system")
  PORT=$(free_port)
  METRIC_PID=""
  case $system in
    floor)   $cpus "$BUILD/floor_server" --port "$PORT" --api-key "$KEY" > "$log" 2>&1 & ;;
    memory1) $cpus "$BUILD/example_server" --port "$PORT" --api-key "$KEY" --store memory --threads 1 $OPEN ${IMBUS_EXTRA[@]+"${IMBUS_EXTRA[@]}"} > "$log" 2>&1 & ;;
    memory2) $cpus "$BUILD/example_server" --port "$PORT" --api-key "$KEY" --store memory --threads 2 $OPEN ${IMBUS_EXTRA[@]+"${IMBUS_EXTRA[@]}"} > "$log" 2>&1 & ;;
    sqlite1) rm -f "$WORK/$name.db"*
             $cpus "$BUILD/example_server" --port "$PORT" --api-key "$KEY" --store "sqlite:$WORK/$name.db" --threads 1 $OPEN ${IMBUS_EXTRA[@]+"${IMBUS_EXTRA[@]}"} > "$log" 2>&1 & ;;
    ws|socketio|uws)
             $cpus node "$PEERS/${system}_server.mjs" "$PORT" > "$log" 2>&1 & ;;
    nchan)   local dir=$WORK/nginx.$name
             rm -rf "$dir"; mkdir -p "$dir"; chmod 755 "$dir"
             sed "s#@PREFIX@#$dir#g; s#@PORT@#$PORT#g; s#@NOFILE@#$NOFILE#g" "$PEERS/nchan.conf" > "$dir/nginx.conf"
             $cpus nginx -c "$dir/nginx.conf" -p "$dir" > "$log" 2>&1 & ;;
  esac
  SERVER_PID=$!
  local up=0
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then up=1; break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.05
  done
  if [[ $up == 1 && $system == nchan ]]; then  # measure the (single) worker, not the master
    up=0
    for _ in $(seq 100); do
      METRIC_PID=$(cat "/proc/$SERVER_PID/task/$SERVER_PID/children" 2>/dev/null | awk '{print $1}')
      [[ -n $METRIC_PID ]] && { up=1; break; }
      sleep 0.05
    done
  fi
  if [[ $up == 1 ]]; then
    : "${METRIC_PID:=$SERVER_PID}"
    return 0
  fi
  stop_server "$system" "$name"
  return 1
}

stop_server() {  # system run-name
  [[ -n $SERVER_PID ]] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  if [[ $1 == nchan && -f $WORK/nginx.$2/error.log ]]; then
    cat "$WORK/nginx.$2/error.log" >> "$LOGS/$2.server.log"
    rm -rf "$WORK/nginx.$2"
  fi
  SERVER_PID=""
}

# One run: a fresh server (no leftovers in imbus's 50 s first-poll window), one loadgen run.
run() {  # system scenario loadgen-args...
  local system=$1 scenario=$2; shift 2
  local name=$scenario.$system line rc=0 mode=${scenario%%-*}
  if [[ " $UNAVAILABLE " == *" $system "* ]]; then
    echo "{\"system\":\"$system\",\"scenario\":\"$scenario\",\"mode\":\"$mode\",\"ok\":false,\"unavailable\":true}" >> "$RESULTS"
    return
  fi
  if ! start_server "$system" "$name"; then
    echo "{\"system\":\"$system\",\"scenario\":\"$scenario\",\"mode\":\"$mode\",\"ok\":false,\"no_server\":true}" >> "$RESULTS"
    return
  fi
  say "$system / $scenario: ws_loadgen $*"
  $LOADGEN_CPUS "$BUILD/ws_loadgen" "$@" --protocol "$(protocol_of "$system")" --port "$PORT" --api-key "$KEY" \
    --server-pid "$METRIC_PID" --label "$system" > "$WORK/out" 2> "$LOGS/$name.loadgen.log" || rc=$?
  stop_server "$system" "$name"
  line=$(grep '^{' "$WORK/out" | tail -1 || true)
  grep '^#' "$WORK/out" >&2 || true
  if [[ -z $line ]]; then
    say "$system / $scenario: no result (exit $rc), see $LOGS/$name.loadgen.log"
    tail -5 "$LOGS/$name.loadgen.log" >&2 || true
    line="{\"mode\":\"$mode\",\"label\":\"$system\",\"ok\":false}"
  fi
  local extra=""
  [[ ${#IMBUS_EXTRA[@]} -gt 0 && $(protocol_of "$system") == imbus ]] && extra="\"server_args\":\"${IMBUS_EXTRA[*]}\","
  echo "{\"system\":\"$system\",\"scenario\":\"$scenario\",$extra${line#\{}" >> "$RESULTS"
}

# Scenario by scenario, every system in turn: a change in the machine's load during the run
# then touches all systems of a table alike.
if has_scenario fanout; then
  for n in $FANOUT_SIZES; do
    for system in "${SYSTEM_LIST[@]}"; do
      run "$system" "fanout-$n" fanout --subscribers "$n" --seconds "$RUN_SECONDS" --publishers "$FANOUT_PUBLISHERS" \
        --window "$FANOUT_WINDOW"
    done
  done
fi
if has_scenario channels; then
  for system in "${SYSTEM_LIST[@]}"; do
    run "$system" "channels-$CHANNEL_SUBS" channels --subscribers "$CHANNEL_SUBS" --seconds "$RUN_SECONDS" \
      --publishers "$CHANNEL_PUBLISHERS" --window "$CHANNEL_WINDOW"
  done
fi
if has_scenario latency; then
  for rate in $LAT_RATE $LAT_LOW_RATE; do
    for system in "${SYSTEM_LIST[@]}"; do
      run "$system" "latency-$LAT_SUBS-$rate" latency --subscribers "$LAT_SUBS" --rate "$rate" --seconds "$RUN_SECONDS" \
        --publishers "$LATENCY_PUBLISHERS"
    done
  done
fi
if has_scenario idle; then
  for system in "${SYSTEM_LIST[@]}"; do
    run "$system" "idle-$IDLE_CONNS" idle --connections "$IDLE_CONNS" --settle 2
  done
fi
if has_scenario storm; then
  for system in "${SYSTEM_LIST[@]}"; do
    run "$system" "storm-$STORM_SUBS" storm --subscribers "$STORM_SUBS" --away "$STORM_AWAY" --publishers "$STORM_PUBLISHERS"
  done
fi
# Hostile clients: the imbus systems only (the peers and the floor have no outbound bounds to
# test); --quick: one of them.
HOSTILE_SYSTEMS=()
for system in "${SYSTEM_LIST[@]}"; do
  case $system in memory1|sqlite1|memory2) HOSTILE_SYSTEMS+=("$system") ;; esac
done
if [[ $QUICK == 1 && ${#HOSTILE_SYSTEMS[@]} -gt 1 ]]; then
  if has_system memory1; then HOSTILE_SYSTEMS=(memory1); else HOSTILE_SYSTEMS=("${HOSTILE_SYSTEMS[0]}"); fi
fi
if (has_scenario pingflood || has_scenario slowreaders) && [[ ${#HOSTILE_SYSTEMS[@]} -eq 0 ]]; then
  say "pingflood and slowreaders run for the imbus systems only (memory1, sqlite1, memory2): none selected"
fi
if has_scenario pingflood; then
  for system in ${HOSTILE_SYSTEMS[@]+"${HOSTILE_SYSTEMS[@]}"}; do
    run "$system" "pingflood-$ATTACK_SECONDS" pingflood --seconds "$ATTACK_SECONDS"
  done
fi
if has_scenario slowreaders && [[ ${#HOSTILE_SYSTEMS[@]} -gt 0 ]]; then
  # An example_server built before the option existed runs with its default bound (noted in the report).
  if { "$BUILD/example_server" --help 2>&1 || true; } | grep -q -- --max-outbound-bytes; then
    IMBUS_EXTRA=(--max-outbound-bytes "$SLOW_MAX_OUTBOUND")
  else
    say "warning: example_server has no --max-outbound-bytes: slowreaders runs with the server's default bound"
  fi
  for system in "${HOSTILE_SYSTEMS[@]}"; do
    run "$system" "slowreaders-$SLOW_READERS" slowreaders --readers "$SLOW_READERS" --history "$SLOW_HISTORY" \
      --rate "$SLOW_RATE" --payload-bytes "$SLOW_PAYLOAD" --seconds "$ATTACK_SECONDS"
  done
  IMBUS_EXTRA=()
fi
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ---------------------------------------------------------------------------------
peer_version() {  # npm package name in bench/peers/node_modules
  local f=$PEERS/node_modules/$1/package.json
  [[ -f $f ]] && sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$f" | head -1 || echo "?"
}
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
MEM_TOTAL=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain -- imbus.hpp 2>/dev/null | head -1 || true)
NODE_VERSION=$(node --version 2>/dev/null || echo none)
NGINX_VERSION=$(nginx -v 2>&1 | sed 's#.*nginx/##' || echo none)
NCHAN_VERSION=$(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null || echo none)
WS_VERSION=$(peer_version ws); SIO_VERSION=$(peer_version socket.io); UWS_VERSION=$(peer_version @trufflesuite/uws-js-unofficial)
export RESULTS QUICK RUN_SECONDS FANOUT_PUBLISHERS FANOUT_WINDOW CHANNEL_PUBLISHERS CHANNEL_WINDOW LATENCY_PUBLISHERS
export STORM_PUBLISHERS STORM_AWAY CPU_MODEL MEM_TOTAL COMMIT DIRTY LOAD_START LOAD_END START_DATE PIN NOFILE
export ATTACK_SECONDS SLOW_RATE SLOW_PAYLOAD SLOW_HISTORY SLOW_MAX_OUTBOUND
export NODE_VERSION NGINX_VERSION NCHAN_VERSION WS_VERSION SIO_VERSION UWS_VERSION
export KERNEL="$(uname -r)" NPROC="$(nproc)"
python3 "$ROOT/bench/ws_report.py" > "$WORK/report.md"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/report.md" "$OUT"
cat "$OUT"
say "wrote $OUT (logs in $LOGS)"
if grep -q '"ok":false' "$RESULTS"; then
  say "FAILED: at least one run did not deliver every notification exactly once (see the tables)"
  exit 1
fi
say "PASS: every run delivered every notification exactly once"
