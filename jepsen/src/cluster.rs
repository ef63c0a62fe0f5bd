//! The cluster under test: real `cfs-node` processes on loopback whose
//! node-to-node links all go through fault-injecting proxies, and, for the
//! file-system workloads, one real FUSE mount per node.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cfs_control::config::{NodeAddr, NodeConfig};
use cfs_control::local as cluster;
use cfs_log::client::LogClient;
use cfs_log::ShardId;

use crate::proxy::{Link, LinkState};

pub struct TestCluster {
    pub dir: PathBuf,
    pub cfgs: Vec<NodeConfig>,
    /// (from, to) → the proxy carrying from's messages to `to`.
    pub links: BTreeMap<(u64, u64), Arc<Link>>,
    /// `CFS_FAULTS` for every node start.
    pub faults: String,
    pub node_bin: PathBuf,
    pub cfs_bin: PathBuf,
    pub mounts: Vec<Mount>,
    /// The administrator's certificate (log clients, segment tools).
    pub admin: cfs_net::Security,
}

/// A node that declared one of its shards failed.
#[derive(Debug, Clone)]
pub struct FailedNode {
    pub node: u64,
    pub listen: SocketAddr,
    /// The `/health` problems naming failed shards.
    pub problems: Vec<String>,
}

/// The "shard N failed: ..." problems of a `/health` body.
fn failed_shards(body: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return Vec::new();
    };
    v["problems"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str())
                .filter(|p| p.starts_with("shard ") && p.contains(" failed"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

pub struct Mount {
    pub path: PathBuf,
    child: Child,
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().context("executable directory")?;
    // Tests run from target/debug/deps; binaries are in target/debug.
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found next to {} (build it: cargo build -p cfs-node)",
        exe.display()
    )
}

impl TestCluster {
    /// Writes configs for `nodes` nodes in `dir` (links through proxies),
    /// starts the proxies and the nodes, and waits until all are healthy.
    pub async fn start(
        dir: &Path,
        nodes: u64,
        shards: u32,
        faults: &str,
    ) -> anyhow::Result<TestCluster> {
        let _ = std::fs::remove_dir_all(dir);
        let mut cfgs = cluster::ensure_configs(dir, nodes, shards, cluster::Transport::Tls)?;
        let mut links = BTreeMap::new();
        for i in 0..cfgs.len() {
            for j in 0..cfgs.len() {
                if i == j {
                    continue;
                }
                let (from, to) = (cfgs[i].node_id, cfgs[j].node_id);
                let link = Link::start(cfgs[j].listen).await?;
                cfgs[i].dial.push(NodeAddr {
                    id: to,
                    addr: link.listen,
                    segments: None,
                    meta: None,
                    http: None,
                });
                links.insert((from, to), link);
            }
        }
        for c in cfgs.iter_mut() {
            // Keep the whole log: the final reads read it from position 0.
            c.log_retain_entries = u64::MAX / 2;
            let path = cluster::node_dir(dir, c.node_id).join("config.toml");
            std::fs::write(path, toml::to_string(c)?)?;
        }
        let tc = TestCluster {
            dir: dir.to_path_buf(),
            cfgs,
            links,
            faults: faults.to_string(),
            node_bin: sibling("cfs-node")?,
            cfs_bin: sibling("cfs")?,
            mounts: Vec::new(),
            admin: cluster::admin_security(dir)?,
        };
        for c in &tc.cfgs {
            tc.start_node(c.node_id)?;
        }
        tc.wait_healthy(Duration::from_secs(60)).await?;
        Ok(tc)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.cfgs.iter().map(|c| c.node_id).collect()
    }

    pub fn start_node(&self, id: u64) -> anyhow::Result<()> {
        cluster::start_node_env(
            &self.dir,
            id,
            &self.node_bin,
            &[("CFS_FAULTS", &self.faults)],
        )
    }

    pub fn kill(&self, id: u64) -> anyhow::Result<()> {
        cluster::stop_node(&self.dir, id, libc::SIGKILL, Duration::from_secs(5))?;
        Ok(())
    }

    pub fn signal(&self, id: u64, sig: i32) {
        if let Some(pid) = cluster::running_pid(&self.dir, id) {
            // SAFETY: sending a signal to a pid we started.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    pub fn is_running(&self, id: u64) -> bool {
        cluster::running_pid(&self.dir, id).is_some()
    }

    pub fn set_link(&self, from: u64, to: u64, s: LinkState) {
        if let Some(l) = self.links.get(&(from, to)) {
            l.set(s);
        }
    }

    pub fn heal_links(&self) {
        for l in self.links.values() {
            l.set(LinkState::Up);
        }
    }

    pub fn log_client(&self) -> LogClient {
        let mut c = LogClient::new(
            &self.cfgs[0].cluster_id,
            self.cfgs.iter().map(|c| c.listen).collect(),
            self.admin.clone(),
        );
        c.timeout = Duration::from_secs(5);
        c
    }

    /// The node currently leading `shard`, as some node reports it.
    pub async fn leader(&self, shard: ShardId) -> Option<u64> {
        let c = self.log_client();
        for cfg in &self.cfgs {
            if let Ok(Ok((_, st))) =
                tokio::time::timeout(Duration::from_secs(1), c.status(cfg.listen)).await
            {
                if let Some(s) = st.iter().find(|s| s.shard == shard && s.is_leader) {
                    return s.leader;
                }
            }
        }
        None
    }

    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let cfgs = self.cfgs.clone();
        tokio::task::spawn_blocking(move || cluster::wait_healthy(&cfgs, timeout)).await??;
        Ok(())
    }

    /// After healing: waits until every node is healthy, except nodes that
    /// declare a shard failed (`/health` 503 with "shard N failed: ..."),
    /// which never heal on their own. Returns those nodes with their
    /// problems: evidence for the verdict (e.g. a replica that found the
    /// cluster about to overwrite entries it had decided), not a harness
    /// error. A node unhealthy for another reason after `timeout` is one.
    pub async fn wait_healthy_or_failed(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<Vec<FailedNode>> {
        let cfgs = self.cfgs.clone();
        tokio::task::spawn_blocking(move || {
            let until = Instant::now() + timeout;
            let mut failed = Vec::new();
            for c in &cfgs {
                loop {
                    let r = cluster::http_get(c.http, "/health");
                    if let Ok((200, _)) = r {
                        break;
                    }
                    if let Ok((_, body)) = &r {
                        let problems = failed_shards(body);
                        if !problems.is_empty() {
                            failed.push(FailedNode {
                                node: c.node_id,
                                listen: c.listen,
                                problems,
                            });
                            break;
                        }
                    }
                    if Instant::now() > until {
                        let detail = match r {
                            Ok((code, body)) => format!("HTTP {code}: {body}"),
                            Err(e) => e.to_string(),
                        };
                        bail!("node {} not healthy after {timeout:?}: {detail}", c.node_id);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Ok(failed)
        })
        .await?
    }

    /// Mounts the file system once per node, each preferring its own node,
    /// in `cache_mode` (strict: every read through a barrier;
    /// close-to-open: leases).
    pub fn mount_all(&mut self, cache_mode: &str) -> anyhow::Result<()> {
        let metas = cluster::meta_servers(&self.cfgs);
        for (i, c) in self.cfgs.iter().enumerate() {
            let path = self.dir.join(format!("mnt-{}", c.node_id));
            std::fs::create_dir_all(&path)?;
            let mut servers = vec![metas[i]];
            servers.extend(
                metas
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, a)| *a),
            );
            let list: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
            let log = std::fs::File::create(self.dir.join(format!("mnt-{}.log", c.node_id)))?;
            let child = std::process::Command::new(&self.cfs_bin)
                .arg("mount")
                .arg(&path)
                .arg("--dir")
                .arg(&self.dir)
                .arg("--servers")
                .arg(list.join(","))
                .args(["--cache-mode", cache_mode, "--timeout", "10"])
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting cfs mount")?;
            let until = Instant::now() + Duration::from_secs(30);
            while !cfs_control::mounts::is_mounted(&path) {
                if Instant::now() > until {
                    bail!("mount {} did not appear", path.display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            self.mounts.push(Mount { path, child });
        }
        Ok(())
    }

    /// Unmounts, stops every node (SIGCONT first: a paused node cannot
    /// stop) and leaves the data and logs in place.
    /// Unmounts every mount (what they release on the way out, such as
    /// locks, still reaches the log).
    pub fn unmount_all(&mut self) {
        for m in self.mounts.iter_mut() {
            cfs_client::unmount(&m.path);
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
        self.mounts.clear();
    }

    /// Waits until every node has applied the same namespace positions
    /// (a replica that lags when the nodes stop is not a divergence);
    /// false if they did not converge within `timeout`.
    pub async fn wait_applied_equal(&self, timeout: Duration) -> bool {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let cfgs = self.cfgs.clone();
            let views = tokio::task::spawn_blocking(move || {
                cfgs.iter()
                    .map(|c| {
                        let (_, body) = cluster::http_get(c.http, "/health").ok()?;
                        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                        Some(v["namespace_applied"].to_string())
                    })
                    .collect::<Option<Vec<String>>>()
            })
            .await
            .ok()
            .flatten();
            if let Some(v) = views {
                if v.iter().all(|x| x == &v[0]) && v[0] != "null" {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn stop(&mut self) {
        self.unmount_all();
        for id in self.ids() {
            self.signal(id, libc::SIGCONT);
            let _ = cluster::stop_node(&self.dir, id, libc::SIGTERM, Duration::from_secs(10));
        }
    }
}

/// Counters from the nodes' `/metrics`, summed over each node's
/// lifetimes: a node counts from zero again after a restart (the nemesis
/// kills nodes), so each node is read now and then ([`CounterSums::sample`])
/// and what it had counted before it restarted is kept. What a node
/// counted after its last read before a kill is missed.
pub struct CounterSums {
    dir: PathBuf,
    /// (node id, HTTP address) of each node.
    nodes: Vec<(u64, SocketAddr)>,
    names: Vec<String>,
    /// Per node: its pid and each counter's value at its last read.
    last: Vec<Option<(i32, Vec<u64>)>>,
    /// Per counter: what nodes counted before they restarted.
    banked: Vec<u64>,
}

impl CounterSums {
    pub fn new(tc: &TestCluster, names: &[&str]) -> CounterSums {
        CounterSums {
            dir: tc.dir.clone(),
            nodes: tc.cfgs.iter().map(|c| (c.node_id, c.http)).collect(),
            names: names.iter().map(|n| n.to_string()).collect(),
            last: vec![None; tc.cfgs.len()],
            banked: vec![0; names.len()],
        }
    }

    /// Reads every node's counters once (plain HTTP, blocking). A node
    /// that is down or paused is skipped.
    pub fn sample(&mut self) {
        for (i, (id, addr)) in self.nodes.iter().enumerate() {
            let Some(pid) = cluster::running_pid(&self.dir, *id) else {
                continue;
            };
            let Ok((200, body)) = cluster::http_get(*addr, "/metrics") else {
                continue;
            };
            // Restarted while being read: whose counters these are is
            // unclear.
            if cluster::running_pid(&self.dir, *id) != Some(pid) {
                continue;
            }
            let now: Vec<u64> = self
                .names
                .iter()
                .map(|n| counter(&body, n).unwrap_or(0))
                .collect();
            if let Some((was_pid, was)) = &self.last[i] {
                if *was_pid != pid || now.iter().zip(was).any(|(v, w)| v < w) {
                    for (b, w) in self.banked.iter_mut().zip(was) {
                        *b += *w;
                    }
                }
            }
            self.last[i] = Some((pid, now));
        }
    }

    /// Each counter's sum over the nodes and their lifetimes.
    pub fn totals(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, name) in self.names.iter().enumerate() {
            let live: u64 = self.last.iter().flatten().map(|(_, v)| v[k]).sum();
            m.insert(name.clone(), serde_json::json!(self.banked[k] + live));
        }
        serde_json::Value::Object(m)
    }
}

/// The value of counter `name` in a Prometheus text body.
fn counter(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
