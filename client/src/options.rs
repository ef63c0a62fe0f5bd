//! Mount options (`cfs mount --help`).

use std::net::SocketAddr;
use std::time::Duration;

/// How long cached metadata may be used without asking a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Nothing cached: every lookup and getattr reads through a barrier.
    Strict,
    /// Attributes and entries cached for `attr_ttl`, refreshed on open
    /// (a file closed on one client is seen whole by the next open
    /// elsewhere), dropped early when a server reports a change.
    CloseToOpen,
    /// Cached for the session's long TTL; only server invalidations drop
    /// entries.
    Session,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(CacheMode::Strict),
            "close-to-open" => Ok(CacheMode::CloseToOpen),
            "session" => Ok(CacheMode::Session),
            _ => Err(format!(
                "cache mode {s:?}: expected strict, close-to-open or session"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct MountOptions {
    pub servers: Vec<SocketAddr>,
    pub cluster_id: String,
    /// The mount's certificate (mutual TLS) or the development plaintext.
    pub security: cfs_net::Security,
    pub cache_mode: CacheMode,
    /// Dirty bytes buffered per file before they are flushed.
    pub write_buffer: usize,
    /// Largest read-ahead window.
    pub read_ahead: usize,
    /// Decoded stripes kept in memory.
    pub cache_bytes: usize,
    /// Longest wait for a server before EIO/ENOTCONN.
    pub timeout: Duration,
    /// Move to the node leading most shards when a server names it (`cfs
    /// mount --dir`); with `--servers`, the first server that answers is
    /// kept, as listed.
    pub follow_leader: bool,
    /// Serve this mount's counters (`GET /metrics`) here (`127.0.0.1:0`:
    /// any free port).
    pub metrics_listen: Option<SocketAddr>,
    /// Write the metrics URL into this file once it is served.
    pub metrics_url_file: Option<std::path::PathBuf>,
    /// Every namespace change waits for its log commit instead of being
    /// answered once the leader ordered it (docs/decisions.md D30).
    pub sync_namespace: bool,
    /// Honour set-user-ID and set-group-ID bits when executing files from
    /// this mount (`--suid`; default off: the mount is `nosuid`).
    pub allow_suid: bool,
    /// Let device files on this mount be opened (`--dev`; default off:
    /// the mount is `nodev`).
    pub allow_dev: bool,
    /// How the stripes this mount writes are stored (`--compress`,
    /// default zstd level 1, docs/decisions.md D49).
    pub compression: cfs_proto::types::Compression,
    /// Inline dedupe of the stripes this mount writes (`--dedupe`,
    /// default on, docs/decisions.md D50).
    pub dedupe: bool,
}

impl MountOptions {
    pub fn ttl(&self) -> Duration {
        match self.cache_mode {
            CacheMode::Strict => Duration::ZERO,
            CacheMode::CloseToOpen => Duration::from_secs(1),
            CacheMode::Session => Duration::from_secs(60),
        }
    }
}
