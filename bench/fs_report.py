#!/usr/bin/env python3
"""Aggregates bench/fs.sh results: median (min-max) per target and metric,
with cfs' ratio to bindfs (the FUSE ceiling), to the better of MooseFS
and GlusterFS where those ran, and to any other cfs build given as a
target directory named cfs-* (e.g. cfs-before: the same run's baseline)."""
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
            try:
                data[parts[0]][t].append(float(parts[1]))
            except ValueError:
                continue
            units[parts[0]] = parts[2]
order = ["cfs", "local", "bindfs", "moosefs", "glusterfs"]
targets = [t for t in order if t in targets] + [t for t in targets if t not in order]
# Lower is better for times, latencies and round trips or FUSE requests per
# tree entry (bench/tree.sh).
LOWER = ("s", "ms", "rt/entry", "req/entry")
lower = lambda m: units[m] in LOWER
med = lambda m, t: statistics.median(data[m][t]) if data[m].get(t) else None

def ratio(m, other):
    c, o = med(m, "cfs"), other
    if c is None or o is None or c == 0 or o == 0:
        return "-"
    return f"{(o / c if lower(m) else c / o):.2f}"

has_dfs = any(t in targets for t in ("moosefs", "glusterfs"))
builds = [t for t in targets if t.startswith("cfs-")]
head = "| workload | unit | " + " | ".join(targets) + " | cfs / bindfs |"
sep = "|---|---|" + "---|" * len(targets) + "---|"
if has_dfs:
    head += " cfs / best of MooseFS, GlusterFS |"
    sep += "---|"
for b in builds:
    head += f" cfs / {b} |"
    sep += "---|"
print(head)
print(sep)
for m in data:
    cells = []
    for t in targets:
        v = data[m].get(t, [])
        # Three decimals for values below 1 (fast tree steps, per-entry counts).
        p = 1 if not v or abs(statistics.median(v)) >= 1 else 3
        cells.append(f"{statistics.median(v):.{p}f} ({min(v):.{p}f}-{max(v):.{p}f})" if v else "-")
    row = f"| {m} | {units[m]} | " + " | ".join(cells) + f" | {ratio(m, med(m, 'bindfs'))} |"
    if has_dfs:
        others = [x for x in (med(m, "moosefs"), med(m, "glusterfs")) if x is not None]
        best = (min(others) if lower(m) else max(others)) if others else None
        row += f" {ratio(m, best)} |"
    for b in builds:
        row += f" {ratio(m, med(m, b))} |"
    print(row)
rounds = len(next(iter(data.values())).get("cfs", [])) if data else 0
print(f"\n{rounds} rounds; ratios are cfs relative to the other (for s, ms, rt/entry and req/entry, the other's / cfs'): above 1 means cfs is better.")
