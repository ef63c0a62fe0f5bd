//! `cfs lakehouse-bench`: the lakehouse at scale without a cluster
//! (`bench/lakehouse.sh` runs it and the freshness part on a live one).
//!
//! 1. ingest: N synthetic namespace changes (one inode and one name per
//!    file, a tree of directories of `FILES_PER_DIR`, 50 owners, 20 types,
//!    two years of times) applied to the lakehouse's state;
//! 2. flush: paths, sort, Parquet (zstd) as the lakehouse writes them;
//! 3. namespace scan: the same tree (up to `--scan-entries`) written into
//!    a real namespace RocksDB, read back as the lakehouse does at start
//!    or after lost changes;
//! 4. reports: top-users, top-dirs --depth 3, find '*.h5', stale --days
//!    180 over the index, median of `--runs`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use cfs_lakehouse::manifest::{now_ns, Manifest, FORMAT};
use cfs_lakehouse::state::{Delta, Meta, Namespace};
use cfs_proto::types::Ino;
use serde::Serialize;

/// Files per synthetic directory.
const FILES_PER_DIR: u64 = 1000;
/// Directories per level above the leaves.
const FANOUT: u64 = 32;
const TYPES: [&str; 20] = [
    "h5", "txt", "py", "rs", "json", "csv", "parquet", "png", "jpg", "log", "tar", "gz", "md", "c",
    "h", "so", "o", "npy", "pt", "bin",
];

#[derive(Serialize)]
pub struct BenchReport {
    pub entries: u64,
    pub ingest_seconds: f64,
    pub ingest_entries_per_s: f64,
    pub rows: u64,
    pub flush_seconds: f64,
    pub parquet_files: usize,
    pub parquet_bytes: u64,
    pub parquet_bytes_per_file: u64,
    pub scan_entries: u64,
    pub scan_seconds: f64,
    pub scan_entries_per_s: f64,
    /// Report → median seconds.
    pub reports: Vec<(String, f64)>,
}

/// A cheap deterministic mix (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The synthetic tree's deltas for `files` files, in creation order: each
/// file costs two (its inode, its name); directories are made as needed.
fn synthetic(files: u64, mut sink: impl FnMut(Delta)) {
    let now_s = now_ns() / 1_000_000_000;
    let dir_meta = |t: i64| Meta {
        mode: libc::S_IFDIR | 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        allocated: 0,
        stored: 0,
        nlink: 2,
        atime: t,
        mtime: t,
        ctime: t,
    };
    sink(Delta::Inode(1, Some(dir_meta(now_s * 1_000_000_000))));
    let leaves = files.div_ceil(FILES_PER_DIR);
    // Leaf directory d sits at /dA/dB/dC with A, B, C from d.
    let mut next_ino: Ino = 2;
    let mut made: std::collections::HashMap<(u64, u64), Ino> = std::collections::HashMap::new();
    for leaf in 0..leaves {
        let parts = [
            leaf / (FANOUT * FANOUT),
            leaf / FANOUT % FANOUT,
            leaf % FANOUT,
        ];
        let mut parent: Ino = 1;
        for (level, p) in parts.iter().enumerate() {
            let key = (level as u64, leaf / FANOUT.pow(2 - level as u32));
            let ino = match made.get(&key) {
                Some(i) => *i,
                None => {
                    let i = next_ino;
                    next_ino += 1;
                    sink(Delta::Inode(i, Some(dir_meta(now_s * 1_000_000_000))));
                    sink(Delta::Link {
                        parent,
                        name: format!("d{level}_{p:03}").into_bytes().into(),
                        child: Some(i),
                    });
                    made.insert(key, i);
                    i
                }
            };
            parent = ino;
        }
        let n = FILES_PER_DIR.min(files - leaf * FILES_PER_DIR);
        for f in 0..n {
            let id = leaf * FILES_PER_DIR + f;
            let h = mix(id);
            let ino = next_ino;
            next_ino += 1;
            let age_s = (h % (2 * 365 * 86_400)) as i64;
            let t = (now_s - age_s) * 1_000_000_000;
            let size = 1u64 << ((h >> 8) % 24);
            sink(Delta::Inode(
                ino,
                Some(Meta {
                    mode: libc::S_IFREG | 0o644,
                    uid: 1000 + (h >> 16) as u32 % 50,
                    gid: 1000 + (h >> 24) as u32 % 10,
                    size,
                    allocated: size,
                    stored: size,
                    nlink: 1,
                    atime: t,
                    mtime: t,
                    ctime: t,
                }),
            ));
            let ext = TYPES[(h >> 32) as usize % TYPES.len()];
            sink(Delta::Link {
                parent,
                name: format!("file_{id:09}.{ext}").into_bytes().into(),
                child: Some(ino),
            });
        }
    }
}

/// Writes the tree's first `files` files into a namespace RocksDB at
/// `path` (keys as the materializer writes them) and times a full scan.
fn scan_bench(path: &Path, files: u64) -> anyhow::Result<(u64, f64)> {
    use cfs_materializers::{keys, store::Txn, NamespaceDb};
    let _ = std::fs::remove_dir_all(path);
    let db = NamespaceDb::open(path).context("opening a scratch namespace")?;
    let mut kinds: std::collections::HashMap<Ino, u32> = std::collections::HashMap::new();
    let mut kvs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    synthetic(files, |d| match d {
        Delta::Inode(ino, Some(m)) => {
            kinds.insert(ino, m.mode & libc::S_IFMT);
            let i = cfs_proto::types::Inode {
                ino,
                mode: m.mode,
                uid: m.uid,
                gid: m.gid,
                size: m.size,
                nlink: m.nlink,
                atime: m.atime,
                mtime: m.mtime,
                ctime: m.ctime,
                crtime: m.ctime,
                rdev: 0,
                generation: 0,
                allocated: m.allocated,
                stored: m.stored,
                parent: 0,
                next_cookie: 0,
                entries: 0,
                acl: None,
                compression: None,
                dedupe: None,
                tenant: None,
                snapshot: false,
            };
            kvs.push((keys::inode(ino), cfs_materializers::store::encode(&i)));
        }
        Delta::Link {
            parent,
            name,
            child: Some(c),
        } => {
            let kind = kinds.get(&c).copied().unwrap_or(0);
            kvs.push((
                keys::dentry(parent, &name),
                cfs_materializers::store::encode(&(c, kind, 0u64)),
            ));
        }
        _ => {}
    });
    drop(kinds);
    let entries = kvs.len() as u64;
    for chunk in kvs.chunks(100_000) {
        let mut txn = Txn::new(&db);
        for (k, v) in chunk {
            txn.put_raw(k.clone(), v.clone());
        }
        txn.keep();
        db.commit(txn, cfs_log::ShardId(0), cfs_log::Position(1))?;
    }
    drop(kvs);
    let started = Instant::now();
    let (ns, _) = cfs_lakehouse::source::scan(&db, &[cfs_log::ShardId(0)])?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        ns.inodes() as u64 + ns.links() as u64 + 1 >= entries,
        "scan read {} inodes and {} names of {entries} entries",
        ns.inodes(),
        ns.links()
    );
    drop(ns);
    drop(db);
    let _ = std::fs::remove_dir_all(path);
    Ok((entries, secs))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(
    dir: &Path,
    entries: u64,
    scan_entries: u64,
    runs: usize,
) -> anyhow::Result<BenchReport> {
    std::fs::create_dir_all(dir)?;
    let lake = dir.join("lakehouse");
    let _ = std::fs::remove_dir_all(&lake);
    std::fs::create_dir_all(&lake)?;
    // Two deltas per file (inode, name).
    let files = entries / 2;
    let mut deltas = Vec::with_capacity(entries as usize + 1024);
    synthetic(files, |d| deltas.push(d));
    let n = deltas.len() as u64;
    let mut ns = Namespace::default();
    let started = Instant::now();
    for d in deltas {
        ns.apply(d);
    }
    let ingest = started.elapsed().as_secs_f64();
    eprintln!("ingest: {n} entries in {ingest:.2} s");
    let started = Instant::now();
    let rows = ns.rows();
    let now = now_ns();
    let w = cfs_lakehouse::parquet_out::write_generation(&lake, 1, now / 1_000_000_000, &rows, 2)?;
    let flush = started.elapsed().as_secs_f64();
    let nrows = rows.len() as u64;
    drop(rows);
    drop(ns);
    Manifest {
        format: FORMAT,
        generation: 1,
        written_at_ns: now_ns(),
        current_at_ns: now,
        positions: Default::default(),
        files: w.files.clone(),
        rows: nrows,
        bytes: w.bytes,
        flush_seconds: flush,
    }
    .save(&lake, true)?;
    eprintln!(
        "flush: {nrows} rows, {} files, {} bytes in {flush:.2} s",
        w.files.len(),
        w.bytes
    );
    let (scanned, scan_s) = if scan_entries > 0 {
        scan_bench(&dir.join("namespace"), scan_entries / 2)?
    } else {
        (0, 0.0)
    };
    if scanned > 0 {
        eprintln!("namespace scan: {scanned} entries in {scan_s:.2} s");
    }
    let engine = cfs_admin::Engine::open(
        &lake,
        &[],
        cfs_admin::Limits {
            time: Duration::from_secs(120),
            ..cfs_admin::Limits::default()
        },
    )?;
    let mut reports = Vec::new();
    for (name, depth, pattern, days) in [
        ("top-users", None, None, None),
        ("top-dirs", Some(3), None, None),
        ("find", None, Some("*.h5"), None),
        ("stale", None, None, Some(180)),
    ] {
        let r = cfs_admin::Report::parse(name, None, depth, pattern, days)?;
        let mut times = Vec::new();
        for _ in 0..runs.max(1) {
            let started = Instant::now();
            let a = engine.report(&r)?;
            times.push(started.elapsed().as_secs_f64());
            anyhow::ensure!(a.rows() > 0, "{name} answered no rows");
        }
        let m = median(times);
        eprintln!("{name}: median {m:.3} s");
        reports.push((name.to_string(), m));
    }
    Ok(BenchReport {
        entries: n,
        ingest_seconds: ingest,
        ingest_entries_per_s: n as f64 / ingest,
        rows: nrows,
        flush_seconds: flush,
        parquet_files: w.files.len(),
        parquet_bytes: w.bytes,
        parquet_bytes_per_file: w.bytes / w.files.len().max(1) as u64,
        scan_entries: scanned,
        scan_seconds: scan_s,
        scan_entries_per_s: if scan_s > 0.0 {
            scanned as f64 / scan_s
        } else {
            0.0
        },
        reports,
    })
}
