#!/usr/bin/env python3
"""Turns `benches/matrix.sh` output (JSON lines) into the BENCHMARKS.md table: the median of
the runs of each row. Usage: python3 benches/table.py bench.jsonl"""
import json
import statistics
import sys
from collections import defaultdict

rows = defaultdict(list)
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    setup = "cluster R3" if r.get("cluster") else ("always" if r["sync_always"] else "default")
    rows[(setup, r["mode"], r["participants"], r["concurrency"])].append(r)

def med(runs, f):
    vals = [f(r) for r in runs if f(r) is not None]
    return statistics.median(vals) if vals else None

print("| setup | mode | participants | clients | runs | tx/s | p50 ms | p95 ms | p99 ms | max ms | JS msgs/tx | JS bytes/tx | raw publishes/s | raw consumed/s | tx per 100 raw publishes | of the bound |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
order = {"default": 0, "always": 1, "cluster R3": 2}
for (setup, mode, n, c), runs in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], -kv[0][3], kv[0][1], kv[0][2])):
    ceil = lambda k: (lambda r: r["ceiling"][k] if r.get("ceiling") else None)
    pub, con, eff = med(runs, ceil("publish_per_sec")), med(runs, ceil("consume_per_sec")), med(runs, ceil("efficiency"))
    per100 = med(runs, ceil("tx_per_100_publishes"))
    fmt = lambda v, spec: "–" if v is None else format(v, spec)
    print(f"| {setup} | {mode} | {n} | {c} | {len(runs)} | "
          f"{fmt(med(runs, lambda r: r['tx_per_sec']), '.0f')} | {fmt(med(runs, lambda r: r['latency_ms']['p50']), '.1f')} | "
          f"{fmt(med(runs, lambda r: r['latency_ms']['p95']), '.1f')} | {fmt(med(runs, lambda r: r['latency_ms']['p99']), '.1f')} | "
          f"{fmt(med(runs, lambda r: r['latency_ms']['max']), '.1f')} | {fmt(med(runs, lambda r: r['js_messages_per_tx']), '.1f')} | "
          f"{fmt(med(runs, lambda r: r['js_bytes_per_tx']), '.0f')} | {fmt(pub, '.0f')} | {fmt(con, '.0f')} | "
          f"{fmt(per100, '.2f')} | {'–' if eff is None else format(100 * eff, '.1f') + '%'} |")
