#!/usr/bin/env bash
# Installs what building and testing ClaudeFS needs on Debian 12 (root).
# Idempotent: does nothing when everything is present.
set -euo pipefail
need=()
# libclang-dev/clang: RocksDB's bindings; fuse3: fusermount3 for `cfs mount`;
# bindfs and fio: the FUSE baseline and the throughput tool of the benchmarks;
# acl: setfacl/getfacl for the POSIX ACL test; prometheus (server, promtool)
# and prometheus-alertmanager (amtool): the monitoring checks and tests.
for p in build-essential pkg-config ca-certificates curl libclang-dev clang fuse3 bindfs fio acl prometheus prometheus-alertmanager; do
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
  echo "setup: no Rust toolchain found; install one with rustup (https://rustup.rs), Rust >= 1.80" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt 2>/dev/null || true
# pjdfstest, the POSIX suite the mount is tested with.
if ! command -v pjdfstest >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/pjdfstest" ]; then
  echo "setup: installing pjdfstest (cargo install)" >&2
  cargo install --quiet --locked pjdfstest 2>/dev/null || cargo install --quiet pjdfstest
fi
