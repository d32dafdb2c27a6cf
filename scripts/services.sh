#!/usr/bin/env bash
# scripts/services.sh — private PostgreSQL 15 and Redis instances for the worker tests.
#
#   scripts/services.sh start DIR    start both on free 127.0.0.1 ports, data in DIR; write DIR/env
#   scripts/services.sh stop DIR     stop both and remove DIR
#   scripts/services.sh status DIR   exit 0 when both are running
#
# `start` is idempotent: with both already running in DIR it only prints their line again.
# DIR/env is a shell file of exports (`. DIR/env`):
#   FEDSEND_TEST_PG_HOST            127.0.0.1 (TCP; the unix socket is in DIR/pg/sock)
#   FEDSEND_TEST_PG_PORT            the PostgreSQL port
#   FEDSEND_TEST_PG_USER            postgres (superuser, trust auth, no password)
#   FEDSEND_TEST_REDIS_URL          redis://127.0.0.1:PORT/
#   FEDSEND_TEST_SYNAPSE_TEMPLATE   name of a database (UTF8, C collation) holding the schema the
#                                   pinned Synapse of tools/python/synapse-venv creates, background
#                                   updates done: tests take a fresh copy each with
#                                   `CREATE DATABASE x TEMPLATE <it>` (no one may be connected to it)
#   FEDSEND_TEST_SERVICES_DIR       DIR
# PostgreSQL runs with fsync off (test data only). initdb refuses root, so as root the cluster
# belongs to the `postgres` user. Needs the packages and the venv of scripts/setup.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PY="$root/tools/python/synapse-venv/bin/python"
TEMPLATE=synapse_template
MARK=.fedsend-services

say() { printf 'services: %s\n' "$*"; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }
usage() { echo "usage: scripts/services.sh start|stop|status DIR" >&2; exit 2; }

(($# == 2)) || usage
cmd=$1
mkdir -p "$2" 2>/dev/null || true
[ -d "$2" ] || die "cannot create $2"
dir="$(cd "$2" && pwd)"

# as_pg CMD…: run as the cluster's owner (postgres when we are root).
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
pg_running() { [ -f "$dir/pg/data/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$dir/pg/data" status >/dev/null 2>&1; }
redis_running() { [ -f "$dir/redis.pid" ] && kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; }
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
psql_() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres "$@"; }

stop_all() {
  if [ -d "$dir/pg/data" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$dir/pg/data" -m fast -w -t 20 stop >/dev/null 2>&1 || true
  fi
  if [ -f "$dir/redis.pid" ]; then
    local pid
    pid="$(cat "$dir/redis.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
}

case "$cmd" in
start)
  if [ -f "$dir/$MARK" ] && [ -f "$dir/env" ] && pg_running && redis_running; then
    # shellcheck disable=SC1091
    . "$dir/env"
    say "already running: postgres 127.0.0.1:$FEDSEND_TEST_PG_PORT, redis $FEDSEND_TEST_REDIS_URL (env: $dir/env)"
    exit 0
  fi
  [ -x "$PG_BIN/initdb" ] || die "$PG_BIN/initdb missing: run scripts/setup.sh (postgresql-15)"
  command -v redis-server >/dev/null || die "redis-server missing: run scripts/setup.sh"
  [ -x "$PY" ] || die "$PY missing: run scripts/setup.sh"
  [ -z "$(ls -A "$dir" 2>/dev/null)" ] || [ -f "$dir/$MARK" ] || die "$dir is not empty and not a services dir"
  stop_all
  rm -rf "${dir:?}/pg" "$dir/redis.pid" "$dir/env"
  touch "$dir/$MARK"
  trap 'rc=$?; [ $rc -eq 0 ] || { stop_all; echo "services: start failed; logs in $dir" >&2; }' EXIT

  mkdir -p "$dir/pg/sock"
  if [ "$(id -u)" -eq 0 ]; then
    chown -R postgres:postgres "$dir/pg"
    as_pg test -w "$dir/pg" || die "the postgres user cannot write $dir/pg (a parent directory not searchable?)"
  fi
  say "postgres: initdb"
  as_pg "$PG_BIN/initdb" -D "$dir/pg/data" -U postgres --auth=trust --encoding=UTF8 --locale=C \
    >"$dir/pg/initdb.log" 2>&1 || { cat "$dir/pg/initdb.log" >&2; die "initdb failed"; }
  pg_port=$(free_port)
  say "postgres: starting on 127.0.0.1:$pg_port"
  as_pg "$PG_BIN/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/postgres.log" -w -t 30 \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $dir/pg/sock -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null || { tail -20 "$dir/pg/postgres.log" >&2; die "postgres did not start"; }

  redis_port=$(free_port)
  say "redis: starting on 127.0.0.1:$redis_port"
  redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir" >/dev/null
  for _ in $(seq 100); do
    redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null | grep -q PONG && break
    sleep 0.05
  done
  redis_running || { tail -20 "$dir/redis.log" >&2; die "redis did not start"; }

  say "postgres: building Synapse's schema in database $TEMPLATE"
  psql_ -d postgres -c "CREATE DATABASE $TEMPLATE ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
  cat >"$dir/synapse-db.yaml" <<EOF
server_name: "template.invalid"
report_stats: false
signing_key: "ed25519 tmpl AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
database:
  name: psycopg2
  args: {user: postgres, dbname: $TEMPLATE, host: 127.0.0.1, port: $pg_port, cp_min: 1, cp_max: 2}
EOF
  (cd "$dir" && "$PY" -m synapse._scripts.update_synapse_database --database-config synapse-db.yaml \
    --run-background-updates >"$dir/synapse-schema.log" 2>&1) \
    || { tail -30 "$dir/synapse-schema.log" >&2; die "building Synapse's schema failed"; }
  version=$(psql_ -d "$TEMPLATE" -tA -c "SELECT version FROM schema_version")
  # Nobody may stay connected to a template; mark it as one.
  psql_ -d postgres -c "ALTER DATABASE $TEMPLATE WITH IS_TEMPLATE true"

  cat >"$dir/env" <<EOF
export FEDSEND_TEST_PG_HOST=127.0.0.1
export FEDSEND_TEST_PG_PORT=$pg_port
export FEDSEND_TEST_PG_USER=postgres
export FEDSEND_TEST_REDIS_URL=redis://127.0.0.1:$redis_port/
export FEDSEND_TEST_SYNAPSE_TEMPLATE=$TEMPLATE
export FEDSEND_TEST_SERVICES_DIR=$dir
EOF
  trap - EXIT
  say "ready: postgres 127.0.0.1:$pg_port, redis 127.0.0.1:$redis_port, template $TEMPLATE (schema $version); env: $dir/env"
  ;;
stop)
  [ -f "$dir/$MARK" ] || { rmdir "$dir" 2>/dev/null || true; die "$dir is not a services dir"; }
  stop_all
  rm -rf "${dir:?}"
  say "stopped; removed $dir"
  ;;
status)
  [ -f "$dir/$MARK" ] && pg_running && redis_running
  ;;
*) usage ;;
esac
