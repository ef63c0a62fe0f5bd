#!/usr/bin/env bash
# Installs what building and testing ClaudeFS needs on Debian 12 (root).
# Idempotent: does nothing when everything is present.
set -euo pipefail
need=()
# libclang-dev/clang: RocksDB's bindings; fuse3: fusermount3 for `cfs mount`;
# bindfs and fio: the FUSE baseline and the throughput tool of the benchmarks;
# acl: setfacl/getfacl for the POSIX ACL test; prometheus (server, promtool)
# and prometheus-alertmanager (amtool): the monitoring checks and tests;
# chromium and chromium-driver: the admin web UI tests; python3-venv: the
# Python packages of the lakehouse interop and UI tests.
for p in build-essential pkg-config ca-certificates curl libclang-dev clang fuse3 bindfs fio acl prometheus prometheus-alertmanager chromium chromium-driver python3-venv; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: no Rust toolchain found; install one with rustup (https://rustup.rs), Rust >= 1.88" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt 2>/dev/null || true
# pjdfstest, the POSIX suite the mount is tested with.
if ! command -v pjdfstest >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/pjdfstest" ]; then
  echo "setup: installing pjdfstest (cargo install)" >&2
  cargo install --quiet --locked pjdfstest 2>/dev/null || cargo install --quiet pjdfstest
fi
# DuckDB for cfs-admin: the prebuilt libduckdb.so from npm (D46).
bash "$(dirname "$0")/setup-duckdb.sh"
# Python packages the tests use to read the lakehouse's Parquet files
# (DuckDB, pyarrow, polars) and to drive Chromium (selenium).
CFS_VENV=${CFS_VENV:-/var/tmp/cfs-venv}
if ! "$CFS_VENV/bin/python" -c "import duckdb, pyarrow, polars, selenium" >/dev/null 2>&1; then
  echo "setup: Python packages into $CFS_VENV (duckdb, pyarrow, polars, selenium)" >&2
  python3 -m venv "$CFS_VENV"
  "$CFS_VENV/bin/pip" install --quiet --disable-pip-version-check duckdb pyarrow polars selenium
fi
