#!/usr/bin/env bash
# The cost of mutual TLS on one connection over loopback, against
# plaintext in the same run (medians of 5, interleaved): metadata-sized
# request/reply round trips and a 1 GiB one-way stream. The cost on the
# whole file system: bench/fs.sh cfs cfs-plaintext (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
cargo run --release -q -p cfs-net --example tls_cost
