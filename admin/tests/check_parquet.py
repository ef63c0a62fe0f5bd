#!/usr/bin/env python3
"""The lakehouse's Parquet files in other readers: DuckDB's Python package,
pyarrow and polars each read the files the manifest names (and the seed's
glob) and find the expected rows and columns; the gateway's Arrow IPC
answer decodes in pyarrow.

usage: check_parquet.py LAKEHOUSE_DIR EXPECTED_ROWS GATEWAY_URL TOKEN [CA HOST:IP]

With CA (the cluster's ca.crt) the gateway is HTTPS and its certificate is
checked against it; HOST:IP makes the certificate's name resolve to the
gateway's address.
"""
import json
import os
import sys
import urllib.parse
import urllib.request

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

import cfs_https

SEED_COLUMNS = [
    "inode", "path", "filename", "parent_path", "owner_uid", "owner_name",
    "group_gid", "group_name", "size_bytes", "blocks_stored", "mtime", "ctime",
    "file_type", "is_replicated",
]


def main():
    lake, want, url, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    tls = None
    if len(sys.argv) > 6:
        cfs_https.resolve(*sys.argv[6].split(":", 1))
        tls = cfs_https.context(sys.argv[5])
    with open(os.path.join(lake, "index.json")) as f:
        manifest = json.load(f)
    files = [os.path.join(lake, p) for p in manifest["files"]]
    for p in files:
        # Hive partitions as in the seed.
        assert "/index/year=" in p and "/month=" in p and "/day=" in p, p

    con = duckdb.connect()
    n = con.execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchone()[0]
    assert n == want, f"duckdb: {n} rows, want {want}"
    glob = os.path.join(lake, "index/**/*.parquet")
    n = con.execute(f"SELECT count(*) FROM '{glob}'").fetchone()[0]
    assert n == want, f"duckdb glob: {n} rows, want {want}"
    print(f"PASS duckdb {duckdb.__version__}: {n} rows")

    t = pa.concat_tables([pq.read_table(p) for p in files])
    assert t.num_rows == want, f"pyarrow: {t.num_rows}"
    names = t.schema.names
    assert names[: len(SEED_COLUMNS)] == SEED_COLUMNS, names
    paths = t.column("path").to_pylist()
    assert paths == sorted(paths, key=lambda s: s.encode()), "rows sorted by path"
    md = pq.ParquetFile(files[0]).metadata
    assert md.row_group(0).column(0).compression == "ZSTD", md.row_group(0).column(0)
    print(f"PASS pyarrow {pa.__version__}: {t.num_rows} rows, zstd, sorted by path")

    df = pl.read_parquet(files)
    assert df.height == want, f"polars: {df.height}"
    assert set(SEED_COLUMNS) <= set(df.columns)
    print(f"PASS polars {pl.__version__}: {df.height} rows")

    q = urllib.parse.urlencode({"sql": "SELECT path, size_bytes FROM files ORDER BY path", "format": "arrow"})
    req = urllib.request.Request(f"{url}/api/query?{q}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60, context=tls) as r:
        assert r.headers["Content-Type"].startswith("application/vnd.apache.arrow.stream")
        assert r.headers["X-Cfs-Index-Timestamp"], "index timestamp header"
        ipc = pa.ipc.open_stream(r.read()).read_all()
    assert ipc.num_rows == want, f"arrow ipc: {ipc.num_rows}"
    print(f"PASS arrow ipc from the gateway: {ipc.num_rows} rows")


if __name__ == "__main__":
    main()
