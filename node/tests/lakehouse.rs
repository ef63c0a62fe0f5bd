//! The metadata lakehouse and the admin gateway on a real 3-node cluster
//! with a mount: the index equals what a walk of the mount (`find`,
//! `stat`) says, through deletes, a directory rename, a node restart and
//! the loss of the index; the gateway's HTTP API refuses what it must;
//! the Parquet files open in DuckDB, pyarrow and polars; and the web UI,
//! loaded in a real headless Chromium, shows the same numbers.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::fuse::Mount;
use common::Cluster;
use serde_json::Value;

/// The flush interval of this test's lakehouse.
const FLUSH_MS: u64 = 1000;
/// How long after a change the index must show it (the issue's goal:
/// the flush interval + 5 s).
const FRESH: Duration = Duration::from_millis(FLUSH_MS + 5000);

/// The Python of `scripts/setup.sh` (duckdb, pyarrow, polars, selenium).
fn python() -> PathBuf {
    let venv = std::env::var("CFS_VENV").unwrap_or_else(|_| "/var/tmp/cfs-venv".into());
    let p = PathBuf::from(venv).join("bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh (it installs the test's Python packages)",
        p.display()
    );
    p
}

/// The name the gateway's certificate carries (a node certificate).
const GATEWAY_NAME: &str = cfs_net::principal::ANY_NODE;

struct Gateway {
    addr: std::net::SocketAddr,
    token: String,
    /// The cluster's TLS directory (`ca.crt`, `admin.crt`, `mount.crt`).
    tls: PathBuf,
}

impl Gateway {
    fn of(cl: &Cluster) -> Gateway {
        let (addr, token) = cfs_node::cluster::admin_gateway(&cl.dir)
            .expect("configs")
            .expect("node 1 serves the gateway");
        Gateway {
            addr,
            token,
            tls: cfs_node::cluster::tls_dir(&cl.dir),
        }
    }

    /// The gateway's URL under its certificate's name.
    fn url(&self) -> String {
        format!("https://{GATEWAY_NAME}:{}", self.addr.port())
    }

    /// `--resolve` for the certificate's name (curl, the test scripts).
    fn resolve(&self) -> String {
        format!("{GATEWAY_NAME}:{}", self.addr.ip())
    }

    /// `curl` a path over HTTPS, the server checked against the cluster's
    /// CA: (status, body; status 0 when no HTTP answer came). `auth`: send
    /// the token.
    fn get(&self, path: &str, auth: bool) -> (u16, Vec<u8>) {
        self.curl(path, auth, &[])
    }

    /// [`Gateway::get`] with more curl arguments (a client certificate).
    fn curl(&self, path: &str, auth: bool, extra: &[&str]) -> (u16, Vec<u8>) {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "60"]);
        c.arg("--cacert").arg(self.tls.join("ca.crt"));
        c.arg("--resolve").arg(format!(
            "{GATEWAY_NAME}:{}:{}",
            self.addr.port(),
            self.addr.ip()
        ));
        if auth {
            c.arg("-H")
                .arg(format!("Authorization: Bearer {}", self.token));
        }
        c.args(extra);
        c.arg(format!("{}{path}", self.url()));
        let out = c.output().expect("curl");
        let text = out.stdout;
        let cut = text.iter().rposition(|b| *b == b'\n').expect("status line");
        let code = String::from_utf8_lossy(&text[cut + 1..])
            .trim()
            .parse()
            .expect("status");
        (code, text[..cut].to_vec())
    }

    fn query(&self, sql: &str) -> Result<Value, (u16, String)> {
        let q = format!("/api/query?sql={}", urlencode(sql));
        let (code, body) = self.get(&q, true);
        if code != 200 {
            return Err((code, String::from_utf8_lossy(&body).into_owned()));
        }
        Ok(serde_json::from_slice(&body).expect("json answer"))
    }

    fn report(&self, name: &str, params: &str) -> Value {
        let (code, body) = self.get(&format!("/api/reports/{name}?{params}"), true);
        assert_eq!(code, 200, "{name}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("json answer")
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What the index says of one name (also what a walk of the mount says).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    kind: String,
    size: u64,
    uid: u32,
    gid: u32,
    nlink: u64,
    mode: u32,
}

fn kind_of(mode: u32) -> &'static str {
    cfs_lakehouse::parquet_out::kind_name(mode)
}

/// `find MOUNT` with `stat` of each: path (from the mount's root) → what
/// it is; plus (inode, size, uid) of every regular file, once per inode.
/// Regular files by inode: (a path, size, uid).
type Files = BTreeMap<u64, (String, u64, u32)>;

fn walk(root: &Path) -> (BTreeMap<String, Seen>, Files) {
    let mut out = BTreeMap::new();
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).expect("lstat");
        let rel = p.strip_prefix(root).expect("under root");
        let path = format!("/{}", rel.display());
        let path = if path == "/" {
            path
        } else {
            path.trim_end_matches('/').to_string()
        };
        out.insert(
            path.clone(),
            Seen {
                kind: kind_of(m.mode()).to_string(),
                size: m.size(),
                uid: m.uid(),
                gid: m.gid(),
                nlink: m.nlink(),
                mode: m.mode(),
            },
        );
        if m.is_file() {
            // A hard-linked file once, by its first path in byte order (as
            // the reports count it).
            let e = files
                .entry(m.ino())
                .or_insert((path.clone(), m.size(), m.uid()));
            if path < e.0 {
                e.0 = path.clone();
            }
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p).expect("readdir") {
                stack.push(e.expect("entry").path());
            }
        }
    }
    (out, files)
}

fn indexed(gw: &Gateway) -> Result<BTreeMap<String, Seen>, (u16, String)> {
    let a = gw.query(
        "SELECT path, kind, size_bytes, owner_uid, group_gid, nlink, mode FROM files ORDER BY path",
    )?;
    let mut out = BTreeMap::new();
    for r in a["rows"].as_array().expect("rows") {
        out.insert(
            r["path"].as_str().expect("path").to_string(),
            Seen {
                kind: r["kind"].as_str().expect("kind").to_string(),
                size: r["size_bytes"].as_u64().expect("size"),
                uid: r["owner_uid"].as_u64().expect("uid") as u32,
                gid: r["group_gid"].as_u64().expect("gid") as u32,
                nlink: r["nlink"].as_u64().expect("nlink"),
                mode: r["mode"].as_u64().expect("mode") as u32,
            },
        );
    }
    Ok(out)
}

/// Waits until the index equals a walk of the mount, at most [`FRESH`]
/// after `since` (when the last change was made); returns how long it
/// took from `since`.
fn wait_equal(gw: &Gateway, mnt: &Path, since: Instant, what: &str) -> Duration {
    let (want, _) = walk(mnt);
    loop {
        let got = indexed(gw);
        if got.as_ref().ok() == Some(&want) {
            return since.elapsed();
        }
        if since.elapsed() > FRESH {
            let got = got.unwrap_or_default();
            let missing: Vec<_> = want
                .keys()
                .filter(|k| !got.contains_key(*k))
                .take(10)
                .collect();
            let extra: Vec<_> = got
                .keys()
                .filter(|k| !want.contains_key(*k))
                .take(10)
                .collect();
            let differ: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
                .take(5)
                .map(|(k, v)| (k.clone(), v.clone(), got.get(k).cloned()))
                .collect();
            panic!(
                "{what}: the index does not equal the mount after {:?}: missing {missing:?}, \
                 extra {extra:?}, different {differ:?}",
                since.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A tree with files of several owners and types, a hard link, a
/// symlink, a fifo, and an empty directory.
fn make_tree(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let owners = [0u32, 1000, 1001, 4242];
    let types = ["h5", "txt", "py", "csv", "bin"];
    for (d, dir) in ["proj/alpha", "proj/beta/deep", "data", "empty"]
        .iter()
        .enumerate()
    {
        std::fs::create_dir_all(root.join(dir)).expect("mkdir");
        if *dir == "empty" {
            continue;
        }
        for i in 0..12usize {
            let ext = types[(i + d) % types.len()];
            let p = root.join(dir).join(format!("f{i:02}.{ext}"));
            let len = (i * 997 + d * 131) % 5000 + 1;
            std::fs::write(&p, vec![b'x'; len]).expect("write");
            let uid = owners[(i + d) % owners.len()];
            std::os::unix::fs::chown(&p, Some(uid), Some(uid + 1)).expect("chown");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        }
    }
    // A compressible file past the inline bytes: stored compressed.
    let log: String = (0..40_000)
        .map(|i| format!("{i:08} INFO stripe written segment={} ok\n", i % 97))
        .collect();
    std::fs::write(root.join("data/app.log"), log).expect("write");
    std::fs::hard_link(root.join("data/f00.py"), root.join("proj/hard.txt")).expect("link");
    std::os::unix::fs::symlink("data/f01.py", root.join("sym")).expect("symlink");
    let fifo = std::ffi::CString::new(root.join("fifo").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
}

/// What the reports must say, from a walk of the mount.
fn expected(mnt: &Path) -> Value {
    let (all, files) = walk(mnt);
    let mut names = cfs_lakehouse::names::Names::default();
    let mut users: BTreeMap<String, u64> = BTreeMap::new();
    let mut types: BTreeMap<String, u64> = BTreeMap::new();
    let mut dirs: BTreeMap<String, u64> = BTreeMap::new();
    for (path, size, uid) in files.values() {
        *users.entry(names.user(*uid).to_string()).or_default() += size;
        let name = path.rsplit('/').next().unwrap_or("");
        let t = cfs_lakehouse::parquet_out::file_type(libc::S_IFREG, name);
        *types.entry(t).or_default() += size;
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() > 2 {
            *dirs.entry(format!("/{}", parts[1])).or_default() += size;
        }
    }
    let h5: Vec<&String> = all
        .keys()
        .filter(|p| p.rsplit('/').next().is_some_and(|n| n.ends_with(".h5")))
        .collect();
    serde_json::json!({
        "top_users": users, "types": types, "dirs_depth1": dirs, "find_h5": h5, "nodes": 3,
    })
}

fn rows_as_map(a: &Value, key: &str, val: &str) -> BTreeMap<String, u64> {
    a["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r[key].as_str().expect("key").to_string(),
                r[val].as_u64().expect("value"),
            )
        })
        .collect()
}

fn check_reports(gw: &Gateway, mnt: &Path) {
    let want = expected(mnt);
    let users = gw.report("top-users", "limit=100");
    assert_eq!(
        serde_json::to_value(rows_as_map(&users, "owner_name", "bytes")).unwrap(),
        want["top_users"]
    );
    let types = gw.report("types", "limit=100");
    assert_eq!(
        serde_json::to_value(rows_as_map(&types, "file_type", "bytes")).unwrap(),
        want["types"]
    );
    let dirs = gw.report("top-dirs", "depth=1&limit=100");
    assert_eq!(
        serde_json::to_value(rows_as_map(&dirs, "dir", "bytes")).unwrap(),
        want["dirs_depth1"]
    );
    let found = gw.report("find", "pattern=*.h5");
    let paths: Vec<&str> = found["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(serde_json::to_value(paths).unwrap(), want["find_h5"]);
    // Every answer states the index's timestamp and lag.
    assert!(found["index"]["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(found["index"]["lag_seconds"].as_f64().unwrap() < 30.0);
}

fn lakehouse_dir(cl: &Cluster) -> PathBuf {
    cfs_node::cluster::lakehouse_dir(&cl.dir).expect("lakehouse dir")
}

#[test]
fn the_index_equals_the_mount_through_changes_restarts_and_loss() {
    let cl = Cluster::start_with("lakehouse", |c| c.lakehouse_flush_ms = FLUSH_MS);
    let m = Mount::new(&cl, "mnt", &[]);
    let gw = Gateway::of(&cl);
    make_tree(&m.path);
    let took = wait_equal(&gw, &m.path, Instant::now(), "after the tree");
    eprintln!("index equal to the mount {took:?} after the last change");
    check_reports(&gw, &m.path);
    // What compression saved, from the namespace's stored bytes.
    let a = gw
        .query("SELECT size_bytes, bytes_mapped, blocks_stored FROM files WHERE path = '/data/app.log'")
        .unwrap();
    let r = &a["rows"][0];
    let (size, mapped, stored) = (
        r["size_bytes"].as_u64().unwrap(),
        r["bytes_mapped"].as_u64().unwrap(),
        r["blocks_stored"].as_u64().unwrap(),
    );
    assert_eq!(size, mapped, "{a}");
    assert!(stored * 2 < mapped, "{stored} of {mapped} stored: {a}");
    let red = gw.report("reduction-report", "limit=100");
    let data = red["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["dir"] == "/data")
        .expect("/data in the reduction report");
    assert!(
        data["saved_bytes"].as_u64().unwrap() >= mapped - stored,
        "{red}"
    );

    // Deletes and a directory rename (every path beneath changes).
    std::fs::remove_file(m.path.join("data/f03.h5")).unwrap();
    std::fs::remove_dir_all(m.path.join("proj/beta/deep")).unwrap();
    std::fs::rename(m.path.join("proj"), m.path.join("projects")).unwrap();
    std::fs::write(m.path.join("projects/alpha/new.h5"), b"fresh").unwrap();
    wait_equal(&gw, &m.path, Instant::now(), "after deletes and a rename");
    check_reports(&gw, &m.path);

    // A restart of the lakehouse's node: it resumes and stays equal.
    let bin = common::bin();
    cfs_node::cluster::stop_node(&cl.dir, 1, libc::SIGTERM, Duration::from_secs(10)).unwrap();
    cfs_node::cluster::start_node(&cl.dir, 1, &bin).unwrap();
    cfs_node::cluster::wait_healthy(&cl.cfgs, Duration::from_secs(30)).unwrap();
    std::fs::write(m.path.join("after-restart.txt"), b"x").unwrap();
    wait_equal(&gw, &m.path, Instant::now(), "after a restart");
    assert!(
        cl.log_of(1).contains("lakehouse read the namespace"),
        "the restarted lakehouse read the namespace"
    );

    // The index lost: rebuilt, equal.
    let lake = lakehouse_dir(&cl);
    std::fs::remove_dir_all(lake.join("index")).unwrap();
    std::fs::remove_file(lake.join("index.json")).unwrap();
    wait_equal(&gw, &m.path, Instant::now(), "after the index was deleted");
    check_reports(&gw, &m.path);

    // The Parquet files in DuckDB's, pyarrow's and polars' own readers,
    // and the gateway's Arrow IPC answer in pyarrow.
    let (want, _) = walk(&m.path);
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../admin/tests/check_parquet.py"))
        .arg(&lake)
        .arg(want.len().to_string())
        .arg(gw.url())
        .arg(&gw.token)
        .arg(gw.tls.join("ca.crt"))
        .arg(gw.resolve())
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "check_parquet.py: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stdout));

    // The web UI in a real headless Chromium shows the same numbers.
    let expect = cl.dir.join("ui-expect.json");
    std::fs::write(&expect, expected(&m.path).to_string()).unwrap();
    let shots = cl.dir.join("ui-shots");
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../admin/tests/ui/check_ui.py"))
        .arg("--url")
        .arg(gw.url())
        .arg("--ca")
        .arg(gw.tls.join("ca.crt"))
        .arg("--resolve")
        .arg(gw.resolve())
        .arg("--token")
        .arg(&gw.token)
        .arg("--expect")
        .arg(&expect)
        .arg("--shots")
        .arg(&shots)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "check_ui.py: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn the_gateway_refuses_what_it_must() {
    let cl = Cluster::start_with("lakehouse-gw", |c| c.lakehouse_flush_ms = FLUSH_MS);
    let gw = Gateway::of(&cl);
    // The first index appears within a flush interval.
    let until = Instant::now() + FRESH;
    while gw.get("/api/index", true).0 != 200 {
        assert!(Instant::now() < until, "no index");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Unauthenticated: 401, with a wrong token too; nothing leaks.
    for path in [
        "/api/index",
        "/api/query?sql=SELECT%201",
        "/api/reports/top-users",
        "/api/overview",
    ] {
        let (code, body) = gw.get(path, false);
        assert_eq!(code, 401, "{path}");
        assert!(!String::from_utf8_lossy(&body).contains(&gw.token));
    }
    let wrong = Gateway {
        addr: gw.addr,
        token: "0".repeat(64),
        tls: gw.tls.clone(),
    };
    assert_eq!(wrong.get("/api/index", true).0, 401);
    // Mutual TLS: an administrator's certificate needs no token; a mount's
    // certificate is not an administrator's; a certificate of another
    // cluster's CA is refused at the handshake, as is plain HTTP.
    let cert = |stem: &str, dir: &Path| {
        [
            "--cert".to_string(),
            dir.join(format!("{stem}.crt")).display().to_string(),
            "--key".to_string(),
            dir.join(format!("{stem}.key")).display().to_string(),
        ]
    };
    let admin = cert("admin", &gw.tls);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    assert_eq!(gw.curl("/api/index", false, &admin).0, 200);
    let mount = cert("mount", &gw.tls);
    let mount: Vec<&str> = mount.iter().map(String::as_str).collect();
    assert_eq!(gw.curl("/api/index", false, &mount).0, 401);
    let other = tempfile::tempdir().unwrap();
    cfs_net::ca::Ca::generate("another-cluster")
        .unwrap()
        .issue_files(
            &cfs_net::Principal::Admin("intruder".into()),
            1,
            other.path(),
            "admin",
        )
        .unwrap();
    let foreign = cert("admin", other.path());
    let foreign: Vec<&str> = foreign.iter().map(String::as_str).collect();
    assert_eq!(gw.curl("/api/index", true, &foreign).0, 0, "foreign cert");
    let plain = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg(format!("http://{}/api/index", gw.addr))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "000", "plain HTTP");
    assert!(
        cl.log_of(1).contains("admin gateway: connection refused"),
        "refused connections are logged with the peer"
    );
    // A connection that never finishes its handshake is closed.
    let mut idle = std::net::TcpStream::connect(gw.addr).unwrap();
    idle.set_read_timeout(Some(cfs_net::TLS_HANDSHAKE_TIMEOUT * 3))
        .unwrap();
    let t = Instant::now();
    let n = std::io::Read::read(&mut idle, &mut [0u8; 64]).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        t.elapsed() < cfs_net::TLS_HANDSHAKE_TIMEOUT * 2,
        "{:?}",
        t.elapsed()
    );
    // Writes, attaches, extensions, files outside: refused, 400.
    for sql in [
        "DROP VIEW files",
        "COPY (SELECT 1) TO '/tmp/cfs-pwned.csv'",
        "ATTACH '/tmp/x.db'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM '../../../etc/passwd'",
    ] {
        match gw.query(sql) {
            Err((400, msg)) => assert!(msg.contains("error"), "{sql}: {msg}"),
            other => panic!("{sql}: expected 400, got {other:?}"),
        }
    }
    assert!(!Path::new("/tmp/cfs-pwned.csv").exists());
    // Malformed SQL: DuckDB's own message, 400.
    match gw.query("SELEC 1") {
        Err((400, msg)) => assert!(msg.to_lowercase().contains("syntax"), "{msg}"),
        other => panic!("expected 400, got {other:?}"),
    }
    // Unknown paths: 404; a report that does not exist: 400.
    assert_eq!(gw.get("/api/nope", true).0, 404);
    assert_eq!(gw.get("/../../etc/passwd", true).0, 404);
    assert_eq!(gw.get("/api/reports/rm-rf", true).0, 400);
    // The UI's files and health are open; metrics pass promtool's lint.
    assert_eq!(gw.get("/", false).0, 200);
    assert_eq!(gw.get("/health", false).0, 200);
    let (code, body) = gw.get("/metrics", false);
    assert_eq!(code, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("claudefs_admin_requests_total"), "{text}");
    // The overview names every node.
    let (code, body) = gw.get("/api/overview", true);
    assert_eq!(code, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["cluster"]["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(v["cluster"]["nodes_up"], 3);
    assert!(v["index"]["generation"].as_u64().unwrap() >= 1);
    // The lakehouse families are on node 1's /metrics.
    assert!(cl.metric(1, "claudefs_lakehouse_generation") >= 1);
}
