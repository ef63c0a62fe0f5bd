#!/usr/bin/env bash
# Segment store benchmark: a 3-node loopback cluster (layout 2+1), write
# and read SIZE_MIB (default 1 GiB) in 1 MiB requests through the stripe
# writer/reader, then read again with m servers killed (degraded). The raw
# baseline (one local file, same size and request size, fsync at the end,
# caches dropped before reading) and the erasure code's per-core
# encode/decode throughput are measured in the same run. Medians of RUNS.
# The LAST line is:
#   segments: write <W> MB/s, read <R> MB/s, degraded read <D> MB/s
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=3 SIZE_MIB=1024
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cargo build --release -q -p cfs-node
CFS="$CARGO_TARGET_DIR/release/cfs"
DIR=$(mktemp -d /var/tmp/cfs-bench-seg.XXXXXX)
trap '"$CFS" down --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
"$CFS" up --nodes 3 --dir "$DIR" --shards 1 >/dev/null

"$CFS" ec-bench --k 4 --m 2
"$CFS" ec-bench --k 2 --m 1

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
out="$DIR/runs.txt"; : >"$out"
for _ in $(seq "$RUNS"); do
  "$CFS" seg-bench --dir "$DIR" --size-mib "$SIZE_MIB" | tee -a "$out"
done
raw_w=$(grep -o 'raw local file: write [0-9.]*' "$out" | awk '{print $5}' | median)
raw_r=$(grep -o 'MB/s, read [0-9.]*' "$out" | head -n "$RUNS" | awk '{print $3}' | median)
w=$(grep -o '^segments: write [0-9.]*' "$out" | awk '{print $3}' | median)
r=$(grep '^segments:' "$out" | grep -o ', read [0-9.]*' | awk '{print $3}' | median)
d=$(grep -o 'degraded read [0-9.]*' "$out" | awk '{print $3}' | median)
echo "raw local file (median): write $raw_w MB/s, read $raw_r MB/s; overhead (k+m)/k = 1.5"
echo "ratios: write $(awk "BEGIN{printf \"%.0f\", 100*$w*1.5/$raw_w}")% of raw/1.5 (goal 60%), read $(awk "BEGIN{printf \"%.0f\", 100*$r*1.5/$raw_r}")% of raw/1.5 (goal 80%)"
echo "segments: write $w MB/s, read $r MB/s, degraded read $d MB/s"
