//! The threaded runtime that hosts a node's shards: one OS thread per shard
//! driving its [`ShardCore`], tokio tasks for sockets, and the API the rest
//! of ClaudeFS uses: [`LogNode::propose`], [`LogNode::read_barrier`],
//! [`LogNode::subscribe`].
//!
//! ```text
//! sockets ──► Input ──► shard thread: apply inputs … ready() = fsync ──► send
//!                                                         └─► decided ──► waiters,
//!                                                                          subscribers
//! ```
//!
//! What a return means:
//! * `propose` returns a position once the entry is decided: it is on a
//!   majority of replicas' disks (fdatasync'd) and will be delivered at that
//!   position by every subscriber on every replica.
//! * `read_barrier` returns a position `p` such that every entry decided
//!   before the call started is below `p`: state that applied every
//!   position below `p` is a linearizable read. It appends nothing: the
//!   leader confirms with one round of messages to a majority that it still
//!   leads (ReadIndex, `read_index`), so a partitioned old leader cannot
//!   produce `p`.
//! * `Err(Timeout)` means unknown: the entry may still be decided. Retrying
//!   with the same request id is safe (deduplicated while the first attempt
//!   is still in the log, i.e. not yet trimmed).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use omnipaxos::messages::Message;
use omnipaxos::util::NodeId;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, info_span, warn, Instrument};

use crate::disk::FsDisk;
use crate::entry::{Entry, EntryKind, RequestId, KIND_USER_MIN};
use crate::policy::{ForwardedReads, Proposals, Refused, Ticks, TrimFloors};
use crate::read_index::{ReadFailed, ReadId, ReadMsg, ReadStart};
use crate::shard::{Epoch, Position, ShardCore, ShardId, Timing};
use crate::storage::SharedWal;
use crate::transport::{write_msg, FrameReader, Identity, PeerLinks, HANDSHAKE_TIMEOUT};
use crate::wal::{NodeWal, StreamId, WalConfig};
use crate::wire::{
    LogError, Role, ShardStatus, Wire, FRAME_BYTES_MAX, HELLO_FRAME_BYTES_MAX, PROPOSE_BATCH_MAX,
    PROTOCOL_VERSION,
};

mod affinity;
mod metrics;
mod read_gate;
mod shard_loop;
mod subscribers;

use metrics::{LogMetrics, NodeGauges, ShardCounters, ShardGauges};
pub use read_gate::{ReadGate, PARKED_READS_MAX};
use shard_loop::ShardLoop;
use subscribers::SubscriberTable;
pub use subscribers::Subscription;

/// Inputs queued per shard thread before new ones are refused.
pub const SHARD_INBOX_MAX: usize = 64 * 1024;
/// Free space (in WAL segments) below which a node refuses new proposals
/// with ENOSPC: room for the next segment, its preallocation, and what is
/// already in flight.
pub const WAL_HEADROOM_SEGMENTS: u64 = 3;
/// How often the WAL's free space is read.
const SPACE_CHECK_EVERY: Duration = Duration::from_millis(100);
/// Inputs applied between two `ready` calls at most, so one burst cannot
/// delay the fsync (and every acknowledgement) without bound.
pub const SHARD_BATCH_INPUTS_MAX: usize = 8 * 1024;
/// Entries returned by one subscription read.
pub const SUBSCRIBE_BATCH_MAX: usize = 4096;
/// Live subscriptions one client connection may hold; more are refused.
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 64;

#[derive(Clone, Debug)]
pub struct LogNodeConfig {
    pub node_id: NodeId,
    pub cluster_id: String,
    pub listen: SocketAddr,
    /// Every replica of every shard, including this node.
    pub nodes: BTreeMap<NodeId, SocketAddr>,
    pub data_dir: PathBuf,
    pub shards: Vec<ShardId>,
    pub tick: Duration,
    pub timing: Timing,
    pub propose_timeout: Duration,
    pub wal: WalConfig,
    /// Decided entries kept below every durable subscriber's position
    /// (history for replaying a lost materialization); 0 trims eagerly.
    pub retain_entries: u64,
    /// Addresses to dial peers at when they differ from `nodes` (a
    /// fault-injecting proxy in the Jepsen suite); `nodes` stays what
    /// clients are told.
    pub dial: BTreeMap<NodeId, SocketAddr>,
    /// Injected faults and deliberate bugs (tests only).
    pub faults: Faults,
    /// Open connections one remote address may keep on the log port
    /// (peers and clients alike); more are closed at once.
    pub connections_per_peer: usize,
    /// Mutual TLS for every connection in and out (or the development
    /// plaintext).
    pub security: cfs_net::Security,
}

/// Faults a node can be started with, for the Jepsen suite: a
/// fault-injecting disk layer, and deliberately broken behaviour the suite
/// must catch. All off in production.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// WAL writes reach the file only at `fdatasync` time, so a kill -9
    /// loses exactly what was not synced (a power failure).
    pub lose_unsynced: bool,
    /// BROKEN: `fdatasync` returns without making the last 200 ms of writes
    /// durable: the log acknowledges entries before they are on disk.
    pub fsync_lies: bool,
    /// BROKEN: read barriers are answered from this node's own decided
    /// position instead of a round through the leader (stale reads).
    pub stale_reads: bool,
}

impl Faults {
    /// Parses a comma-separated list (`lose-unsynced,fsync-lies,stale-reads`).
    pub fn parse(s: &str) -> Result<Faults, String> {
        let mut f = Faults::default();
        for w in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match w {
                "lose-unsynced" => f.lose_unsynced = true,
                "fsync-lies" => f.fsync_lies = true,
                "stale-reads" => f.stale_reads = true,
                other => return Err(format!("unknown fault {other:?}")),
            }
        }
        Ok(f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("data directory {dir}: {reason}")]
    DataDir { dir: String, reason: String },
    #[error("the node's log ({dir}): {source}")]
    Wal {
        dir: String,
        #[source]
        source: crate::wal::WalError,
    },
    #[error("shard {shard}: {source}")]
    Shard {
        shard: ShardId,
        #[source]
        source: crate::shard::ShardError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the outcome of a proposal goes.
enum Reply {
    /// An in-process caller waiting on a oneshot.
    Local(oneshot::Sender<Result<Position, LogError>>),
    /// A remote client's request: the answer goes straight to the writer of
    /// its connection, with no task per request.
    Remote { id: u64, conn: mpsc::Sender<Wire> },
}

impl Reply {
    fn send(self, result: Result<Position, LogError>) {
        match self {
            Reply::Local(tx) => {
                let _ = tx.send(result);
            }
            Reply::Remote { id, conn } => {
                // A full connection queue drops the reply; the client times
                // out and retries with the same request id (deduplicated).
                let _ = conn.try_send(Wire::Decided { id, result });
            }
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Reply::Local(tx) => tx.is_closed(),
            Reply::Remote { conn, .. } => conn.is_closed(),
        }
    }
}

/// What a linearizable read returns: the read position (see the module
/// docs) and the leader's watermark at the time it answered (an opaque
/// number the layer above publishes with [`LogNode::set_watermark`]; the
/// metadata service uses it for lease recalls).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadPoint {
    pub position: Position,
    pub watermark: u64,
}

/// Where the answer to a read goes.
enum ReadReply {
    Local(oneshot::Sender<Result<ReadPoint, LogError>>),
    /// A remote log client: gets the position only.
    Remote {
        id: u64,
        conn: mpsc::Sender<Wire>,
    },
}

impl ReadReply {
    fn send(self, result: Result<ReadPoint, LogError>) {
        match self {
            ReadReply::Local(tx) => {
                let _ = tx.send(result);
            }
            ReadReply::Remote { id, conn } => {
                let result = result.map(|r| r.position);
                let _ = conn.try_send(Wire::Decided { id, result });
            }
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            ReadReply::Local(tx) => tx.is_closed(),
            ReadReply::Remote { conn, .. } => conn.is_closed(),
        }
    }
}

/// Replies queued per client connection before new ones are dropped.
const CLIENT_REPLY_QUEUE_MAX: usize = 16 * 1024;

enum Input {
    Paxos(Message<Entry>),
    /// `redirect`: answer `NotLeader` instead of forwarding (remote clients).
    Propose {
        entry: Entry,
        reply: Option<Reply>,
        redirect: bool,
    },
    /// Proposals that arrived in one frame (a client's `ProposeBatch`, a
    /// peer's `Forward`): one wake-up of the shard thread for all of them.
    ProposeMany {
        proposals: Vec<(Entry, Option<Reply>)>,
        redirect: bool,
    },
    /// A linearizable read of a caller on this node.
    Read(ReadReply),
    /// A layer above this node's log failed for this shard (its
    /// materializer cannot write): stop the replica, so that leadership
    /// and the mounts move to nodes that can serve it.
    Fail(String),
    /// A read a follower forwarded to this node.
    ReadForwarded {
        from: NodeId,
        seq: u64,
    },
    /// The leader's answer to a read this node forwarded.
    ReadDone {
        seq: u64,
        result: Result<ReadPoint, LogError>,
    },
    ReadMsg(NodeId, ReadMsg),
    /// Nothing: wakes the shard thread to start reads a settle let go.
    Wake,
    Reconnected(NodeId),
    PeerFloor(NodeId, Position),
    /// Take the lead of this shard (leader affinity, `affinity`).
    Campaign,
    Stop,
}

struct ShardHandle {
    inbox: std_mpsc::SyncSender<Input>,
    wal: SharedWal<FsDisk>,
    base: Position,
    config_id: u32,
    decided: watch::Receiver<Position>,
    status: Arc<Mutex<ShardStatus>>,
    subscribers: Arc<Mutex<SubscriberTable>>,
    counters: Arc<ShardCounters>,
    fatal: Arc<Mutex<Option<String>>>,
    /// See [`LogNode::set_watermark`].
    watermark: Arc<AtomicU64>,
    /// See [`LogNode::answered_early`].
    gate: Arc<ReadGate>,
}

struct Inner {
    cfg: LogNodeConfig,
    shards: HashMap<ShardId, ShardHandle>,
    /// The node's WAL (every shard's stream), for its statistics.
    wal: NodeWal<FsDisk>,
    /// Set while the WAL's disk is below its headroom (`watch_space`):
    /// why new proposals are refused.
    low_space: Mutex<Option<String>>,
    /// Open connections per remote address on the log port.
    peers: cfs_frame::peers::PeerLimiter,
    links: PeerLinks,
    /// Request ids for proposals made through this node's API.
    client_id: u64,
    seq: AtomicU64,
    /// Live inbound peer links: node id -> (incarnation, still open).
    inbound: Mutex<HashMap<NodeId, (u64, Arc<AtomicBool>)>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    stopping: AtomicBool,
    /// Connections closed for bad input (malformed frames, bad handshakes).
    pub rejected_connections: AtomicU64,
    /// When each peer was last heard from (ms since `epoch`).
    heard: HashMap<NodeId, AtomicU64>,
    epoch: Instant,
    /// One node led every shard once since start (see `problems`).
    leaders_settled: AtomicBool,
    metrics: LogMetrics,
    /// Free bytes of the WAL's file system at the last check
    /// (`watch_space`; `u64::MAX` before the first).
    disk_free: AtomicU64,
}

/// A node that has not heard from a majority (itself included) for this
/// long refuses client requests at once (NoLeader) instead of holding them
/// until they time out: an isolated old leader would otherwise keep
/// accepting proposals it cannot commit (Raft's CheckQuorum, for liveness
/// only; safety never depends on it).
pub const QUORUM_SILENCE_MAX: Duration = Duration::from_secs(1);

/// A running log node. Cheap to clone.
#[derive(Clone)]
pub struct LogNode {
    inner: Arc<Inner>,
}

fn random_nonzero() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// Checks (or creates) the identity file that binds a data directory to one
/// node of one cluster, so a misconfigured node cannot reuse another's log.
/// Opens the node's WAL, `<data_dir>/wal`: one for every shard (D39).
/// Refuses a data directory holding per-shard WALs of an older version.
fn open_node_wal(cfg: &LogNodeConfig) -> Result<NodeWal<FsDisk>, StartError> {
    let dir = cfg.data_dir.join("wal");
    let data_dir = |reason: String| StartError::DataDir {
        dir: cfg.data_dir.display().to_string(),
        reason,
    };
    for shard in &cfg.shards {
        let old = cfg.data_dir.join(format!("shard-{shard}")).join("epoch-1");
        let has_segments = std::fs::read_dir(&old).is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("seg-")))
        });
        if has_segments {
            return Err(data_dir(format!(
                "{} holds a per-shard log written by an older version (before one WAL per \
                 node); this version cannot read it: start this node from an empty data \
                 directory and let it catch up from the others",
                old.display()
            )));
        }
    }
    let faults = crate::disk::DiskFaults {
        lose_unsynced: cfg.faults.lose_unsynced || cfg.faults.fsync_lies,
        fsync_lies: cfg.faults.fsync_lies,
    };
    let disk = FsDisk::with_faults(&dir, faults).map_err(|e| data_dir(e.to_string()))?;
    let wal = NodeWal::open(disk, cfg.wal.clone()).map_err(|source| StartError::Wal {
        dir: dir.display().to_string(),
        source,
    })?;
    let known: Vec<StreamId> = cfg
        .shards
        .iter()
        .map(|s| StreamId::replica(s.get(), 1))
        .collect();
    for s in wal.unopened().into_iter().filter(|s| !known.contains(s)) {
        tracing::warn!(stream = %s, "the node's WAL holds a log this configuration does not \
            run: its untrimmed entries keep old segments on disk");
    }
    Ok(wal)
}

fn check_identity(dir: &Path, cluster_id: &str, node_id: NodeId) -> Result<(), StartError> {
    let err = |reason: String| StartError::DataDir {
        dir: dir.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let path = dir.join("IDENTITY");
    let want = format!("cluster_id={cluster_id}\nnode_id={node_id}\n");
    match std::fs::read_to_string(&path) {
        Ok(have) if have == want => Ok(()),
        Ok(have) => Err(err(format!(
            "belongs to another node: {} says {:?}, this node is cluster {cluster_id:?} node {node_id}",
            path.display(),
            have.trim().replace('\n', " ")
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, want).map_err(|e| err(e.to_string()))?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| err(e.to_string()))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

impl LogNode {
    /// Recovers every shard from `data_dir`, starts the shard threads, the
    /// peer links and the listener.
    ///
    /// # Errors
    /// A corrupt WAL (with file and offset), a data directory that belongs
    /// to another node, an invalid configuration or a busy listen address.
    pub async fn start(cfg: LogNodeConfig) -> Result<LogNode, StartError> {
        if !cfg.nodes.contains_key(&cfg.node_id) {
            return Err(StartError::Config(format!(
                "node id {} is not among the cluster's nodes {:?}",
                cfg.node_id,
                cfg.nodes.keys().collect::<Vec<_>>()
            )));
        }
        if cfg.nodes.len() < 2 {
            return Err(StartError::Config(
                "a replicated log needs at least 2 nodes (3 for fault tolerance)".into(),
            ));
        }
        check_identity(&cfg.data_dir, &cfg.cluster_id, cfg.node_id)?;
        let me = Identity {
            cluster_id: cfg.cluster_id.clone(),
            node_id: cfg.node_id,
            incarnation: random_nonzero(),
            security: cfg.security.clone(),
        };
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
        let node_ids: Vec<NodeId> = cfg.nodes.keys().copied().collect();
        let wal = open_node_wal(&cfg)?;
        let metrics = LogMetrics::new(wal.flush_histogram());
        let mut shards = HashMap::new();
        let mut starters = Vec::new();
        for &shard in &cfg.shards {
            let dir = cfg.data_dir.join(format!("shard-{shard}"));
            let epoch = Epoch {
                config_id: 1,
                nodes: node_ids.clone(),
                base: Position::ZERO,
            };
            let stream = wal
                .stream(StreamId::replica(shard.get(), epoch.config_id))
                .map_err(|e| StartError::Shard {
                    shard,
                    source: e.into(),
                })?;
            std::fs::create_dir_all(&dir).map_err(|e| StartError::DataDir {
                dir: dir.display().to_string(),
                reason: e.to_string(),
            })?;
            let subscribers = SubscriberTable::load(dir.join("subscribers")).map_err(|reason| {
                StartError::DataDir {
                    dir: dir.display().to_string(),
                    reason,
                }
            })?;
            let core = ShardCore::open(
                shard,
                cfg.node_id,
                epoch.clone(),
                stream,
                &cfg.timing,
                Position::ZERO,
            )
            .map_err(|source| StartError::Shard { shard, source })?;
            // Already-decided entries are not redelivered: subscribers read
            // them from the WAL.
            let decided = core.decided();
            let (inbox_tx, inbox_rx) = std_mpsc::sync_channel(SHARD_INBOX_MAX);
            let (decided_tx, decided_rx) = watch::channel(decided);
            let status = Arc::new(Mutex::new(ShardStatus {
                shard,
                leader: None,
                is_leader: false,
                decided,
                trimmed: epoch.base,
                config_id: epoch.config_id,
                ballot: 0,
                term_start: None,
            }));
            let handle = ShardHandle {
                inbox: inbox_tx,
                wal: core.wal().clone(),
                base: epoch.base,
                config_id: epoch.config_id,
                decided: decided_rx,
                status: status.clone(),
                subscribers: Arc::new(Mutex::new(subscribers)),
                counters: Arc::new(metrics.shard(shard)),
                fatal: Arc::new(Mutex::new(None)),
                watermark: Arc::new(AtomicU64::new(0)),
                gate: Arc::default(),
            };
            starters.push((
                core,
                inbox_rx,
                decided_tx,
                handle.status.clone(),
                handle.subscribers.clone(),
                handle.counters.clone(),
                (
                    handle.fatal.clone(),
                    handle.watermark.clone(),
                    handle.gate.clone(),
                ),
            ));
            shards.insert(shard, handle);
        }
        // Peer links report reconnects to every shard.
        let inboxes: Vec<std_mpsc::SyncSender<Input>> =
            shards.values().map(|h| h.inbox.clone()).collect();
        let on_connect = Arc::new(move |peer: NodeId| {
            for i in &inboxes {
                let _ = i.try_send(Input::Reconnected(peer));
            }
        });
        let peers: Vec<(NodeId, SocketAddr)> = cfg
            .nodes
            .iter()
            .filter(|(id, _)| **id != cfg.node_id)
            .map(|(id, a)| (*id, cfg.dial.get(id).copied().unwrap_or(*a)))
            .collect();
        let links = PeerLinks::start(me.clone(), peers, on_connect);
        let inner = Arc::new(Inner {
            cfg: cfg.clone(),
            shards,
            wal,
            low_space: Mutex::new(None),
            links,
            client_id: random_nonzero(),
            seq: AtomicU64::new(1),
            inbound: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            rejected_connections: AtomicU64::new(0),
            heard: cfg
                .nodes
                .keys()
                .filter(|id| **id != cfg.node_id)
                .map(|id| (*id, AtomicU64::new(0)))
                .collect(),
            epoch: Instant::now(),
            leaders_settled: AtomicBool::new(false),
            metrics,
            disk_free: AtomicU64::new(u64::MAX),
            peers: cfs_frame::peers::PeerLimiter::new(cfg.connections_per_peer),
        });
        for (core, rx, decided_tx, status, subs, counters, (fatal, watermark, gate)) in starters {
            let shard = core.shard;
            let weak = Arc::downgrade(&inner);
            let tick = cfg.tick;
            let retain_entries = cfg.retain_entries;
            let t = std::thread::Builder::new()
                .name(format!("shard-{shard}"))
                .spawn(move || {
                    let span = info_span!("shard", shard = shard.get());
                    let _g = span.enter();
                    let mut l = ShardLoop {
                        core,
                        rx,
                        decided_tx,
                        status,
                        subs,
                        counters,
                        links: weak,
                        proposals: Proposals::default(),
                        floors: TrimFloors::new(retain_entries),
                        ticks: Ticks::default(),
                        reads: HashMap::new(),
                        forwarded: ForwardedReads::default(),
                        next_read: 0,
                        watermark,
                        gate,
                        parked: Vec::new(),
                        known_leader: None,
                    };
                    // A panic (OmniPaxos stops on a storage error it cannot
                    // handle, e.g. a write to a poisoned WAL) fails the shard
                    // visibly: `/health` names it instead of staying 200.
                    let run =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.run(tick)));
                    let run = run.unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&*p))));
                    match run {
                        Err(e) => {
                            error!("shard stopped: {e}");
                            *fatal.lock().expect("fatal lock") = Some(e);
                        }
                        // A clean stop: the lazily written decided index too.
                        Ok(()) => {
                            if let Err(e) = l.core.wal().lock().flush() {
                                warn!("cannot flush the log at shutdown: {e}");
                            }
                        }
                    }
                })
                .map_err(|e| StartError::Config(format!("cannot start shard thread: {e}")))?;
            inner.threads.lock().expect("threads lock").push(t);
        }
        let node = LogNode { inner };
        let acceptor = node.clone();
        tokio::spawn(async move { acceptor.accept_loop(listener).await });
        tokio::spawn(Self::keep_leaders_together(Arc::downgrade(&node.inner)));
        tokio::spawn(Self::watch_space(Arc::downgrade(&node.inner)));
        info!(node = cfg.node_id, listen = %cfg.listen, shards = ?cfg.shards, "log node started");
        Ok(node)
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.cfg.node_id
    }

    /// Every [`affinity::LEADER_AFFINITY_EVERY`], campaigns for the shards
    /// [`affinity::campaign_for`] names, while this node hears from a
    /// majority; ends with the node.
    async fn keep_leaders_together(inner: std::sync::Weak<Inner>) {
        loop {
            tokio::time::sleep(affinity::LEADER_AFFINITY_EVERY).await;
            let Some(inner) = inner.upgrade() else { return };
            if inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            let node = LogNode { inner };
            if !node.quorum_recent() {
                continue;
            }
            // A node low on log space takes no proposals: it must not
            // pull the leadership of every shard to itself.
            if node.check_space().is_err() {
                continue;
            }
            for shard in affinity::campaign_for(node.node_id(), &node.status()) {
                let Ok(h) = node.shard(shard) else { continue };
                if h.inbox.try_send(Input::Campaign).is_ok() {
                    h.counters.campaigns.inc();
                    info!(?shard, "taking the lead so one node leads every shard");
                }
            }
        }
    }

    fn shard(&self, shard: ShardId) -> Result<&ShardHandle, LogError> {
        self.inner
            .shards
            .get(&shard)
            .ok_or(LogError::UnknownShard(shard))
    }

    /// A fresh request id for a proposal made through this node.
    pub fn next_request(&self) -> RequestId {
        RequestId {
            client: self.inner.client_id,
            seq: self.inner.seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Whether this node heard from a majority of the nodes (itself
    /// included) within [`QUORUM_SILENCE_MAX`]. A node that just started
    /// counts its peers as heard.
    pub fn quorum_recent(&self) -> bool {
        let now = self.inner.epoch.elapsed().as_millis() as u64;
        let window = QUORUM_SILENCE_MAX.as_millis() as u64;
        let heard = self
            .inner
            .heard
            .values()
            .filter(|t| now.saturating_sub(t.load(Ordering::Relaxed)) <= window)
            .count();
        2 * (heard + 1) > self.inner.heard.len() + 1
    }

    async fn submit(
        &self,
        shard: ShardId,
        entry: Entry,
        redirect: bool,
    ) -> Result<Position, LogError> {
        self.enqueue(shard, entry, redirect)?.await
    }

    /// Puts `entry` in `shard`'s queue now; returns what waits (up to the
    /// propose timeout) for its decided position.
    fn enqueue(
        &self,
        shard: ShardId,
        entry: Entry,
        redirect: bool,
    ) -> Result<impl std::future::Future<Output = Result<Position, LogError>>, LogError> {
        let h = self.shard(shard)?;
        if let Some(f) = h.fatal.lock().expect("fatal lock").clone() {
            return Err(LogError::Connection(format!("shard failed: {f}")));
        }
        self.check_space()?;
        let (tx, rx) = oneshot::channel();
        h.counters.proposals.inc();
        h.inbox
            .try_send(Input::Propose {
                entry,
                reply: Some(Reply::Local(tx)),
                redirect,
            })
            .map_err(|_| {
                h.counters.inbox_full.inc();
                LogError::NoLeader(shard)
            })?;
        let timeout = self.inner.cfg.propose_timeout;
        let commit = self.inner.metrics.commit.clone();
        let proposed = Instant::now();
        Ok(async move {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => {
                    commit.observe(proposed.elapsed().as_secs_f64());
                    r
                }
                Ok(Err(_)) => Err(LogError::ShuttingDown),
                Err(_) => {
                    // A timeout is the slowest commit of all: it counts.
                    commit.observe(proposed.elapsed().as_secs_f64());
                    Err(LogError::Timeout)
                }
            }
        })
    }

    /// Refuses new proposals while the WAL's disk is below its headroom.
    fn check_space(&self) -> Result<(), LogError> {
        match self
            .inner
            .low_space
            .lock()
            .expect("low space lock")
            .as_ref()
        {
            Some(m) => Err(LogError::NoSpace(m.clone())),
            None => Ok(()),
        }
    }

    /// Every [`SPACE_CHECK_EVERY`], compares the free space of the WAL's
    /// file system with [`WAL_HEADROOM_SEGMENTS`] segments: below it, new
    /// proposals are refused (ENOSPC) before the disk is full, so the
    /// entries already accepted, a rotation and the trims that free space
    /// still fit.
    async fn watch_space(inner: std::sync::Weak<Inner>) {
        loop {
            tokio::time::sleep(SPACE_CHECK_EVERY).await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            if inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            let dir = inner.cfg.data_dir.join("wal");
            let headroom = WAL_HEADROOM_SEGMENTS * inner.cfg.wal.segment_bytes;
            let free = crate::disk::free_bytes(&dir);
            if let Ok(f) = &free {
                inner.disk_free.store(*f, Ordering::Relaxed);
            }
            let low = match free {
                Ok(free) if free < headroom => Some(format!(
                    "log disk low: {free} bytes free under {} (headroom of \
                     {WAL_HEADROOM_SEGMENTS} WAL segments); new proposals refused with ENOSPC",
                    dir.display()
                )),
                Ok(_) => None,
                Err(e) => {
                    warn!("cannot read the free space of {}: {e}", dir.display());
                    continue;
                }
            };
            let mut cur = inner.low_space.lock().expect("low space lock");
            match (&*cur, &low) {
                (None, Some(m)) => warn!("{m}"),
                (Some(_), None) => info!("log disk has room again: proposals accepted"),
                _ => {}
            }
            *cur = low;
        }
    }

    /// Proposes `entry` to `shard`; returns its position once decided.
    /// Retries while a leader is being elected, until the propose timeout.
    /// An entry without a request id gets one from this node.
    #[tracing::instrument(skip(self, entry), fields(kind = entry.kind.0))]
    pub async fn propose(&self, shard: ShardId, mut entry: Entry) -> Result<Position, LogError> {
        if entry.request.is_none() {
            entry.request = self.next_request();
        }
        let deadline = Instant::now() + self.inner.cfg.propose_timeout;
        loop {
            if !self.quorum_recent() {
                return Err(LogError::NoLeader(shard));
            }
            match self.submit(shard, entry.clone(), false).await {
                Err(LogError::NoLeader(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(self.inner.cfg.tick * 5).await;
                }
                r => return r,
            }
        }
    }

    /// A linearizable read point: see the module docs. Retries while a
    /// leader is being elected, until the propose timeout.
    pub async fn read_barrier(&self, shard: ShardId) -> Result<Position, LogError> {
        self.read_index(shard).await.map(|r| r.position)
    }

    /// As [`LogNode::read_barrier`], with the leader's watermark.
    #[tracing::instrument(skip(self))]
    pub async fn read_index(&self, shard: ShardId) -> Result<ReadPoint, LogError> {
        if self.inner.cfg.faults.stale_reads {
            // BROKEN on purpose (Faults::stale_reads): this node's view.
            let position = self.stale_read_point(shard)?;
            let watermark = self.shard(shard)?.watermark.load(Ordering::SeqCst);
            return Ok(ReadPoint {
                position,
                watermark,
            });
        }
        let deadline = Instant::now() + self.inner.cfg.propose_timeout;
        loop {
            if !self.quorum_recent() {
                return Err(LogError::NoLeader(shard));
            }
            let h = self.shard(shard)?;
            let (tx, rx) = oneshot::channel();
            h.inbox
                .try_send(Input::Read(ReadReply::Local(tx)))
                .map_err(|_| {
                    h.counters.inbox_full.inc();
                    LogError::NoLeader(shard)
                })?;
            let left = deadline.saturating_duration_since(Instant::now());
            let r = match tokio::time::timeout(left, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(LogError::ShuttingDown),
                Err(_) => Err(LogError::Timeout),
            };
            match r {
                Err(LogError::NoLeader(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(self.inner.cfg.tick * 5).await;
                }
                r => return r,
            }
        }
    }

    /// Publishes this node's watermark for `shard`: while this node leads
    /// the shard, reads it answers carry the value (see [`ReadPoint`]).
    pub fn set_watermark(&self, shard: ShardId, value: u64) -> Result<(), LogError> {
        self.shard(shard)?.watermark.store(value, Ordering::SeqCst);
        Ok(())
    }

    /// Proposes `entry` to `shard` now, in call order with this node's
    /// other calls (the entry is in the shard's queue when this returns),
    /// and returns what waits for its decided position. Unlike
    /// [`LogNode::propose`] it does not wait out an election and try
    /// again; the shard's own re-proposal of undecided entries
    /// (`policy::Proposals`) still applies, so after a leader change the
    /// decided order may differ from the call order (the sequencer
    /// detects that when it settles).
    pub fn propose_now(
        &self,
        shard: ShardId,
        mut entry: Entry,
    ) -> Result<impl std::future::Future<Output = Result<Position, LogError>>, LogError> {
        if entry.request.is_none() {
            entry.request = self.next_request();
        }
        self.enqueue(shard, entry, false)
    }

    /// A layer above answered its callers for changes numbered below
    /// `upto` before their entries were decided: reads of `shard` that
    /// followers forward from now on (while this node leads) wait until
    /// [`LogNode::settled_early`] reaches `upto` (`read_gate`). Reads of
    /// callers on this node are not held here: that layer holds them
    /// itself.
    pub fn answered_early(&self, shard: ShardId, upto: u64) -> Result<(), LogError> {
        self.shard(shard)?.gate.answered(upto);
        Ok(())
    }

    /// Early answers numbered below `upto` are settled (decided and
    /// applied, or given up): reads held for them may start.
    pub fn settled_early(&self, shard: ShardId, upto: u64) -> Result<(), LogError> {
        let h = self.shard(shard)?;
        if h.gate.settled(upto) {
            let _ = h.inbox.try_send(Input::Wake);
        }
        Ok(())
    }

    /// Stops this node's replica of `shard` for `why` (a layer above it
    /// cannot go on: the namespace materializer's database failed): it is
    /// reported failed (`/health` 503 naming it), refuses proposals, and
    /// the other replicas elect a leader without it. Like a WAL error, it
    /// lasts until the node restarts.
    pub fn fail_shard(&self, shard: ShardId, why: String) -> Result<(), LogError> {
        let h = self.shard(shard)?;
        {
            let mut f = h.fatal.lock().expect("fatal lock");
            if f.is_some() {
                return Ok(());
            }
            *f = Some(why.clone());
        }
        error!(shard = shard.get(), "shard stopped: {why}");
        match h.inbox.try_send(Input::Fail(why)) {
            Ok(()) => Ok(()),
            // A full queue: delivered from a thread of its own (the shard
            // thread drains its queue; nothing here may block).
            Err(std_mpsc::TrySendError::Full(input)) => {
                let inbox = h.inbox.clone();
                std::thread::spawn(move || {
                    let _ = inbox.send(input);
                });
                Ok(())
            }
            Err(std_mpsc::TrySendError::Disconnected(_)) => Ok(()),
        }
    }

    /// BROKEN on purpose (Faults::stale_reads): this node's own decided
    /// position instead of a round through the leader.
    fn stale_read_point(&self, shard: ShardId) -> Result<Position, LogError> {
        self.status()
            .into_iter()
            .find(|s| s.shard == shard)
            .map(|s| s.decided)
            .ok_or(LogError::UnknownShard(shard))
    }

    /// Reads decided entries from `from` on; `name`, if given, registers a
    /// durable subscriber whose `persisted` position holds back trimming.
    pub fn subscribe(
        &self,
        shard: ShardId,
        from: Position,
        name: Option<&str>,
    ) -> Result<Subscription, LogError> {
        let h = self.shard(shard)?;
        if let Some(n) = name {
            if n.is_empty() || n.contains(char::is_whitespace) {
                return Err(LogError::Invalid(format!("bad subscriber name {n:?}")));
            }
            let mut t = h.subscribers.lock().expect("subscribers lock");
            if !t.persisted.contains_key(n) {
                t.persisted.insert(n.to_string(), from);
                t.dirty = true;
            }
        }
        Ok(Subscription {
            next: from,
            wal: h.wal.clone(),
            base: h.base,
            decided: h.decided.clone(),
            name: name.map(str::to_string),
            table: h.subscribers.clone(),
        })
    }

    pub fn status(&self) -> Vec<ShardStatus> {
        let mut v: Vec<ShardStatus> = self
            .inner
            .shards
            .values()
            .map(|h| {
                let mut s = h.status.lock().expect("status lock").clone();
                // A stopped replica leads nothing and knows no leader,
                // whatever it last reported.
                if h.fatal.lock().expect("fatal lock").is_some() {
                    s.is_leader = false;
                    s.leader = None;
                }
                s
            })
            .collect();
        v.sort_by_key(|s| s.shard);
        v
    }

    /// Problems that make this node unhealthy (empty when healthy).
    /// While the node starts (up to [`affinity::LEADERS_SETTLE_MAX`]),
    /// shards led by different nodes count as a problem too, so that a
    /// cluster reports healthy once leader affinity has brought them
    /// together: the move is a leader change, during which a change
    /// answered early may be unseen by other mounts for a moment (D30),
    /// and it then happens before anyone mounts.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(m) = self
            .inner
            .low_space
            .lock()
            .expect("low space lock")
            .as_ref()
        {
            p.push(m.clone());
        }
        for (id, h) in &self.inner.shards {
            if let Some(f) = h.fatal.lock().expect("fatal lock").as_ref() {
                p.push(format!("shard {id} failed: {f}"));
            } else if h.status.lock().expect("status lock").leader.is_none() {
                p.push(format!("shard {id} has no leader"));
            }
        }
        if p.is_empty() && !self.inner.leaders_settled.load(Ordering::Relaxed) {
            let status = self.status();
            let together = affinity::led_by_one(&status);
            if together || self.inner.epoch.elapsed() >= affinity::LEADERS_SETTLE_MAX {
                self.inner.leaders_settled.store(true, Ordering::Relaxed);
            } else {
                p.push("starting: shards are led by different nodes until leader affinity brings them together".into());
            }
        }
        p.sort();
        p
    }

    /// Prometheus text exposition of this node's log metrics.
    pub fn metrics_text(&self) -> String {
        let mut shards: Vec<(ShardId, ShardGauges)> = self
            .inner
            .shards
            .iter()
            .map(|(id, h)| {
                let st = h.status.lock().expect("status lock").clone();
                let failed = h.fatal.lock().expect("fatal lock").is_some();
                let g = ShardGauges {
                    decided: st.decided.get(),
                    trimmed: st.trimmed.get(),
                    is_leader: st.is_leader && !failed,
                    ballot: st.ballot,
                    failed,
                };
                (*id, g)
            })
            .collect();
        shards.sort_by_key(|(id, _)| *id);
        let now = self.inner.epoch.elapsed().as_millis() as u64;
        let window = QUORUM_SILENCE_MAX.as_millis() as u64;
        let links = &self.inner.links.stats;
        let free = self.inner.disk_free.load(Ordering::Relaxed);
        let node = NodeGauges {
            wal: self.inner.wal.stats(),
            disk_free: (free != u64::MAX).then_some(free),
            wal_dir: self.inner.cfg.data_dir.join("wal").display().to_string(),
            peers: self.inner.heard.len(),
            peers_connected: self
                .inner
                .heard
                .values()
                .filter(|t| {
                    let t = t.load(Ordering::Relaxed);
                    t > 0 && now.saturating_sub(t) <= window
                })
                .count(),
            sent: links.sent.load(Ordering::Relaxed),
            dropped: links.dropped.load(Ordering::Relaxed),
            reconnects: links.reconnects.load(Ordering::Relaxed),
            rejected_connections: self.inner.rejected_connections.load(Ordering::Relaxed),
        };
        let _one = self.inner.metrics.scrape.lock().expect("scrape lock");
        self.inner.metrics.refresh(&shards, &node);
        cfs_metrics::render(&self.inner.metrics.registry)
    }

    /// Stops the shard threads (after their current batch) and the listener.
    pub async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        for h in self.inner.shards.values() {
            let _ = h.inbox.send(Input::Stop);
        }
        let threads: Vec<_> = self
            .inner
            .threads
            .lock()
            .expect("threads lock")
            .drain(..)
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        info!("log node stopped");
    }

    async fn accept_loop(self, listener: TcpListener) {
        loop {
            if self.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            match listener.accept().await {
                Ok((s, addr)) => {
                    let Some(slot) = self.inner.peers.admit(addr.ip()) else {
                        self.inner
                            .rejected_connections
                            .fetch_add(1, Ordering::Relaxed);
                        warn!(peer = %addr, max = self.inner.peers.max(),
                            "closing connection: too many open from this address");
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    let me = self.clone();
                    tokio::spawn(
                        async move {
                            let _slot = slot;
                            if let Err(reason) = me.serve_connection(s).await {
                                me.inner
                                    .rejected_connections
                                    .fetch_add(1, Ordering::Relaxed);
                                warn!("closing connection: {reason}");
                            }
                        }
                        .instrument(info_span!("conn", peer = %addr)),
                    );
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Handshake, then either peer traffic or client requests. Returns an
    /// error string when the connection is closed for bad input.
    async fn serve_connection(&self, s: tokio::net::TcpStream) -> Result<(), String> {
        let conn = self
            .inner
            .cfg
            .security
            .accept(s)
            .await
            .map_err(|e| e.to_string())?;
        let (r, mut w, peer) = (conn.reader, conn.writer, conn.peer);
        let mut reader = FrameReader::new(r, HELLO_FRAME_BYTES_MAX);
        let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
            Err(_) => return Err("no hello within the handshake timeout".into()),
            Ok(Err(e)) => return Err(format!("bad hello: {e}")),
            Ok(Ok(h)) => h,
        };
        let (role, node_id) = match &hello {
            Wire::Hello { role, node_id, .. } => (*role, *node_id),
            _ => return Err("first message is not a hello".into()),
        };
        let alive = Arc::new(AtomicBool::new(true));
        if let Err(reason) = self.check_hello(&hello, &alive, &peer) {
            let _ = write_msg(
                &mut w,
                &Wire::Refused {
                    reason: reason.clone(),
                },
            )
            .await;
            return Err(reason);
        }
        match role {
            Role::Peer => {
                let _ = write_msg(
                    &mut w,
                    &Wire::Welcome {
                        node_id: self.inner.cfg.node_id,
                    },
                )
                .await;
                reader.max = FRAME_BYTES_MAX;
                let r = self.serve_peer(node_id, reader).await;
                alive.store(false, Ordering::SeqCst);
                r
            }
            Role::Client => {
                let _ = write_msg(
                    &mut w,
                    &Wire::Welcome {
                        node_id: self.inner.cfg.node_id,
                    },
                )
                .await;
                reader.max = FRAME_BYTES_MAX;
                self.serve_client(reader, w).await
            }
        }
    }

    /// Validates a hello; for peers, registers the link as `alive`.
    fn check_hello(
        &self,
        hello: &Wire,
        alive: &Arc<AtomicBool>,
        peer: &cfs_net::Peer,
    ) -> Result<(), String> {
        let Wire::Hello {
            protocol,
            cluster_id,
            role,
            node_id,
            incarnation,
        } = hello
        else {
            return Err("first message is not a hello".into());
        };
        let (protocol, role, node_id, incarnation) = (*protocol, *role, *node_id, *incarnation);
        if protocol != PROTOCOL_VERSION {
            return Err(format!(
                "protocol {protocol} not supported (this node speaks {PROTOCOL_VERSION})"
            ));
        }
        if *cluster_id != self.inner.cfg.cluster_id {
            // The refusal never names this cluster's id.
            return Err(format!("wrong cluster id {cluster_id:?}"));
        }
        if role == Role::Client {
            // Log clients read every entry (file data inline): nodes and
            // administrators only, never a mount.
            if !peer.is_admin() {
                return Err(format!(
                    "{peer} may not use the log: it needs a node or administrator certificate"
                ));
            }
            return Ok(());
        }
        if !peer.is_node(node_id) {
            return Err(format!("{peer} claimed to be node {node_id}"));
        }
        if node_id == self.inner.cfg.node_id {
            return Err(format!(
                "duplicate node id {node_id}: that is this node's own id"
            ));
        }
        if !self.inner.cfg.nodes.contains_key(&node_id) {
            return Err(format!("node id {node_id} is not a member of this cluster"));
        }
        let mut inbound = self.inner.inbound.lock().expect("inbound lock");
        if let Some((inc, live)) = inbound.get(&node_id) {
            if *inc != incarnation && live.load(Ordering::SeqCst) {
                return Err(format!(
                    "duplicate node id {node_id}: another process with that id is connected"
                ));
            }
        }
        inbound.insert(node_id, (incarnation, alive.clone()));
        Ok(())
    }

    async fn serve_peer(
        &self,
        peer: NodeId,
        mut reader: FrameReader<cfs_net::BoxRead>,
    ) -> Result<(), String> {
        loop {
            let msg = match reader.next().await {
                Ok(m) => m,
                Err(crate::transport::TransportError::Closed) => return Ok(()),
                Err(e) => return Err(format!("from node {peer}: {e}")),
            };
            if let Some(t) = self.inner.heard.get(&peer) {
                t.store(
                    self.inner.epoch.elapsed().as_millis() as u64,
                    Ordering::Relaxed,
                );
            }
            match msg {
                Wire::Paxos {
                    shard,
                    config_id,
                    msg,
                } => {
                    let h = self
                        .shard(shard)
                        .map_err(|e| format!("from node {peer}: {e}"))?;
                    if msg.get_sender() != peer || msg.get_receiver() != self.inner.cfg.node_id {
                        return Err(format!(
                            "node {peer} sent a message from {} to {}",
                            msg.get_sender(),
                            msg.get_receiver()
                        ));
                    }
                    if config_id != h.config_id {
                        continue;
                    }
                    tracing::trace!(?msg, "recv");
                    if h.inbox.try_send(Input::Paxos(msg)).is_err() {
                        h.counters.inbox_full.inc();
                    }
                }
                Wire::Forward { shard, entries } => {
                    let h = self
                        .shard(shard)
                        .map_err(|e| format!("from node {peer}: {e}"))?;
                    // One input per PROPOSE_BATCH_MAX, as for a client's
                    // frame: bounded work per input.
                    let mut entries = entries.into_iter().peekable();
                    while entries.peek().is_some() {
                        let proposals = entries
                            .by_ref()
                            .take(PROPOSE_BATCH_MAX)
                            .map(|e| (e, None))
                            .collect();
                        let input = Input::ProposeMany {
                            proposals,
                            redirect: true,
                        };
                        if h.inbox.try_send(input).is_err() {
                            h.counters.inbox_full.inc();
                        }
                    }
                }
                Wire::Persisted { shard, floor } => {
                    let h = self
                        .shard(shard)
                        .map_err(|e| format!("from node {peer}: {e}"))?;
                    let _ = h.inbox.try_send(Input::PeerFloor(peer, floor));
                }
                Wire::ReadIndex {
                    shard,
                    config_id,
                    msg,
                } => {
                    let h = self
                        .shard(shard)
                        .map_err(|e| format!("from node {peer}: {e}"))?;
                    if config_id == h.config_id {
                        let _ = h.inbox.try_send(Input::ReadMsg(peer, msg));
                    }
                }
                Wire::ReadForward { shard, seq } => {
                    let h = self
                        .shard(shard)
                        .map_err(|e| format!("from node {peer}: {e}"))?;
                    let _ = h.inbox.try_send(Input::ReadForwarded { from: peer, seq });
                }
                Wire::ReadDone { shard, seq, result } => {
                    let h = self
                        .shard(shard)
                        .map_err(|e| format!("from node {peer}: {e}"))?;
                    let _ = h.inbox.try_send(Input::ReadDone { seq, result });
                }
                other => {
                    return Err(format!(
                        "node {peer} sent a client message on a peer link: {other:?}"
                    ))
                }
            }
        }
    }

    async fn serve_client(
        &self,
        mut reader: FrameReader<cfs_net::BoxRead>,
        w: cfs_net::BoxWrite,
    ) -> Result<(), String> {
        let (tx, rx) = mpsc::channel::<Wire>(CLIENT_REPLY_QUEUE_MAX);
        let writer = tokio::spawn(crate::frame::write_batched(w, rx, Wire::encode_frame));
        // Each live subscription holds one permit.
        let subscriptions = Arc::new(tokio::sync::Semaphore::new(
            SUBSCRIPTIONS_PER_CONNECTION_MAX,
        ));
        let result = loop {
            let msg = match reader.next().await {
                Ok(m) => m,
                Err(crate::transport::TransportError::Closed) => break Ok(()),
                Err(e) => break Err(format!("client: {e}")),
            };
            let tx = tx.clone();
            match msg {
                Wire::Propose { id, shard, entry } => {
                    if let Err(e) = validate_client_entry(&entry) {
                        let _ = tx.send(Wire::Decided { id, result: Err(e) }).await;
                        continue;
                    }
                    self.submit_remote(shard, vec![(id, entry)], &tx).await;
                }
                Wire::ProposeBatch { shard, proposals } => {
                    if proposals.len() > PROPOSE_BATCH_MAX {
                        break Err(format!(
                            "client sent {} proposals in one frame (at most {PROPOSE_BATCH_MAX})",
                            proposals.len()
                        ));
                    }
                    let mut valid = Vec::with_capacity(proposals.len());
                    for (id, entry) in proposals {
                        match validate_client_entry(&entry) {
                            Ok(()) => valid.push((id, entry)),
                            Err(e) => {
                                let _ = tx.send(Wire::Decided { id, result: Err(e) }).await;
                            }
                        }
                    }
                    self.submit_remote(shard, valid, &tx).await;
                }
                Wire::ReadBarrier { id, shard } if self.inner.cfg.faults.stale_reads => {
                    let result = self.stale_read_point(shard);
                    let _ = tx.send(Wire::Decided { id, result }).await;
                }
                Wire::ReadBarrier { id, shard } => {
                    let sent = self.shard(shard).and_then(|h| {
                        if !self.quorum_recent() {
                            return Err(LogError::NoLeader(shard));
                        }
                        let reply = ReadReply::Remote {
                            id,
                            conn: tx.clone(),
                        };
                        h.inbox.try_send(Input::Read(reply)).map_err(|_| {
                            h.counters.inbox_full.inc();
                            LogError::NoLeader(shard)
                        })
                    });
                    if let Err(e) = sent {
                        let _ = tx.send(Wire::Decided { id, result: Err(e) }).await;
                    }
                }
                Wire::Status { id } => {
                    let _ = tx
                        .send(Wire::StatusReply {
                            id,
                            node_id: self.inner.cfg.node_id,
                            shards: self.status(),
                        })
                        .await;
                }
                Wire::Subscribe { id, shard, from } => {
                    let Ok(permit) = subscriptions.clone().try_acquire_owned() else {
                        warn!(
                            "client refused a subscription: \
                            {SUBSCRIPTIONS_PER_CONNECTION_MAX} live on its connection"
                        );
                        let e = LogError::Invalid(format!(
                            "too many subscriptions on this connection (at most \
                             {SUBSCRIPTIONS_PER_CONNECTION_MAX})"
                        ));
                        let _ = tx.send(Wire::Entries { id, result: Err(e) }).await;
                        continue;
                    };
                    let sub = self.subscribe(shard, from, None);
                    tokio::spawn(async move {
                        let _permit = permit;
                        let mut sub = match sub {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = tx.send(Wire::Entries { id, result: Err(e) }).await;
                                return;
                            }
                        };
                        loop {
                            let r = sub.next_batch(SUBSCRIBE_BATCH_MAX).await;
                            let stop = r.is_err();
                            if tx.send(Wire::Entries { id, result: r }).await.is_err() || stop {
                                return;
                            }
                        }
                    });
                }
                other => break Err(format!("client sent a non-request message: {other:?}")),
            }
        };
        drop(tx);
        writer.abort();
        result
    }
}

impl LogNode {
    /// Queues a remote client's proposals (one frame's worth) as one input;
    /// the shard thread answers each on `conn`.
    async fn submit_remote(
        &self,
        shard: ShardId,
        proposals: Vec<(u64, Entry)>,
        conn: &mpsc::Sender<Wire>,
    ) {
        if proposals.is_empty() {
            return;
        }
        let refuse = |proposals: Vec<(u64, Entry)>, e: LogError| async move {
            for (id, _) in proposals {
                let result = Err(e.clone());
                let _ = conn.send(Wire::Decided { id, result }).await;
            }
        };
        let h = match self.shard(shard) {
            Ok(h) => h,
            Err(e) => return refuse(proposals, e).await,
        };
        if !self.quorum_recent() {
            return refuse(proposals, LogError::NoLeader(shard)).await;
        }
        if let Err(e) = self.check_space() {
            return refuse(proposals, e).await;
        }
        h.counters.proposals.inc_by(proposals.len() as u64);
        let ids: Vec<u64> = proposals.iter().map(|(id, _)| *id).collect();
        let input = Input::ProposeMany {
            proposals: proposals
                .into_iter()
                .map(|(id, entry)| {
                    let reply = Reply::Remote {
                        id,
                        conn: conn.clone(),
                    };
                    (entry, Some(reply))
                })
                .collect(),
            redirect: true,
        };
        if h.inbox.try_send(input).is_err() {
            h.counters.inbox_full.inc();
            for id in ids {
                let result = Err(LogError::NoLeader(shard));
                let _ = conn.send(Wire::Decided { id, result }).await;
            }
        }
    }
}

/// The message of a caught panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

fn validate_client_entry(e: &Entry) -> Result<(), LogError> {
    if e.request.is_none() {
        return Err(LogError::Invalid(
            "a request id (client != 0) is required".into(),
        ));
    }
    if e.kind.0 < KIND_USER_MIN && e.kind != EntryKind::DATA {
        return Err(LogError::Invalid(format!(
            "entry kind {} is reserved for the log",
            e.kind.0
        )));
    }
    // The layers above the log (namespace, transactions) propose inside
    // the node, after checking the caller; a remote client reaching the
    // log port directly may not bypass them.
    if e.kind != EntryKind::DATA {
        return Err(LogError::Invalid(format!(
            "entry kind {} is proposed only inside a node, not by remote clients",
            e.kind.0
        )));
    }
    Ok(())
}
