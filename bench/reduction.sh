#!/usr/bin/env bash
# Data reduction (issue 18, docs/benchmarks.md "Data reduction"): on a
# fresh 3-node cluster (`cfs up`, release build), three mounts of the same
# cluster: `on` reducing as mounts do by default (inline dedupe and
# zstd:1), `zstd` compressing only (`--dedupe off`) and `off`
# (`--compress off --dedupe off`):
#  1. space: real data written through each: the source trees of three
#     releases of one project (PyPI sdists, unpacked), the first of them
#     copied twice, and incompressible random bytes. Reported per data
#     set: the file bytes, what the mount stored for its stripes
#     (`claudefs_fuse_stripe_{data,stored}_bytes_total`), the fragment
#     bytes on the segment servers' disks, the bytes dedupe found already
#     stored (`claudefs_fuse_dedupe_bytes_total{result="found"}`), next to
#     `zstd -3` of the same
#     files (each file alone, and the tree as one tar stream) and a
#     file-level dedupe (each distinct content once).
#  2. throughput: fio sequential write then read (1 MiB blocks, caches
#     dropped between) of SIZE_MIB per run, incompressible and
#     compressible (fio --buffer_compress_percentage=COMPRESS_PCT) data,
#     medians of RUNS runs, through each mount in alternation; ratios on
#     the run's own `off` figures. Goal: >= 0.70 of off for
#     incompressible data.
#     A fourth target, `enc`, is a directory of the `on` mount whose
#     files are also sealed with a tenant's key (`cfs admin policy set
#     DIR --encrypt bench`, D51): what encryption at rest costs on top.
#  3. duplicated data: SIZE_MIB of random bytes from a local file copied
#     (dd, 1 MiB blocks, fsync) into each mount once, then again into a
#     second file: the second copy's MB/s, medians of RUNS, ratios on
#     `off`. Goal: faster than off.
#
# Usage: bench/reduction.sh   (env: RUNS, SIZE_MIB, COMPRESS_PCT, PROJECT,
# RELEASES, CACHE: where the sdists are kept between runs, PARTS: which of
# `space throughput dup` to run, all by default)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
COMPRESS_PCT=${COMPRESS_PCT:-75}
PROJECT=${PROJECT:-Django}
RELEASES=${RELEASES:-"4.2.16 5.0.9 5.1.3"}
PARTS=${PARTS:-"space throughput dup"}
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
for t in fio zstd curl; do
  command -v $t >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q $t >/dev/null
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cargo build --release -q -p cfs-node
CFS="$CARGO_TARGET_DIR/release/cfs"
WORK=$(mktemp -d /var/tmp/cfs-bench-reduction.XXXXXX)
CL="$WORK/cluster"
ON="$WORK/on" OFF="$WORK/off"
cleanup() {
  for m in "$ON" "$WORK/zstd" "$OFF"; do fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  "$CFS" down --dir "$CL" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- the data sets, outside the cluster ------------------------------------
DATA="$WORK/data"
mkdir -p "$DATA/src" "$DATA/random"
echo "== fetching $PROJECT $RELEASES (PyPI sdists)" >&2
CACHE=${CACHE:-/var/tmp/cfs-bench-cache/reduction}
for r in $RELEASES; do
  mkdir -p "$CACHE/$r"
  sdist=$(ls "$CACHE/$r"/*.tar.gz 2>/dev/null | head -1 || true)
  if [ -z "$sdist" ]; then
    pip download -q --no-binary :all: --no-deps "$PROJECT==$r" -d "$CACHE/$r" >&2
    sdist=$(ls "$CACHE/$r"/*.tar.gz | head -1)
  fi
  mkdir -p "$DATA/src/$r"
  tar -xzf "$sdist" -C "$DATA/src/$r"
done
first=${RELEASES%% *}
cp -a "$DATA/src/$first" "$DATA/src/$first-copy"
head -c $((256 << 20)) /dev/urandom >"$DATA/random/r.bin"

# --- the cluster and its two mounts ------------------------------------------
"$CFS" up --nodes 3 --dir "$CL" >/dev/null
mount_one() { # DIR NAME [OPTS]
  local dir=$1 name=$2
  shift 2
  mkdir -p "$dir"
  "$CFS" mount "$dir" --dir "$CL" --metrics-listen 127.0.0.1:0 \
    --metrics-url-file "$WORK/$name.url" "$@" >"$WORK/$name.log" 2>&1 &
  until mountpoint -q "$dir" && [ -s "$WORK/$name.url" ]; do sleep 0.2; done
}
ZS="$WORK/zstd"
mount_one "$ON" on
mount_one "$ZS" zstd --dedupe off
mount_one "$OFF" off --compress off --dedupe off
# The `enc` target: a tenant's directory on the `on` mount.
"$CFS" admin keys create bench --dir "$CL" >/dev/null
mkdir "$ON/enc"
"$CFS" admin policy set "$ON/enc" --encrypt bench >/dev/null
target_dir() { # off | on | enc -> the directory written through
  if [ "$1" = enc ]; then echo "$ON/enc"; else echo "$WORK/$1"; fi
}
counter() { # NAME METRIC
  curl -s "$(cat "$WORK/$1.url")" | awk -v m="$2" '$1 ~ "^"m"({|$)" {s += $2} END {printf "%d\n", s}'
}
stored() { du -sb "$CL"/node-*/data/segments | awk '{s += $1} END {printf "%d\n", s}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}'; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# --- 1. space -----------------------------------------------------------------
if part space; then
echo "| data set | file bytes MiB | mount | stripe data MiB | dedupe found MiB | stripe stored MiB | stripe ratio | fragments on disk MiB | zstd -3 per file MiB | zstd -3 tar MiB | file-level dedupe MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for set in src random; do
  files=$(du -sb --apparent-size "$DATA/$set" | cut -f1)
  per_file=$(find "$DATA/$set" -type f -print0 | xargs -0 -n 200 sh -c 'for f; do zstd -3 -q -c "$f" | wc -c; done' _ | awk '{s += $1} END {print s}')
  tarred=$(tar -C "$DATA/$set" -cf - . | zstd -3 -q -c | wc -c)
  unique=$(python3 - "$DATA/$set" <<'EOF'
import hashlib, os, sys
seen, total = set(), 0
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        p = os.path.join(root, f)
        if os.path.islink(p) or not os.path.isfile(p):
            continue
        h = hashlib.sha256(open(p, "rb").read()).digest()
        if h not in seen:
            seen.add(h)
            total += os.path.getsize(p)
print(total)
EOF
)
  for m in on zstd off; do
    dir=$WORK/$m
    d0=$(counter $m claudefs_fuse_stripe_data_bytes_total)
    h0=$(counter $m claudefs_fuse_dedupe_bytes_total'{result="found"}')
    s0=$(counter $m claudefs_fuse_stripe_stored_bytes_total)
    f0=$(stored)
    cp -a "$DATA/$set" "$dir/$set-$m"
    sync
    d1=$(counter $m claudefs_fuse_stripe_data_bytes_total)
    h1=$(counter $m claudefs_fuse_dedupe_bytes_total'{result="found"}')
    s1=$(counter $m claudefs_fuse_stripe_stored_bytes_total)
    f1=$(stored)
    echo "| $set | $(mib "$files") | $m | $(mib $((d1 - d0 + h1 - h0))) | $(mib $((h1 - h0))) | $(mib $((s1 - s0))) | $(ratio $((d1 - d0 + h1 - h0)) $((s1 - s0))) | $(mib $((f1 - f0))) | $(mib "$per_file") | $(mib "$tarred") | $(mib "$unique") |"
    diff -r "$DATA/$set" "$dir/$set-$m" >/dev/null || { echo "$set through $m does not read back equal" >&2; exit 1; }
  done
done

fi

# --- 2. throughput ------------------------------------------------------------
# Fresh bytes per block (--refill_buffers) and per run (--randrepeat=0):
# fio's fixed seed would write the same bytes in every run, which the
# `on` mount would find already stored (dedupe) instead of writing.
fio_mbs() { # DIR RW EXTRA... -> MB/s
  local dir=$1 rw=$2
  shift 2
  fio --name=seq --directory="$dir" --filename=seq.bin --rw="$rw" --bs=1M \
    --size="${SIZE_MIB}M" --ioengine=psync --end_fsync=1 --refill_buffers --randrepeat=0 \
    --output-format=json "$@" 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; r=j["write"] if j["write"]["io_bytes"] else j["read"]; print("%.1f" % (r["bw"] / 1024))'
}
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
if part throughput; then
echo
echo "| data | mount | write MB/s (median of $RUNS) | read MB/s | write vs off | read vs off |"
echo "|---|---|---|---|---|---|"
for kind in incompressible compressible; do
  extra=()
  [ $kind = compressible ] && extra=(--buffer_compress_percentage="$COMPRESS_PCT" --buffer_compress_chunk=4096)
  declare -A W R
  W=() R=()
  for i in $(seq 1 "$RUNS"); do
    for m in off on enc; do
      dir=$(target_dir $m)
      rm -f "$dir/seq.bin"
      drop
      W[$m]+="$(fio_mbs "$dir" write "${extra[@]}") "
      drop
      R[$m]+="$(fio_mbs "$dir" read "${extra[@]}") "
      rm -f "$dir/seq.bin"
    done
  done
  woff=$(echo ${W[off]} | tr ' ' '\n' | median)
  roff=$(echo ${R[off]} | tr ' ' '\n' | median)
  for m in off on enc; do
    w=$(echo ${W[$m]} | tr ' ' '\n' | median)
    r=$(echo ${R[$m]} | tr ' ' '\n' | median)
    echo "| $kind | $m | $w | $r | $(ratio "$w" "$woff") | $(ratio "$r" "$roff") |"
  done
  echo "$kind runs: write off [${W[off]}] on [${W[on]}] enc [${W[enc]}]; read off [${R[off]}] on [${R[on]}] enc [${R[enc]}]" >&2
done

fi

# --- 3. duplicated data ---------------------------------------------------------
if part dup; then
head -c $((SIZE_MIB << 20)) /dev/urandom >"$WORK/dup.bin"
dd_mbs() { # SRC DST -> MB/s
  local t0 t1
  t0=$(date +%s.%N)
  dd if="$1" of="$2" bs=1M conv=fsync status=none
  t1=$(date +%s.%N)
  awk -v b=$((SIZE_MIB << 20)) -v a="$t0" -v z="$t1" 'BEGIN {printf "%.1f", b / (z - a) / 1e6}'
}
echo
echo "| data | mount | second copy MB/s (median of $RUNS) | vs off |"
echo "|---|---|---|---|"
declare -A D
D=()
for i in $(seq 1 "$RUNS"); do
  for m in off on enc; do
    dir=$(target_dir $m)
    rm -f "$dir"/dup-*.bin
    dd_mbs "$WORK/dup.bin" "$dir/dup-a.bin" >/dev/null
    D[$m]+="$(dd_mbs "$WORK/dup.bin" "$dir/dup-b.bin") "
    cmp "$WORK/dup.bin" "$dir/dup-b.bin" || { echo "dup-b through $m differs" >&2; exit 1; }
    rm -f "$dir"/dup-*.bin
  done
done
doff=$(echo ${D[off]} | tr ' ' '\n' | median)
for m in off on enc; do
  d=$(echo ${D[$m]} | tr ' ' '\n' | median)
  echo "| duplicated (${SIZE_MIB} MiB random, written twice) | $m | $d | $(ratio "$d" "$doff") |"
done
echo "duplicated runs: off [${D[off]}] on [${D[on]}] enc [${D[enc]}]" >&2
fi
