#!/usr/bin/env bash
# Builds ClaudeFS, starts a local 3-node cluster on loopback and mounts it.
# Usage: scripts/up.sh [DIR] [MNT] [NODES]
#   stop and unmount with: /var/tmp/cfs-target/release/cfs down --dir DIR
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-./cluster} MNT=${2:-./mnt} NODES=${3:-3}
bash scripts/setup.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cargo build --release -q -p cfs-node
exec "$CARGO_TARGET_DIR/release/cfs" up --nodes "$NODES" --dir "$DIR" --mount "$MNT"
