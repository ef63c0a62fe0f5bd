//! Workloads: what the clients do, what they read at the end, and how the
//! history is checked.

pub mod bank;
pub mod fsops;
pub mod fsreg;
pub mod log;
pub mod register;
pub mod set;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use cfs_log::ShardId;
use serde_json::Value;

use crate::history::History;

/// What clients need: the nodes' addresses and the mounts.
pub struct Ctx {
    pub cluster_id: String,
    /// The administrator's certificate, for log clients.
    pub security: cfs_net::Security,
    pub nodes: Vec<SocketAddr>,
    pub mounts: Vec<PathBuf>,
    pub shards: Vec<ShardId>,
    pub history: Arc<History>,
    /// Clients stop invoking at this time (history clock, ns).
    pub until: u64,
    pub seed: u64,
    pub concurrency: u64,
    /// Nodes that declared a shard failed after healing (set before the
    /// final reads, which do not wait for them).
    pub failed_nodes: std::sync::Mutex<Vec<SocketAddr>>,
}

impl Ctx {
    pub fn log_client(&self) -> cfs_log::client::LogClient {
        let mut c = cfs_log::client::LogClient::new(
            &self.cluster_id,
            self.nodes.clone(),
            self.security.clone(),
        );
        c.timeout = std::time::Duration::from_secs(5);
        c
    }
}

/// A process slot's current process id: a process whose operation ended
/// indeterminate (info) may still be running it, so the slot goes on as a
/// new process, as in Jepsen.
pub struct Process {
    pub id: u64,
    step: u64,
}

impl Process {
    pub fn new(slot: u64, concurrency: u64) -> Process {
        Process {
            id: slot,
            step: concurrency,
        }
    }
    pub fn crashed(&mut self) {
        self.id += self.step;
    }
}

/// What a checker found.
#[derive(Debug, Default, serde::Serialize)]
pub struct Checked {
    pub valid: bool,
    /// Each anomaly: its kind, the operations (history indices) and the
    /// positions or values involved.
    pub anomalies: Vec<Value>,
    /// Workload-specific counts.
    pub summary: Value,
    /// True when a checker could not decide (search budget).
    pub unknown: bool,
}

/// Whether an I/O error from the mount means "did not happen" (the file
/// system answered it) rather than "unknown".
pub fn definite(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::EEXIST | libc::ENOTEMPTY | libc::EINVAL | libc::ENOTDIR)
    )
}
