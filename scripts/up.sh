#!/usr/bin/env bash
# Builds ClaudeFS and starts a local 3-node cluster on loopback.
# Usage: scripts/up.sh [DIR] [NODES]     (stop it with: cfs down --dir DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-./cluster} NODES=${2:-3}
bash scripts/setup.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cargo build --release -q -p cfs-node
exec "$CARGO_TARGET_DIR/release/cfs" up --nodes "$NODES" --dir "$DIR"
