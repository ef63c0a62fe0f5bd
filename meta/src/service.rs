//! The metadata service: FUSE clients connect here. Mutations become log
//! entries on the owning shard and are answered with the outcome the local
//! materializer computed when it applied them; reads come from the local
//! RocksDB, after a read barrier when the client asks for fresh data.
//! Changes made by other clients are pushed as invalidations.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cfs_log::LogNode;
use cfs_materializers::materializer::{self, Change, Waiters};
use cfs_materializers::ops::*;
use cfs_materializers::read::ReadError;

use crate::coordinator;
use crate::leases::{Leases, Session};
use crate::sequencer::{Sequencer, Ticket};
use cfs_materializers::read::NsRead;
use cfs_materializers::types::*;
use cfs_materializers::NamespaceDb;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{info, warn, Instrument};

use crate::metrics::RequestKind;

/// How long a mutation waits for its outcome after being decided.
const APPLY_WAIT: Duration = Duration::from_secs(30);
/// Age at which an open transaction is presumed abandoned by its
/// coordinator and completed by recovery (node 1; others wait longer).
const RECOVER_AFTER: Duration = Duration::from_secs(3);
/// Entries per readdir reply at most.
const READDIR_MAX: u32 = 1024;
/// Changes queued for the sessions' forwarders before the slowest is
/// told to drop everything (`Lagged`).
const CHANGES_QUEUE_MAX: usize = 64 * 1024;
/// Cross-shard transactions remembered with the client they run for.
const TX_REQUESTERS_MAX: usize = 4096;
/// How long a transaction's client is remembered after its coordinator
/// returned: longer than the reply waits for its session's forwarding.
const TX_REQUESTER_GRACE: Duration = Duration::from_secs(2);
const _: () = assert!(TX_REQUESTER_GRACE.as_millis() > GRANT_WAIT.as_millis());
/// Applied changes one clean-position publication covers at most.
const CLEAN_COALESCE_MAX: usize = 1024;
/// Lapsed holds broken per shard per check (the rest wait for the next).
const HOLDS_BROKEN_PER_CHECK: usize = 64;
/// Longest interval between two checks for idle clients.
const FORGET_CHECK_MAX: Duration = Duration::from_secs(60);
/// Inodes whose attributes go with an early answer at most
/// (`ServerMsg::Current`; a change touches a few).
const CURRENT_INODES_MAX: usize = 8;

/// How often leadership terms and clean positions are refreshed.
const LEASE_TICK: Duration = Duration::from_millis(10);
/// Longest wait for a leased session's invalidation to be forwarded
/// before a lease is granted.
const GRANT_WAIT: Duration = Duration::from_secs(1);
/// A connection must send its `Hello` within this (a slow-loris peer
/// holding sockets and tasks is closed).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued to one session (replies, invalidations, settlements):
/// past this the client has stopped reading, and its session is closed
/// rather than growing the node's memory.
pub const SESSION_OUTBOX_MAX: usize = 64 * 1024;
/// Requests of one session being served at once; the next waits (the
/// session's reader stops reading) until one finishes.
pub const SESSION_INFLIGHT_MAX: usize = 1024;

struct Barrier {
    /// Arrival tickets; a barrier started after ticket `t` was issued
    /// serves the read that took `t`.
    next_ticket: AtomicU64,
    last: tokio::sync::Mutex<(u64, Position)>,
}

struct Inner {
    cluster_id: String,
    node_id: u64,
    /// Trades mount tokens for certificates (`MetaConfig::enroll`).
    enroll: Option<Enroller>,
    /// Seals and opens tenants' keys (`MetaConfig::master_key`, D51).
    master_key: Option<Arc<crate::tenant_keys::MasterKey>>,
    log: LogNode,
    db: Arc<NamespaceDb>,
    waiters: Arc<Waiters>,
    applied: HashMap<ShardId, watch::Receiver<Position>>,
    barriers: HashMap<ShardId, Barrier>,
    changes: broadcast::Sender<Change>,
    segment_servers: Vec<(u64, String)>,
    /// The segment store's (total, free) bytes of file data, as the
    /// garbage collector last measured them (`set_store_space`); statfs
    /// answers from the node's own disk until then.
    store_space: std::sync::Mutex<Option<(u64, u64)>>,
    meta_servers: Vec<(u64, String)>,
    data_dir: PathBuf,
    nodes: u64,
    spread_depth: u32,
    counters: crate::metrics::MetaMetrics,
    /// Why a shard's materializer stopped, if one did.
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    shard_list: Vec<ShardId>,
    /// This process's id as a transaction coordinator (random per start,
    /// so its steps' operation ids never repeat).
    coordinator_id: u64,
    next_step: AtomicU64,
    /// `CFS_FAILPOINT`: a protocol point where this process aborts (tests).
    failpoint: Option<String>,
    /// Client sessions' leases and each shard's clean position.
    leases: Leases,
    /// Mutations of the shards this node leads, ordered and predicted
    /// (D30).
    seq: Sequencer,
    /// Cross-shard transactions this node coordinates, and the client
    /// each runs for: their changes are that client's own.
    tx_requesters: Arc<std::sync::Mutex<HashMap<cfs_proto::tx::TxId, TxRequester>>>,
    /// Finish steps ordered but not yet decided (D37), by the client
    /// operation they were answered for; `mutate` takes them when the
    /// coordinator returns.
    finishing: std::sync::Mutex<HashMap<coordinator::Requester, Vec<Settling>>>,
}

/// A change answered before it was decided, to settle.
struct Settling {
    ticket: Ticket,
    /// For a committed transaction's finish step (D37): the step, its
    /// shard and transaction. The decision is in the log, so a step this
    /// node could not get decided (it lost the lead) is proposed again
    /// rather than reported as failed.
    finish: Option<(ShardId, LoggedOp, cfs_proto::tx::TxId)>,
}

/// The client a cross-shard transaction runs for.
struct TxRequester {
    client: u64,
    /// Its finish steps (operation ids of this coordinator) answered
    /// before they were decided: their invalidations went with the
    /// answer, so their apply sends that client nothing.
    early_steps: Vec<u64>,
}

/// A running metadata service.
#[derive(Clone)]
pub struct MetaService {
    inner: Arc<Inner>,
}

pub struct MetaConfig {
    pub cluster_id: String,
    pub node_id: u64,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub shards: Vec<ShardId>,
    pub segment_servers: Vec<(u64, String)>,
    /// Metadata services of the nodes: node id → address.
    pub meta_servers: Vec<(u64, String)>,
    pub nodes: u64,
    /// See [`cfs_materializers::tx::dir_shard`].
    pub spread_depth: u32,
    /// Open sessions one remote address may keep; more are closed at once.
    pub connections_per_peer: usize,
    /// Mutual TLS (or the development plaintext). A mount's certificate
    /// sets how its uids and gids map (root squash by default).
    pub security: cfs_net::Security,
    /// A client (mount) with no operation for this long has its
    /// exactly-once outcome tables forgotten; a retry of one of its old
    /// operations then gets ESTALE. Longer than any mount's `--timeout`.
    pub forget_idle_clients: Duration,
    /// The cluster CA, on a node that trades one-time mount tokens for
    /// client certificates (`cfs mount --token`); `None`: it does not.
    pub enroll: Option<Arc<cfs_net::ca::Ca>>,
    /// The cluster's master key (D51): without it this node neither makes
    /// nor hands out tenants' keys.
    pub master_key: Option<Arc<crate::tenant_keys::MasterKey>>,
}

/// What a node that enrolls mounts holds.
struct Enroller {
    ca: Arc<cfs_net::ca::Ca>,
    key: cfs_net::token::TokenKey,
}

impl MetaService {
    /// Opens the namespace database, starts one materializer per shard and
    /// listens for clients.
    pub async fn start(cfg: MetaConfig, log: LogNode) -> anyhow::Result<MetaService> {
        let path = cfg.data_dir.join("namespace");
        let db = Arc::new(NamespaceDb::open(&path).context("opening the namespace database")?);
        let waiters = Arc::new(Waiters::default());
        let (changes, _) = broadcast::channel(CHANGES_QUEUE_MAX);
        let mut applied = HashMap::new();
        let mut barriers = HashMap::new();
        let failed: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let metrics = crate::metrics::MetaMetrics::default();
        for &shard in &cfg.shards {
            materializer::init_shard(&db, shard)?;
            let from = db.applied(shard)?;
            let sub = log
                .subscribe(shard, from, Some(materializer::SUBSCRIBER))
                .with_context(|| format!("subscribing to shard {shard}"))?;
            let (tx, rx) = watch::channel(from);
            applied.insert(shard, rx);
            barriers.insert(
                shard,
                Barrier {
                    next_ticket: AtomicU64::new(1),
                    last: tokio::sync::Mutex::new((0, Position::ZERO)),
                },
            );
            let (db2, w2, ch2, f2) = (db.clone(), waiters.clone(), changes.clone(), failed.clone());
            let (log2, all) = (log.clone(), cfg.shards.clone());
            let apply_seconds = metrics.apply_seconds.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    materializer::run_shard(db2, shard, sub, w2, tx, ch2, apply_seconds).await
                {
                    tracing::error!(shard = %shard, "namespace materializer failed: {e}");
                    let why = format!("namespace materializer of shard {shard} stopped: {e}");
                    f2.lock().expect("failed lock").push(why.clone());
                    // Every shard's state is in the one database: this node
                    // serves none of them now. Its replicas stop, so that
                    // leadership, and the mounts that follow it, move to
                    // nodes that can (docs/security.md, "storage faults").
                    for s in all {
                        let _ = log2.fail_shard(s, why.clone());
                    }
                }
            });
        }
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding the metadata service to {}", cfg.listen))?;
        let svc = MetaService {
            inner: Arc::new(Inner {
                cluster_id: cfg.cluster_id,
                node_id: cfg.node_id,
                enroll: cfg.enroll.map(|ca| Enroller {
                    key: ca.token_key(),
                    ca,
                }),
                master_key: cfg.master_key,
                log,
                db,
                waiters,
                applied,
                barriers,
                changes,
                segment_servers: cfg.segment_servers,
                store_space: std::sync::Mutex::new(None),
                meta_servers: cfg.meta_servers,
                data_dir: cfg.data_dir,
                nodes: cfg.nodes,
                spread_depth: cfg.spread_depth,
                counters: metrics,
                failed,
                shard_list: cfg.shards.clone(),
                coordinator_id: rand::random::<u64>() | 1,
                next_step: AtomicU64::new(1),
                failpoint: std::env::var("CFS_FAILPOINT")
                    .ok()
                    .filter(|s| !s.is_empty()),
                leases: Leases::new(&cfg.shards),
                seq: Sequencer::new(&cfg.shards),
                tx_requesters: Arc::default(),
                finishing: Default::default(),
            }),
        };
        // Leadership terms and clean positions, published to the log so
        // that reads answered by this node as leader carry them.
        let lw = svc.inner.clone();
        let mut applied_changes = lw.changes.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(LEASE_TICK) => {}
                    _ = lw.leases.dirty.notified() => {}
                    r = applied_changes.recv() => {
                        if matches!(r, Err(broadcast::error::RecvError::Closed)) {
                            return;
                        }
                    }
                }
                // One publication covers every change applied meanwhile
                // (under load, many per wake-up).
                for _ in 0..CLEAN_COALESCE_MAX {
                    match applied_changes.try_recv() {
                        Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                        Err(_) => break,
                    }
                }
                lw.publish_clean();
            }
        });
        let rec = svc.inner.clone();
        // Nodes look at abandoned transactions at staggered ages, so that
        // usually one of them completes each.
        let after = RECOVER_AFTER + Duration::from_secs(cfg.node_id.saturating_sub(1).min(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match coordinator::recover(&*rec, after).await {
                    Ok(0) => {}
                    Ok(n) => info!(transactions = n, "recovered abandoned transactions"),
                    Err(e) => warn!("transaction recovery: {e}"),
                }
            }
        });
        let forget = svc.inner.clone();
        let idle = cfg.forget_idle_clients;
        tokio::spawn(async move {
            let every = (idle / 4).clamp(Duration::from_millis(200), FORGET_CHECK_MAX);
            loop {
                tokio::time::sleep(every).await;
                forget.forget_idle_clients(idle).await;
            }
        });
        let holds = svc.inner.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(cfs_proto::hold::CHECK_EVERY).await;
                holds.break_lapsed_holds().await;
            }
        });
        info!(listen = %cfg.listen, "metadata service listening");
        let s2 = svc.clone();
        let peers = cfs_frame::peers::PeerLimiter::new(cfg.connections_per_peer);
        let security = cfg.security.clone();
        let enrolling = s2.inner.enroll.is_some();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((sock, peer)) => {
                        let Some(slot) = peers.admit(peer.ip()) else {
                            warn!(%peer, max = peers.max(),
                                "metadata connection closed: too many open from this address");
                            continue;
                        };
                        let inner = s2.inner.clone();
                        let security = security.clone();
                        tokio::spawn(
                            async move {
                                let _slot = slot;
                                let accepted = if enrolling {
                                    security.accept_enrolling(sock).await
                                } else {
                                    security.accept(sock).await
                                };
                                match accepted {
                                    Ok(conn) => serve_conn(inner, conn).await,
                                    Err(e) => warn!("metadata connection refused: {e}"),
                                }
                            }
                            .instrument(tracing::info_span!("meta_session", %peer)),
                        );
                    }
                    Err(e) => {
                        warn!("metadata accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(svc)
    }

    /// Problems for /health.
    pub fn problems(&self) -> Vec<String> {
        self.inner.failed.lock().expect("failed lock").clone()
    }

    /// Applied position of each shard.
    /// The namespace database and a subscription to what changes in it
    /// from now on (the lakehouse follows both).
    pub fn namespace(&self) -> (Arc<NamespaceDb>, broadcast::Receiver<Change>) {
        (self.inner.db.clone(), self.inner.changes.subscribe())
    }

    /// Fences `segments` for freeing (or lifts their fences) on each of
    /// `shards` this node leads (D48): one entry per shard, proposed with
    /// the sequencer held alone so that no write answered early can be
    /// decided after the fence and fail. A segment a shard's extents still
    /// reference stays unfenced there (read the fences back from the
    /// namespace). The shards proposed to, each with its result.
    pub async fn fence_segments(
        &self,
        shards: &[ShardId],
        segments: &[SegmentId],
        fence: bool,
    ) -> Vec<(ShardId, Result<(), Errno>)> {
        let inner = &self.inner;
        let mut out = Vec::new();
        for &shard in shards {
            if !inner.leads(shard) {
                continue;
            }
            for part in segments.chunks(cfs_proto::ops::FENCE_SEGMENTS_MAX) {
                let op = Op::FenceSegments {
                    shard,
                    segments: part.to_vec(),
                    fence,
                };
                let r = match inner.propose_service_op(shard, op).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) | Err(e) => Err(e),
                };
                out.push((shard, r));
            }
        }
        out
    }

    /// What statfs answers from now on: the segment store's capacity and
    /// free space in bytes of file data (after erasure coding's share).
    pub fn set_store_space(&self, total: u64, free: u64) {
        *self.inner.store_space.lock().expect("space lock") = Some((total, free.min(total)));
    }

    /// Proposes compaction's relocations on `shard` (D48), with the
    /// sequencer held alone when this node leads it. The inodes whose
    /// extents moved (the others changed since the copy).
    pub async fn relocate_extents(
        &self,
        shard: ShardId,
        moves: Vec<cfs_proto::ops::Relocation>,
    ) -> Result<usize, Errno> {
        let op = Op::RelocateExtents { shard, moves };
        match self.inner.propose_service_op(shard, op).await? {
            Ok(Applied::Changed { inodes, .. }) => Ok(inodes.len()),
            Ok(_) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Every tenant's keys in the clear, opened with this node's master
    /// key (D51): for the collector, which re-encrypts and compacts sealed
    /// stripes. Empty when there are none; EKEYREJECTED without a master
    /// key (or the wrong one) while there are some.
    pub async fn all_tenant_keys(&self) -> Result<Vec<cfs_proto::tenant::TenantKeys>, Errno> {
        let inner = &self.inner;
        let shard = inner.keys_shard()?;
        let records = cfs_materializers::tenant_keys::all(&inner.db, shard)
            .map_err(|e| read_err(ReadError::Db(e)))?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let master = inner.master()?;
        let mut by_tenant: std::collections::BTreeMap<String, Vec<_>> = Default::default();
        for r in records {
            by_tenant.entry(r.tenant.clone()).or_default().push(r);
        }
        by_tenant
            .iter()
            .map(|(t, rs)| crate::tenant_keys::open_all(master, &inner.cluster_id, t, rs))
            .collect()
    }

    /// Every tenant's re-encryption progress as last logged.
    pub fn reencryption(&self) -> Result<Vec<cfs_proto::tenant::Reencryption>, Errno> {
        let shard = self.inner.keys_shard()?;
        cfs_materializers::tenant_keys::reencryption(&self.inner.db, shard)
            .map_err(|e| read_err(ReadError::Db(e)))
    }

    /// Logs how far re-encrypting a tenant has gone (D51).
    pub async fn log_reencryption(
        &self,
        progress: cfs_proto::tenant::Reencryption,
    ) -> Result<(), Errno> {
        let shard = self.inner.keys_shard()?;
        let op = Op::ReencryptProgress {
            shard,
            progress: Box::new(progress),
        };
        self.inner.propose_service_op(shard, op).await?.map(|_| ())
    }

    /// Whether this node leads `shard` now.
    pub fn leads(&self, shard: ShardId) -> bool {
        self.inner.leads(shard)
    }

    /// The shards this service materializes.
    pub fn shards(&self) -> Vec<ShardId> {
        self.inner.shard_list.clone()
    }

    pub fn applied(&self) -> Vec<(ShardId, Position)> {
        let mut v: Vec<_> = self
            .inner
            .applied
            .iter()
            .map(|(s, r)| (*s, *r.borrow()))
            .collect();
        v.sort_unstable();
        v
    }

    /// Prometheus text exposition of the service's and the namespace
    /// materializer's families.
    pub fn metrics_text(&self) -> String {
        let decided: std::collections::HashMap<ShardId, Position> = self
            .inner
            .log
            .status()
            .into_iter()
            .map(|s| (s.shard, s.decided))
            .collect();
        let shards: Vec<(ShardId, Position, Position)> = self
            .applied()
            .into_iter()
            .map(|(s, a)| (s, a, decided.get(&s).copied().unwrap_or(a)))
            .collect();
        let failed = !self.problems().is_empty();
        let ids: Vec<ShardId> = shards.iter().map(|(s, _, _)| *s).collect();
        // A read error leaves the gauge at its last value.
        let inodes = self.inner.db.files(&ids).ok();
        let _one = self.inner.counters.scrape.lock().expect("scrape lock");
        self.inner.counters.refresh(&shards, failed, inodes);
        cfs_metrics::render(&self.inner.counters.registry)
    }
}

/// The queue of messages to one session's client.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<ServerMsg>,
    /// Set once the queue was full: the session is being closed.
    overflowed: Arc<std::sync::atomic::AtomicBool>,
}

/// Queues `m` for the session's client. False if the session is gone or
/// its client stopped reading (the session is then closed).
fn send(out: &Outbox, m: ServerMsg) -> bool {
    match out.tx.try_send(m) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            if !out.overflowed.swap(true, Ordering::SeqCst) {
                warn!(
                    queued = SESSION_OUTBOX_MAX,
                    "client stopped reading its replies; closing its session"
                );
            }
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// The cluster's identity for a mount's caller: mapped, then root
/// squashed unless the mount is trusted with root.
/// Whether `peer` may manage keys: a node, an administrator, or anyone in
/// a development cluster without TLS.
fn admin_peer(peer: &cfs_net::Peer) -> bool {
    matches!(
        peer,
        cfs_net::Peer::Plaintext
            | cfs_net::Peer::Cert(cfs_net::Principal::Node(_) | cfs_net::Principal::Admin(_))
    )
}

fn map_creds(policy: &cfs_net::ClientPolicy, c: &mut Creds) {
    c.uid = policy.uid(c.uid);
    c.gid = policy.gid(c.gid);
    for g in c.groups.iter_mut() {
        *g = policy.gid(*g);
    }
}

async fn serve_conn(inner: Arc<Inner>, conn: cfs_net::Conn) {
    let (r, w) = (conn.reader, conn.writer);
    // Every uid and gid the mount sends goes through its policy (root
    // squash unless its certificate trusts root; per-mount maps).
    let policy = conn.peer.client_policy();
    let peer = conn.peer.clone();
    let mut reader = cfs_frame::BodyReader::new(r, MESSAGE_BYTES_MAX);
    let (sender, rx) = mpsc::channel::<ServerMsg>(SESSION_OUTBOX_MAX);
    let tx = Outbox {
        tx: sender,
        overflowed: Arc::default(),
    };
    tokio::spawn(cfs_frame::write_batched(w, rx, |m: &ServerMsg, out| {
        let _ = cfs_frame::encode_with(out, |o| bincode::serialize_into(o, m));
    }));
    // The first frame must be a Hello of this cluster, soon.
    let first = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        reader.next_with(|b| cfs_frame::decode_body::<RequestFrame>(b, MESSAGE_BYTES_MAX)),
    )
    .await;
    let Ok(first) = first else {
        warn!("no Hello within {HANDSHAKE_TIMEOUT:?}; closed");
        return;
    };
    if conn.peer == cfs_net::Peer::Anonymous {
        // No certificate: a mount trading a token, nothing else.
        match first {
            Ok(Ok(RequestFrame {
                id,
                req: Request::Enroll { token, csr_der },
                ..
            })) => {
                let result = inner.enroll_mount(&token, &csr_der).await;
                send(
                    &tx,
                    ServerMsg::Reply {
                        id,
                        result,
                        stamp: 0,
                    },
                );
            }
            _ => warn!("a peer without a certificate asked for more than a mount token; closed"),
        }
        return;
    }
    let client = match first {
        Ok(decoded) => match decoded {
            Ok(RequestFrame {
                id,
                req:
                    Request::Hello {
                        cluster_id,
                        client_id,
                    },
                ..
            }) => {
                if cluster_id != inner.cluster_id {
                    warn!(%cluster_id, peer = %conn.peer, "client of another cluster refused");
                    send(
                        &tx,
                        ServerMsg::Reply {
                            id,
                            result: Err(Errno::EPERM),
                            stamp: 0,
                        },
                    );
                    return;
                }
                // A new session sees everything decided before it began
                // (this node may have just restarted and still be
                // catching up).
                for shard in inner.shard_list.clone() {
                    if let Err(e) = inner.fresh(shard).await {
                        warn!(shard = %shard, "session start: shard not current: {e}");
                        send(
                            &tx,
                            ServerMsg::Reply {
                                id,
                                result: Err(Errno::EIO),
                                stamp: 0,
                            },
                        );
                        return;
                    }
                }
                send(
                    &tx,
                    ServerMsg::Reply {
                        id,
                        stamp: 0,
                        result: Ok(Reply::Welcome {
                            node_id: inner.node_id,
                            segment_servers: inner.segment_servers.clone(),
                            shards: inner.applied.keys().copied().collect(),
                            leader_meta: inner.leader_meta(),
                        }),
                    },
                );
                client_id
            }
            Ok(_) => {
                warn!("session did not start with Hello; closed");
                return;
            }
            Err(e) => {
                warn!("bad first frame: {e}; closed");
                return;
            }
        },
        Err(e) => {
            warn!("session closed before Hello: {e}");
            return;
        }
    };
    inner.counters.sessions.inc();
    let _open = crate::metrics::Held::new(&inner.counters.sessions_open);
    info!(
        client = format_args!("{client:016x}"),
        "client session started"
    );
    // Subscribed before the applied positions are read: every change
    // above them reaches the session.
    let mut changes = inner.changes.subscribe();
    let applied: Vec<(ShardId, Position)> = inner
        .applied
        .iter()
        .map(|(s, rx)| (*s, *rx.borrow()))
        .collect();
    let (sid, session) = inner.leases.open(client, &applied);
    let tx2 = tx.clone();
    let (inner2, sess2) = (inner.clone(), session.clone());
    let forward = tokio::spawn(async move {
        loop {
            match changes.recv().await {
                Ok(c) if c.inodes.is_empty() && c.entries.is_empty() => {
                    sess2.forwarded(c.shard, c.upto, None);
                }
                Ok(c) => {
                    // The session's own changes are sent too (its cache
                    // drops them) but nothing waits for their ack: its
                    // own answer carries them. A cross-shard operation's
                    // steps are its client's own too: waiting for the
                    // client's ack could deadlock with the kernel, which
                    // holds the directory's lock for the call in progress
                    // while the mount applies the invalidation.
                    let (tx_own, tx_early) = c.tx.map_or((false, false), |t| {
                        let m = inner2.tx_requesters.lock().expect("tx requesters lock");
                        m.get(&t)
                            .filter(|r| r.client == client)
                            .map_or((false, false), |r| {
                                let early = c.origin == inner2.coordinator_id
                                    && r.early_steps.contains(&c.op_id);
                                (true, early)
                            })
                    });
                    let own = c.origin == client || tx_own;
                    // Answered early with its invalidations: sent already
                    // (a change decided other than answered is sent again
                    // to every session, as not anyone's own).
                    if tx_early || (c.origin == client && c.op_id != 0 && sess2.take_early(c.op_id))
                    {
                        sess2.forwarded(c.shard, c.upto, None);
                        continue;
                    }
                    let mut last = 0;
                    let entries = c.entries.into_iter().map(|(p, n)| (p, Some((p, n))));
                    for (ino, entry) in c.inodes.into_iter().map(|i| (i, None)).chain(entries) {
                        last = sess2.next_seq();
                        let m = ServerMsg::Invalidate {
                            ino,
                            entry,
                            seq: last,
                            own,
                        };
                        if !send(&tx2, m) {
                            return;
                        }
                    }
                    sess2.forwarded(c.shard, c.upto, (!own).then_some(last));
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(
                        missed = n,
                        "session fell behind the changes; it drops everything"
                    );
                    // Missed some: tell the client to drop everything;
                    // that covers every change applied so far.
                    let seq = sess2.next_seq();
                    if !send(
                        &tx2,
                        ServerMsg::Invalidate {
                            ino: 0,
                            entry: None,
                            seq,
                            own: false,
                        },
                    ) {
                        return;
                    }
                    for (s, rx) in &inner2.applied {
                        sess2.forwarded(*s, *rx.borrow(), Some(seq));
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let inflight = Arc::new(tokio::sync::Semaphore::new(SESSION_INFLIGHT_MAX));
    loop {
        if tx.overflowed.load(Ordering::SeqCst) {
            break;
        }
        let decoded = match reader
            .next_with(|b| cfs_frame::decode_body::<RequestFrame>(b, MESSAGE_BYTES_MAX))
            .await
        {
            Ok(d) => d,
            Err(cfs_frame::ReadError::Closed) => break,
            Err(e) => {
                warn!("client session: {e}; closed");
                break;
            }
        };
        let f = match decoded {
            Ok(f) => f,
            Err(e) => {
                warn!("client session: {e}; closed");
                break;
            }
        };
        let mut f = f;
        if let Request::Mutate { creds, .. } = &mut f.req {
            map_creds(&policy, creds);
        }
        match f.req {
            Request::InvalAck { seq } => {
                session.acked(seq);
                continue;
            }
            Request::ReleaseLeases => {
                session.release();
                continue;
            }
            _ => {}
        }
        // Timed from here: a wait for an in-flight slot is part of it.
        let arrived = Instant::now();
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            break;
        };
        let (inner, tx, session, peer) = (inner.clone(), tx.clone(), session.clone(), peer.clone());
        // The request id the mount logs too (`client:id`), so one
        // request's lines can be followed across the mount and the node.
        let span = tracing::info_span!("req", req = %cfs_proto::RequestTag::new(client, f.id));
        tokio::spawn(
            async move {
                let _permit = permit;
                let id = f.id;
                let stamp = session.sent();
                let mutation = matches!(f.req, Request::Mutate { .. });
                let kind = match &f.req {
                    Request::Mutate { .. } => RequestKind::Mutation,
                    Request::Lease => RequestKind::Lease,
                    _ => RequestKind::Read,
                };
                let result = match f.req {
                    Request::Lease => inner.grant(&session).await,
                    Request::TenantKeys { tenant } => inner.tenant_keys(&peer, &tenant).await,
                    Request::MakeTenantKey { tenant, rotate } => {
                        inner.make_tenant_key(&peer, &tenant, rotate).await
                    }
                    Request::ListTenantKeys => inner.key_report(&peer).await,
                    _ => handle(&inner, client, f, &tx, &session).await,
                };
                if mutation {
                    // The session's own invalidations go out before the reply,
                    // so its cache never serves what the change replaced.
                    let deadline = Instant::now() + GRANT_WAIT;
                    for (shard, rx) in &inner.applied {
                        let upto = *rx.borrow();
                        session.wait_forwarded(*shard, upto, deadline).await;
                    }
                }
                if matches!(result, Err(Errno::EIO)) {
                    inner.counters.errors.inc();
                }
                send(&tx, ServerMsg::Reply { id, result, stamp });
                inner.counters.served(kind, arrived.elapsed().as_secs_f64());
                tracing::debug!(
                    kind = kind.name(),
                    micros = arrived.elapsed().as_micros() as u64,
                    "request served"
                );
            }
            .instrument(span),
        );
    }
    forward.abort();
    inner.leases.close(sid);
    info!(
        client = format_args!("{client:016x}"),
        "client session ended"
    );
}

/// What a refused proposal means to the caller: ENOSPC when the log's
/// disk is below its headroom, else EIO.
pub(crate) fn log_errno(e: &cfs_log::LogError) -> Errno {
    match e {
        cfs_log::LogError::NoSpace(_) => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

fn now_ns() -> Nanos {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn read_err(e: ReadError) -> Errno {
    match e {
        ReadError::Fs(e) => e,
        ReadError::Db(e) => {
            tracing::error!("namespace read: {e}");
            Errno::EIO
        }
    }
}

impl Inner {
    /// Trades a one-time mount token for a certificate for the key of
    /// `csr_der`: the token must be signed by the cluster CA and not
    /// expired, and its use is recorded in the log first, so that it is
    /// traded once in the whole cluster. Refusals say why in the node's
    /// log, never the token; the peer gets EACCES.
    async fn enroll_mount(self: &Arc<Self>, token: &str, csr_der: &[u8]) -> Result<Reply, Errno> {
        let Some(e) = &self.enroll else {
            warn!("a mount token was offered to a node that does not enroll mounts");
            return Err(Errno::EPERM);
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let t = e.key.verify(token, now).map_err(|err| {
            warn!("mount token refused: {err}");
            Errno::EACCES
        })?;
        let expires =
            i64::try_from(t.expires_unix.saturating_mul(1_000_000_000)).unwrap_or(i64::MAX);
        let shard = shard_of(cfs_materializers::types::ROOT_INO);
        let (coordinator, op_id) = coordinator::Cluster::next_id(&**self);
        let lop = LoggedOp {
            client: coordinator,
            op_id,
            creds: Creds::root(),
            now: now_ns(),
            op: Op::ConsumeToken {
                shard,
                id: t.id,
                expires,
            },
        };
        let used = {
            let _alone = self.seq.exclusive().await;
            coordinator::Cluster::propose(&**self, shard, lop).await
        };
        match used {
            Ok(Ok(_)) => {}
            Ok(Err(Errno::EEXIST)) => {
                warn!(
                    token = format_args!("{:032x}", t.id),
                    "mount token used already; refused"
                );
                return Err(Errno::EACCES);
            }
            Ok(Err(err)) | Err(err) => {
                warn!(
                    token = format_args!("{:032x}", t.id),
                    "recording a mount token's use: {err}"
                );
                return Err(Errno::EIO);
            }
        }
        let cert_pem =
            e.ca.sign_request(csr_der, &t.client, cfs_net::ca::CERT_VALID_DAYS)
                .map_err(|err| {
                    warn!("mount token: bad certificate request: {err}");
                    Errno::EINVAL
                })?;
        info!(
            token = format_args!("{:032x}", t.id),
            client = %t.client,
            "mount token used: client certificate issued"
        );
        Ok(Reply::Enrolled { cert_pem })
    }

    fn check_shard(&self, ino: Ino) -> Result<ShardId, Errno> {
        let s = shard_of(ino);
        if ino == 0 || !self.applied.contains_key(&s) {
            return Err(Errno::ESTALE);
        }
        Ok(s)
    }

    /// Waits until this node applied everything decided before now on
    /// `shard`: a read barrier, shared by reads that arrive while one is
    /// being taken.
    async fn fresh(&self, shard: ShardId) -> Result<(), Errno> {
        let b = &self.barriers[&shard];
        let ticket = b.next_ticket.fetch_add(1, Ordering::SeqCst);
        let pos = {
            let mut last = b.last.lock().await;
            if last.0 > ticket {
                last.1
            } else {
                let started = b.next_ticket.fetch_add(1, Ordering::SeqCst);
                let pos = self.log.read_barrier(shard).await.map_err(|e| {
                    warn!(shard = %shard, "read barrier: {e}");
                    Errno::EIO
                })?;
                self.counters.barriers.inc();
                *last = (started, pos);
                pos
            }
        };
        let mut rx = self.applied[&shard].clone();
        tokio::time::timeout(APPLY_WAIT, rx.wait_for(|a| *a >= pos))
            .await
            .map_err(|_| Errno::EIO)?
            .map_err(|_| Errno::EIO)?;
        Ok(())
    }

    /// Runs the read `f` for `client`: over what this node answered,
    /// decided or not, when the undecided part is `client`'s own; else
    /// once the other clients' undecided changes ordered before it are
    /// settled, over the database (`Sequencer::read_as`).
    async fn read_as<T>(
        &self,
        client: u64,
        f: impl Fn(&cfs_materializers::read::Overlaid<'_>) -> T,
    ) -> Result<T, Errno> {
        match self.seq.read_as(client, &self.db, &f) {
            Ok(r) => Ok(r),
            Err(upto) => {
                self.counters.reads_held.inc();
                if !self
                    .seq
                    .wait_settled(upto, Instant::now() + APPLY_WAIT)
                    .await
                {
                    return Err(Errno::EIO);
                }
                Ok(self.seq.read_decided(&self.db, f))
            }
        }
    }

    /// Renews the session's leases on the shards this node leads: after a
    /// read barrier (the grant is no older than the request) and once the
    /// invalidations of everything applied so far are queued to it.
    async fn grant(&self, session: &Session) -> Result<Reply, Errno> {
        let mut shards = Vec::new();
        // One deadline for all shards: a grant answers in time even when
        // the session's invalidations lag (those shards are left out).
        let deadline = Instant::now() + GRANT_WAIT;
        if session.congested() {
            self.counters.lease_refusals.inc();
        } else {
            for st in self.log.status() {
                if !st.is_leader || self.fresh(st.shard).await.is_err() {
                    continue;
                }
                // Marked first, so no change is answered early from now on
                // (`others_hold`); then the ones answered before settle, so
                // their invalidations are among those waited for below.
                session.grant(st.shard, Instant::now());
                let next = self.seq.next();
                if !self.seq.wait_settled(next, deadline).await {
                    continue;
                }
                let upto = *self.applied[&st.shard].borrow();
                if !session.wait_forwarded(st.shard, upto, deadline).await {
                    continue;
                }
                if self.leads(st.shard) {
                    session.grant(st.shard, Instant::now());
                    shards.push(st.shard);
                }
            }
        }
        self.counters.leases_granted.inc_by(shards.len() as u64);
        let leading = self.log.status().iter().filter(|s| s.is_leader).count() as u32;
        Ok(Reply::Lease {
            shards,
            millis: cfs_proto::lease::LEASE.as_millis() as u32,
            inval_seq: session.sent(),
            leading,
        })
    }

    /// Whether a change of `client` on `shard` may be answered before it
    /// is decided. Not from a leader that has not heard from a majority
    /// within a second (it may be cut off and no longer lead): its answers
    /// could not be decided, and the majority's side would not see them.
    /// Not while the shard's previous leader's leases may be in use, nor
    /// while another client's cache holds a lease on the shard.
    fn may_answer_early(&self, shard: ShardId, client: u64) -> bool {
        let now = Instant::now();
        self.log.quorum_recent()
            && !self.leases.fenced(shard, now)
            && !self.leases.others_hold(shard, client, now)
    }

    fn leads(&self, shard: ShardId) -> bool {
        self.log
            .status()
            .iter()
            .any(|s| s.shard == shard && s.is_leader)
    }

    /// True if this node leads `shard` and has applied the barrier its
    /// term began with (D41): only then does the database hold the inode
    /// counter past every number an earlier leader may have promised, so
    /// the sequencer's predictions are this term's own.
    fn may_sequence(&self, shard: ShardId) -> bool {
        let Some(start) = self
            .log
            .status()
            .iter()
            .find(|s| s.shard == shard && s.is_leader)
            .and_then(|s| s.term_start)
        else {
            return false;
        };
        self.applied
            .get(&shard)
            .is_some_and(|a| *a.borrow() > start)
    }

    /// Proposes `op` (a service-only step) on `shard` as this node's
    /// coordinator, with root credentials; when this node leads `shard`,
    /// with the sequencer held alone, so that nothing it answered early
    /// is ordered after it (D30).
    async fn propose_service_op(&self, shard: ShardId, op: Op) -> Result<ApplyResult, Errno> {
        let (coordinator, op_id) = coordinator::Cluster::next_id(self);
        let lop = LoggedOp {
            client: coordinator,
            op_id,
            creds: Creds::root(),
            now: now_ns(),
            op,
        };
        let _alone = if self.leads(shard) {
            Some(self.seq.exclusive().await)
        } else {
            None
        };
        coordinator::Cluster::propose(self, shard, lop).await
    }

    /// Forgets the outcome tables of clients idle for `idle` on the shards
    /// this node leads (one entry per shard and check, each bounded).
    async fn forget_idle_clients(self: &Arc<Self>, idle: Duration) {
        let idle_before =
            now_ns().saturating_sub(i64::try_from(idle.as_nanos()).unwrap_or(i64::MAX));
        for &shard in &self.shard_list {
            if !self.leads(shard) {
                continue;
            }
            match cfs_materializers::apply::idle_clients(&self.db, shard, idle_before, 1) {
                Ok(c) if c.is_empty() => continue,
                Ok(_) => {}
                Err(e) => {
                    warn!(shard = %shard, "reading idle clients: {e}");
                    continue;
                }
            }
            match self
                .propose_service_op(shard, Op::ForgetIdleClients { shard, idle_before })
                .await
            {
                Ok(Ok(_)) => {
                    self.counters.clients_forgotten.inc();
                    info!(shard = %shard, idle_s = idle.as_secs(), "forgot idle clients' outcome tables");
                }
                Ok(Err(e)) => tracing::debug!(shard = %shard, "forgetting idle clients: {e}"),
                Err(e) => warn!(shard = %shard, "forgetting idle clients: {e}"),
            }
        }
    }

    /// Breaks the holds of mounts that stopped renewing them on the shards
    /// this node leads (`cfs_proto::hold`): their locks are released and
    /// their orphans deleted.
    async fn break_lapsed_holds(self: &Arc<Self>) {
        for &shard in &self.shard_list {
            if !self.leads(shard) {
                continue;
            }
            let clients = match cfs_materializers::apply::lapsed_holds(
                &self.db,
                shard,
                now_ns(),
                HOLDS_BROKEN_PER_CHECK,
            ) {
                Ok(c) => c,
                Err(e) => {
                    warn!(shard = %shard, "reading mounts' holds: {e}");
                    continue;
                }
            };
            for client in clients {
                // Not past changes this node answered early (D30).
                match self
                    .propose_service_op(shard, Op::ExpireHold { shard, client })
                    .await
                {
                    Ok(Ok(Applied::Changed { inodes, .. })) => {
                        self.counters.holds_broken.inc();
                        info!(
                            shard = %shard,
                            client = format_args!("{client:016x}"),
                            inodes = inodes.len(),
                            "a mount's hold lapsed: its locks and orphans there are released"
                        );
                    }
                    // Lapsed with nothing left to hold (a mount that
                    // unlocked and left), or renewed meanwhile.
                    Ok(Ok(_)) => {}
                    // EAGAIN (an open transaction): tried at the next check.
                    Ok(Err(e)) => {
                        tracing::debug!(shard = %shard, "breaking a lapsed hold: {e}")
                    }
                    Err(e) => warn!(shard = %shard, "breaking a lapsed hold: {e}"),
                }
            }
        }
    }

    /// Refreshes leadership terms and clean positions; publishes them.
    fn publish_clean(&self) {
        let now = Instant::now();
        for st in self.log.status() {
            self.leases
                .observe_leadership(st.shard, st.is_leader, st.ballot, now);
            let applied = self
                .applied
                .get(&st.shard)
                .map_or(Position::ZERO, |r| *r.borrow());
            let clean = self.leases.recompute(st.shard, applied, now);
            let _ = self.log.set_watermark(st.shard, clean.get());
        }
    }

    /// Waits until every session leasing `shard` anywhere has applied the
    /// invalidations of the change at `pos` (the shard's leader says so:
    /// here, or in its answer to a read barrier).
    async fn wait_clean(&self, shard: ShardId, pos: Position) -> Result<(), Errno> {
        let deadline = Instant::now() + APPLY_WAIT;
        let mut waited = false;
        loop {
            if self.leads(shard) {
                self.publish_clean();
                let step = (Instant::now() + Duration::from_millis(5)).min(deadline);
                if self.leases.wait_clean_local(shard, pos, step).await {
                    break;
                }
            } else {
                match self.log.read_index(shard).await {
                    Ok(r) if r.watermark > pos.get() => break,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                    Err(e) => {
                        warn!(shard = %shard, "waiting for the leader's clean position: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            waited = true;
            if Instant::now() >= deadline {
                warn!(shard = %shard, pos = %pos, "leased caches did not let go in time");
                return Err(Errno::EIO);
            }
        }
        if waited {
            self.counters.clean_waits.inc();
        }
        Ok(())
    }

    /// A client's mutation: through the sequencer when this node leads
    /// its shard and the change stays on it, else on its home shard or as
    /// a cross-shard transaction this node coordinates (see
    /// `cfs_materializers::tx`) once nothing sequenced is pending.
    /// `early`: where to send `Settled` if the answer goes out before the
    /// change is decided.
    async fn mutate(
        self: &Arc<Self>,
        client: u64,
        op_id: u64,
        creds: Creds,
        op: Op,
        early: Option<(&Outbox, &Arc<Session>)>,
    ) -> Result<Reply, Errno> {
        if op.is_service_only() {
            warn!(
                client = format_args!("{client:016x}"),
                "a client sent a step only metadata services may propose; refused"
            );
            return Err(Errno::EPERM);
        }
        // A mount takes and releases only its own locks.
        let lock_client = match &op {
            Op::Lock { lock, .. } => Some(lock.client),
            Op::ReleaseLocks { client, .. } => Some(*client),
            _ => None,
        };
        if lock_client.is_some_and(|c| c != client) {
            warn!(
                client = format_args!("{client:016x}"),
                "a client sent a lock operation for another client; refused"
            );
            return Err(Errno::EPERM);
        }
        self.check_shard(op.home())?;
        self.counters.mutations.inc();
        let (r, answered_early) = match self.sequenced(client, op_id, &creds, &op, early).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                // Cross-shard work, or a shard another node leads: it must
                // not overtake changes this node sequenced (if it leads any).
                // A cross-shard transaction reads through the overlay and
                // its steps are queued after what it holds (D37); anything
                // else waits until what was sequenced is decided
                // (`Cluster::quiesce`).
                let leading = self.log.status().iter().any(|s| s.is_leader);
                let _alone = if leading {
                    Some(self.seq.alone().await)
                } else {
                    None
                };
                // Finishes are ordered early only under the hold.
                let early_finishes = early.is_some() && _alone.is_some();
                let r =
                    coordinator::execute(&**self, client, op_id, creds, op, early_finishes).await;
                let finishing = self
                    .finishing
                    .lock()
                    .expect("finishing lock")
                    .remove(&coordinator::Requester { client, op_id })
                    .unwrap_or_default();
                let answered_early = match early {
                    // Only a success is answered early (an error answer
                    // is not kept by the client).
                    Some((tx, session)) if !finishing.is_empty() && matches!(r, Ok(Ok(_))) => {
                        self.answer_early(client, op_id, tx, session, finishing);
                        true
                    }
                    _ => {
                        // Not taken early: settled before the answer.
                        for f in finishing {
                            self.settle_early(f).await;
                        }
                        false
                    }
                };
                if leading && r.is_err() {
                    // A transaction that failed part way may have left
                    // locks the overlay's pending changes hide: nothing
                    // more is sequenced over them until those are decided
                    // (its own finishes are settled above: waiting for
                    // them here, before they are settled, would wait out
                    // the whole settle bound).
                    self.seq.drain().await;
                }
                (r, answered_early)
            }
            Err(e) => (Err(e), false),
        };
        if let (Some((tx, _)), false) = (early, answered_early) {
            // Asked for early and answered once decided: settled already
            // (sent before the answer, so the client never keeps it).
            send(
                tx,
                ServerMsg::Settled {
                    op_id,
                    failed: None,
                },
            );
        }
        match r? {
            Ok(Applied::Attr(i)) => Ok(Reply::Attr(i)),
            Ok(Applied::Conflict(l)) => Ok(Reply::Lock(Some(l))),
            Ok(Applied::None | Applied::Decision { .. } | Applied::Changed { .. }) => {
                Ok(Reply::None)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs a single-shard mutation through the sequencer (`None`: it is
    /// not one this node can order: it does not lead the shard, or the
    /// change reaches another shard). Answered at once when the client
    /// asked for it and no other client's cache holds a lease on the shard
    /// (a leased cache must let go first: then the answer waits for the
    /// decision as before); the outcome is then confirmed later with
    /// `ServerMsg::Settled`.
    async fn sequenced(
        self: &Arc<Self>,
        client: u64,
        op_id: u64,
        creds: &Creds,
        op: &Op,
        early: Option<(&Outbox, &Arc<Session>)>,
    ) -> Result<Option<(Result<ApplyResult, Errno>, bool)>, Errno> {
        let shard = op.shard();
        if op_id == 0 || !self.may_sequence(shard) {
            return Ok(None);
        }
        if let Op::Create {
            parent, name, mode, ..
        } = op
        {
            if mode & libc::S_IFMT == libc::S_IFDIR {
                let placed = self.seq.read(&self.db, |r| {
                    cfs_materializers::tx::dir_shard(
                        r,
                        *parent,
                        name,
                        &self.shard_list,
                        self.spread_depth,
                    )
                });
                if placed != shard {
                    return Ok(None);
                }
            }
        }
        let lop = LoggedOp {
            client,
            op_id,
            creds: creds.clone(),
            now: now_ns(),
            op: op.clone(),
        };
        let eligible = early.is_some() && self.may_answer_early(shard, client);
        // Fault injection (tests): answer early, never queue the entry,
        // and die, as a leader that fails before its entries reach a
        // replica: the mount must replay.
        let lose = eligible && self.failpoint.as_deref() == Some("early-answer-lost");
        let hold = self.seq.shared().await;
        // Registered before the entry can be applied: its apply then sends
        // this session no invalidations (they go with the answer), so what
        // the answer tells the mount's cache is not dropped by its own
        // change.
        let mut remembered = false;
        let sequenced = self.seq.sequence(
            &self.db,
            &self.log,
            &self.waiters,
            shard,
            &lop,
            lose,
            |told| {
                if let (true, Ok(_), Some((_, session))) = (eligible, told, early) {
                    remembered = session.expect_early(op_id);
                }
            },
        );
        let forget = |remembered: bool| {
            if let (true, Some((_, session))) = (remembered, early) {
                session.take_early(op_id);
            }
        };
        let ticket = match sequenced {
            Ok(Some(t)) => t,
            Ok(None) => {
                forget(remembered);
                return Ok(None);
            }
            Err(e) => {
                forget(remembered);
                return Err(e);
            }
        };
        drop(hold);
        self.counters.sequenced.inc();
        // Not early from a leader that has not heard from a majority within
        // a second (it may be cut off and no longer lead): its answers
        // could not be decided, and the majority's side would not see them.
        // Only a success is answered early: an error answer would not be
        // kept by the client, so a different decision could not reach it.
        let early = early.filter(|_| eligible && ticket.told.is_ok());
        if lose {
            let answered = early.is_some();
            tokio::spawn(async move {
                if answered {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                tracing::error!("failpoint early-answer-lost reached: aborting (CFS_FAILPOINT)");
                std::process::abort();
            });
        }
        if let Some((tx, session)) = early {
            let told = ticket.told.clone();
            self.answer_early(
                client,
                op_id,
                tx,
                session,
                vec![Settling {
                    ticket,
                    finish: None,
                }],
            );
            return Ok(Some((Ok(told), true)));
        }
        let changed = ticket.changed.clone();
        let s = self
            .seq
            .settle(&self.db, &self.log, &self.waiters, ticket)
            .await;
        if !s.as_told {
            self.mispredicted(changed);
        }
        if let Some(pos) = s.position {
            // Leased caches elsewhere must have dropped what this changed
            // before anyone is told it happened.
            if let Err(e) = self.wait_clean(shard, pos).await {
                return Ok(Some((Err(e), false)));
            }
        }
        Ok(Some((s.outcome, false)))
    }

    /// Answers `op_id` of `client` before its sequenced changes
    /// (`tickets`) are decided: what they replaced leaves the session's
    /// cache and what they made goes to it before the answer; once all
    /// are decided the session is told `Settled` (with the failure if one
    /// did not come out as answered).
    fn answer_early(
        self: &Arc<Self>,
        client: u64,
        op_id: u64,
        tx: &Outbox,
        session: &Arc<Session>,
        settling: Vec<Settling>,
    ) {
        self.counters.early.inc();
        for t in settling.iter().map(|s| &s.ticket) {
            let _ = self.log.answered_early(t.shard, t.seq + 1);
            // What the change replaced leaves the session's cache before
            // the answer arrives (the materializer's invalidations come
            // only once it is applied).
            let c = &t.changed;
            let entries = c.entries.iter().map(|(p, n)| (*p, Some((*p, n.clone()))));
            for (ino, entry) in c.inodes.iter().map(|i| (*i, None)).chain(entries) {
                let seq = session.next_seq();
                send(
                    tx,
                    ServerMsg::Invalidate {
                        ino,
                        entry,
                        seq,
                        own: true,
                    },
                );
            }
        }
        // And what the changes made of them (a directory's times and link
        // count): the kernel asks for a directory's attributes again
        // after every change in it, which the mount's cache then answers.
        // Read from the overlay, which holds the changes. The stamp is
        // taken first: a change whose invalidation is sent after it may
        // be missing from the read, and the mount then refuses the read
        // for that inode.
        let stamp = session.sent();
        let mut touched: Vec<Ino> = Vec::new();
        for i in settling.iter().flat_map(|s| s.ticket.changed.inodes.iter()) {
            if !touched.contains(i) && touched.len() < CURRENT_INODES_MAX {
                touched.push(*i);
            }
        }
        let inodes: Vec<Inode> = touched
            .iter()
            .filter_map(|i| self.seq.read(&self.db, |db| db.inode(*i)).ok())
            .collect();
        if !inodes.is_empty() {
            send(tx, ServerMsg::Current { inodes, stamp });
        }
        let (inner, tx) = (self.clone(), tx.clone());
        tokio::spawn(async move {
            let mut failed = None;
            for f in settling {
                if let Some(e) = inner.settle_early(f).await {
                    failed.get_or_insert(e);
                }
            }
            if failed.is_some() {
                warn!(
                    client = format_args!("{client:016x}"),
                    op_id,
                    ?failed,
                    "a change answered early did not apply as answered"
                );
            }
            send(&tx, ServerMsg::Settled { op_id, failed });
        });
    }

    /// [`Inner::settle_told`] for a change answered early. A finish step
    /// that was not decided here (this node lost the lead, or its
    /// proposal timed out) is proposed again: its transaction's decision
    /// is in the log, so it comes out as answered, or changes nothing
    /// when recovery finished the transaction first. Its transaction's
    /// client is forgotten only after it settled (its apply's changes are
    /// that client's own until then).
    async fn settle_early(&self, f: Settling) -> Option<Errno> {
        let told = f.ticket.told.clone();
        let mut failed = self.settle_told(f.ticket).await;
        if let Some((shard, lop, tx)) = f.finish {
            if failed.is_some() {
                failed = match coordinator::Cluster::propose(self, shard, lop).await {
                    Ok(r) if r == told || r == Ok(Applied::None) => None,
                    Ok(Err(e)) => Some(e),
                    _ => Some(Errno::EIO),
                };
                if failed.is_none() {
                    info!(?tx, shard = %shard, "a finish answered early was decided once proposed again");
                }
            }
            let requesters = self.tx_requesters.clone();
            tokio::spawn(async move {
                tokio::time::sleep(TX_REQUESTER_GRACE).await;
                requesters.lock().expect("tx requesters lock").remove(&tx);
            });
        }
        failed
    }

    /// Waits for a sequenced change to be decided: `None` if it came out
    /// as predicted, else why not (every session then drops what it
    /// changed).
    async fn settle_told(&self, t: Ticket) -> Option<Errno> {
        let changed = t.changed.clone();
        let s = self.seq.settle(&self.db, &self.log, &self.waiters, t).await;
        if !s.as_told {
            self.mispredicted(changed);
        }
        match s.outcome {
            _ if s.as_told => None,
            Ok(Err(e)) => Some(e),
            _ => Some(Errno::EIO),
        }
    }

    /// A sequenced change was decided otherwise than predicted: counted,
    /// and caches filled from the overlay hold what did not happen, so
    /// every session drops what it changed (as a change nobody made).
    fn mispredicted(&self, mut c: Change) {
        self.counters.mispredicted.inc();
        c.origin = 0;
        c.upto = self
            .applied
            .get(&c.shard)
            .map_or(Position::ZERO, |r| *r.borrow());
        let _ = self.changes.send(c);
    }

    /// The metadata service of the node leading most of this node's
    /// shards, if that is another node with a known address.
    fn leader_meta(&self) -> Option<String> {
        let mut led: HashMap<u64, usize> = HashMap::new();
        for s in self.log.status() {
            if let Some(l) = s.leader {
                *led.entry(l).or_default() += 1;
            }
        }
        let (node, _) = led.into_iter().max_by_key(|(n, c)| (*c, *n))?;
        if node == self.node_id {
            return None;
        }
        self.meta_servers
            .iter()
            .find(|(id, _)| *id == node)
            .map(|(_, a)| a.clone())
    }

    /// A stored stripe for each chunk id, from the decided state of every
    /// shard this node holds (D50). A stale answer is safe: a stripe freed
    /// since makes the writer's commit fail with FREED_DATA, and it
    /// writes the bytes instead.
    async fn find_chunks(&self, ids: &[ChunkId]) -> Result<Vec<Option<Extent>>, Errno> {
        if ids.len() > cfs_proto::ops::FIND_CHUNKS_MAX {
            return Err(Errno::EINVAL);
        }
        let shards: Vec<ShardId> = self.applied.keys().copied().collect();
        let (db, ids) = (self.db.clone(), ids.to_vec());
        let found = tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|id| cfs_materializers::chunks::find(&db, &shards, id))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|_| Errno::EIO)?
        .map_err(|e| {
            tracing::error!("chunk lookup: {e}");
            Errno::EIO
        })?;
        self.counters.chunks_asked.inc_by(found.len() as u64);
        self.counters
            .chunks_found
            .inc_by(found.iter().filter(|f| f.is_some()).count() as u64);
        Ok(found)
    }

    /// The shard that keeps tenants' keys (D51).
    fn keys_shard(&self) -> Result<ShardId, Errno> {
        self.shard_list.iter().min().copied().ok_or(Errno::EIO)
    }

    fn master(&self) -> Result<&crate::tenant_keys::MasterKey, Errno> {
        self.master_key.as_deref().ok_or_else(|| {
            warn!("a tenant key was asked of a node without a master key (master_key_file, CFS_MASTER_KEY)");
            Errno::EKEYREJECTED
        })
    }

    /// `tenant`'s keys in the clear, for a peer allowed them (D51).
    async fn tenant_keys(&self, peer: &cfs_net::Peer, tenant: &str) -> Result<Reply, Errno> {
        if !cfs_proto::tenant::valid_tenant(tenant) {
            return Err(Errno::EINVAL);
        }
        let allowed = match peer {
            cfs_net::Peer::Cert(cfs_net::Principal::Client { policy, .. }) => {
                policy.may_use_tenant(tenant)
            }
            cfs_net::Peer::Anonymous => false,
            _ => true,
        };
        if !allowed {
            warn!(%peer, tenant, "a mount asked for the keys of a tenant its certificate does not name: refused");
            return Err(Errno::EACCES);
        }
        let master = self.master()?;
        let shard = self.keys_shard()?;
        self.fresh(shard).await?;
        let records = cfs_materializers::tenant_keys::of_tenant(&self.db, shard, tenant)
            .map_err(|e| read_err(ReadError::Db(e)))?;
        crate::tenant_keys::open_all(master, &self.cluster_id, tenant, &records)
            .map(Reply::TenantKeys)
    }

    /// Makes `tenant`'s first key, or its next generation (`rotate`):
    /// administrators and nodes only.
    async fn make_tenant_key(
        &self,
        peer: &cfs_net::Peer,
        tenant: &str,
        rotate: bool,
    ) -> Result<Reply, Errno> {
        if !admin_peer(peer) {
            warn!(%peer, tenant, "only administrators make tenant keys: refused");
            return Err(Errno::EACCES);
        }
        if !cfs_proto::tenant::valid_tenant(tenant) {
            return Err(Errno::EINVAL);
        }
        let key: [u8; 32] = rand::random();
        let wrapped = self.master()?.wrap(&self.cluster_id, tenant, &key);
        let shard = self.keys_shard()?;
        let op = Op::AddTenantKey {
            shard,
            tenant: tenant.to_string(),
            rotate,
            wrapped: Box::new(wrapped),
        };
        self.propose_service_op(shard, op).await??;
        info!(tenant, rotate, "tenant key made");
        self.key_report(peer).await
    }

    /// Every tenant's keys (no key bytes) and re-encryption progress.
    async fn key_report(&self, peer: &cfs_net::Peer) -> Result<Reply, Errno> {
        if !admin_peer(peer) {
            return Err(Errno::EACCES);
        }
        let shard = self.keys_shard()?;
        self.fresh(shard).await?;
        let db_err = |e| read_err(ReadError::Db(e));
        let keys = cfs_materializers::tenant_keys::all(&self.db, shard).map_err(db_err)?;
        let reencryption =
            cfs_materializers::tenant_keys::reencryption(&self.db, shard).map_err(db_err)?;
        Ok(Reply::Keys(cfs_proto::tenant::KeyReport {
            keys: keys
                .into_iter()
                .map(|r| cfs_proto::tenant::KeyInfo {
                    tenant: r.tenant,
                    id: r.id,
                    generation: r.generation,
                    made: r.made,
                })
                .collect(),
            reencryption,
        }))
    }

    fn statfs(&self) -> Result<FsStats, Errno> {
        let path = std::ffi::CString::new(self.data_dir.as_os_str().as_encoded_bytes())
            .map_err(|_| Errno::EIO)?;
        // SAFETY: `path` is a valid NUL-terminated string and `st` a
        // properly sized out-parameter.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(Errno::EIO);
        }
        let shards: Vec<ShardId> = self.applied.keys().copied().collect();
        let files = self.db.files(&shards).map_err(read_err)?;
        if let Some((total_bytes, free_bytes)) = *self.store_space.lock().expect("space lock") {
            return Ok(FsStats {
                total_bytes,
                free_bytes,
                files,
            });
        }
        // Until the store was measured: every node contributes its disk;
        // 2 of every 3 bytes hold data with the default 2+1 layout.
        let per = |blocks: u64| blocks * st.f_frsize * self.nodes * 2 / 3;
        Ok(FsStats {
            total_bytes: per(st.f_blocks),
            free_bytes: per(st.f_bavail),
            files,
        })
    }
}

impl coordinator::Cluster for Inner {
    async fn propose(&self, shard: ShardId, lop: LoggedOp) -> Result<ApplyResult, Errno> {
        let id = self.log.next_request();
        let e = materializer::entry(id, &lop);
        if e.payload.len() > cfs_log::entry::ENTRY_PAYLOAD_BYTES_MAX {
            return Err(Errno::E2BIG);
        }
        let rx = self.waiters.register(id);
        let pos = match self.log.propose(shard, e).await {
            Ok(p) => p,
            Err(err) => {
                self.waiters.forget(id);
                warn!(shard = %shard, "namespace proposal failed: {err}");
                return Err(log_errno(&err));
            }
        };
        let r = match tokio::time::timeout(APPLY_WAIT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) | Err(_) => {
                self.waiters.forget(id);
                return Err(Errno::EIO);
            }
        };
        // Leased caches elsewhere must have dropped what this changed
        // before anyone is told it happened.
        self.wait_clean(shard, pos).await?;
        Ok(r)
    }

    async fn barrier(&self, shard: ShardId) -> Result<(), Errno> {
        self.fresh(shard).await
    }

    fn view<T>(&self, f: impl FnOnce(&NamespaceDb, &cfs_materializers::store::Overlay) -> T) -> T {
        self.seq.read(&self.db, |r| f(r.db, r.overlay))
    }

    async fn quiesce(&self) {
        self.seq.drain_before_alone().await
    }

    async fn propose_finish(
        &self,
        shard: ShardId,
        lop: LoggedOp,
        by: coordinator::Finisher,
    ) -> Result<ApplyResult, Errno> {
        let requester = match by {
            coordinator::Finisher::Recovery => {
                // Its keys are locked, and what was sequenced before its
                // prepares settled long ago.
                return self.propose(shard, lop).await;
            }
            coordinator::Finisher::Coordinator(r) => r,
        };
        let tx = match &lop.op {
            Op::TxFinish { tx, .. } => Some(*tx),
            _ => None,
        };
        // As an early answer (`sequenced`), from the shard's leader. The
        // caller holds the sequencer exclusively (it runs cross-shard
        // work), so this is ordered after everything sequenced before it.
        let early =
            requester.filter(|r| self.leads(shard) && self.may_answer_early(shard, r.client));
        let (Some(r), Some(tx)) = (early, tx) else {
            // Written behind the overlay's back: after what it held when
            // the transaction began (not this transaction's own finishes,
            // which settle only once it returns).
            self.seq.drain_before_alone().await;
            return self.propose(shard, lop).await;
        };
        // Ordered after what was sequenced before the hold: those entries
        // precede this transaction's prepares in the logs, so they are
        // decided already, and settling them takes out of the overlay
        // what the prepares have since changed (the count of open
        // intents) before this step is folded over it.
        self.seq.drain_before_alone().await;
        // Registered before the step can be applied: its apply then sends
        // the requester nothing (the answer carries its changes).
        let registered = {
            let mut m = self.tx_requesters.lock().expect("tx requesters lock");
            match m.get_mut(&tx) {
                Some(t) if t.client == r.client => {
                    t.early_steps.push(lop.op_id);
                    true
                }
                _ => false,
            }
        };
        let unregister = || {
            if registered {
                if let Some(t) = self
                    .tx_requesters
                    .lock()
                    .expect("tx requesters lock")
                    .get_mut(&tx)
                {
                    t.early_steps.retain(|s| *s != lop.op_id);
                }
            }
        };
        // Fault injection (tests): order the finish and answer, never
        // queue it, and die, as a leader that fails before its finishes
        // reach a replica: recovery must complete the transaction.
        let lose = self.failpoint.as_deref() == Some("tx-finish-lost");
        let ticket = match self.seq.sequence(
            &self.db,
            &self.log,
            &self.waiters,
            shard,
            &lop,
            lose,
            |_| {},
        ) {
            Ok(Some(t)) => t,
            Ok(None) => {
                unregister();
                self.seq.drain_before_alone().await;
                return self.propose(shard, lop).await;
            }
            Err(e) => {
                unregister();
                return Err(e);
            }
        };
        self.counters.sequenced.inc();
        let told = ticket.told.clone();
        if told.is_err() {
            // Not what a decided transaction's finish does: wait for it.
            unregister();
            return match self.settle_told(ticket).await {
                None => Ok(told),
                Some(e) => Err(e),
            };
        }
        self.counters.finishes_early.inc();
        if lose {
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                tracing::error!("failpoint tx-finish-lost reached: aborting (CFS_FAILPOINT)");
                std::process::abort();
            });
        }
        self.finishing
            .lock()
            .expect("finishing lock")
            .entry(r)
            .or_default()
            .push(Settling {
                ticket,
                finish: Some((shard, lop, tx)),
            });
        Ok(told)
    }

    fn db(&self) -> &NamespaceDb {
        &self.db
    }

    fn shards(&self) -> &[ShardId] {
        &self.shard_list
    }

    fn spread_depth(&self) -> u32 {
        self.spread_depth
    }

    fn next_id(&self) -> (u64, u64) {
        (
            self.coordinator_id,
            self.next_step.fetch_add(1, Ordering::Relaxed),
        )
    }

    fn now(&self) -> Nanos {
        now_ns()
    }

    fn on_behalf(&self, tx: cfs_proto::tx::TxId, client: Option<u64>) {
        let mut m = self.tx_requesters.lock().expect("tx requesters lock");
        match client {
            Some(c) if m.len() < TX_REQUESTERS_MAX => {
                m.insert(
                    tx,
                    TxRequester {
                        client: c,
                        early_steps: Vec::new(),
                    },
                );
            }
            // Past the bound, a transaction's changes are foreign to its
            // client too (its session then acknowledges them: slower, not
            // wrong).
            Some(_) => warn!(
                ?tx,
                "too many cross-shard operations in flight to remember their clients"
            ),
            // Kept a little longer: the session may forward the last
            // steps' changes after the coordinator returned (the reply
            // waits for that forwarding, at most GRANT_WAIT).
            None => {
                let requesters = self.tx_requesters.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(TX_REQUESTER_GRACE).await;
                    // One with finishes answered early is forgotten once
                    // they settled (`Inner::settle_early`).
                    let mut m = requesters.lock().expect("tx requesters lock");
                    if m.get(&tx).is_some_and(|r| r.early_steps.is_empty()) {
                        m.remove(&tx);
                    }
                });
            }
        }
    }

    fn failpoint(&self, name: &str) {
        if self.failpoint.as_deref() == Some(name) {
            tracing::error!("failpoint {name} reached: aborting (CFS_FAILPOINT)");
            std::process::abort();
        }
    }
}

#[tracing::instrument(skip(inner, f, tx, session), fields(id = f.id))]
async fn handle(
    inner: &Arc<Inner>,
    client: u64,
    f: RequestFrame,
    tx: &Outbox,
    session: &Arc<Session>,
) -> Result<Reply, Errno> {
    let ino = match &f.req {
        Request::Hello { .. } => return Err(Errno::EINVAL),
        Request::Mutate {
            op_id,
            creds,
            op,
            early,
        } => {
            return inner
                .mutate(
                    client,
                    *op_id,
                    creds.clone(),
                    op.clone(),
                    early.then_some((tx, session)),
                )
                .await
        }
        Request::StatFs => return inner.statfs().map(Reply::Stats),
        Request::FindChunks { ids } => return inner.find_chunks(ids).await.map(Reply::Chunks),
        Request::Lease
        | Request::InvalAck { .. }
        | Request::ReleaseLeases
        | Request::Enroll { .. }
        | Request::TenantKeys { .. }
        | Request::MakeTenantKey { .. }
        | Request::ListTenantKeys => return Err(Errno::EINVAL),
        Request::Lookup { parent, .. } => *parent,
        Request::GetAttr { ino }
        | Request::ReadDir { ino, .. }
        | Request::ReadDirPlus { ino, .. }
        | Request::ReadLink { ino }
        | Request::GetXattr { ino, .. }
        | Request::ListXattr { ino }
        | Request::Extents { ino, .. }
        | Request::GetLock { ino, .. } => *ino,
    };
    let shard = inner.check_shard(ino)?;
    inner.counters.reads.inc();
    if f.fresh {
        inner.fresh(shard).await?;
    }
    if let Request::GetLock { ino, lock } = &f.req {
        return inner
            .db
            .get_lock(*ino, lock)
            .map(Reply::Lock)
            .map_err(read_err);
    }
    let r = inner.read_as(client, |db| read(db, &f.req)).await?;
    match (&f.req, r) {
        // The inode may live on another shard: fresh there too.
        (Request::Lookup { .. }, Ok(Reply::Attr(i))) if f.fresh && shard_of(i.ino) != shard => {
            inner.fresh(inner.check_shard(i.ino)?).await?;
            inner
                .read_as(client, |db| db.inode(i.ino).map(Reply::Attr))
                .await?
                .map_err(read_err)
        }
        (_, r) => r.map_err(read_err),
    }
}

/// Serves a read request from `db`.
fn read(db: &impl NsRead, req: &Request) -> Result<Reply, ReadError> {
    match req.clone() {
        Request::Lookup { parent, name } => db.lookup(parent, &name).map(Reply::Attr),
        Request::GetAttr { ino } => db.inode(ino).map(Reply::Attr),
        Request::ReadDir { ino, after, max } => db
            .readdir(ino, after, max.min(READDIR_MAX) as usize)
            .map(Reply::Entries),
        Request::ReadDirPlus { ino, after, max } => db
            .readdir_plus(ino, after, max.min(READDIR_MAX) as usize)
            .map(Reply::EntriesPlus),
        Request::ReadLink { ino } => db.readlink(ino).map(Reply::Data),
        Request::GetXattr { ino, name } => db.getxattr(ino, &name).map(Reply::Data),
        Request::ListXattr { ino } => db.listxattr(ino).map(Reply::Names),
        Request::Extents { ino, offset, len } => db.extents(ino, offset, len).map(Reply::Extents),
        Request::GetLock { .. }
        | Request::Hello { .. }
        | Request::Mutate { .. }
        | Request::StatFs
        | Request::FindChunks { .. }
        | Request::Lease
        | Request::InvalAck { .. }
        | Request::ReleaseLeases
        | Request::Enroll { .. }
        | Request::TenantKeys { .. }
        | Request::MakeTenantKey { .. }
        | Request::ListTenantKeys => Err(ReadError::Fs(Errno::EINVAL)),
    }
}
