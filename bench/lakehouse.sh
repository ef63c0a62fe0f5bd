#!/usr/bin/env bash
# The metadata lakehouse (issue 17, docs/benchmarks.md "The lakehouse"):
#  1. at scale, without a cluster (`cfs lakehouse-bench`): ENTRIES synthetic
#     namespace changes (default 10 million: 5 M files, an inode and a name
#     each) through the lakehouse's state, the Parquet flush (bytes per
#     file), a full read of a real namespace RocksDB of SCAN_ENTRIES, and
#     the latency (median of RUNS) of top-users, top-dirs --depth 3,
#     find '*.h5' and stale --days 180 over the index;
#  2. freshness on a live 3-node cluster under a create load: the time from
#     a file's creation until the gateway's `find` answers it, median of
#     RUNS, with the flush interval the cluster runs (`cfs up`: 5 s).
# Goals: ingest >= 500,000 entries/s; each report < 1 s; freshness <= the
# flush interval + 5 s.
#
# Usage: bench/lakehouse.sh   (env: ENTRIES, SCAN_ENTRIES, RUNS)
set -euo pipefail
cd "$(dirname "$0")/.."
ENTRIES=${ENTRIES:-10000000}
SCAN_ENTRIES=${SCAN_ENTRIES:-2000000}
RUNS=${RUNS:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cargo build --release -q -p cfs-node
CFS="$CARGO_TARGET_DIR/release/cfs"
WORK=$(mktemp -d /var/tmp/cfs-bench-lake.XXXXXX)
CL="$WORK/cluster"
cleanup() {
  [ -n "${LOAD_PID:-}" ] && kill "$LOAD_PID" 2>/dev/null || true
  "$CFS" down --dir "$CL" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== at scale: $ENTRIES entries" >&2
"$CFS" lakehouse-bench --dir "$WORK/scale" --entries "$ENTRIES" --scan-entries "$SCAN_ENTRIES" --runs "$RUNS" >"$WORK/scale.json"

echo "== freshness under a create load" >&2
"$CFS" up --nodes 3 --dir "$CL" --mount "$CL/mnt" >/dev/null
MNT="$CL/mnt"
until mountpoint -q "$MNT"; do sleep 0.2; done
mkdir -p "$MNT/load" "$MNT/markers"
# The load: files created without pause for as long as the measurement runs.
python3 - "$MNT/load" <<'PY' &
import os, sys, itertools
d = sys.argv[1]
for i in itertools.count():
    sub = os.path.join(d, f"d{i // 1000:05}")
    if i % 1000 == 0:
        os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"f{i:08}.dat"), "wb") as f:
        f.write(b"x" * 100)
PY
LOAD_PID=$!
python3 - "$CL" "$MNT" "$RUNS" "$WORK/fresh.json" <<'PY'
import json, os, re, statistics, sys, time, urllib.parse, urllib.request
sys.path.insert(0, "admin/tests")
import cfs_https
cl, mnt, runs, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = open(os.path.join(cl, "node-1", "config.toml")).read()
addr = re.search(r'admin_listen\s*=\s*"([^"]+)"', cfg).group(1)
flush_ms = int(re.search(r'lakehouse_flush_ms\s*=\s*(\d+)', cfg).group(1))
token = open(os.path.join(cl, "admin-token")).read().strip()
# The gateway is HTTPS under node 1's certificate (name node.cfs.internal).
ip, port = addr.rsplit(":", 1)
cfs_https.resolve("node.cfs.internal", ip)
tls = cfs_https.context(os.path.join(cl, "tls", "ca.crt"))
def find(pattern):
    q = urllib.parse.urlencode({"pattern": pattern})
    req = urllib.request.Request(f"https://node.cfs.internal:{port}/api/reports/find?{q}",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30, context=tls) as r:
            return json.load(r)
    except urllib.error.HTTPError:
        return None
times, lags, rows = [], [], []
time.sleep(flush_ms / 1000 * 2)
for i in range(runs):
    name = f"marker-{i}-{time.time_ns()}.txt"
    t0 = time.monotonic()
    open(os.path.join(mnt, "markers", name), "w").close()
    while True:
        a = find(name)
        if a and a["rows"]:
            break
        if time.monotonic() - t0 > 120:
            sys.exit(f"{name} not in the index after 120 s")
        time.sleep(0.05)
    times.append(time.monotonic() - t0)
    lags.append(a["index"]["lag_seconds"])
    rows.append(a["index"]["rows"])
    time.sleep(0.5)
json.dump({"flush_interval_s": flush_ms / 1000, "freshness_s": times,
           "freshness_median_s": statistics.median(times), "index_rows": rows}, open(out, "w"))
PY
kill "$LOAD_PID" 2>/dev/null || true
wait "$LOAD_PID" 2>/dev/null || true
LOAD_PID=
python3 - "$WORK/scale.json" "$WORK/fresh.json" <<'PY'
import json, sys
s, f = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
ok = lambda b: "met" if b else "SHORT"
print(f"ingest: {s['entries']:,} entries in {s['ingest_seconds']:.2f} s = {s['ingest_entries_per_s']:,.0f}/s "
      f"(goal >= 500,000/s: {ok(s['ingest_entries_per_s'] >= 500_000)})")
print(f"flush: {s['rows']:,} rows in {s['flush_seconds']:.2f} s, {s['parquet_files']} files, "
      f"{s['parquet_bytes_per_file']/2**20:.1f} MiB per file, {s['parquet_bytes']/s['rows']:.1f} B per row")
if s["scan_entries"]:
    print(f"namespace scan (RocksDB): {s['scan_entries']:,} entries in {s['scan_seconds']:.2f} s = {s['scan_entries_per_s']:,.0f}/s")
for name, secs in s["reports"]:
    print(f"{name}: median {secs*1000:.0f} ms over {s['rows']:,} rows (goal < 1 s: {ok(secs < 1.0)})")
fi, fm = f["flush_interval_s"], f["freshness_median_s"]
print(f"freshness under a create load: median {fm:.2f} s (runs {', '.join(f'{t:.2f}' for t in f['freshness_s'])}), "
      f"flush interval {fi:.0f} s, index {f['index_rows'][-1]:,} rows (goal <= {fi + 5:.0f} s: {ok(fm <= fi + 5)})")
PY
