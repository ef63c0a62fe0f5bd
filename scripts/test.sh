#!/usr/bin/env bash
# The whole test suite: formatting, lints, the monitoring checks, unit
# tests, the deterministic simulation (CFS_SIM_SEEDS seeds) and end-to-end
# tests against real multi-process clusters on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/cfs-target}
export CFS_SIM_SEEDS=${CFS_SIM_SEEDS:-500}
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
# Rules, alert unit tests, configs and dashboards (offline, real promtool).
bash scripts/check-monitoring.sh
cargo test --workspace --all-targets
echo "test.sh: all tests passed"
