#!/usr/bin/env bash
# The PostgreSQL baseline of BENCHMARKS.md: two-phase commit across three local PostgreSQL
# instances (PREPARE TRANSACTION / COMMIT PREPARED), 64 clients in a closed loop, three runs
# of 8 seconds per row, one JSON line per run:
#   bash benches/postgres.sh > pg.jsonl
# Installs Debian's postgresql package when no PostgreSQL is found (needs root and the
# Debian mirror). Rows: synchronous_commit on (PostgreSQL's default: every commit fsynced)
# and off (written at once, fsynced in the background, as JetStream's default sync does),
# each without and with a decision log (the client's commit decision written to a table
# between the phases, as a transaction manager that can recover must).
set -euo pipefail
cd "$(dirname "$0")/.."
pgbin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
PGBIN=$(pgbin || true)
if [ -z "$PGBIN" ]; then
  echo "installing PostgreSQL (Debian's postgresql package)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  PGBIN=$(pgbin)
fi
cargo build --release -p txcoord-pg2pc --quiet
SECS=${SECS:-8}
RUNS=${RUNS:-3}
DIR=$(mktemp -d)
# initdb and postgres refuse to run as root: as root, run them as the postgres user.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
PORTS=()
for i in 0 1 2; do
  PORTS+=("$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')")
done
stop_all() {
  for i in 0 1 2; do as_pg "$PGBIN/pg_ctl" -D "$DIR/pg$i" -m immediate stop >/dev/null 2>&1 || true; done
  rm -rf "$DIR"
}
trap stop_all EXIT
for i in 0 1 2; do
  as_pg "$PGBIN/initdb" -D "$DIR/pg$i" -U postgres --auth=trust >/dev/null
done
start_all() {
  for i in 0 1 2; do
    as_pg "$PGBIN/pg_ctl" -D "$DIR/pg$i" -l "$DIR/pg$i.log" -w \
      -o "-p ${PORTS[$i]} -c listen_addresses=127.0.0.1 -c unix_socket_directories=$DIR -c max_connections=300 -c max_prepared_transactions=300 -c synchronous_commit=$1" \
      start >/dev/null
  done
}
stop_instances() {
  for i in 0 1 2; do as_pg "$PGBIN/pg_ctl" -D "$DIR/pg$i" -m fast stop >/dev/null; done
}
ports=$(IFS=,; echo "${PORTS[*]}")
for sync in on off; do
  start_all "$sync"
  for log in "" "--decision-log"; do
    for _ in $(seq "$RUNS"); do
      target/release/txcoord-pg2pc --ports "$ports" --concurrency 64 --duration-secs "$SECS" \
        --label "synchronous_commit=$sync" $log
    done
  done
  stop_instances
done
