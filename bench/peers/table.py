"""Medians of run.sh's JSON lines, as a Markdown table with each row's messages/s
against Roundtable's (persistence off) at the same message count."""

import json
import statistics
import sys
from collections import defaultdict


def row_of(v):
    if v.get("workload") == "groupchat":
        name = "roundtable" + (" (persisted)" if v["persist"] else "")
        return name, v["messages"], {
            "msgs_per_s": v["messages_per_sec"],
            "first": v["us_per_msg_first100"],
            "last": v["us_per_msg_last100"],
            "ratio": v["last_over_first"],
            "added": v["added_kib"] / 1024,
        }
    return v["framework"], v["messages"], {
        "msgs_per_s": v["msgs_per_s"],
        "first": v["us_first_100"],
        "last": v["us_last_100"],
        "ratio": v["last_over_first"],
        "added": v["added_mib"],
    }


runs = defaultdict(list)
peers = set()
for line in open(sys.argv[1]):
    if line.strip():
        v = json.loads(line)
        peers.add(v["peers"])
        name, m, fields = row_of(v)
        runs[(m, name)].append(fields)

med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]} | {"n": len(rs)} for k, rs in runs.items()}
print(f"peers: {', '.join(map(str, sorted(peers)))}; medians of the runs counted in the last column")
print()
print("| framework | M | msgs/s | Roundtable (off) ÷ this | µs/msg first 100 | µs/msg last 100 | last/first | added MiB | runs |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
order = ["roundtable", "roundtable (persisted)", "autogen", "langgraph"]
for m in sorted({m for m, _ in med}):
    base = med.get((m, "roundtable"), {}).get("msgs_per_s")
    for name in order + sorted({n for mm, n in med if mm == m and n not in order}):
        r = med.get((m, name))
        if r is None:
            continue
        times = f"{base / r['msgs_per_s']:,.1f}" if base else "–"
        print(
            f"| {name} | {m:,} | {r['msgs_per_s']:,.0f} | {times} | {r['first']:.1f} | {r['last']:.1f} "
            f"| {r['ratio']:.2f} | {r['added']:.2f} | {r['n']} |"
        )
