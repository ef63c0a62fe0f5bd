#!/usr/bin/env bash
set -euo pipefail
# DuckDB for the Parquet query crate: the prebuilt libduckdb.so shipped in the npm
# package @duckdb/node-bindings-linux-x64 (building the crate's bundled C++ takes
# 45+ minutes). Must match the duckdb crate (=1.10506.1 <-> DuckDB v1.5.6).
DUCKDB_NPM_VERSION=1.5.6-r.1
DUCKDB_NPM_INTEGRITY=sha512-IXcrZJE6kEqM0Z4wwdVnGBHX/frOS33VPNAwDXQ/Q+Fs84b058Qe94chrCCIcNJlG8Y3UHIUU4eBeCQxW5mN1Q==
DUCKDB_DIR=${CFS_DUCKDB_DIR:-/var/tmp/cfs-duckdb/1.5.6}
if [ ! -f "$DUCKDB_DIR/libduckdb.so" ]; then
  echo "setup: fetching libduckdb.so (npm @duckdb/node-bindings-linux-x64@$DUCKDB_NPM_VERSION)" >&2
  pkg=https://registry.npmjs.org/@duckdb/node-bindings-linux-x64
  # The registry's dist.integrity must equal the pinned one (guards a typo in either).
  reg=$(curl -fsSL --retry 3 "$pkg/$DUCKDB_NPM_VERSION" | grep -o '"integrity": *"sha512-[^"]*"' | head -1 | sed 's/.*"\(sha512-[^"]*\)"/\1/')
  [ "$reg" = "$DUCKDB_NPM_INTEGRITY" ] || { echo "setup: registry integrity '$reg' != pinned" >&2; exit 1; }
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  curl -fsSL --retry 3 -o "$tmp/pkg.tgz" "$pkg/-/node-bindings-linux-x64-$DUCKDB_NPM_VERSION.tgz"
  want=$(printf %s "${DUCKDB_NPM_INTEGRITY#sha512-}" | base64 -d | od -An -v -tx1 | tr -d ' \n')
  echo "$want  $tmp/pkg.tgz" | sha512sum -c --quiet - || { echo "setup: libduckdb tarball sha512 mismatch" >&2; exit 1; }
  tar -xzf "$tmp/pkg.tgz" -C "$tmp" package/libduckdb.so
  mkdir -p "$DUCKDB_DIR"
  install -m 0755 "$tmp/package/libduckdb.so" "$DUCKDB_DIR/libduckdb.so.part"
  mv -f "$DUCKDB_DIR/libduckdb.so.part" "$DUCKDB_DIR/libduckdb.so"   # atomic: never a half file
  rm -rf "$tmp"; trap - EXIT
fi
