#!/usr/bin/env bash
# Consecutive long Jepsen runs across workloads and nemeses (docs/jepsen.md).
# Usage: jepsen/long.sh [RUNS] [SECONDS] [FIRST_SEED]   (env: JEPSEN_BIN = a
# directory holding prebuilt jepsen, cfs and cfs-node; OUT = results dir;
# WORKLOADS = the rotation, default "log register set bank"; the other
# file-system workloads, fs-register and fs-ops (early answers, D30), are
# options: WORKLOADS='log register set bank fs-register fs-ops')
# Prints one markdown row per run and stops at the first invalid run.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-20} SECS=${2:-300} SEED=${3:-1}
OUT=${OUT:-/var/tmp/cfs-jepsen/long}
if [ -z "${JEPSEN_BIN:-}" ]; then
  cargo build -q -p jepsen -p cfs-node
  JEPSEN_BIN=${CARGO_TARGET_DIR:-target}/debug
fi
mkdir -p "$OUT"
read -r -a workloads <<< "${WORKLOADS:-log register set bank}"
echo "| run | workload | nemesis | faults | seed | operations | anomalies | valid |"
echo "|---|---|---|---|---|---|---|---|"
for i in $(seq 0 $((RUNS - 1))); do
  w=${workloads[$((i % ${#workloads[@]}))]}
  s=$((SEED + i))
  case $w in
    log|register) nem=kill,pause,partition,delay,power; faults=lose-unsynced ;;
    *) nem=kill,pause,partition,delay; faults= ;;
  esac
  dir="$OUT/run-$((i + 1))-$w-$s"
  "$JEPSEN_BIN/jepsen" --workload "$w" --nemesis "$nem" --faults "$faults" \
    --time-limit "$SECS" --seed "$s" --out "$dir" > "$dir.txt" 2>&1
  rc=$?
  line=$(grep -E "^${w//-/}: " "$dir.txt" | head -1)
  ops=$(echo "$line" | sed -E 's/.*: ([0-9]+) operations.*/\1/')
  anomalies=$(echo "$line" | sed -E 's/.* ([0-9]+) anomalies.*/\1/')
  echo "| $((i + 1)) | $w | $nem | ${faults:--} | $s | ${ops:-?} | ${anomalies:-?} | $([ $rc = 0 ] && echo yes || echo NO) |"
  [ $rc = 0 ] || exit 1
  # A valid run keeps its history, verdict and node logs, not its data.
  rm -rf "$dir"/cluster/node-*/data
done
