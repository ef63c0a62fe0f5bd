//! Observability checked by the real tools (docs/metrics.md): every
//! daemon's `/metrics` passes `promtool check metrics`; a real Prometheus
//! scrapes a 3-node cluster and a mount under load, evaluates the shipped
//! rules, and answers every expression of every shipped dashboard with
//! data; `cfs admin status` lists every daemon with its metrics URL.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cfs_node::cluster;
use common::fuse::{cfs, Mount};
use common::Cluster;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// A mount started as `cfs up --mount` starts one, so that `cfs admin
/// status --dir` finds it (DIR/mount/{metrics-url,path}).
fn mount_with_metrics(c: &Cluster, name: &str) -> (Mount, SocketAddr) {
    let md = c.dir.join("mount");
    std::fs::create_dir_all(&md).expect("mount dir");
    let url_file = md.join("metrics-url");
    let m = Mount::new(
        c,
        name,
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-url-file",
            url_file.to_str().expect("utf-8 path"),
        ],
    );
    std::fs::write(md.join("path"), m.path.as_os_str().as_encoded_bytes()).expect("path");
    let url = std::fs::read_to_string(&url_file).expect("metrics url");
    let addr = url
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .parse()
        .expect("metrics address");
    (m, addr)
}

/// Creates, writes, reads, stats and removes small files, asks for names
/// that do not exist, fails an rmdir (so the error family has data), and
/// writes and reads one file large enough for the segment servers.
fn load(dir: &Path, rounds: usize) {
    let d = dir.join("load");
    let _ = std::fs::create_dir_all(&d);
    for i in 0..rounds {
        let p = d.join(format!("f{i}"));
        let mut f = std::fs::File::create(&p).expect("create");
        f.write_all(&vec![i as u8; 4096 + i * 512]).expect("write");
        f.sync_all().expect("fsync");
        drop(f);
        assert_eq!(std::fs::read(&p).expect("read").len(), 4096 + i * 512);
        let _ = std::fs::metadata(d.join(format!("absent{i}")));
        if i % 3 == 0 {
            std::fs::remove_file(&p).expect("unlink");
        }
    }
    // An error only the file system can give (the kernel asks it).
    let full = d.join("full");
    let _ = std::fs::create_dir(&full);
    std::fs::write(full.join("x"), b"x").expect("write");
    let e = std::fs::remove_dir(&full).expect_err("rmdir of a non-empty directory");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    // Past the inline limit: fragments go to the segment servers.
    let big = d.join("big");
    let data: Vec<u8> = (0..300 << 10).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&big, &data).expect("write big");
    assert_eq!(std::fs::read(&big).expect("read big"), data);
}

/// `promtool check metrics` on `text`: its problems (empty when clean).
fn promtool_check(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup.sh installs the prometheus package)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said.trim().to_string()
    } else {
        format!("promtool failed ({}): {said}", out.status)
    }
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    cluster::http_get(addr, path).expect("http get")
}

/// A raw request, for methods `http_get` does not send.
fn request(addr: SocketAddr, raw: &str) -> u16 {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    s.write_all(raw.as_bytes()).expect("send");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn every_daemon_serves_clean_metrics_and_nothing_else() {
    let c = Cluster::start("mon-lint");
    let (m, mount_addr) = mount_with_metrics(&c, "mnt");
    load(&m.path, 30);

    for cfg in &c.cfgs {
        let (code, body) = get(cfg.http, "/metrics");
        assert_eq!(code, 200);
        assert_eq!(promtool_check(&body), "", "node {} metrics", cfg.node_id);
        for family in [
            "claudefs_build_info{daemon=\"node\"",
            "claudefs_log_commit_duration_seconds_bucket",
            "claudefs_log_wal_fsync_duration_seconds_bucket",
            "claudefs_log_ballot{shard=",
            "claudefs_log_trimmed_position{shard=",
            "claudefs_materializer_lag_entries{materializer=\"namespace\",shard=",
            "claudefs_materializer_apply_duration_seconds_bucket",
            "claudefs_meta_request_duration_seconds_bucket",
            "claudefs_segments_device_capacity_bytes{device=",
            "claudefs_segments_request_duration_seconds_bucket",
        ] {
            assert!(body.contains(family), "node {}: no {family}", cfg.node_id);
        }
        assert!(
            !body.lines().any(|l| l.starts_with("cfs_")),
            "every family has the claudefs_ prefix"
        );
        // The metrics port serves metrics and health only.
        assert_eq!(get(cfg.http, "/").0, 404);
        assert_eq!(get(cfg.http, "/admin").0, 404);
        assert_eq!(get(cfg.http, "/metrics/../health").0, 404);
        let post = request(
            cfg.http,
            "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(post, 405, "node {}: POST /metrics", cfg.node_id);
    }

    let (code, body) = get(mount_addr, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(promtool_check(&body), "", "mount metrics");
    for family in [
        "claudefs_build_info{daemon=\"mount\"",
        "claudefs_fuse_request_duration_seconds_bucket{op=\"create\"",
        "claudefs_fuse_errors_total{errno=\"ENOTEMPTY\"}",
        "claudefs_fuse_writeback_bytes_total",
    ] {
        assert!(body.contains(family), "mount: no {family}");
    }
    assert_eq!(get(mount_addr, "/").0, 404);
    assert_eq!(get(mount_addr, "/health").0, 200);

    // `cfs admin status` lists every daemon with its metrics URL.
    let out = Command::new(cfs())
        .args(["admin", "status", "--json", "--dir"])
        .arg(&c.dir)
        .output()
        .expect("cfs admin status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let nodes = v["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    for (n, cfg) in nodes.iter().zip(&c.cfgs) {
        assert_eq!(n["health"], "ok", "{n}");
        assert_eq!(n["metrics_url"], format!("http://{}/metrics", cfg.http));
    }
    assert_eq!(
        v["mounts"][0]["metrics_url"],
        format!("http://{mount_addr}/metrics")
    );
    assert_eq!(v["mounts"][0]["up"], true);
    assert!(v["mounts"][0]["requests"].as_u64().expect("requests") > 0);
    assert_eq!(v["healthy"], true);
    let shards = v["shards"].as_array().expect("shards");
    assert!(!shards.is_empty() && shards.iter().all(|s| s["leader"].is_u64()));
    let table = Command::new(cfs())
        .args(["admin", "status", "--dir"])
        .arg(&c.dir)
        .output()
        .expect("cfs admin status");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("HEALTHY"), "{table}");
    for cfg in &c.cfgs {
        assert!(
            table.contains(&format!("http://{}/metrics", cfg.http)),
            "{table}"
        );
    }
    drop(m);
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A Prometheus server scraping `nodes` and `mount` every second, with the
/// shipped rules; killed on drop.
struct Prometheus {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(dir: &Path, nodes: &[SocketAddr], mount: SocketAddr) -> Prometheus {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let list = |a: &[SocketAddr]| {
            a.iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rules = repo().join("monitoring/prometheus/rules");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}/*.yml'\n\
             scrape_configs:\n\
             \x20 - job_name: claudefs-node\n    static_configs:\n      - targets: [{}]\n\
             \x20 - job_name: claudefs-mount\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            list(nodes),
            list(&[mount]),
        );
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).expect("prometheus config");
        let out = Command::new("promtool")
            .args(["check", "config"])
            .arg(&cfg)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "the test's config: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("prometheus (scripts/setup.sh installs the prometheus package)");
        Prometheus { child, addr }
    }

    /// The `result` of an instant query.
    fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let Ok((200, body)) = cluster::http_get(self.addr, &format!("/api/v1/query?query={enc}"))
        else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_the_cluster_and_every_dashboard_query_answers() {
    let c = Cluster::start("mon-prom");
    let (m, mount_addr) = mount_with_metrics(&c, "mnt");
    let nodes: Vec<SocketAddr> = c.cfgs.iter().map(|n| n.http).collect();
    let prom = Prometheus::start(&c.dir, &nodes, mount_addr);
    let until = Instant::now() + Duration::from_secs(60);
    while prom.query("up == 1").len() < 4 {
        assert!(
            Instant::now() < until,
            "Prometheus did not scrape all 4 daemons; see {}",
            c.dir.join("prometheus.log").display()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // A small load over several scrapes, so rates and histograms have data.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        load(&m.path, 10);
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !prom.query("claudefs:nodes_up:count == 3").is_empty(),
        "the recording rules are loaded and evaluated"
    );
    // Every expression of every dashboard parses and returns series.
    let out = Command::new("python3")
        .arg(repo().join("monitoring/check_dashboards.py"))
        .arg("live")
        .arg(format!("http://{}", prom.addr))
        .arg(repo().join("monitoring/grafana/dashboards"))
        // A projection of when the devices fill exists only while use
        // grows over the window; this short run may free as much as it
        // writes.
        .args(["--allow-empty", "Projected full"])
        .output()
        .expect("python3");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dashboard queries: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.lines().filter(|l| l.starts_with("ok")).count() >= 20,
        "{said}"
    );
    // No alert fires, or is pending, on a healthy cluster under a light
    // load (the run is shorter than the alerts' `for`).
    let alerts = prom.query("ALERTS");
    assert!(alerts.is_empty(), "alerts firing or pending: {alerts:?}");
    drop(m);
}

#[test]
fn a_request_is_logged_under_one_id_by_the_mount_and_the_node() {
    let c = Cluster::start_env("mon-req", |_| {}, &[("CFS_LOG", "info,cfs_meta=debug")]);
    let m = Mount::with_env(
        &c,
        "mnt",
        &["--log-format", "json"],
        &[("CFS_LOG", "info,cfs_client=debug")],
    );
    load(&m.path, 3);
    drop(m);
    // The mount's JSON lines name each request it sent ...
    let mount_log = std::fs::read_to_string(c.dir.join("mnt.log")).expect("mount log");
    let sent: Vec<String> = mount_log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "metadata request sent")
        .filter_map(|v| v["fields"]["req"].as_str().map(str::to_string))
        .collect();
    assert!(sent.len() >= 10, "requests the mount logged: {sent:?}");
    // ... and the node that served each one logged it under exactly that
    // id (the JSON value of its `req` span, so `..:4` is not `..:42`).
    let served_ids: std::collections::HashSet<String> = c
        .cfgs
        .iter()
        .flat_map(|n| {
            c.log_of(n.node_id)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["fields"]["message"] == "request served")
                .filter_map(|v| v["span"]["req"].as_str().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        !served_ids.is_empty(),
        "no request served line from the nodes"
    );
    let served = sent.iter().filter(|tag| served_ids.contains(*tag)).count();
    assert!(
        served * 10 >= sent.len() * 9,
        "{served} of {} requests found in the nodes' logs under their id",
        sent.len()
    );
}
