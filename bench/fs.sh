#!/usr/bin/env bash
# File system benchmark: the cfs mount of a 3-node local cluster, a local
# directory and a bindfs mount of it (the FUSE ceiling here), interleaved
# for ROUNDS rounds; prints a markdown table of medians (min-max).
#
# Usage: bench/fs.sh [ROUNDS]   (env: BENCH_DIR, FILES, SMALL_FILES, SEQ_MIB)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cargo build --release -q -p cfs-node
CFS=$CARGO_TARGET_DIR/release/cfs
W=${BENCH_DIR:-/var/tmp/cfs-bench}
ROUNDS=${1:-3}
FILES=${FILES:-10000} SMALL_FILES=${SMALL_FILES:-2000} SEQ_MIB=${SEQ_MIB:-1024}

cleanup() {
  "$CFS" down --dir "$W/cluster" >/dev/null 2>&1 || true
  fusermount3 -u -z "$W/bindfs" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
rm -rf "$W"
mkdir -p "$W/local" "$W/bindfs" "$W/mnt" "$W/results"
"$CFS" up --dir "$W/cluster" --mount "$W/mnt" >/dev/null
bindfs "$W/local" "$W/bindfs"

# A real source tree: a few thousand files from the cargo registry.
SRC=$(ls -d "$HOME"/.cargo/registry/src/*/ | head -1)
TAR="$W/src.tar"
(cd "$SRC" && tar -cf "$TAR" $(ls -d librocksdb-sys-* tokio-1.* 2>/dev/null | head -3))
echo "tarball: $(tar -tf "$TAR" | wc -l) entries, $(du -h "$TAR" | cut -f1)" >&2

for r in $(seq 1 "$ROUNDS"); do
  for t in cfs local bindfs; do
    case $t in cfs) d="$W/mnt" ;; local) d="$W/local" ;; bindfs) d="$W/bindfs" ;; esac
    echo "round $r: $t" >&2
    "$CFS" fsbench "$d" --files "$FILES" --small-files "$SMALL_FILES" --seq-mib "$SEQ_MIB" \
      --tarball "$TAR" > "$W/results/$t.$r"
  done
done
python3 bench/fs_report.py "$W/results"
