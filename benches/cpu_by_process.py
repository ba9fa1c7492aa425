#!/usr/bin/env python3
"""Runs a `txcoord bench --count N` command and reports the CPU time each kind of process
spent per transaction, read from /proc while it runs (user + system, every descendant
nats-server and txcoord process). Usage:
    python3 benches/cpu_by_process.py target/release/txcoord bench --count 10000 [...]
"""
import os
import subprocess
import sys
import time

cmd = sys.argv[1:]
count = int(cmd[cmd.index("--count") + 1]) if "--count" in cmd else None
hz = os.sysconf("SC_CLK_TCK")
seen = {}  # pid -> (role, user s, system s), the last reading


def role(cmdline):
    if "nats-server" in cmdline:
        return "nats-server"
    for sub, name in ((" serve", "coordinator"), (" participant", "participants (all)"), (" bench", "load generator")):
        if "txcoord" in cmdline and sub in cmdline:
            return name
    return None


def sample():
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cl = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        r = role(cl)
        if r is None:
            continue
        fields = st[st.rfind(")") + 2:].split()
        seen[pid] = (r, int(fields[11]) / hz, int(fields[12]) / hz)


start = time.time()
proc = subprocess.Popen(cmd)
while proc.poll() is None:
    sample()
    time.sleep(0.1)
wall = time.time() - start
totals = {}
for r, u, s in seen.values():
    tu, ts = totals.get(r, (0.0, 0.0))
    totals[r] = (tu + u, ts + s)
all_cpu = sum(u + s for u, s in totals.values())
print(f"\nCPU by process kind over {wall:.1f} s of wall time ({all_cpu:.1f} CPU-seconds):")
for r, (u, s) in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
    per = f"{(u + s) / count * 1e6:8.0f} µs/tx" if count else ""
    print(f"  {r:20} user {u:6.2f} s  system {s:6.2f} s  {100 * (u + s) / all_cpu:5.1f}%  {per}")
if count:
    print(f"  {'all':20} {all_cpu / count * 1e6:38.0f} µs/tx")
sys.exit(proc.returncode)
