//! The `cfs-node` TOML configuration.
//!
//! ```toml
//! cluster_id = "dev"
//! node_id = 1
//! listen = "127.0.0.1:7401"      # log traffic: peers and clients
//! http = "127.0.0.1:7501"        # /health and /metrics
//! data_dir = "/var/lib/cfs/node-1"
//! shards = [0, 1, 2, 3]
//! spread_depth = 2               # directory levels spread over shards
//! tick_ms = 10                   # OmniPaxos clock
//! log_format = "console"         # or "json"
//! connections_per_peer = 1024    # per listener and remote address
//!
//! [tls]                          # mutual TLS on every listener
//! ca = "/etc/cfs/ca.crt"         # the cluster CA (`cfs ca init`)
//! cert = "/etc/cfs/node-1.crt"   # this node's (`cfs ca issue --node 1`)
//! key = "/etc/cfs/node-1.key"
//! # insecure_plaintext = true    # instead of [tls]: development only
//!
//! [[nodes]]
//! id = 1
//! addr = "127.0.0.1:7401"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use cfs_log::shard::Timing;
use cfs_log::wal::WalConfig;
use cfs_log::{LogNodeConfig, ShardId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub cluster_id: String,
    pub node_id: u64,
    pub listen: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    pub shards: Vec<ShardId>,
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    #[serde(default = "default_election_ticks")]
    pub election_ticks: u64,
    #[serde(default = "default_propose_timeout_ms")]
    pub propose_timeout_ms: u64,
    #[serde(default = "default_segment_mib")]
    pub wal_segment_mib: u64,
    /// Entry bytes per shard replica kept in memory; older ones are read
    /// back from the WAL.
    #[serde(default = "default_wal_memory_mib")]
    pub wal_memory_mib: u64,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Segment server address; no segment server when absent.
    #[serde(default)]
    pub segments_listen: Option<SocketAddr>,
    /// Segment files (default: `<data_dir>/segments`).
    #[serde(default)]
    pub segments_dir: Option<PathBuf>,
    /// Use io_uring for segment I/O when the kernel allows (default true).
    #[serde(default = "default_true")]
    pub segments_io_uring: bool,
    /// Decided log entries kept below what every materializer persisted,
    /// so a lost namespace can be rebuilt by replay (see docs/namespace.md).
    #[serde(default = "default_retain_entries")]
    pub log_retain_entries: u64,
    /// Metadata service address for FUSE clients; none when absent.
    #[serde(default)]
    pub meta_listen: Option<SocketAddr>,
    /// New directories this many levels below the root (or fewer) are
    /// spread over the shards; deeper ones stay on their parent's shard
    /// (docs/filesystem.md). Set the same on every node.
    #[serde(default = "default_spread_depth")]
    pub spread_depth: u32,
    /// Open connections one remote address may keep on each listener
    /// (log, segments, metadata); more are closed at once.
    #[serde(default = "default_connections_per_peer")]
    pub connections_per_peer: usize,
    /// A mount idle this long has its exactly-once outcome tables
    /// forgotten (a retry of one of its old operations then gets ESTALE).
    /// Keep it longer than any mount's `--timeout`.
    #[serde(default = "default_forget_idle_clients_s")]
    pub forget_idle_clients_s: u64,
    /// No TLS and no authentication: a development cluster only.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// The metadata lakehouse (docs/lakehouse.md): this node writes the
    /// Parquet index of the namespace here (it needs `meta_listen`); none
    /// when absent.
    #[serde(default)]
    pub lakehouse_dir: Option<PathBuf>,
    /// How often the lakehouse writes what changed (at least 1000).
    #[serde(default = "default_lakehouse_flush_ms")]
    pub lakehouse_flush_ms: u64,
    /// The admin gateway (HTTP API and web UI over the lakehouse of
    /// `lakehouse_dir`); none when absent.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// The file holding the gateway's token (required with
    /// `admin_listen`; `cfs up` writes `DIR/admin-token`).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Files besides the index the gateway's queries may read (a CSV to
    /// join with).
    #[serde(default)]
    pub admin_allow: Vec<PathBuf>,
    /// How often this node's garbage collector looks for sealed segments
    /// no extent references, fences them on the shards it leads and frees
    /// the fenced ones (docs/decisions.md D48); 0 turns it off.
    #[serde(default = "default_gc_interval_ms")]
    pub gc_interval_ms: u64,
    /// A segment is a candidate only once it has been seen sealed for
    /// this long (a writer commits its stripes after sealing; a commit
    /// later than this is refused and written again, never lost).
    #[serde(default = "default_gc_grace_ms")]
    pub gc_grace_ms: u64,
    /// The cluster's master key (64 hex digits; the same on every node):
    /// it seals tenants' data keys in the log (docs/decisions.md D51).
    /// Absent: `CFS_MASTER_KEY` from the environment, else none (this
    /// node then neither makes nor hands out tenant keys).
    #[serde(default)]
    pub master_key_file: Option<PathBuf>,
    /// Mutual TLS material; required unless `insecure_plaintext`.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    pub nodes: Vec<NodeAddr>,
    /// Dial these addresses for peers instead of their `nodes` address
    /// (the Jepsen suite's fault-injecting proxies).
    #[serde(default)]
    pub dial: Vec<NodeAddr>,
}

/// Where a node's TLS material lives.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA's directory (`ca.crt`, `ca.key`): with it this node trades
    /// one-time mount tokens (`cfs admin token create`) for client
    /// certificates on its metadata listener. Without it, it does not.
    /// A node holding the CA key can issue any certificate: give it to
    /// the nodes that must enroll mounts only.
    #[serde(default)]
    pub enroll_ca_dir: Option<PathBuf>,
}

impl TlsSection {
    pub fn files(&self) -> cfs_net::TlsFiles {
        cfs_net::TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddr {
    pub id: u64,
    pub addr: SocketAddr,
    /// The node's segment server, for clients (learned through the
    /// metadata service).
    #[serde(default)]
    pub segments: Option<SocketAddr>,
    /// The node's metadata service, so clients can be pointed at the
    /// node leading the shards.
    #[serde(default)]
    pub meta: Option<SocketAddr>,
    /// The node's `/health` and `/metrics` address (the admin gateway's
    /// overview reads every node's).
    #[serde(default)]
    pub http: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Console,
    Json,
}

fn default_gc_interval_ms() -> u64 {
    30_000
}
fn default_gc_grace_ms() -> u64 {
    60_000
}
fn default_lakehouse_flush_ms() -> u64 {
    60_000
}

fn default_true() -> bool {
    true
}
fn default_retain_entries() -> u64 {
    100_000
}

fn default_spread_depth() -> u32 {
    cfs_proto::types::DEFAULT_SPREAD_DEPTH
}

fn default_tick_ms() -> u64 {
    10
}
fn default_election_ticks() -> u64 {
    10
}
fn default_propose_timeout_ms() -> u64 {
    5000
}
fn default_connections_per_peer() -> usize {
    cfs_frame::peers::CONNECTIONS_PER_PEER_DEFAULT
}
fn default_forget_idle_clients_s() -> u64 {
    3600
}
fn default_wal_memory_mib() -> u64 {
    64
}
fn default_segment_mib() -> u64 {
    64
}

impl NodeConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let s =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: NodeConfig =
            toml::from_str(&s).with_context(|| format!("parsing {}", path.display()))?;
        c.validate()
            .with_context(|| format!("checking {}", path.display()))?;
        Ok(c)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.cluster_id.is_empty() {
            bail!("cluster_id is empty");
        }
        if self.node_id == 0 {
            bail!("node_id must not be 0");
        }
        let mut seen = BTreeMap::new();
        for n in &self.nodes {
            if n.id == 0 {
                bail!("node id 0 in [[nodes]]");
            }
            if seen.insert(n.id, n.addr).is_some() {
                bail!("duplicate node id {} in [[nodes]]", n.id);
            }
        }
        if !seen.contains_key(&self.node_id) {
            bail!("node_id {} is not listed in [[nodes]]", self.node_id);
        }
        if self.shards.is_empty() {
            bail!("no shards configured");
        }
        if self.tick_ms == 0 || self.election_ticks < 2 {
            bail!("tick_ms must be > 0 and election_ticks >= 2");
        }
        match (&self.tls, self.insecure_plaintext) {
            (None, false) => bail!(
                "no [tls] section: give the node its certificate (`cfs ca issue --node {}`), \
                 or set insecure_plaintext = true for a development cluster",
                self.node_id
            ),
            (Some(_), true) => bail!("both [tls] and insecure_plaintext are set"),
            _ => {}
        }
        Ok(())
    }

    /// This node's connections: its certificate, checked to be the
    /// certificate of this node id, or the development plaintext.
    pub fn security(&self) -> anyhow::Result<cfs_net::Security> {
        let Some(tls) = &self.tls else {
            return Ok(cfs_net::Security::plaintext());
        };
        let s = cfs_net::Security::load(&tls.files()).context("loading the node's TLS files")?;
        if s.me() != Some(&cfs_net::Principal::Node(self.node_id)) {
            bail!(
                "{} is not a certificate of node {} (it names {:?})",
                tls.cert.display(),
                self.node_id,
                s.me()
            );
        }
        Ok(s)
    }

    /// The segment server's configuration, if this node runs one.
    pub fn segments_config(
        &self,
        security: &cfs_net::Security,
    ) -> Option<cfs_segments::server::SegmentServerConfig> {
        Some(cfs_segments::server::SegmentServerConfig {
            node_id: self.node_id,
            cluster_id: self.cluster_id.clone(),
            listen: self.segments_listen?,
            dir: self
                .segments_dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("segments")),
            io_uring: self.segments_io_uring,
            connections_per_peer: self.connections_per_peer,
            security: security.clone(),
        })
    }

    pub fn log_config(&self, security: &cfs_net::Security) -> LogNodeConfig {
        LogNodeConfig {
            node_id: self.node_id,
            cluster_id: self.cluster_id.clone(),
            listen: self.listen,
            nodes: self.nodes.iter().map(|n| (n.id, n.addr)).collect(),
            data_dir: self.data_dir.join("log"),
            shards: self.shards.clone(),
            tick: Duration::from_millis(self.tick_ms),
            timing: Timing {
                election_ticks: self.election_ticks,
                resend_ticks: self.election_ticks * 2,
            },
            propose_timeout: Duration::from_millis(self.propose_timeout_ms),
            wal: WalConfig {
                segment_bytes: self.wal_segment_mib << 20,
                background_prealloc: true,
                memory_bytes_max: (self.wal_memory_mib << 20) as usize,
            },
            retain_entries: self.log_retain_entries,
            dial: self.dial.iter().map(|n| (n.id, n.addr)).collect(),
            faults: Default::default(),
            connections_per_peer: self.connections_per_peer,
            security: security.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        r#"
cluster_id = "t"
node_id = 1
listen = "127.0.0.1:1"
http = "127.0.0.1:2"
data_dir = "/tmp/x"
shards = [0]
insecure_plaintext = true
[[nodes]]
id = 1
addr = "127.0.0.1:1"
[[nodes]]
id = 2
addr = "127.0.0.1:3"
"#
        .into()
    }

    #[test]
    fn parses_and_validates() {
        let c: NodeConfig = toml::from_str(&sample()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.tick_ms, 10);
    }

    #[test]
    fn rejects_bad_configs() {
        let dup = sample().replace("id = 2", "id = 1");
        let c: NodeConfig = toml::from_str(&dup).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("duplicate node id"));
        let unknown = sample() + "bogus = 1\n";
        assert!(toml::from_str::<NodeConfig>(&unknown).is_err());
        let missing = sample().replace("node_id = 1", "node_id = 9");
        let c: NodeConfig = toml::from_str(&missing).unwrap();
        assert!(c.validate().is_err());
        // Neither TLS nor the explicit development flag: refused.
        let open = sample().replace("insecure_plaintext = true\n", "");
        let c: NodeConfig = toml::from_str(&open).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("no [tls] section"));
    }
}
