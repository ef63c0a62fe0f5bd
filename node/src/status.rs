//! `cfs admin status`: the cluster as its daemons report it. Built from
//! the same `/health` and `/metrics` that Prometheus scrapes
//! (docs/metrics.md), so the table and the dashboards never disagree.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use serde::Serialize;

use crate::cluster;

/// One sample of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Samples of a text exposition (format 0.0.4); comments and lines that do
/// not parse are skipped.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        None => (head.to_string(), BTreeMap::new()),
        Some((name, rest)) => (name.to_string(), parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, v) = rest.split_once("=\"")?;
        let mut val = String::new();
        let mut chars = v.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => {
                    let (_, n) = chars.next()?;
                    val.push(match n {
                        'n' => '\n',
                        other => other,
                    });
                }
                '"' => break i,
                c => val.push(c),
            }
        };
        out.insert(k.trim_start_matches(',').to_string(), val);
        rest = v[end + 1..].trim_start_matches(',');
    }
    Some(out)
}

/// Samples of one daemon, looked up by family.
struct Metrics(Vec<Sample>);

impl Metrics {
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| s.name == name)
    }
    fn sum(&self, name: &str) -> Option<f64> {
        let mut it = self.all(name).peekable();
        it.peek()?;
        Some(it.map(|s| s.value).sum())
    }
    fn label(&self, name: &str, label: &str) -> Option<String> {
        self.all(name).find_map(|s| s.labels.get(label).cloned())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    pub node_id: u64,
    /// `ok`, `degraded` or `down`.
    pub health: String,
    pub problems: Vec<String>,
    pub metrics_url: String,
    pub version: Option<String>,
    pub shards_led: u32,
    pub shards: u32,
    pub decided_entries: u64,
    pub materializer_lag_max: u64,
    pub log_disk_free_bytes: Option<u64>,
    pub segment_capacity_bytes: Option<u64>,
    pub segment_used_bytes: Option<u64>,
    pub sessions: Option<u64>,
    pub peers_connected: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShardRow {
    pub shard: String,
    pub leader: Option<u64>,
    pub ballot: u64,
    pub decided: u64,
    pub trimmed: u64,
    pub lag_max: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MountStatus {
    pub path: Option<String>,
    pub metrics_url: String,
    pub up: bool,
    pub requests: u64,
    pub errors: u64,
    pub version: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    pub healthy: bool,
    pub nodes_up: usize,
    pub inodes: Option<u64>,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub nodes: Vec<NodeStatus>,
    pub shards: Vec<ShardRow>,
    pub mounts: Vec<MountStatus>,
    /// Tenants' key generations and re-encryption progress as logged
    /// (D51); `None` when the metadata service did not answer.
    pub keys: Option<cfs_proto::tenant::KeyReport>,
}

fn metrics_url(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}

fn scrape(addr: SocketAddr) -> Option<Metrics> {
    match cluster::http_get(addr, "/metrics") {
        Ok((200, body)) => Some(Metrics(parse_metrics(&body))),
        _ => None,
    }
}

/// Reads every node of the local cluster in `dir`, and its mount if
/// `cfs up --mount` started one.
pub fn gather(dir: &Path) -> anyhow::Result<ClusterStatus> {
    let cfgs = cluster::load_configs(dir)?;
    let cluster_id = cfgs
        .first()
        .map(|c| c.cluster_id.clone())
        .unwrap_or_default();
    let nodes: Vec<(u64, SocketAddr)> = cfgs.iter().map(|c| (c.node_id, c.http)).collect();
    let mut st = gather_nodes(cluster_id, &nodes, local_mount(dir));
    st.keys = key_report(dir);
    Ok(st)
}

/// How long `cfs admin status` waits for the keys report.
const KEYS_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The tenants' keys and re-encryption progress, if a metadata service
/// answers within [`KEYS_WAIT`].
fn key_report(dir: &Path) -> Option<cfs_proto::tenant::KeyReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async { tokio::time::timeout(KEYS_WAIT, crate::keys::report(dir)).await })
        .ok()?
        .ok()
}

/// Reads the `/health` and `/metrics` of `nodes` (id, HTTP address).
pub fn gather_nodes(
    cluster_id: String,
    cfgs: &[(u64, SocketAddr)],
    mount: Option<MountStatus>,
) -> ClusterStatus {
    let mut nodes = Vec::new();
    let mut shards: BTreeMap<String, ShardRow> = BTreeMap::new();
    let mut inodes = None;
    for &(node_id, http) in cfgs {
        let health = cluster::http_get(http, "/health");
        let (health, problems) = match &health {
            Ok((code, body)) => {
                let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
                let problems = v["problems"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| p.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                let h = if *code == 200 { "ok" } else { "degraded" };
                (h.to_string(), problems)
            }
            Err(e) => ("down".to_string(), vec![e.to_string()]),
        };
        let m = if health == "down" { None } else { scrape(http) };
        let mut n = NodeStatus {
            node_id,
            health,
            problems,
            metrics_url: metrics_url(http),
            version: None,
            shards_led: 0,
            shards: 0,
            decided_entries: 0,
            materializer_lag_max: 0,
            log_disk_free_bytes: None,
            segment_capacity_bytes: None,
            segment_used_bytes: None,
            sessions: None,
            peers_connected: None,
        };
        if let Some(m) = &m {
            n.version = m.label("claudefs_build_info", "version");
            for s in m.all("claudefs_log_is_leader") {
                n.shards += 1;
                let shard = s.labels.get("shard").cloned().unwrap_or_default();
                let row = shards.entry(shard.clone()).or_insert(ShardRow {
                    shard,
                    leader: None,
                    ballot: 0,
                    decided: 0,
                    trimmed: u64::MAX,
                    lag_max: 0,
                });
                if s.value == 1.0 {
                    n.shards_led += 1;
                    row.leader = Some(node_id);
                }
            }
            let per_shard = |name: &str| {
                m.all(name)
                    .filter_map(|s| Some((s.labels.get("shard")?.clone(), s.value as u64)))
                    .collect::<Vec<_>>()
            };
            for (shard, v) in per_shard("claudefs_log_ballot") {
                if let Some(r) = shards.get_mut(&shard) {
                    r.ballot = r.ballot.max(v);
                }
            }
            for (shard, v) in per_shard("claudefs_log_decided_position") {
                if let Some(r) = shards.get_mut(&shard) {
                    r.decided = r.decided.max(v);
                }
            }
            for (shard, v) in per_shard("claudefs_log_trimmed_position") {
                if let Some(r) = shards.get_mut(&shard) {
                    r.trimmed = r.trimmed.min(v);
                }
            }
            for (shard, v) in per_shard("claudefs_materializer_lag_entries") {
                n.materializer_lag_max = n.materializer_lag_max.max(v);
                if let Some(r) = shards.get_mut(&shard) {
                    r.lag_max = r.lag_max.max(v);
                }
            }
            n.decided_entries = m.sum("claudefs_log_decided_entries_total").unwrap_or(0.0) as u64;
            n.log_disk_free_bytes = m.sum("claudefs_log_disk_free_bytes").map(|v| v as u64);
            n.segment_capacity_bytes = m
                .sum("claudefs_segments_device_capacity_bytes")
                .map(|v| v as u64);
            n.segment_used_bytes = m
                .sum("claudefs_segments_device_used_bytes")
                .map(|v| v as u64);
            n.sessions = m.sum("claudefs_meta_sessions").map(|v| v as u64);
            n.peers_connected = m.sum("claudefs_log_peers_connected").map(|v| v as u64);
            if let Some(i) = m.sum("claudefs_namespace_inodes") {
                inodes = Some(inodes.unwrap_or(0u64).max(i as u64));
            }
        }
        nodes.push(n);
    }
    for r in shards.values_mut() {
        if r.trimmed == u64::MAX {
            r.trimmed = 0;
        }
    }
    let mounts = mount.into_iter().collect::<Vec<_>>();
    let nodes_up = nodes.iter().filter(|n| n.health != "down").count();
    ClusterStatus {
        cluster_id,
        healthy: nodes.iter().all(|n| n.health == "ok")
            && shards.values().all(|r| r.leader.is_some()),
        nodes_up,
        inodes,
        capacity_bytes: nodes.iter().filter_map(|n| n.segment_capacity_bytes).sum(),
        used_bytes: nodes.iter().filter_map(|n| n.segment_used_bytes).sum(),
        nodes,
        shards: shards.into_values().collect(),
        mounts,
        keys: None,
    }
}

/// The mount `cfs up --mount` started (`DIR/mount/metrics-url`).
fn local_mount(dir: &Path) -> Option<MountStatus> {
    let md = dir.join("mount");
    let url = std::fs::read_to_string(md.join("metrics-url")).ok()?;
    let url = url.trim().to_string();
    let path = std::fs::read_to_string(md.join("path")).ok();
    let addr: Option<SocketAddr> = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok());
    let m = addr.and_then(scrape);
    Some(MountStatus {
        path,
        up: m.is_some(),
        requests: m
            .as_ref()
            .and_then(|m| m.sum("claudefs_fuse_requests_total"))
            .unwrap_or(0.0) as u64,
        errors: m
            .as_ref()
            .and_then(|m| m.sum("claudefs_fuse_errors_total"))
            .unwrap_or(0.0) as u64,
        version: m
            .as_ref()
            .and_then(|m| m.label("claudefs_build_info", "version")),
        metrics_url: url,
    })
}

fn bytes(v: Option<u64>) -> String {
    match v {
        None => "-".into(),
        Some(b) => {
            const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
            let mut x = b as f64;
            let mut u = 0;
            while x >= 1024.0 && u + 1 < UNITS.len() {
                x /= 1024.0;
                u += 1;
            }
            if u == 0 {
                format!("{b} B")
            } else {
                format!("{x:.1} {}", UNITS[u])
            }
        }
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// The human table.
pub fn render_table(s: &ClusterStatus) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "cluster {}  {}  nodes up {}/{}  inodes {}  segments used {} of {}",
        s.cluster_id,
        if s.healthy { "HEALTHY" } else { "DEGRADED" },
        s.nodes_up,
        s.nodes.len(),
        opt(s.inodes),
        bytes(Some(s.used_bytes)),
        bytes(Some(s.capacity_bytes)),
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<5} {:<9} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9}  METRICS",
        "NODE", "HEALTH", "LEADS", "PEERS", "LAG", "LOG FREE", "SEG USED", "SEG CAP", "SESSIONS"
    );
    for n in &s.nodes {
        let _ = writeln!(
            o,
            "{:<5} {:<9} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9}  {}",
            n.node_id,
            n.health,
            format!("{}/{}", n.shards_led, n.shards),
            opt(n.peers_connected),
            n.materializer_lag_max,
            bytes(n.log_disk_free_bytes),
            bytes(n.segment_used_bytes),
            bytes(n.segment_capacity_bytes),
            opt(n.sessions),
            n.metrics_url,
        );
        for p in &n.problems {
            let _ = writeln!(o, "      ! {p}");
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<6} {:>7} {:>7} {:>12} {:>12} {:>8}",
        "SHARD", "LEADER", "BALLOT", "DECIDED", "TRIMMED", "LAG"
    );
    for r in &s.shards {
        let _ = writeln!(
            o,
            "{:<6} {:>7} {:>7} {:>12} {:>12} {:>8}",
            r.shard,
            opt(r.leader),
            r.ballot,
            r.decided,
            r.trimmed,
            r.lag_max
        );
    }
    if !s.mounts.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<30} {:<5} {:>10} {:>8}  METRICS",
            "MOUNT", "UP", "REQUESTS", "ERRORS"
        );
        for m in &s.mounts {
            let _ = writeln!(
                o,
                "{:<30} {:<5} {:>10} {:>8}  {}",
                m.path.as_deref().unwrap_or("-"),
                if m.up { "yes" } else { "no" },
                m.requests,
                m.errors,
                m.metrics_url
            );
        }
    }
    if let Some(k) = s.keys.as_ref().filter(|k| !k.keys.is_empty()) {
        let _ = writeln!(o);
        let mut tenants: BTreeMap<&str, u32> = BTreeMap::new();
        for key in &k.keys {
            let g = tenants.entry(key.tenant.as_str()).or_default();
            *g = (*g).max(key.generation);
        }
        for (t, g) in tenants {
            let _ = writeln!(o, "tenant {t}: key generation {g}");
        }
        for p in &k.reencryption {
            let _ = writeln!(
                o,
                "re-encryption {}: to key {}, moved {}, left {}{}",
                p.tenant,
                p.to.0,
                bytes(Some(p.moved_bytes)),
                bytes(Some(p.left_bytes)),
                if p.left_bytes == 0 { " (done)" } else { "" }
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_lines_parse_with_labels_and_escapes() {
        let t = "# HELP x y\n# TYPE x counter\nx 3\ny{a=\"1\",b=\"q\\\"z\"} 2.5\nz{shard=\"0\"} 1e3\nbad line\n";
        let s = parse_metrics(t);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "x");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].labels["a"], "1");
        assert_eq!(s[1].labels["b"], "q\"z");
        assert_eq!(s[2].value, 1000.0);
    }

    #[test]
    fn the_table_names_every_node_and_shard() {
        let st = ClusterStatus {
            cluster_id: "c1".into(),
            healthy: false,
            nodes_up: 1,
            inodes: Some(7),
            capacity_bytes: 1 << 30,
            used_bytes: 1 << 20,
            nodes: vec![NodeStatus {
                node_id: 2,
                health: "degraded".into(),
                problems: vec!["shard 0 failed: disk".into()],
                metrics_url: "http://127.0.0.1:1/metrics".into(),
                version: None,
                shards_led: 1,
                shards: 4,
                decided_entries: 9,
                materializer_lag_max: 3,
                log_disk_free_bytes: Some(5 << 30),
                segment_capacity_bytes: None,
                segment_used_bytes: None,
                sessions: Some(1),
                peers_connected: Some(2),
            }],
            shards: vec![ShardRow {
                shard: "0".into(),
                leader: None,
                ballot: 4,
                decided: 100,
                trimmed: 10,
                lag_max: 3,
            }],
            mounts: vec![],
            keys: Some(cfs_proto::tenant::KeyReport {
                keys: vec![cfs_proto::tenant::KeyInfo {
                    tenant: "lab".into(),
                    id: cfs_proto::tenant::KeyId(3),
                    generation: 2,
                    made: 0,
                }],
                reencryption: vec![cfs_proto::tenant::Reencryption {
                    tenant: "lab".into(),
                    to: cfs_proto::tenant::KeyId(3),
                    moved_bytes: 1 << 20,
                    left_bytes: 0,
                    at: 0,
                }],
            }),
        };
        let t = render_table(&st);
        assert!(t.contains("tenant lab: key generation 2"), "{t}");
        assert!(
            t.contains("re-encryption lab: to key 3, moved 1.0 MiB, left 0 B (done)"),
            "{t}"
        );
        assert!(t.contains("DEGRADED"));
        assert!(t.contains("! shard 0 failed: disk"));
        assert!(t.contains("5.0 GiB"));
        assert!(t.lines().any(|l| l.starts_with("0 ") && l.contains(" - ")));
    }
}
