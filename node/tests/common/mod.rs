//! A real multi-process cluster for end-to-end tests.
#![allow(dead_code)]

pub mod fuse;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cfs_log::client::LogClient;
use cfs_node::cluster;
use cfs_node::config::NodeConfig;

/// How many times [`stable_leader`] looks again when leadership moved
/// while it waited.
pub const LEADER_SETTLE_ATTEMPTS: usize = 5;

/// The node `leader` names once it has named the same node across `hold`
/// (a busy machine can move leadership right after restarts; a test that
/// needs a leader past its fence waits for one that stayed).
pub fn stable_leader(hold: Duration, mut leader: impl FnMut() -> u64) -> u64 {
    let mut seen = Vec::new();
    for _ in 0..LEADER_SETTLE_ATTEMPTS {
        let first = leader();
        std::thread::sleep(hold);
        let then = leader();
        if then == first {
            return first;
        }
        seen.push((first, then));
    }
    panic!("leadership kept moving: {seen:?}");
}

pub struct Cluster {
    pub dir: PathBuf,
    pub cfgs: Vec<NodeConfig>,
}

impl Cluster {
    pub fn start(name: &str) -> Cluster {
        Self::start_with(name, |_| {})
    }

    /// Starts a 3-node cluster after `tweak` edits each node's config.
    pub fn start_with(name: &str, tweak: impl Fn(&mut NodeConfig)) -> Cluster {
        Self::start_env(name, tweak, &[])
    }

    /// [`Cluster::start_with`], the nodes run with `env` (`CFS_LOG`).
    pub fn start_env(name: &str, tweak: impl Fn(&mut NodeConfig), env: &[(&str, &str)]) -> Cluster {
        let dir = std::env::temp_dir().join(format!("cfs-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfgs =
            cluster::ensure_configs(&dir, 3, 2, cluster::Transport::Tls).expect("configs");
        for c in cfgs.iter_mut() {
            tweak(c);
            let path = cluster::node_dir(&dir, c.node_id).join("config.toml");
            std::fs::write(path, toml::to_string(c).expect("toml")).expect("write config");
        }
        // Built first, so the nodes are stopped (Drop) even if they never
        // become healthy.
        let cl = Cluster { dir, cfgs };
        for c in &cl.cfgs {
            cluster::start_node_env(&cl.dir, c.node_id, &bin(), env).expect("start");
        }
        cluster::wait_healthy(&cl.cfgs, Duration::from_secs(30)).expect("healthy");
        cl
    }

    /// A new certificate for `who` from the cluster's CA, as `stem`.
    pub fn issue(&self, who: cfs_net::Principal, stem: &str) -> cfs_net::Security {
        let td = cluster::tls_dir(&self.dir);
        let ca = cfs_net::ca::Ca::load(&td).expect("cluster CA");
        ca.issue_files(&who, 1, &td, stem).expect("issue");
        cfs_net::Security::load(&cfs_net::TlsFiles::in_dir(&td, stem)).expect("load")
    }

    /// The administrator's certificate `cfs up` made.
    pub fn admin(&self) -> cfs_net::Security {
        cluster::admin_security(&self.dir).expect("admin certificate")
    }

    pub fn client(&self) -> LogClient {
        LogClient::new(
            &self.cfgs[0].cluster_id,
            self.cfgs.iter().map(|c| c.listen).collect(),
            self.admin(),
        )
    }

    pub fn segment_client(&self) -> std::sync::Arc<cfs_segments::client::SegmentClient> {
        cfs_segments::client::SegmentClient::new(
            &self.cfgs[0].cluster_id,
            cluster::segment_servers(&self.cfgs),
            self.admin(),
        )
    }

    /// `cfs fsck` passes on every node (links, tree, segment counts),
    /// with no transaction left open; each node's report.
    pub fn fsck_clean(&self) -> Vec<String> {
        let mut reports = Vec::new();
        for c in &self.cfgs {
            let out = std::process::Command::new(fuse::cfs())
                .args(["fsck", "--dir", self.dir.to_str().expect("utf-8 dir")])
                .args(["--node", &c.node_id.to_string()])
                .output()
                .expect("run cfs fsck");
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && text.contains(" 0 open transaction records, 0 problems"),
                "node {}: {text}",
                c.node_id
            );
            reports.push(text);
        }
        reports
    }

    pub fn cfg(&self, id: u64) -> &NodeConfig {
        &self.cfgs[(id - 1) as usize]
    }

    pub async fn leader(&self, shard: cfs_log::ShardId) -> u64 {
        let c = self.client();
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            for cfg in &self.cfgs {
                if let Ok((_, st)) = c.status(cfg.listen).await {
                    if let Some(s) = st.iter().find(|s| s.shard == shard && s.is_leader) {
                        return s.leader.expect("leader id");
                    }
                }
            }
            assert!(Instant::now() < until, "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to 20 s) until one node leads every shard (leader
    /// affinity, D34); returns its id.
    pub fn wait_leaders_together(&self) -> u64 {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let mut led = Vec::new();
            for c in &self.cfgs {
                let Ok((_, body)) = cluster::http_get(c.http, "/metrics") else {
                    continue;
                };
                let gauges: Vec<&str> = body
                    .lines()
                    .filter(|l| l.starts_with("claudefs_log_is_leader{"))
                    .collect();
                let leading = gauges.iter().filter(|l| l.ends_with(" 1")).count();
                led.push((c.node_id, leading, gauges.len()));
            }
            if let Some((id, _, _)) = led.iter().find(|(_, n, all)| *all > 0 && n == all) {
                return *id;
            }
            assert!(Instant::now() < until, "leaders stayed apart: {led:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(cluster::node_dir(&self.dir, id).join("node.log"))
            .unwrap_or_default()
    }

    /// Waits (up to 5 s) until metric `name` of node `id` reaches `at_least`;
    /// returns its last value. Counters are bumped after a connection is
    /// closed, so a test can see the close before the count.
    pub fn metric_at_least(&self, id: u64, name: &str, at_least: u64) -> u64 {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.metric(id, name);
            if v >= at_least || Instant::now() > until {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn metric(&self, id: u64, name: &str) -> u64 {
        let (_, body) = cluster::http_get(self.cfg(id).http, "/metrics").expect("metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &self.cfgs {
            let _ = cluster::stop_node(&self.dir, c.node_id, libc::SIGKILL, Duration::from_secs(5));
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cfs-node"))
}

impl Cluster {
    /// Where node `id` keeps its segment fragments.
    pub fn segments_dir(&self, id: u64) -> PathBuf {
        let cfg = self.cfg(id);
        cfg.segments_dir
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("segments"))
    }

    /// Bytes of fragment files on every node's segment server.
    pub fn fragment_bytes(&self) -> u64 {
        self.cfgs
            .iter()
            .map(|c| {
                std::fs::read_dir(self.segments_dir(c.node_id))
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .filter_map(|e| e.metadata().ok())
                            .filter(|m| m.is_file())
                            .map(|m| m.len())
                            .sum::<u64>()
                    })
                    .unwrap_or(0)
            })
            .sum()
    }
}

/// Reads `want` back from `p` whole and in odd-sized parts at odd
/// offsets (each part served from the stripe it falls in).
pub fn reads_back(p: &std::path::Path, want: &[u8]) {
    use std::os::unix::fs::FileExt;
    let got = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(got == want, "{} does not read back byte-exact", p.display());
    let f = std::fs::File::open(p).expect("open");
    let mut at = 7usize;
    while at < want.len() {
        let n = (4093 + at % 70_000).min(want.len() - at);
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, at as u64).expect("read");
        assert!(
            b == want[at..at + n],
            "{}: {n} bytes at {at} differ",
            p.display()
        );
        at += n * 37 + 1;
    }
}

/// Whether `ok` holds within `secs` (asked every 250 ms).
pub fn wait_until(secs: u64, mut ok: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    ok()
}

impl Cluster {
    /// Waits (up to `secs`) until `ok` holds of the fragment bytes
    /// stored; those bytes.
    pub fn wait_stored(&self, secs: u64, ok: impl Fn(u64) -> bool) -> u64 {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.fragment_bytes();
            if ok(s) || Instant::now() > until {
                return s;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Deterministic bytes zstd cannot shrink (xorshift): what a test that
/// must fill devices, or must not be compressed, writes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
