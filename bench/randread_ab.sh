#!/usr/bin/env bash
# 4 KiB random reads with and without compression (docs/benchmarks.md,
# "What compression costs random reads"): one fresh 3-node cluster
# (`cfs up`, release build), two mounts of it (`--compress off` and the
# default zstd:1); on each in turn, ROUNDS times: fio writes a SIZE_MIB
# file of fresh, 75 % compressible bytes sequentially (1 MiB blocks,
# end_fsync), caches are dropped, and
# fio reads 4 KiB at random for SECONDS. Prints the IOPS of each run.
#
# Usage: bench/randread_ab.sh   (env: ROUNDS 2, SIZE_MIB 1024, SECONDS_RUN 10)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2} SIZE_MIB=${SIZE_MIB:-1024} SECS=${SECONDS_RUN:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
command -v fio >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q fio >/dev/null
cargo build --release -q -p cfs-node
CFS="$CARGO_TARGET_DIR/release/cfs"
W=$(mktemp -d /var/tmp/cfs-bench-randread.XXXXXX)
CL=$W/cluster
cleanup() {
  for m in "$W/on" "$W/off"; do umount -l "$m" 2>/dev/null || true; done
  "$CFS" down --dir "$CL" >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT
"$CFS" up --nodes 3 --dir "$CL" >/dev/null
for m in on off; do
  mkdir -p "$W/$m"
  opt=()
  [ $m = off ] && opt=(--compress off)
  "$CFS" mount "$W/$m" --dir "$CL" "${opt[@]}" --metrics-listen 127.0.0.1:0 \
    --metrics-url-file "$W/$m.url" >"$W/$m.log" 2>&1 &
  until mountpoint -q "$W/$m" && [ -s "$W/$m.url" ]; do sleep 0.2; done
done
# A mount's counter (sum over its label sets).
counter() { # MOUNT NAME
  curl -s "$(cat "$W/$1.url")" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%d", s }'
}
for r in $(seq 1 "$ROUNDS"); do
  for m in off on; do
    d=$W/$m/fio
    mkdir -p "$d"
    rm -f "$d/fio.bin"
    c=(--directory="$d" --filename=fio.bin --size="${SIZE_MIB}M" --ioengine=psync
      --output-format=json --group_reporting)
    # Fresh bytes per block (one buffer repeated would be stored once by
    # dedupe, D50, and read from a handful of cached stripes), 75 %
    # compressible so that the `on` mount stores them compressed, new in
    # every round (--randrepeat=0: fio's fixed seed would write the same
    # bytes again, found by dedupe).
    fio --name=seqw --rw=write --bs=1M --end_fsync=1 --refill_buffers --randrepeat=0 \
      --buffer_compress_percentage=75 --buffer_compress_chunk=4096 "${c[@]}" >/dev/null
    sync
    echo 3 >/proc/sys/vm/drop_caches
    iops=$(fio --name=randr --rw=randread --bs=4k --time_based --runtime="$SECS" "${c[@]}" |
      python3 -c "import json,sys; print(round(json.load(sys.stdin)['jobs'][0]['read']['iops']))")
    echo "round $r compress $m: randread $iops IOPS"
    rm -f "$d/fio.bin"
  done
done
# What each mount stored (so that `on` is seen to have compressed) and
# how its small reads were served (D49: frames read in part).
for m in off on; do
  data=$(counter $m claudefs_fuse_stripe_data_bytes_total)
  stored=$(counter $m claudefs_fuse_stripe_stored_bytes_total)
  part=$(counter $m 'claudefs_fuse_stripe_reads_total{how="part"}')
  whole=$(counter $m 'claudefs_fuse_stripe_reads_total{how="whole"}')
  echo "compress $m: $((data >> 20)) MiB into stripes, $((stored >> 20)) MiB stored; small reads: $part in part, $whole whole"
done
