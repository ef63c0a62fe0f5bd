#!/usr/bin/env bash
# Space reclamation (issue 18, docs/benchmarks.md "Space reclamation"):
# on a fresh 3-node cluster (`cfs up`, release build, the garbage
# collector as `cfs up` configures it):
#  1. LIVE_MIB of files that stay (the live data);
#  2. fsx on one file for FSX_SECONDS (the long-run parameters of
#     docs/posix.md: writes, truncates, punches, copy_file_range, mapped
#     writes), then `rm` of that file;
#  3. a tree of CHURN_MIB copied, then `rm -rf`.
# Reports the fragment bytes on the segment servers' disks (`du` of their
# segment directories) after each step and how long the collector took to
# bring them back, against the live data times 1.5 (2+1 erasure coding).
# Goal: within 10 % of that once the collector has run.
#
# Usage: bench/space.sh   (env: LIVE_MIB, FSX_SECONDS, CHURN_MIB, WAIT_S)
set -euo pipefail
cd "$(dirname "$0")/.."
LIVE_MIB=${LIVE_MIB:-256}
FSX_SECONDS=${FSX_SECONDS:-600}
CHURN_MIB=${CHURN_MIB:-1024}
WAIT_S=${WAIT_S:-300}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cargo build --release -q -p cfs-node
CFS="$CARGO_TARGET_DIR/release/cfs"
WORK=$(mktemp -d /var/tmp/cfs-bench-space.XXXXXX)
CL="$WORK/cluster"
cleanup() {
  "$CFS" down --dir "$CL" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$CFS" up --nodes 3 --dir "$CL" --mount "$CL/mnt" >/dev/null
MNT="$CL/mnt"
until mountpoint -q "$MNT"; do sleep 0.2; done

stored() { du -sb "$CL"/node-*/data/segments | awk '{s += $1} END {printf "%d\n", s}'; }
mib() { echo $(( $1 / 1048576 )); }
# Waits until the stored bytes are at most $1 or WAIT_S passed; prints
# the seconds it took.
wait_down_to() {
  local goal=$1 t0=$SECONDS
  while [ "$(stored)" -gt "$goal" ] && [ $((SECONDS - t0)) -lt "$WAIT_S" ]; do sleep 2; done
  echo $((SECONDS - t0))
}

EMPTY=$(stored)
echo "== live data: $LIVE_MIB MiB" >&2
mkdir -p "$MNT/live"
for i in $(seq 1 $((LIVE_MIB / 16))); do
  head -c $((16 << 20)) /dev/urandom >"$MNT/live/f$i"
done
sync
LIVE=$((LIVE_MIB << 20))
GOAL=$((EMPTY + LIVE * 3 / 2 * 11 / 10))
echo "stored after the live data: $(mib "$(stored)") MiB (1.5 x live = $(mib $((LIVE * 3 / 2))) MiB)" >&2

echo "== fsx for $FSX_SECONDS s" >&2
# The peak while fsx runs (sampled every 5 s).
( peak=0; while :; do s=$(stored); [ "$s" -gt "$peak" ] && peak=$s && echo "$peak" >"$WORK/peak"; sleep 5; done ) &
SAMPLER=$!
"$CFS" fsx "$MNT/fsx.bin" --seconds "$FSX_SECONDS" --ops 20000 --max-size 8000000 --max-op 1000000 >"$WORK/fsx.log" 2>&1 || {
  tail -5 "$WORK/fsx.log" >&2
  exit 1
}
kill "$SAMPLER" 2>/dev/null || true
tail -1 "$WORK/fsx.log" >&2
AFTER_FSX=$(stored)
PEAK=$(cat "$WORK/peak")
echo "fsx: peak stored while it ran $(mib "$PEAK") MiB" >&2
rm -f "$MNT/fsx.bin"
FSX_WAIT=$(wait_down_to "$GOAL")
AFTER_FSX_RM=$(stored)
echo "fsx: stored $(mib "$AFTER_FSX") MiB, after rm $(mib "$AFTER_FSX_RM") MiB in ${FSX_WAIT} s" >&2

echo "== churn: $CHURN_MIB MiB copied and removed" >&2
mkdir -p "$MNT/churn"
for i in $(seq 1 $((CHURN_MIB / 16))); do
  head -c $((16 << 20)) /dev/urandom >"$MNT/churn/f$i"
done
sync
AFTER_CHURN=$(stored)
rm -rf "$MNT/churn"
CHURN_WAIT=$(wait_down_to "$GOAL")
AFTER_CHURN_RM=$(stored)
echo "churn: stored $(mib "$AFTER_CHURN") MiB, after rm -rf $(mib "$AFTER_CHURN_RM") MiB in ${CHURN_WAIT} s" >&2

# The live data reads back.
for i in $(seq 1 $((LIVE_MIB / 16))); do cat "$MNT/live/f$i" >/dev/null; done
python3 - <<PY
live, empty = $LIVE, $EMPTY
rows = [("after the live data", None, None),
        ("fsx ${FSX_SECONDS} s", $AFTER_FSX, $AFTER_FSX_RM),
        ("churn ${CHURN_MIB} MiB", $AFTER_CHURN, $AFTER_CHURN_RM)]
want = live * 1.5
print(f"live data {live / 2**20:,.0f} MiB; stored while fsx ran: at most {($PEAK - empty) / 2**20:,.0f} MiB")
print(f"| step | stored before rm | stored after rm and GC | after / (1.5 x live) | GC time |")
print("|---|---|---|---|---|")
for (name, before, after), t in zip(rows[1:], ["$FSX_WAIT", "$CHURN_WAIT"]):
    print(f"| {name} | {(before - empty) / 2**20:,.0f} MiB | {(after - empty) / 2**20:,.0f} MiB | {(after - empty) / want:.3f} | {t} s |")
PY
