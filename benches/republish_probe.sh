#!/usr/bin/env bash
# Whether a subject transform and RePublish make the log phantom-free (BENCHMARKS.md, "What
# is left"): starts its own nats-server (the project's pinned build, a temp store) and runs
# benches/republish_probe.py against it with the project's Python (nats-py).
#   bash benches/republish_probe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./dev setup >/dev/null
SERVER="$PWD/.tools/venv/bin/nats-server"
PY="$PWD/.tools/venv/bin/python"
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
"$PY" benches/republish_probe.py "nats://127.0.0.1:$PORT"
