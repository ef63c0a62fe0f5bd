#!/usr/bin/env bash
# Tree workloads for bench/fs.sh (docs/benchmarks.md) on a real source
# tree, a PyPI sdist (Django 5.1.4: ~10k entries): extract, copy, walk,
# compare, sync, commit to git and remove it under DIR/tree, each step cold
# (caches dropped first). Prints `tree_<step> <seconds> s` per step and, on
# a cfs mount (METRICS_URL_FILE given and present), `tree_<step>_rtt
# <round trips per tree entry> rt/entry` and `tree_<step>_req <FUSE requests
# per tree entry> req/entry`. Any tool failure or difference aborts.
#
# Usage: bash bench/tree.sh DIR [METRICS_URL_FILE]   (fs.sh sources it)
# Env: TREE_SDIST (django==5.1.4), TREE_CACHE (/var/tmp/cfs-bench-cache).
TREE_SDIST=${TREE_SDIST:-django==5.1.4}
TREE_CACHE=${TREE_CACHE:-/var/tmp/cfs-bench-cache}

# tree_fetch OUT [FALLBACK]: the sdist as an uncompressed tar in OUT,
# downloaded once into TREE_CACHE; the tar FALLBACK (with a warning) if the
# download fails.
tree_fetch() {
  local out=$1 fallback=${2:-} cache=$TREE_CACHE/$TREE_SDIST sdist
  sdist=$(ls "$cache"/*.tar.gz 2>/dev/null | head -1 || true)
  if [ -z "$sdist" ] &&
    pip download -q --no-binary :all: --no-deps "$TREE_SDIST" -d "$cache" >&2; then
    sdist=$(ls "$cache"/*.tar.gz | head -1)
  fi
  if [ -n "$sdist" ]; then
    gzip -dc "$sdist" > "$out"
  elif [ -n "$fallback" ]; then
    echo "warning: could not download $TREE_SDIST; tree workloads use $fallback" >&2
    cp "$fallback" "$out"
  else
    echo "could not download $TREE_SDIST" >&2
    return 1
  fi
}

# tree_entries TAR: the number of entries (find | wc -l) of TAR extracted on
# the local disk, the per-entry denominator.
tree_entries() {
  local ref n
  ref=$(mktemp -d /var/tmp/cfs-tree.XXXXXX)
  tar -xf "$1" -C "$ref"
  n=$(find "$ref" | wc -l)
  rm -rf "$ref"
  echo "$n"
}

tree_cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# Round trips and FUSE requests (summed over ops) so far, once the requests
# are still: the FORGETs after a cache drop and the RELEASEs after a close
# reach the mount late.
tree_scrape() {
  curl -sf "$TREE_URL" | awk '
    $1 == "claudefs_fuse_round_trips_total" { rt = $2; seen = 1 }
    $1 ~ /^claudefs_fuse_requests_total([{]|$)/ { req += $2 }
    END { if (!seen) exit 1; printf "%.0f %.0f\n", rt, req }'
}
tree_counters() {
  local a b= i
  for i in $(seq 50); do
    a=$(tree_scrape) || { echo "cannot read claudefs_fuse_* from $TREE_URL" >&2; return 1; }
    [ "${a#* }" = "${b#* }" ] && break
    b=$a
    sleep 0.1
  done
  echo "$a"
}

# tree_step NAME CMD...: times CMD (stdout discarded), which must succeed,
# and prints its row(s).
tree_step() {
  local name=$1 c0 c1 t0 t1
  shift
  if [ -n "$TREE_URL" ]; then c0=$(tree_counters) || exit 1; fi
  t0=$(date +%s.%N)
  "$@" > /dev/null || { echo "tree_$name failed: $*" >&2; exit 1; }
  t1=$(date +%s.%N)
  awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN { printf "tree_%s %.3f s\n", n, b - a }'
  if [ -n "$TREE_URL" ]; then
    c1=$(tree_counters) || exit 1
    echo "$c0 $c1" | awk -v n="$name" -v e="$TREE_ENTRIES" '{
      printf "tree_%s_rtt %.3f rt/entry\n", n, ($3 - $1) / e
      printf "tree_%s_req %.3f req/entry\n", n, ($4 - $2) / e }'
  fi
}

# The steps that are more than one command.
tree_find() { # every entry must be there
  local n
  n=$(find "$1" | wc -l) || return 1
  [ "$n" = "$TREE_ENTRIES" ] || { echo "find $1: $n entries, not $TREE_ENTRIES" >&2; return 1; }
}
tree_diff() { # exit status 1: the copies differ
  diff -r "$1" "$2" >&2 || { [ $? = 1 ] && echo "diff -r $1 $2: the copies differ" >&2; return 1; }
}
tree_git() { # a reproducible git: no user or system config
  GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1 git -C "$1" -c safe.directory='*' \
    -c init.defaultBranch=main -c user.name=bench -c user.email=bench@localhost \
    -c gc.auto=0 "${@:2}"
}
tree_git_commit() { tree_git "$1" init -q && tree_git "$1" add -A && tree_git "$1" commit -qm x; }
tree_git_status() { # the checkout must be clean
  local s
  s=$(tree_git "$1" status --porcelain) || return 1
  [ -z "$s" ] || { echo "git status in $1: not clean: $(echo "$s" | head -3)" >&2; return 1; }
}

# tree_run DIR TAR ENTRIES [METRICS_URL_FILE]: the workloads on DIR/tree: a
# is the extraction, b its cp -a copy, c its rsync copy and the git repo.
tree_run() {
  local t=$1/tree tar=$2
  TREE_ENTRIES=$3 TREE_URL=
  if [ -n "${4:-}" ] && [ -f "$4" ]; then TREE_URL=$(cat "$4"); fi
  rm -rf "$t"
  mkdir -p "$t/a"
  tree_cold
  cat "$tar" > /dev/null # the tarball is on the local disk: read it warm
  tree_step tar tar -xf "$tar" -C "$t/a"
  tree_cold; tree_step cp cp -a "$t/a" "$t/b"
  tree_cold; tree_step find tree_find "$t/a"
  tree_cold; tree_step du du -s "$t/a"
  tree_cold; tree_step ls_lR ls -lR "$t/a"
  tree_cold; tree_step diff tree_diff "$t/a" "$t/b"
  tree_cold; tree_step rsync rsync -a "$t/a/" "$t/c/"
  tree_cold; tree_step git_commit tree_git_commit "$t/c"
  tree_cold; tree_step git_status tree_git_status "$t/c"
  tree_cold; tree_step rm rm -rf "$t"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  [ $# -ge 1 ] && [ -d "$1" ] || { echo "usage: bash bench/tree.sh DIR [METRICS_URL_FILE]" >&2; exit 2; }
  command -v rsync >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q rsync >/dev/null
  tar=$(mktemp /var/tmp/cfs-tree.XXXXXX)
  trap 'rm -f "$tar"' EXIT
  tree_fetch "$tar"
  n=$(tree_entries "$tar")
  echo "tree: $n entries" >&2
  tree_run "$1" "$tar" "$n" "${2:-}"
fi
