#!/usr/bin/env bash
# Whether a subject transform and RePublish make the log phantom-free (BENCHMARKS.md, "What
# is left"): starts its own nats-server (the project's pinned build, a temp store) and runs
# benches/republish_probe.py against it with the project's Python (nats-py).
#   bash benches/republish_probe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash benches/with_nats.sh sh -c '.tools/venv/bin/python benches/republish_probe.py "$NATS_URL"'
