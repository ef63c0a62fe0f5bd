#!/usr/bin/env bash
# GlusterFS on this machine, for side-by-side benchmarks: glusterd, a
# replica-3 volume of three bricks (each its own directory), FUSE-mounted.
#
# Usage: bench/glusterfs.sh up DIR MNT     (idempotent; installs the Debian packages)
#        bench/glusterfs.sh down DIR MNT   (unmounts, deletes the volume, stops glusterd)
set -euo pipefail
cmd=${1:?up|down} D=${2:?DIR} M=${3:?MNT}
D=$(realpath -m "$D") M=$(realpath -m "$M")
VOL=cfsbench
# Bricks must not be on a loopback address: a private one on this machine.
IP=$(bash "$(dirname "$0")/bench-ip.sh")
G="gluster --mode=script"

case $cmd in
down)
  umount -l "$M" 2>/dev/null || true
  if pgrep -x glusterd >/dev/null; then
    $G volume stop $VOL force >/dev/null 2>&1 || true
    $G volume delete $VOL >/dev/null 2>&1 || true
    pkill -x glusterd || true
  fi
  pkill -x glusterfsd 2>/dev/null || true
  pkill -f "glusterfs.*$VOL" 2>/dev/null || true
  echo "glusterfs down"
  ;;
up)
  if ! command -v glusterd >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q glusterfs-server glusterfs-client >/dev/null
  fi
  if mountpoint -q "$M"; then echo "glusterfs already mounted at $M"; exit 0; fi
  pgrep -x glusterd >/dev/null || glusterd
  for _ in $(seq 1 30); do $G volume list >/dev/null 2>&1 && break; sleep 1; done
  if ! $G volume info $VOL >/dev/null 2>&1; then
    mkdir -p "$D/b1" "$D/b2" "$D/b3"
    $G volume create $VOL replica 3 "$IP:$D/b1" "$IP:$D/b2" "$IP:$D/b3" force >/dev/null
  fi
  $G volume start $VOL force >/dev/null 2>&1 || true
  mkdir -p "$M"
  mount -t glusterfs "$IP:/$VOL" "$M"
  for _ in $(seq 1 30); do mountpoint -q "$M" && break; sleep 1; done
  echo "glusterfs up: replica-3 volume $VOL ($D/b1..b3), mounted at $M"
  ;;
*) echo "usage: $0 up|down DIR MNT" >&2; exit 2 ;;
esac
