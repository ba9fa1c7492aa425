#!/usr/bin/env bash
# What a stored JetStream write costs, and what group commit could save (BENCHMARKS.md,
# "Group commit of the log, measured"): starts its own nats-server (the project's pinned
# build, default sync, a temp store) and runs examples/publish_probe.rs against it, which
# publishes records one by one with PubAcks, without any PubAck, and in JetStream atomic
# batches of 4, 16 and 64, and prints the server's and the client's CPU per stored message.
#   bash benches/publish_probe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./dev setup >/dev/null
SERVER="$PWD/.tools/venv/bin/nats-server"
cargo build --release --example publish_probe --quiet
DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$DIR/nats.conf" <<CONF
listen: 127.0.0.1:$PORT
jetstream { store_dir: "$DIR/store" }
CONF
"$SERVER" -c "$DIR/nats.conf" >"$DIR/nats.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break
  sleep 0.1
done
"$SERVER" --version
target/release/examples/publish_probe "nats://127.0.0.1:$PORT" "$PID"
