#!/usr/bin/env bash
# Log benchmark: a 3-node loopback cluster, proposals from concurrent
# clients, 200 B and 4 KiB entries. Measures in the same run, on the same
# disk, the baselines the figures are judged against: one 4 KiB
# write+fdatasync (latency) and the disk's own sequential bandwidth with
# fdatasync (1 MiB writes). Prints each figure against its goal (issue
# 14) and, as its LAST line:
#   log: <N> entries/s, p50 <x> ms, p99 <y> ms   (4 KiB entries, 3 replicas)
# Figures are medians over RUNS runs (default 3) of SECONDS each. The three
# replicas share this one disk, so the 4 KiB goal divides its bandwidth by 3.
#
# Usage: bench/log.sh [--runs N] [--seconds S] [--clients C]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=3 SECONDS_PER_RUN=5 CLIENTS=128
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --seconds) SECONDS_PER_RUN=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cargo build --release -q -p cfs-node
CFS="$CARGO_TARGET_DIR/release/cfs"
DIR=$(mktemp -d /var/tmp/cfs-bench-log.XXXXXX)
trap '"$CFS" down --dir "$DIR" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
"$CFS" up --nodes 3 --dir "$DIR" --shards 1 >/dev/null

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

"$CFS" fsync-bench --dir "$DIR" --count 3000 | tee "$DIR/fsync.txt"
fsync_p50=$(grep -o 'p50 [0-9.]*' "$DIR/fsync.txt" | awk '{print $2}')
disk_mibs=$(grep -o '[0-9.]* MiB/s' "$DIR/fsync.txt" | awk '{print $1}')

run_set() { # size clients -> prints medians
  local size=$1 clients=$2 out="$DIR/runs-$1-$2.txt"
  : >"$out"
  for _ in $(seq "$RUNS"); do
    "$CFS" bench-log --dir "$DIR" --clients "$clients" --size "$size" --seconds "$SECONDS_PER_RUN" | tee -a "$out" >&2
  done
  local eps p50 p99
  eps=$(grep -o '^log: [0-9.]*' "$out" | awk '{print $2}' | median)
  p50=$(grep -o 'p50 [0-9.]*' "$out" | awk '{print $2}' | median)
  p99=$(grep -o 'p99 [0-9.]*' "$out" | awk '{print $2}' | median)
  echo "$eps $p50 $p99"
}

verdict() { awk "BEGIN{print ($1) ? \"meets\" : \"SHORT\"}"; }

echo "# unloaded (1 client): commit latency vs one fdatasync (p50 $fsync_p50 ms)"
read -r eps p50 p99 < <(run_set 4096 1)
echo "unloaded 4 KiB: $eps entries/s, p50 $p50 ms, p99 $p99 ms; p50 / fdatasync p50 = $(awk "BEGIN{printf \"%.1f\", $p50/$fsync_p50}")x (goal <= 3x: $(verdict "$p50 <= 3 * $fsync_p50"))"
read -r eps p50 p99 < <(run_set 200 "$CLIENTS")
echo "loaded 200 B ($CLIENTS clients): $eps entries/s, p50 $p50 ms, p99 $p99 ms (goal >= 150000/s: $(verdict "$eps >= 150000"))"
read -r eps p50 p99 < <(run_set 4096 "$CLIENTS")
mibs=$(awk "BEGIN{printf \"%.1f\", $eps * 4096 / 1048576}")
goal=$(awk "BEGIN{printf \"%.1f\", 0.6 * $disk_mibs / 3}")
echo "loaded 4 KiB ($CLIENTS clients): $mibs MiB/s of entries; disk $disk_mibs MiB/s fdatasync'd sequential; goal >= 60% of disk/3 = $goal MiB/s: $(verdict "$mibs >= $goal")"
echo "log: $eps entries/s, p50 $p50 ms, p99 $p99 ms"
