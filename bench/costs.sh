#!/usr/bin/env bash
# What each namespace operation costs on a `cfs up` mount (3 nodes, the
# default shards): round trips, log entries, WAL fdatasyncs per node and
# early answers per operation, from the daemons' own counters
# (bench/costs.py). The settle step (an fsync of the mount's root, which
# waits for every change of the mount to be decided) is outside the timed
# loop but inside the counted window, so commits are counted in full.
#
# Usage: bench/costs.sh [N] [ROUNDS] [extra cfs mount options...]
#   e.g. bench/costs.sh 200 3 --sync-namespace
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}; ROUNDS=${2:-3}; shift $(( $# > 2 ? 2 : $# ))
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cargo build --release -q -p cfs-node
CFS="$CARGO_TARGET_DIR/release/cfs"
DIR=$(mktemp -d /var/tmp/cfs-bench-costs.XXXXXX)
trap '"$CFS" down --dir "$DIR/c" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
opts=()
for o in "$@"; do opts+=(--mount-opt "$o"); done
"$CFS" up --dir "$DIR/c" --mount "$DIR/m" "${opts[@]}" >/dev/null
python3 bench/costs.py "$DIR/c" "$DIR/m" "$N" "$ROUNDS"
