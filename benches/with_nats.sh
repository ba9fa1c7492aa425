#!/usr/bin/env bash
# Runs a command against a nats-server of its own: the project's pinned build, default sync,
# a temp store, a free port. The command gets NATS_URL and NATS_SERVER_PID in its
# environment; the server and its store are gone when it ends. Used by the probes:
#   bash benches/with_nats.sh sh -c 'my-probe "$NATS_URL"'
set -euo pipefail
cd "$(dirname "$0")/.."
./dev setup >/dev/null
SERVER="$PWD/.tools/venv/bin/nats-server"
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
NATS_URL="nats://127.0.0.1:$PORT" NATS_SERVER_PID="$PID" "$@"
