#!/usr/bin/env python3
"""What each namespace operation costs on a mount: round trips from the
mount, log entries decided, WAL fdatasyncs per node, and how many changes
were answered early (D30). Run by bench/costs.sh on a fresh `cfs up`
cluster; prints a markdown table (medians over ROUNDS rounds of N
operations each; counters are deltas of the daemons' own /metrics).

Usage: costs.py CLUSTER_DIR MOUNT [N] [ROUNDS]
"""
import os
import re
import statistics
import sys
import time
import urllib.request


def scrape(url):
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        base = re.sub(r"\{.*\}", "", name)
        try:
            out[base] = out.get(base, 0.0) + float(value)
        except ValueError:
            pass
    return out


def node_urls(cluster):
    urls = []
    for d in sorted(os.listdir(cluster)):
        cfg = os.path.join(cluster, d, "config.toml")
        if d.startswith("node-") and os.path.exists(cfg):
            m = re.search(r'^http\s*=\s*"([^"]+)"', open(cfg).read(), re.M)
            urls.append(f"http://{m.group(1)}/metrics")
    return urls


class Meter:
    def __init__(self, cluster):
        self.mount_url = open(os.path.join(cluster, "mount", "metrics-url")).read().strip()
        self.nodes = node_urls(cluster)

    def sample(self):
        m = scrape(self.mount_url)
        ns = [scrape(u) for u in self.nodes]
        return {
            "rt": m.get("claudefs_fuse_round_trips_total", 0),
            "seg": m.get("claudefs_fuse_segment_requests_total", 0),
            # Every node decides every entry of the shards it replicates:
            # the cluster's entries are one node's count (all replicate all).
            "entries": ns[0].get("claudefs_log_decided_entries_total", 0),
            "syncs": sum(n.get("claudefs_log_wal_syncs_total", 0) for n in ns) / len(ns),
            "early": sum(n.get("claudefs_meta_early_answers_total", 0) for n in ns),
        }


def settle(mount):
    # Every change of this mount decided (fsync of a directory waits for
    # them, D30), so counters include the commits of what was measured.
    fd = os.open(mount, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    time.sleep(0.3)


def small(d, i):
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(b"x" * 1024)


def rsync_like(d, i):
    # rsync/cp -a: temp file, bytes, attributes, rename over the name.
    tmp = os.path.join(d, f".f{i}.XXXX")
    with open(tmp, "wb") as f:
        f.write(b"y" * 2048)
        os.fchmod(f.fileno(), 0o640)
        os.utime(f.fileno(), (1_000_000_000, 1_000_000_000))
    os.rename(tmp, os.path.join(d, f"f{i}"))


def create_fsync(d, i):
    with open(os.path.join(d, f"s{i}"), "wb") as f:
        f.write(b"z" * 1024)
        os.fsync(f.fileno())


# name -> (prepare(dir, n), op(dir, i))
def prep_files(d, n):
    for i in range(n):
        small(d, i)


def prep_dirs(d, n):
    for i in range(n):
        os.mkdir(os.path.join(d, f"d{i}"))


def rm_rf(d, i):
    # One small tree per op: a directory with 4 files.
    t = os.path.join(d, f"t{i}")
    for j in range(4):
        os.unlink(os.path.join(t, f"x{j}"))
    os.rmdir(t)


def prep_trees(d, n):
    for i in range(n):
        t = os.path.join(d, f"t{i}")
        os.mkdir(t)
        for j in range(4):
            with open(os.path.join(t, f"x{j}"), "wb") as f:
                f.write(b"t")


CASES = [
    ("create + write 1 KiB + close", None, small),
    ("mkdir", None, lambda d, i: os.mkdir(os.path.join(d, f"d{i}"))),
    ("rmdir", prep_dirs, lambda d, i: os.rmdir(os.path.join(d, f"d{i}"))),
    ("unlink", prep_files, lambda d, i: os.unlink(os.path.join(d, f"f{i}"))),
    ("rename in a directory", prep_files,
     lambda d, i: os.rename(os.path.join(d, f"f{i}"), os.path.join(d, f"g{i}"))),
    ("chmod", prep_files, lambda d, i: os.chmod(os.path.join(d, f"f{i}"), 0o600)),
    ("stat (cached under a lease)", prep_files, lambda d, i: os.stat(os.path.join(d, f"f{i}"))),
    ("rsync/cp -a file: tmp + write + chmod + utimes + rename", None, rsync_like),
    ("rm -rf of a 4-file directory (per directory)", prep_trees, rm_rf),
    ("create + write 1 KiB + fsync + close", None, create_fsync),
]


def main():
    cluster, mount = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    meter = Meter(cluster)
    print(f"# {n} operations per round, medians of {rounds} rounds; per operation:")
    print("| operation | ops/s | round trips | log entries | WAL fdatasyncs per node | answered early |")
    print("|---|---|---|---|---|---|")
    for k, (name, prep, op) in enumerate(CASES):
        rows = []
        for r in range(rounds):
            d = os.path.join(mount, f"costs-{k}-{r}")
            os.mkdir(d)
            if prep:
                prep(d, n)
            settle(mount)
            a = meter.sample()
            t = time.monotonic()
            for i in range(n):
                op(d, i)
            secs = time.monotonic() - t
            settle(mount)
            b = meter.sample()
            rows.append({
                "ops": n / secs,
                **{key: (b[key] - a[key]) / n for key in a},
            })
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(f"| {name} | {med['ops']:.0f} | {med['rt']:.2f} | {med['entries']:.2f} "
              f"| {med['syncs']:.2f} | {med['early']:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
