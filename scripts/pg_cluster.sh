#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the imbus tests, on a free loopback port.
#   eval "$(bash scripts/pg_cluster.sh start)"   initdb + start; prints the exports:
#        IMBUS_PG_CONNINFO (what the tests connect to) and IMBUS_PG_CLUSTER (its directory)
#   bash scripts/pg_cluster.sh stop [DIR]        stops it and removes DIR ($IMBUS_PG_CLUSTER)
# initdb refuses to run as root: as root the cluster runs as the `postgres` user. The machine's
# default cluster (port 5432) is never touched.
set -euo pipefail

bin=${IMBUS_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -x "$bin/initdb" ] || { echo "pg_cluster.sh: no PostgreSQL server found (Debian: apt-get install postgresql)" >&2; exit 1; }

as_owner=()
[ "$(id -u)" -eq 0 ] && as_owner=(runuser -u postgres --)

case "${1:-}" in
  start)
    dir=$(mktemp -d /tmp/imbus-pg-XXXXXX)
    [ ${#as_owner[@]} -gt 0 ] && chown postgres: "$dir"
    "${as_owner[@]}" "$bin/initdb" -D "$dir/data" -U postgres -A trust --no-sync -E UTF8 --locale=C.UTF-8 \
      >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; rm -rf "$dir"; exit 1; }
    # A random high port; if something already listens there, pg_ctl fails and we try another.
    started=""
    for _ in 1 2 3 4 5 6 7 8; do
      port=$((20000 + RANDOM % 40000))
      if "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 30 -o \
           "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" \
           start >/dev/null 2>&1; then
        started=yes
        break
      fi
    done
    if [ -z "$started" ]; then
      cat "$dir/log" >&2
      rm -rf "$dir"
      exit 1
    fi
    echo "export IMBUS_PG_CONNINFO='host=127.0.0.1 port=$port user=postgres dbname=postgres'"
    echo "export IMBUS_PG_CLUSTER='$dir'"
    ;;
  stop)
    dir=${2:-${IMBUS_PG_CLUSTER:-}}
    [ -n "$dir" ] && [ -d "$dir/data" ] || { echo "pg_cluster.sh: no cluster directory given" >&2; exit 1; }
    "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    rm -rf "$dir"
    ;;
  *)
    echo "usage: $0 start|stop [DIR]" >&2
    exit 2
    ;;
esac
