#!/usr/bin/env bash
# Early answers (D30) against --sync-namespace on one cluster, one mount at
# a time (a second mount would hold a lease and turn early answers off),
# ROUNDS rounds interleaved: fsbench metadata phases, tar -x and rm -rf of
# the sdist bench/fs.sh uses (TAR). Prints "MODE ROUND METRIC VALUE UNIT".
# Usage: bench/early_ab.sh [ROUNDS]
set -u
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cd "$(dirname "$0")/.."
cargo build --release -q -p cfs-node
CFS=$CARGO_TARGET_DIR/release/cfs
TAR=${TAR:-/var/tmp/cfs-bench/src.tar}  # the sdist bench/fs.sh fetched
D=/var/tmp/ab
$CFS down --dir $D/c >/dev/null 2>&1; umount -l $D/m 2>/dev/null; rm -rf $D; mkdir -p $D/m
$CFS up --dir $D/c >/dev/null
for r in $(seq 1 "${1:-3}"); do
  for mode in early sync; do
    extra=""; [ $mode = sync ] && extra="--sync-namespace"
    $CFS mount $D/m --dir $D/c $extra > $D/mount-$mode-$r.log 2>&1 &
    pid=$!
    for i in $(seq 100); do mountpoint -q $D/m && break; sleep 0.1; done
    mkdir -p $D/m/$mode-$r
    $CFS fsbench $D/m/$mode-$r --files 2000 --small-files 300 --seq-mib 8 2>&1 | grep -E "^(create|unlink|mkdir|rmdir|small_write_fsync|create_tree|unlink_tree) " | sed "s/^/$mode $r /"
    # tar -x of the sdist
    mkdir -p $D/m/$mode-$r-tar; s=$(date +%s.%N); tar -xf "$TAR" -C $D/m/$mode-$r-tar; e=$(date +%s.%N)
    echo "$mode $r tar_x $(echo "$e - $s" | bc) s"
    s=$(date +%s.%N); rm -rf $D/m/$mode-$r-tar; e=$(date +%s.%N)
    echo "$mode $r rm_rf $(echo "$e - $s" | bc) s"
    umount $D/m; wait $pid 2>/dev/null
  done
done
$CFS down --dir $D/c >/dev/null
