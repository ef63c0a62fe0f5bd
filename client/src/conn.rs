//! The client's session with the metadata service: requests multiplexed on
//! one connection, failover across `--servers`, bounded waits, and the
//! invalidations nodes push.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cfs_proto::ops::*;
use cfs_proto::rpc::{Call, Lease};
use cfs_proto::types::*;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::unsettled::Unsettled;

/// An invalidation to apply to the kernel's caches, then acknowledge.
pub struct Invalidation {
    /// The session (`MetaCache` generation) it came from.
    pub gen: u64,
    /// Its number in that session (0: the "drop everything" sent locally
    /// on a new connection; nothing to acknowledge).
    pub seq: u64,
    /// 0 means "everything".
    pub ino: Ino,
    pub entry: Option<(Ino, Vec<u8>)>,
    /// This mount's own change: the kernel already knows.
    pub own: bool,
    /// Where the acknowledgement goes (that session's connection).
    pub acker: mpsc::UnboundedSender<RequestFrame>,
}

type Pending = Arc<Mutex<HashMap<u64, Waiter>>>;

/// Lease renewals granting no shard in a row after which a session moves
/// to the node leading most shards.
pub const LEADERLESS_RENEWALS: u32 = 10;
/// Moves of that kind at most this often.
pub const LEADER_CHASE_EVERY: Duration = Duration::from_secs(30);

/// A request waiting for its reply, and what the reader may cache from
/// it, in arrival order with the invalidations (`MetaCache`).
struct Waiter {
    tx: oneshot::Sender<Result<Reply, Errno>>,
    /// The directory entry the reply tells the inode of: a lookup's, or
    /// (`true`) this session's create or link.
    names: Option<(Ino, Vec<u8>, bool)>,
    /// False for a mutation sent again: its reply may be the outcome
    /// recorded for an earlier attempt, older than its stamp says.
    cacheable: bool,
    /// A change asked to be answered early (its operation id): the
    /// reader records the answer before waking the caller, so a replay
    /// started meanwhile includes it.
    early_op: Option<u64>,
}

/// The directory entry whose inode `req`'s reply tells.
/// A change to replay as it was answered: a create keeps the inode
/// number it was given (the new term kept it free for it, D41), so what
/// the kernel and this mount already know of the file stays true.
fn as_answered(mut op: Op, told: &Result<Reply, Errno>) -> Op {
    if let (
        Op::Create {
            ino: slot @ None, ..
        },
        Ok(Reply::Attr(i)),
    ) = (&mut op, told)
    {
        *slot = Some(i.ino);
    }
    op
}

fn names_of(req: &Request) -> Option<(Ino, Vec<u8>, bool)> {
    match req {
        Request::Lookup { parent, name } => Some((*parent, name.clone(), false)),
        Request::Mutate {
            op: Op::Create { parent, name, .. } | Op::Link { parent, name, .. },
            ..
        } => Some((*parent, name.clone(), true)),
        _ => None,
    }
}

struct Conn {
    tx: mpsc::UnboundedSender<RequestFrame>,
    pending: Pending,
    server: usize,
    /// Set by the reader when the connection ended: no reply will come,
    /// even though sending may still seem to work.
    dead: Arc<std::sync::atomic::AtomicBool>,
    /// When the reader last received anything (lease renewals are
    /// answered every `RENEW_EVERY`): a node still talking is not dead.
    heard: Arc<Heard>,
}

/// A monotonic "last heard" time, shared with the connection's reader.
struct Heard {
    since: Instant,
    ms: AtomicU64,
}

impl Heard {
    fn new() -> Heard {
        Heard {
            since: Instant::now(),
            ms: AtomicU64::new(0),
        }
    }

    fn now(&self) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.ms.store(ms, Ordering::Relaxed);
    }

    fn within(&self, d: Duration) -> bool {
        let last = Duration::from_millis(self.ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last) < d
    }
}

/// What the first node told us.
#[derive(Clone, Debug)]
pub struct Welcome {
    pub node_id: u64,
    pub segment_servers: Vec<(u64, String)>,
    /// The node leading most shards, if another (see `Reply::Welcome`).
    pub leader_meta: Option<String>,
}

pub struct MetaClient {
    servers: Vec<SocketAddr>,
    cluster_id: String,
    security: cfs_net::Security,
    pub client_id: u64,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    next_server: AtomicUsize,
    next_id: AtomicU64,
    next_op: AtomicU64,
    /// Longest time a call waits for a server before failing.
    pub timeout: Duration,
    invalidations: mpsc::UnboundedSender<Invalidation>,
    welcome: Mutex<Option<Welcome>>,
    /// This mount's counters (round trips counted here).
    pub stats: Arc<crate::stats::MountStats>,
    /// Attributes and leases (`crate::cache`).
    pub cache: Arc<crate::cache::MetaCache>,
    /// See `MountOptions::follow_leader`.
    follow_leader: std::sync::atomic::AtomicBool,
    /// Changes answered early and not settled yet (`crate::unsettled`).
    pub unsettled: Arc<Unsettled>,
}

/// Longest wait for one server's answer before trying the next.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl MetaClient {
    pub fn new(
        servers: Vec<SocketAddr>,
        cluster_id: String,
        security: cfs_net::Security,
        timeout: Duration,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Invalidation>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats: Arc<crate::stats::MountStats> = Arc::default();
        let c = MetaClient {
            servers,
            cluster_id,
            security,
            client_id: rand::random::<u64>() | 1,
            conn: tokio::sync::Mutex::new(None),
            next_server: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            next_op: AtomicU64::new(1),
            timeout,
            invalidations: tx,
            welcome: Mutex::new(None),
            cache: Arc::new(crate::cache::MetaCache::new(stats.clone())),
            stats,
            follow_leader: std::sync::atomic::AtomicBool::new(false),
            unsettled: Arc::default(),
        };
        (Arc::new(c), rx)
    }

    /// A change failed with its outcome unknown to the caller (EIO,
    /// ENOTCONN): some of it may have applied, while the kernel, told of an
    /// error, did not update its entries. Drops the kernel's entries for
    /// `names` and its caches of the directories `dirs` now (after every
    /// invalidation already queued), and sends the change's own
    /// invalidations that are still to come to the kernel too.
    pub fn outcome_unknown(&self, dirs: &[Ino], names: &[(Ino, &[u8])]) {
        self.cache.watch_unknown_outcome(dirs);
        let gen = self.cache.generation();
        // Nothing to acknowledge (sequence 0): these come from the mount.
        let (acker, _) = mpsc::unbounded_channel();
        let entries = names.iter().map(|(p, n)| (*p, Some((*p, n.to_vec()))));
        for (ino, entry) in dirs.iter().map(|d| (*d, None)).chain(entries) {
            self.cache.forget(ino);
            let _ = self.invalidations.send(Invalidation {
                gen,
                seq: 0,
                ino,
                entry,
                own: false,
                acker: acker.clone(),
            });
        }
    }

    pub fn set_follow_leader(&self, on: bool) {
        self.follow_leader.store(on, Ordering::Relaxed);
    }

    pub fn welcome(&self) -> Option<Welcome> {
        self.welcome.lock().expect("welcome lock").clone()
    }

    async fn connect_one(&self, idx: usize) -> Result<Arc<Conn>, String> {
        let addr = self.servers[idx];
        let conn = self
            .security
            .connect(addr, CONNECT_TIMEOUT)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let (r, w) = (conn.reader, conn.writer);
        let (tx, rx) = mpsc::unbounded_channel::<RequestFrame>();
        tokio::spawn(cfs_frame::write_batched(w, rx, |m: &RequestFrame, out| {
            let _ = cfs_frame::encode_with(out, |o| bincode::serialize_into(o, m));
        }));
        let pending: Pending = Arc::default();
        let p2 = pending.clone();
        let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dead2 = dead.clone();
        let heard = Arc::new(Heard::new());
        let heard2 = heard.clone();
        let inval = self.invalidations.clone();
        let stats = self.stats.clone();
        let cache = self.cache.clone();
        let unsettled = self.unsettled.clone();
        // Replies and invalidations of this connection count only once it
        // is the session (see below).
        let gen = Arc::new(AtomicU64::new(u64::MAX));
        let gen2 = gen.clone();
        let acker = tx.clone();
        let welcome_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (wtx, wrx) = oneshot::channel();
        pending.lock().expect("pending lock").insert(
            welcome_id,
            Waiter {
                tx: wtx,
                names: None,
                cacheable: false,
                early_op: None,
            },
        );
        tokio::spawn(async move {
            let mut reader = cfs_frame::BodyReader::new(r, MESSAGE_BYTES_MAX);
            loop {
                let msg = match reader
                    .next_with(|b| cfs_frame::decode_body::<ServerMsg>(b, MESSAGE_BYTES_MAX))
                    .await
                {
                    Ok(decoded) => match decoded {
                        Ok(m) => m,
                        Err(e) => {
                            warn!(%addr, "bad message from metadata server: {e}");
                            break;
                        }
                    },
                    Err(_) => break,
                };
                heard2.now();
                let g = gen2.load(Ordering::SeqCst);
                match msg {
                    ServerMsg::Reply { id, result, stamp } => {
                        let waiter = p2.lock().expect("pending lock").remove(&id);
                        let cacheable = waiter.as_ref().is_some_and(|w| w.cacheable);
                        let names = waiter.as_ref().and_then(|w| w.names.as_ref());
                        if let (Ok(Reply::Attr(i)), Some((parent, name, own)), true) =
                            (&result, names, cacheable)
                        {
                            cache.fetched_dentry(g, stamp, *parent, name, i.ino, *own);
                            if *own && i.is_dir() {
                                // This session's mkdir (a create of a
                                // name that exists fails): empty.
                                cache.created_dir(g, stamp, i.ino);
                            }
                        }
                        match &result {
                            _ if !cacheable => {}
                            Ok(Reply::Attr(i)) => cache.fetched(g, stamp, i),
                            Ok(Reply::EntriesPlus(p)) => {
                                for (_, i, names) in &p.entries {
                                    cache.fetched(g, stamp, i);
                                    cache.fetched_xattr_names(g, stamp, i.ino, names);
                                }
                            }
                            _ => {}
                        }
                        if let Some(w) = waiter {
                            if let (Some(op_id), Ok(_)) = (w.early_op, &result) {
                                unsettled.answered(op_id, &result);
                            }
                            let _ = w.tx.send(result);
                        }
                    }
                    ServerMsg::Current { inodes, stamp } => {
                        for i in &inodes {
                            cache.fetched(g, stamp, i);
                        }
                    }
                    ServerMsg::Settled { op_id, failed } => {
                        if unsettled.settled(op_id, failed) {
                            warn!(op_id, ?failed, "a change answered early did not apply as answered; the next fsync or close of what it touched reports it");
                        }
                    }
                    ServerMsg::Invalidate {
                        ino,
                        entry,
                        seq,
                        own,
                    } => {
                        stats.invalidation();
                        cache.invalidated_entry(
                            g,
                            seq,
                            ino,
                            entry.as_ref().map(|(p, n)| (*p, n.as_slice())),
                            own,
                        );
                        let _ = inval.send(Invalidation {
                            gen: g,
                            seq,
                            ino,
                            entry,
                            own,
                            acker: acker.clone(),
                        });
                    }
                }
            }
            // Fail everything outstanding: callers retry elsewhere. `dead`
            // first, so a request registered after the clear sees it.
            dead2.store(true, Ordering::SeqCst);
            p2.lock().expect("pending lock").clear();
        });
        tx.send(RequestFrame {
            id: welcome_id,
            fresh: false,
            req: Request::Hello {
                cluster_id: self.cluster_id.clone(),
                client_id: self.client_id,
            },
        })
        .map_err(|_| format!("{addr}: closed"))?;
        match tokio::time::timeout(CONNECT_TIMEOUT * 5, wrx).await {
            Ok(Ok(Ok(Reply::Welcome {
                node_id,
                segment_servers,
                leader_meta,
                ..
            }))) => {
                info!(%addr, node_id, "connected to metadata service");
                *self.welcome.lock().expect("welcome lock") = Some(Welcome {
                    node_id,
                    segment_servers,
                    leader_meta,
                });
            }
            Ok(Ok(Err(e))) => return Err(format!("{addr}: refused: {e} (wrong cluster id?)")),
            _ => return Err(format!("{addr}: no welcome")),
        }
        // A new session: nothing cached before may be used, and we may
        // have missed invalidations while disconnected.
        let g = self.cache.session();
        gen.store(g, Ordering::SeqCst);
        let _ = self.invalidations.send(Invalidation {
            gen: g,
            seq: 0,
            ino: 0,
            entry: None,
            own: false,
            acker: tx.clone(),
        });
        Ok(Arc::new(Conn {
            tx,
            pending,
            server: idx,
            dead,
            heard,
        }))
    }

    /// The current connection, or a new one to the next server that
    /// answers.
    async fn conn(&self) -> Result<Arc<Conn>, String> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref() {
            if !c.tx.is_closed() && !c.dead.load(Ordering::SeqCst) {
                return Ok(c.clone());
            }
        }
        *g = None;
        let mut errs = Vec::new();
        for _ in 0..self.servers.len() {
            let idx = self.next_server.fetch_add(1, Ordering::Relaxed) % self.servers.len();
            match self.connect_one(idx).await {
                Ok(c) => {
                    let c = self.prefer_leader(c).await;
                    if let Err(e) = self.replay(&c).await {
                        errs.push(e);
                        continue;
                    }
                    self.next_server.store(c.server, Ordering::Relaxed);
                    *g = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => errs.push(e),
            }
        }
        Err(errs.join("; "))
    }

    /// Sends again, on a new session and before anything else, the changes
    /// the last session answered early but did not settle (same operation
    /// ids: the log applies each once), and settles them by their answers.
    async fn replay(&self, c: &Conn) -> Result<(), String> {
        let todo = self.unsettled.to_replay();
        if todo.is_empty() {
            return Ok(());
        }
        info!(
            changes = todo.len(),
            "replaying changes answered early but not settled"
        );
        let server = self.servers[c.server];
        for (op_id, req, told) in todo {
            let req = match req {
                Request::Mutate {
                    op_id, creds, op, ..
                } => Request::Mutate {
                    op_id,
                    creds,
                    op: as_answered(op, &told),
                    early: false,
                },
                r => r,
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            c.pending.lock().expect("pending lock").insert(
                id,
                Waiter {
                    tx,
                    names: None,
                    cacheable: false,
                    early_op: None,
                },
            );
            c.tx.send(RequestFrame {
                id,
                fresh: false,
                req,
            })
            .map_err(|_| format!("{server}: closed during replay"))?;
            let wait = ATTEMPT_TIMEOUT + cfs_proto::lease::server_hold();
            match tokio::time::timeout(wait, rx).await {
                Ok(Ok(Err(Errno::EIO))) | Ok(Err(_)) | Err(_) => {
                    c.pending.lock().expect("pending lock").remove(&id);
                    return Err(format!("{server}: replay not answered"));
                }
                Ok(Ok(r)) => {
                    if self.unsettled.replayed(op_id, &r) {
                        warn!(op_id, "a replayed change did not apply as first answered");
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves to the node leading most shards when the node `c` reached
    /// names one among our servers; keeps `c` if that fails.
    async fn prefer_leader(&self, c: Arc<Conn>) -> Arc<Conn> {
        if !self.follow_leader.load(Ordering::Relaxed) {
            return c;
        }
        let hint = self.welcome().and_then(|w| w.leader_meta);
        let Some(j) = hint.and_then(|a| {
            let a: SocketAddr = a.parse().ok()?;
            self.servers.iter().position(|s| *s == a)
        }) else {
            return c;
        };
        let first = self.welcome();
        match self.connect_one(j).await {
            Ok(l) => {
                info!(server = %self.servers[j], "moved to the node leading the shards");
                l
            }
            Err(e) => {
                warn!("the shards' leader did not answer ({e}); staying");
                *self.welcome.lock().expect("welcome lock") = first;
                c
            }
        }
    }

    async fn drop_conn(&self, server: usize) {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref().filter(|c| c.server == server) {
            Self::release(&self.cache, c);
            *g = None;
            self.next_server.store(server + 1, Ordering::Relaxed);
        }
    }

    /// Gives up the session's leases: the cache stops using them first
    /// (a new generation), then the node is told, so that changes need not
    /// wait for this session's acknowledgements until its leases run out.
    fn release(cache: &crate::cache::MetaCache, c: &Conn) {
        cache.session();
        let _ = c.tx.send(RequestFrame {
            id: 0,
            fresh: false,
            req: Request::ReleaseLeases,
        });
    }

    /// Waits for the reply on `c` for an attempt; past it, if `patient`,
    /// keeps waiting (until `deadline`) while the connection is still
    /// heard from: a
    /// node answering other requests and lease renewals is slow with this
    /// one, not dead, and leaving it would start a new session (dropping
    /// every cache) for nothing.
    async fn wait_reply(
        c: &Conn,
        mut rx: oneshot::Receiver<Result<Reply, Errno>>,
        attempt: Duration,
        deadline: Instant,
        patient: bool,
    ) -> Result<Result<Result<Reply, Errno>, oneshot::error::RecvError>, tokio::time::error::Elapsed>
    {
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(attempt)
                .max(Duration::from_millis(1));
            // (A dead connection's reader drops every waiting sender, so
            // `rx` ends at once.)
            match tokio::time::timeout(left, &mut rx).await {
                Err(e) if !patient || Instant::now() >= deadline || !c.heard.within(attempt) => {
                    return Err(e)
                }
                Err(_) => continue,
                Ok(r) => return Ok(r),
            }
        }
    }

    /// Starts a new session through the server after the current one: its
    /// welcome names the node leading most shards, which `conn` moves to.
    async fn chase_leader(&self) {
        let server = self.conn.lock().await.as_ref().map(|c| c.server);
        if let Some(s) = server {
            info!(server = %self.servers[s], "this node leads no shard; looking for the leader");
            self.drop_conn(s).await;
            if let Err(e) = self.conn().await {
                warn!("no metadata server answered: {e}");
            }
        }
    }

    /// Releases the current session's leases (unmount).
    pub async fn release_leases(&self) {
        if let Some(c) = self.conn.lock().await.as_ref() {
            Self::release(&self.cache, c);
        }
    }

    /// Sends `req` and waits for the reply, moving to another server when
    /// one fails. Mutations carry an operation id so a retry elsewhere is
    /// applied at most once. Gives up with ENOTCONN when no server could
    /// be reached within the timeout, EIO when servers answered but could
    /// not complete the request.
    pub async fn call(&self, req: Request, fresh: bool) -> Result<Reply, Errno> {
        self.call_counted(req, fresh, true).await
    }

    /// A typed request (`cfs_proto::rpc`): its reply, or EIO if the node
    /// answered another kind (a protocol violation, logged).
    pub async fn rpc<C: Call>(&self, c: C, fresh: bool) -> Result<C::Reply, Errno> {
        Self::typed::<C>(self.call(c.into(), fresh).await?)
    }

    fn typed<C: Call>(r: Reply) -> Result<C::Reply, Errno> {
        C::reply(r).ok_or_else(|| {
            warn!("metadata server answered with the wrong kind of reply");
            Errno::EIO
        })
    }

    /// Renews leases every `lease::RENEW_EVERY` until the runtime stops.
    /// A session whose node has led no shard for [`LEADERLESS_RENEWALS`]
    /// renewals in a row (leadership moved after the mount connected)
    /// moves to the node leading most shards, at most once per
    /// [`LEADER_CHASE_EVERY`].
    pub fn keep_leases(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut leaderless = 0u32;
            let mut chased: Option<Instant> = None;
            loop {
                let Some(c) = me.upgrade() else { return };
                let gen = c.cache.generation();
                let sent = Instant::now();
                let r = c.call_counted(Lease.into(), false, false).await;
                if let Ok(g) = r.and_then(Self::typed::<Lease>) {
                    let valid = Duration::from_millis(g.millis as u64);
                    c.cache.leased(gen, sent, &g.shards, valid, g.inval_seq);
                    leaderless = if g.leading == 0 { leaderless + 1 } else { 0 };
                }
                let due = chased.is_none_or(|t| t.elapsed() >= LEADER_CHASE_EVERY);
                if leaderless >= LEADERLESS_RENEWALS
                    && due
                    && c.follow_leader.load(Ordering::Relaxed)
                {
                    leaderless = 0;
                    chased = Some(Instant::now());
                    c.chase_leader().await;
                }
                drop(c);
                tokio::time::sleep(cfs_proto::lease::RENEW_EVERY).await;
            }
        });
    }

    /// As `call`; `count` says whether it counts as a round trip of the
    /// file system's work (lease renewals do not).
    async fn call_counted(&self, req: Request, fresh: bool, count: bool) -> Result<Reply, Errno> {
        let req = match req {
            Request::Mutate {
                op_id: 0,
                creds,
                op,
                early,
            } => Request::Mutate {
                op_id: self.next_op.fetch_add(1, Ordering::Relaxed),
                creds,
                op,
                early,
            },
            r => r,
        };
        // A change asked to be answered early is kept until settled.
        let early = match &req {
            Request::Mutate {
                op_id, early: true, ..
            } => {
                self.unsettled.room().await;
                self.unsettled.sent(*op_id, &req);
                Some(*op_id)
            }
            _ => None,
        };
        let r = self.attempts(req, fresh, count).await;
        if let Some(op_id) = early {
            match &r {
                Ok(_) => self.unsettled.answered(op_id, &r),
                // An error is the outcome the caller reports (EIO: not
                // known); such a change is not replayed behind its back.
                Err(_) => self.unsettled.abandoned(op_id),
            }
        }
        r
    }

    /// The attempts of `call_counted` on the current server, then others.
    async fn attempts(&self, req: Request, fresh: bool, count: bool) -> Result<Reply, Errno> {
        let deadline = Instant::now() + self.timeout;
        let mut reached = false;
        let mut attempts: u32 = 0;
        let mut delay = Duration::from_millis(20);
        loop {
            match self.conn().await {
                Ok(c) => {
                    reached = true;
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    // The node serving it logs under the same tag.
                    let tag = cfs_proto::RequestTag::new(self.client_id, id);
                    let (tx, rx) = oneshot::channel();
                    // A mutation's later attempts may be answered with
                    // the outcome recorded for an earlier one.
                    let again = attempts > 0 && matches!(req, Request::Mutate { .. });
                    attempts += 1;
                    let early_op = match &req {
                        Request::Mutate {
                            op_id, early: true, ..
                        } => {
                            // Kept again for this attempt (a failed one was
                            // settled by its node before its EIO).
                            self.unsettled.sent(*op_id, &req);
                            Some(*op_id)
                        }
                        _ => None,
                    };
                    c.pending.lock().expect("pending lock").insert(
                        id,
                        Waiter {
                            tx,
                            names: if again { None } else { names_of(&req) },
                            cacheable: !again,
                            early_op,
                        },
                    );
                    let sent = c.tx.send(RequestFrame {
                        id,
                        fresh,
                        req: req.clone(),
                    });
                    if count {
                        self.stats.meta_round_trip(fresh);
                    }
                    tracing::debug!(req = %tag, server = %self.servers[c.server], attempt = attempts, "metadata request sent");
                    if sent.is_ok() && !c.dead.load(Ordering::SeqCst) {
                        // A server that does not answer within an attempt
                        // (paused, or cut off while its connection stays
                        // up) is left for the next one; mutations are
                        // exactly-once, so retrying elsewhere is safe.
                        // Changes and lease grants may wait out a leased
                        // cache elsewhere (at most a lease's hold).
                        let attempt = match req {
                            Request::Mutate { .. } | Request::Lease => {
                                ATTEMPT_TIMEOUT + cfs_proto::lease::server_hold()
                            }
                            _ => ATTEMPT_TIMEOUT,
                        };
                        // A lease renewal is not waited for past its
                        // attempt: the lease lapses instead.
                        let patient = !matches!(req, Request::Lease);
                        match Self::wait_reply(&c, rx, attempt, deadline, patient).await {
                            Ok(Ok(Err(Errno::EIO))) => {
                                // The node could not get it through the
                                // log (cut off from the majority, or no
                                // leader yet): retry on the next server.
                                warn!(req = %tag, server = %self.servers[c.server], "EIO from the node; trying the next");
                                self.drop_conn(c.server).await;
                            }
                            Ok(Ok(r)) => return r,
                            Ok(Err(_)) => {
                                warn!(req = %tag, server = %self.servers[c.server], "connection lost");
                                self.drop_conn(c.server).await
                            }
                            Err(_) if matches!(req, Request::Lease) => {
                                // A slow renewal is not a dead node: the
                                // lease lapses, the session stays.
                                c.pending.lock().expect("pending lock").remove(&id);
                                return Err(Errno::EAGAIN);
                            }
                            Err(_) => {
                                c.pending.lock().expect("pending lock").remove(&id);
                                warn!(req = %tag, server = %self.servers[c.server], ?attempt, "no answer in time; trying the next");
                                self.drop_conn(c.server).await;
                            }
                        }
                    } else {
                        c.pending.lock().expect("pending lock").remove(&id);
                        self.drop_conn(c.server).await;
                    }
                }
                Err(e) => warn!("no metadata server reachable: {e}"),
            }
            if Instant::now() >= deadline {
                return Err(if reached { Errno::EIO } else { Errno::ENOTCONN });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unknown_outcome_reaches_the_kernel_as_foreign_invalidations() {
        let (c, mut rx) = MetaClient::new(
            Vec::new(),
            "t".into(),
            cfs_net::Security::plaintext(),
            Duration::from_secs(1),
        );
        let (dir, newdir) = (5, 6);
        c.outcome_unknown(&[dir, newdir], &[(dir, b"old"), (newdir, b"new")]);
        let mut got = Vec::new();
        while let Ok(m) = rx.try_recv() {
            assert!(!m.own && m.seq == 0);
            got.push((m.ino, m.entry));
        }
        assert_eq!(
            got,
            vec![
                (dir, None),
                (newdir, None),
                (dir, Some((dir, b"old".to_vec()))),
                (newdir, Some((newdir, b"new".to_vec()))),
            ]
        );
        // The change's own invalidations still to come go to the kernel too.
        assert!(c.cache.watched(7, &Some((newdir, b"new".to_vec()))));
    }
}
