//! The engine against a real index written by the lakehouse's writer:
//! reports, the seed's glob, formats, and every kind of hostile query.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cfs_admin::{AdminError, Engine, Limits, Report};
use cfs_lakehouse::manifest::{now_ns, Manifest, FORMAT};
use cfs_lakehouse::state::{Delta, Meta, Namespace};

const DIR: u32 = libc::S_IFDIR | 0o755;
const FILE: u32 = libc::S_IFREG | 0o644;

fn meta(mode: u32, uid: u32, size: u64, mtime_s: i64) -> Meta {
    Meta {
        mode,
        uid,
        gid: uid,
        size,
        allocated: size,
        stored: size,
        nlink: 1,
        atime: mtime_s * 1_000_000_000,
        mtime: mtime_s * 1_000_000_000,
        ctime: mtime_s * 1_000_000_000,
    }
}

/// / ─ proj/{a.h5 (uid 0, 100 B), b.txt (uid 1, 50 B)}, data/old.h5
/// (uid 1, 7 B, ten years old), link → proj/a.h5 (a hard link).
fn write_index(dir: &Path) {
    let now = now_ns() / 1_000_000_000;
    let mut ns = Namespace::default();
    let inodes = [
        (1, meta(DIR, 0, 0, now)),
        (2, meta(DIR, 0, 0, now)),
        (3, meta(DIR, 0, 0, now)),
        (
            10,
            Meta {
                nlink: 2,
                ..meta(FILE, 0, 100, now)
            },
        ),
        // Compressed: 50 bytes mapped, 20 stored.
        (
            11,
            Meta {
                stored: 20,
                ..meta(FILE, 1, 50, now)
            },
        ),
        (12, meta(FILE, 1, 7, now - 3650 * 86_400)),
    ];
    for (i, m) in inodes {
        ns.apply(Delta::Inode(i, Some(m)));
    }
    for (p, n, c) in [
        (1, "proj", 2),
        (1, "data", 3),
        (2, "a.h5", 10),
        (2, "b.txt", 11),
        (3, "old.h5", 12),
        (1, "link", 10),
    ] {
        ns.apply(Delta::Link {
            parent: p,
            name: n.as_bytes().into(),
            child: Some(c),
        });
    }
    save(dir, &ns);
}

/// Writes `ns` as the index's generation 1.
fn save(dir: &Path, ns: &Namespace) {
    let now = now_ns() / 1_000_000_000;
    let rows = ns.rows();
    let w = cfs_lakehouse::parquet_out::write_generation(dir, 1, now, &rows, 2).unwrap();
    Manifest {
        format: FORMAT,
        generation: 1,
        written_at_ns: now_ns(),
        current_at_ns: now_ns(),
        positions: BTreeMap::from([(0, 42)]),
        files: w.files,
        rows: rows.len() as u64,
        bytes: w.bytes,
        flush_seconds: 0.0,
    }
    .save(dir, true)
    .unwrap();
}

fn engine(dir: &Path) -> Engine {
    Engine::open(
        dir,
        &[],
        Limits {
            time: Duration::from_secs(2),
            rows: 1000,
            ..Limits::default()
        },
    )
    .unwrap()
}

fn rows(e: &Engine, sql: &str) -> serde_json::Value {
    e.query(sql, None).unwrap().json_rows().unwrap()
}

#[test]
fn reports_and_the_seeds_glob_answer_from_the_index() {
    let d = tempfile::tempdir().unwrap();
    write_index(d.path());
    let e = engine(d.path());
    let users = e
        .report(&Report::parse("top-users", None, None, None, None).unwrap())
        .unwrap();
    // The hard link counts once: root has 100 B, uid 1 has 57 B.
    let u = users.json_rows().unwrap();
    assert_eq!(u[0]["owner_name"], "root");
    assert_eq!(u[0]["bytes"], 100);
    assert_eq!(u[1]["owner_uid"], 1);
    assert_eq!(u[1]["bytes"], 57);
    assert!(users.index.lag_seconds < 60.0);
    assert_eq!(users.index.positions.get(&0), Some(&42));
    let find = e
        .report(&Report::parse("find", None, None, Some("*.h5"), None).unwrap())
        .unwrap()
        .json_rows()
        .unwrap();
    let paths: Vec<&str> = find
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/data/old.h5", "/proj/a.h5"]);
    let stale = e
        .report(&Report::parse("stale", None, None, None, Some(180)).unwrap())
        .unwrap()
        .json_rows()
        .unwrap();
    assert_eq!(stale.as_array().unwrap().len(), 1);
    assert_eq!(stale[0]["path"], "/data/old.h5");
    let dirs = e
        .report(&Report::parse("top-dirs", None, Some(1), None, None).unwrap())
        .unwrap()
        .json_rows()
        .unwrap();
    assert_eq!(dirs[0]["dir"], "/proj");
    assert_eq!(dirs[0]["bytes"], 50);
    assert_eq!(dirs[1]["dir"], "/data");
    let types = e
        .report(&Report::parse("types", None, None, None, None).unwrap())
        .unwrap()
        .json_rows()
        .unwrap();
    // A hard-linked file counts once, under its first path ("/link",
    // which has no extension).
    let types: Vec<(String, u64)> = types
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["file_type"].as_str().unwrap().to_string(),
                r["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        types,
        [
            ("".to_string(), 100),
            ("txt".to_string(), 50),
            ("h5".to_string(), 7)
        ]
    );
    let red = e
        .report(&Report::parse("reduction-report", None, None, None, None).unwrap())
        .unwrap();
    assert!(red
        .note
        .as_deref()
        .unwrap()
        .contains("claudefs_fuse_dedupe_bytes_total"));
    let red = red.json_rows().unwrap();
    let proj = red
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["dir"] == "/proj")
        .expect("/proj row")
        .clone();
    assert_eq!(
        (
            &proj["bytes"],
            &proj["mapped_bytes"],
            &proj["stored_bytes"],
            &proj["saved_bytes"]
        ),
        // a.h5 counts once, by its first path (/link, at the top).
        (&50.into(), &50.into(), &20.into(), &30.into()),
        "{red}"
    );
    // The seed's glob, relative to the lakehouse directory.
    let n = rows(&e, "SELECT count(*) AS n FROM 'index/**/*.parquet'");
    assert_eq!(n[0]["n"], 7);
    // Formats: CSV with a header, Arrow IPC, a table.
    let a = e
        .query("SELECT path FROM files ORDER BY path", None)
        .unwrap();
    let csv = String::from_utf8(a.to_csv().unwrap()).unwrap();
    assert!(csv.starts_with("path\n/\n/data\n"), "{csv}");
    let ipc = a.to_arrow().unwrap();
    let r = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None).unwrap();
    let n: usize = r.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(n, 7);
    assert!(a.to_table().unwrap().contains("/proj/a.h5"));
}

#[test]
fn the_row_limit_cuts_and_says_so() {
    let d = tempfile::tempdir().unwrap();
    write_index(d.path());
    let e = engine(d.path());
    let a = e.query("SELECT * FROM files", Some(3)).unwrap();
    assert_eq!(a.rows(), 3);
    assert!(a.truncated);
    let a = e.query("SELECT * FROM files;", Some(7)).unwrap();
    assert_eq!(a.rows(), 7);
    assert!(!a.truncated);
}

#[test]
fn hostile_queries_are_refused_and_change_nothing() {
    let d = tempfile::tempdir().unwrap();
    write_index(d.path());
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.csv");
    std::fs::write(&secret, "a\n1\n").unwrap();
    let e = engine(d.path());
    let refused = |sql: &str| match e.query(sql, None) {
        Err(AdminError::Refused(m)) => m,
        other => panic!(
            "{sql}: expected a refusal, got {:?}",
            other.map(|a| a.rows())
        ),
    };
    for sql in [
        "DROP VIEW files",
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO files VALUES (1)",
        &format!("COPY (SELECT 1) TO '{}/x.csv'", d.path().display()),
        "ATTACH ':memory:' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "PRAGMA version",
        "SELECT 1; SELECT 2",
    ] {
        let m = refused(sql);
        assert!(!m.is_empty());
    }
    // Reads outside the index: DuckDB's own sandbox says no.
    for sql in [
        format!("SELECT * FROM read_csv('{}')", secret.display()),
        "SELECT * FROM read_text('/etc/passwd')".to_string(),
        "SELECT * FROM read_csv('index/../../../../etc/passwd')".to_string(),
        "SELECT * FROM glob('/etc/*')".to_string(),
    ] {
        match e.query(&sql, None) {
            Err(AdminError::DuckDb(err)) => {
                let m = err.to_string();
                assert!(
                    m.contains("ermission") || m.contains("disabled"),
                    "{sql}: {m}"
                );
            }
            other => panic!(
                "{sql}: expected a DuckDB refusal, got {:?}",
                other.map(|a| a.rows())
            ),
        }
    }
    // Malformed SQL: DuckDB's parser error, a client error.
    match e.query("SELEC * FROM files", None) {
        Err(err @ AdminError::Sql(_)) => assert_eq!(err.status(), 400),
        other => panic!("expected a parser error, got {:?}", other.map(|a| a.rows())),
    }
    // The view and the files are still there.
    assert_eq!(rows(&e, "SELECT count(*) AS n FROM files")[0]["n"], 7);
    assert!(!d.path().join("x.csv").exists());
    // An allowed file is readable (a join with an external CSV).
    let e2 = Engine::open(d.path(), std::slice::from_ref(&secret), Limits::default()).unwrap();
    let n = e2
        .query(
            &format!("SELECT count(*) AS n FROM '{}'", secret.display()),
            None,
        )
        .unwrap()
        .json_rows()
        .unwrap();
    assert_eq!(n[0]["n"], 1);
}

#[test]
fn a_query_over_the_time_limit_is_cancelled() {
    let d = tempfile::tempdir().unwrap();
    write_index(d.path());
    let e = engine(d.path());
    let started = std::time::Instant::now();
    match e.query(
        "SELECT count(*) FROM range(100000000000) a, range(1000) b",
        None,
    ) {
        Err(err @ AdminError::Cancelled(_)) => assert_eq!(err.status(), 408),
        other => panic!("expected a cancellation, got {:?}", other.map(|a| a.rows())),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // The engine still answers.
    assert_eq!(rows(&e, "SELECT count(*) AS n FROM files")[0]["n"], 7);
}

/// `top-dirs` at each depth equals the directories' totals taken path by
/// path (a file counts under its ancestors of that depth, files too
/// shallow for it not at all).
#[test]
fn top_dirs_at_every_depth() {
    let d = tempfile::tempdir().unwrap();
    let now = now_ns() / 1_000_000_000;
    let mut ns = Namespace::default();
    for i in [1, 2, 3, 4, 5, 6] {
        ns.apply(Delta::Inode(i, Some(meta(DIR, 0, 0, now))));
    }
    for (i, size) in [(10, 10), (11, 5), (12, 7), (13, 1)] {
        ns.apply(Delta::Inode(i, Some(meta(FILE, 0, size, now))));
    }
    // /a/b/c/f1 (10 B), /a/b/g (5 B), /a/x/y/f2 (7 B), /h (1 B)
    for (p, n, c) in [
        (1, "a", 2),
        (2, "b", 3),
        (3, "c", 4),
        (4, "f1", 10),
        (3, "g", 11),
        (2, "x", 5),
        (5, "y", 6),
        (6, "f2", 12),
        (1, "h", 13),
    ] {
        ns.apply(Delta::Link {
            parent: p,
            name: n.as_bytes().into(),
            child: Some(c),
        });
    }
    save(d.path(), &ns);
    let e = engine(d.path());
    let dirs = |depth: usize| -> Vec<(String, u64)> {
        let a = e
            .report(&Report::parse("top-dirs", None, Some(depth), None, None).unwrap())
            .unwrap()
            .json_rows()
            .unwrap();
        a.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["dir"].as_str().unwrap().to_string(),
                    r["bytes"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let s = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
        v.iter().map(|(d, b)| (d.to_string(), *b)).collect()
    };
    assert_eq!(dirs(1), s(&[("/a", 22)]));
    assert_eq!(dirs(2), s(&[("/a/b", 15), ("/a/x", 7)]));
    assert_eq!(dirs(3), s(&[("/a/b/c", 10), ("/a/x/y", 7)]));
    assert_eq!(dirs(4), s(&[]));
    let red = e
        .report(&Report::parse("reduction-report", None, None, None, None).unwrap())
        .unwrap()
        .json_rows()
        .unwrap();
    assert_eq!(red[0]["dir"], "/a");
    assert_eq!(red[0]["bytes"], 22);
    assert_eq!(red.as_array().unwrap().len(), 1);
}
