#!/usr/bin/env bash
# What a stored JetStream write costs, and what group commit could save (BENCHMARKS.md,
# "Group commit of the log, measured"): starts its own nats-server (the project's pinned
# build, default sync, a temp store) and runs examples/publish_probe.rs against it, which
# publishes records one by one with PubAcks, without any PubAck, and in JetStream atomic
# batches of 4, 16 and 64, and prints the server's and the client's CPU per stored message.
#   bash benches/publish_probe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --example publish_probe --quiet
bash benches/with_nats.sh sh -c 'target/release/examples/publish_probe "$NATS_URL" "$NATS_SERVER_PID"'
