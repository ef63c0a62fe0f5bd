#!/usr/bin/env bash
# Side-by-side file system benchmark (docs/benchmarks.md): the same
# workloads on each target, interleaved across targets for ROUNDS rounds;
# prints a markdown table of medians (min-max).
#
# Usage: bench/fs.sh [-r ROUNDS] [TARGET...]
#   TARGET: cfs (a 3-node cluster on loopback, mounted, mutual TLS),
#   cfs-plaintext (the same made with --insecure-plaintext: the cost of
#   TLS is the ratio of the two), local (a directory
#   on this disk), bindfs (a bindfs mount of it: the FUSE ceiling here),
#   moosefs (master + 3 chunkservers, goal 3: bench/moosefs.sh), glusterfs
#   (replica-3 volume, FUSE: bench/glusterfs.sh), or any directory path.
#   Default: cfs local bindfs moosefs glusterfs.
# Env: FILES (10000; also 100 x 100 in a tree), SMALL_FILES (5000), SEQ_MIB
#   (1024, fsbench's own sequential pass), FIO_MIB (1024), FIO_SECONDS (20),
#   BENCH_DIR (/var/tmp/cfs-bench), TREE (1; 0 skips the tree workloads of
#   bench/tree.sh on a PyPI sdist: TREE_SDIST, TREE_CACHE there).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=3
if [ "${1:-}" = "-r" ]; then ROUNDS=$2; shift 2; fi
# Old form: bench/fs.sh ROUNDS
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then ROUNDS=$1; shift; fi
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(cfs local bindfs moosefs glusterfs)
FILES=${FILES:-10000} SMALL_FILES=${SMALL_FILES:-5000} SEQ_MIB=${SEQ_MIB:-1024}
FIO_MIB=${FIO_MIB:-1024} FIO_SECONDS=${FIO_SECONDS:-20} TREE=${TREE:-1}
bash scripts/setup.sh
command -v fio >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q fio >/dev/null
command -v rsync >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q rsync >/dev/null
source bench/tree.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cargo build --release -q -p cfs-node
CFS=$CARGO_TARGET_DIR/release/cfs
W=${BENCH_DIR:-/var/tmp/cfs-bench}

dir_of() {
  case $1 in
    cfs) echo "$W/mnt" ;; cfs-plaintext) echo "$W/mnt-plain" ;; local) echo "$W/local" ;; bindfs) echo "$W/bindfs" ;;
    moosefs) echo "$W/mfs-mnt" ;; glusterfs) echo "$W/gl-mnt" ;; *) echo "$1" ;;
  esac
}
cleanup() {
  "$CFS" down --dir "$W/cluster" >/dev/null 2>&1 || true
  "$CFS" down --dir "$W/cluster-plain" >/dev/null 2>&1 || true
  fusermount3 -u -z "$W/bindfs" >/dev/null 2>&1 || true
  bash bench/moosefs.sh down "$W/moosefs" "$W/mfs-mnt" >/dev/null 2>&1 || true
  bash bench/glusterfs.sh down "$W/gluster" "$W/gl-mnt" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
rm -rf "$W"
mkdir -p "$W/local" "$W/results"
for t in "${TARGETS[@]}"; do
  case $t in
    cfs) "$CFS" up --dir "$W/cluster" --mount "$W/mnt" >/dev/null ;;
    cfs-plaintext) "$CFS" up --insecure-plaintext --dir "$W/cluster-plain" --mount "$W/mnt-plain" >/dev/null ;;
    local) ;;
    bindfs) mkdir -p "$W/bindfs"; bindfs "$W/local" "$W/bindfs" ;;
    moosefs) bash bench/moosefs.sh up "$W/moosefs" "$W/mfs-mnt" >/dev/null 2>&1 ;;
    glusterfs) bash bench/glusterfs.sh up "$W/gluster" "$W/gl-mnt" >/dev/null 2>&1 ;;
    *) [ -d "$t" ] || { echo "no such target: $t" >&2; exit 2; } ;;
  esac
done

# A real source tree: a few thousand files from the cargo registry.
SRC=$(ls -d "$HOME"/.cargo/registry/src/*/ | head -1)
TAR="$W/src.tar"
(cd "$SRC" && tar -cf "$TAR" $(ls -d librocksdb-sys-* tokio-1.* 2>/dev/null | head -3))
echo "tarball: $(tar -tf "$TAR" | wc -l) entries, $(du -h "$TAR" | cut -f1)" >&2
# The tree workloads' tree: the sdist, or that tarball if PyPI fails.
if [ "$TREE" != 0 ]; then
  tree_fetch "$W/tree.tar" "$TAR"
  TREE_N=$(tree_entries "$W/tree.tar")
  echo "tree: $TREE_N entries, $(du -h "$W/tree.tar" | cut -f1)" >&2
fi

# fio: 1 MiB sequential write (end_fsync) and read (cold), 4 KiB random
# reads (IOPS, p99) and 4 KiB random writes each followed by fsync.
fio_run() {
  local d=$1/fio-bench out
  mkdir -p "$d"
  local common=(--directory="$d" --filename=fio.bin --size="${FIO_MIB}M" --ioengine=psync
    --output-format=json --group_reporting)
  j() { python3 -c "import json,sys; d=json.load(sys.stdin)['jobs'][0]; print($1)"; }
  # Fresh bytes for every block (--refill_buffers): fio otherwise writes
  # one buffer over and over, which a deduplicating store (cfs, D50)
  # keeps once, measuring dedupe rather than the data path), different in
  # every run (--randrepeat=0: fio's fixed seed writes the same bytes
  # each time, found again by dedupe).
  out=$(fio --name=seqw --rw=write --bs=1M --end_fsync=1 --refill_buffers --randrepeat=0 "${common[@]}")
  echo "fio_seq_write $(echo "$out" | j "round(d['write']['bw_bytes']/1e6,1)") MB/s"
  sync; echo 3 > /proc/sys/vm/drop_caches
  out=$(fio --name=seqr --rw=read --bs=1M "${common[@]}")
  echo "fio_seq_read $(echo "$out" | j "round(d['read']['bw_bytes']/1e6,1)") MB/s"
  sync; echo 3 > /proc/sys/vm/drop_caches
  out=$(fio --name=randr --rw=randread --bs=4k --time_based --runtime="$FIO_SECONDS" "${common[@]}")
  echo "fio_rand_read $(echo "$out" | j "round(d['read']['iops'])") IOPS"
  echo "fio_rand_read_p99 $(echo "$out" | j "round(d['read']['clat_ns']['percentile']['99.000000']/1e6,2)") ms"
  out=$(fio --name=randw --rw=randwrite --bs=4k --fsync=1 --time_based --runtime="$FIO_SECONDS" "${common[@]}")
  echo "fio_rand_write_fsync $(echo "$out" | j "round(d['write']['iops'])") IOPS"
  rm -rf "$d"
}

for r in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    d=$(dir_of "$t")
    name=$(basename "$t")
    echo "round $r: $name" >&2
    {
      "$CFS" fsbench "$d" --files "$FILES" --small-files "$SMALL_FILES" --seq-mib "$SEQ_MIB" \
        --tarball "$TAR"
      fio_run "$d"
      # The tree workloads; on cfs also round trips and requests per entry.
      if [ "$TREE" != 0 ]; then
        metrics=
        [ "$t" != cfs ] || metrics=$W/cluster/mount/metrics-url
        [ "$t" != cfs-plaintext ] || metrics=$W/cluster-plain/mount/metrics-url
        tree_run "$d" "$W/tree.tar" "$TREE_N" "$metrics"
      fi
    } > "$W/results/$name.$r"
  done
done
python3 bench/fs_report.py "$W/results"
