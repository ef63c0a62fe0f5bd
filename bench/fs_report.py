#!/usr/bin/env python3
"""Aggregates bench/fs.sh results: median (min-max) per target and metric."""
import collections, os, statistics, sys

d = sys.argv[1]
data = collections.defaultdict(lambda: collections.defaultdict(list))
units = {}
targets = []
for f in sorted(os.listdir(d)):
    t = f.rsplit(".", 1)[0]
    if t not in targets:
        targets.append(t)
    for line in open(os.path.join(d, f)):
        parts = line.split()
        if len(parts) == 3:
            data[parts[0]][t].append(float(parts[1]))
            units[parts[0]] = parts[2]
order = ["cfs", "local", "bindfs"]
targets = [t for t in order if t in targets] + [t for t in targets if t not in order]
print("| workload | unit | " + " | ".join(targets) + " | cfs / bindfs |")
print("|---|---|" + "---|" * len(targets) + "---|")
for m in data:
    cells = []
    for t in targets:
        v = data[m].get(t, [])
        cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "-")
    ratio = "-"
    if data[m].get("cfs") and data[m].get("bindfs"):
        c, b = statistics.median(data[m]["cfs"]), statistics.median(data[m]["bindfs"])
        r = c / b if units[m] != "s" else b / c
        ratio = f"{r:.2f}"
    print(f"| {m} | {units[m]} | " + " | ".join(cells) + f" | {ratio} |")
print(f"\n{len(next(iter(data.values())).get('cfs', []))} rounds; for seconds, the ratio is bindfs/cfs (higher is better for cfs).")
