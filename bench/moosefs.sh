#!/usr/bin/env bash
# MooseFS on this machine, for side-by-side benchmarks: one master and three
# chunkservers on loopback (each with its own directory), goal 3 (three
# copies of every chunk), mounted with mfsmount.
#
# Usage: bench/moosefs.sh up DIR MNT     (idempotent; installs the Debian packages)
#        bench/moosefs.sh down DIR MNT
#
# Durability: chunkservers are configured to fsync before closing a chunk
# (HDD_FSYNC_BEFORE_CLOSE = 1; MooseFS' default is 0), and fsync(2) on the
# mount flushes to all three copies, so fsync-based workloads compare like
# for like with cfs, which fsyncs every log entry and stripe.
set -euo pipefail
cmd=${1:?up|down} D=${2:?DIR} M=${3:?MNT}
D=$(realpath -m "$D") M=$(realpath -m "$M")
# MooseFS refuses loopback addresses between its daemons: give them a
# private address on a dummy interface of this machine.
IP=$(bash "$(dirname "$0")/bench-ip.sh")

down() {
  umount -l "$M" 2>/dev/null || true
  for i in 1 2 3; do
    [ -f "$D/cs$i/mfschunkserver.cfg" ] && mfschunkserver -c "$D/cs$i/mfschunkserver.cfg" stop >/dev/null 2>&1 || true
  done
  [ -f "$D/master/mfsmaster.cfg" ] && mfsmaster -c "$D/master/mfsmaster.cfg" stop >/dev/null 2>&1 || true
}

case $cmd in
down) down; echo "moosefs down" ;;
up)
  if ! command -v mfsmaster >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      moosefs-master moosefs-chunkserver moosefs-client moosefs-cli >/dev/null
  fi
  if mountpoint -q "$M"; then echo "moosefs already mounted at $M"; exit 0; fi
  mkdir -p "$D/master" "$M"
  cat > "$D/master/mfsmaster.cfg" <<EOF
WORKING_USER = root
WORKING_GROUP = root
DATA_PATH = $D/master
EXPORTS_FILENAME = $D/master/mfsexports.cfg
MATOML_LISTEN_HOST = $IP
MATOCS_LISTEN_HOST = $IP
MATOCL_LISTEN_HOST = $IP
EOF
  echo "*  /  rw,alldirs,admin,maproot=0:0" > "$D/master/mfsexports.cfg"
  [ -e "$D/master/metadata.mfs" ] || echo "MFSM NEW" > "$D/master/metadata.mfs"
  mfsmaster -c "$D/master/mfsmaster.cfg" start >/dev/null
  for i in 1 2 3; do
    mkdir -p "$D/cs$i/data" "$D/cs$i/hdd"
    cat > "$D/cs$i/mfschunkserver.cfg" <<EOF
WORKING_USER = root
WORKING_GROUP = root
DATA_PATH = $D/cs$i/data
HDD_CONF_FILENAME = $D/cs$i/mfshdd.cfg
CSSERV_LISTEN_HOST = $IP
CSSERV_LISTEN_PORT = 94${i}2
MASTER_HOST = $IP
HDD_FSYNC_BEFORE_CLOSE = 1
HDD_LEAVE_SPACE_DEFAULT = 1GiB
EOF
    echo "$D/cs$i/hdd" > "$D/cs$i/mfshdd.cfg"
    mfschunkserver -c "$D/cs$i/mfschunkserver.cfg" start >/dev/null
  done
  mfsmount "$M" -H $IP -o nonempty >/dev/null
  mfssetgoal -r 3 "$M" >/dev/null
  # Deleted files go to MooseFS' trash for a day by default, keeping their
  # chunks on disk: rounds of 1 GiB files filled this machine's disk.
  mfssettrashtime -r 0 "$M" >/dev/null
  # Wait until the master sees all three chunkservers.
  for _ in $(seq 1 60); do
    [ "$(mfscli -H $IP -SCS -p 2>/dev/null | grep -cF "$IP")" -ge 3 ] && break
    sleep 1
  done
  echo "moosefs up: master + 3 chunkservers, goal 3, mounted at $M"
  ;;
*) echo "usage: $0 up|down DIR MNT" >&2; exit 2 ;;
esac
