//! A remote client of the log API (benchmarks, tests, tools, later the FUSE
//! client): finds the leader, follows redirects, and retries with the same
//! request id, so a retried proposal is decided at most once while the
//! first attempt is still in the log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cfs_net::Security;
use tokio::sync::mpsc;

use crate::entry::{Entry, EntryKind, RequestId};
use crate::shard::{Position, ShardId};
use crate::transport::{dial, Identity};
use crate::wire::{LogError, Role, ShardStatus, Wire, PROPOSE_BATCH_MAX};

/// Per-attempt wait before a proposal is retried (same request id).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before retrying while no leader is known.
const NO_LEADER_PAUSE: Duration = Duration::from_millis(50);

type Pending = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Wire>>>>;

struct Conn {
    tx: mpsc::UnboundedSender<Wire>,
    pending: Pending,
    next_id: AtomicU64,
}

impl Conn {
    async fn open(
        addr: SocketAddr,
        cluster_id: &str,
        security: &Security,
    ) -> Result<Arc<Conn>, LogError> {
        let me = Identity {
            cluster_id: cluster_id.to_string(),
            node_id: 0,
            incarnation: rand::random(),
            security: security.clone(),
        };
        let (mut reader, w, _) = dial(addr, &me, Role::Client)
            .await
            .map_err(|e| LogError::Connection(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel::<Wire>();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(write_requests(w, rx));
        let p2 = pending.clone();
        tokio::spawn(async move {
            while let Ok(m) = reader.next().await {
                let id = match &m {
                    Wire::Decided { id, .. }
                    | Wire::StatusReply { id, .. }
                    | Wire::Entries { id, .. } => *id,
                    _ => continue,
                };
                let tx = p2.lock().expect("pending lock").get(&id).cloned();
                if let Some(tx) = tx {
                    let _ = tx.send(m);
                }
            }
            // Connection gone: fail everything waiting.
            p2.lock().expect("pending lock").clear();
        });
        Ok(Arc::new(Conn {
            tx,
            pending,
            next_id: AtomicU64::new(1),
        }))
    }

    fn request(
        &self,
        make: impl FnOnce(u64) -> Wire,
    ) -> Result<(u64, mpsc::UnboundedReceiver<Wire>), LogError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        self.tx
            .send(make(id))
            .map_err(|_| LogError::Connection("connection closed".into()))?;
        Ok((id, rx))
    }

    fn done(&self, id: u64) {
        self.pending.lock().expect("pending lock").remove(&id);
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Writes a connection's requests. What is queued when the writer wakes
/// goes out in one write of up to [`crate::frame::WRITE_BATCH_BYTES`], and
/// the proposals among it as one [`Wire::ProposeBatch`] frame per shard
/// (at most [`PROPOSE_BATCH_MAX`] each): the node decodes one frame and
/// wakes its shard thread once for all of them. Other requests keep their
/// place after the proposals queued before them.
async fn write_requests<W>(mut w: W, mut rx: mpsc::UnboundedReceiver<Wire>)
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut buf = Vec::new();
    let mut batches = ProposalBatches::default();
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut next = Some(first);
        while let Some(m) = next {
            match m {
                Wire::Propose { id, shard, entry } => batches.push(shard, id, entry, &mut buf),
                other => {
                    batches.flush(&mut buf);
                    other.encode_frame(&mut buf);
                }
            }
            if buf.len() + batches.bytes >= crate::frame::WRITE_BATCH_BYTES {
                break;
            }
            next = rx.try_recv().ok();
        }
        batches.flush(&mut buf);
        if w.write_all(&buf).await.is_err() {
            return;
        }
    }
}

/// Proposals gathered per shard before they are encoded.
#[derive(Default)]
struct ProposalBatches {
    by_shard: Vec<(ShardId, Vec<(u64, Entry)>)>,
    /// Payload bytes gathered.
    bytes: usize,
}

impl ProposalBatches {
    fn push(&mut self, shard: ShardId, id: u64, entry: Entry, out: &mut Vec<u8>) {
        self.bytes += entry.payload.len();
        let i = match self.by_shard.iter().position(|(s, _)| *s == shard) {
            Some(i) => i,
            None => {
                self.by_shard.push((shard, Vec::new()));
                self.by_shard.len() - 1
            }
        };
        self.by_shard[i].1.push((id, entry));
        if self.by_shard[i].1.len() >= PROPOSE_BATCH_MAX {
            let (shard, proposals) = self.by_shard.swap_remove(i);
            self.bytes -= proposals
                .iter()
                .map(|(_, e)| e.payload.len())
                .sum::<usize>();
            Self::encode(shard, proposals, out);
        }
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        for (shard, proposals) in self.by_shard.drain(..) {
            Self::encode(shard, proposals, out);
        }
        self.bytes = 0;
    }

    fn encode(shard: ShardId, mut proposals: Vec<(u64, Entry)>, out: &mut Vec<u8>) {
        if proposals.len() == 1 {
            let (id, entry) = proposals.remove(0);
            Wire::Propose { id, shard, entry }.encode_frame(out);
        } else {
            Wire::ProposeBatch { shard, proposals }.encode_frame(out);
        }
    }
}

/// A client of a cluster's log API.
pub struct LogClient {
    cluster_id: String,
    security: Security,
    addrs: Vec<SocketAddr>,
    conns: tokio::sync::Mutex<HashMap<SocketAddr, Arc<Conn>>>,
    leader: Mutex<HashMap<ShardId, SocketAddr>>,
    rr: AtomicUsize,
    client_id: u64,
    seq: AtomicU64,
    pub timeout: Duration,
}

impl LogClient {
    /// A client of the nodes at `addrs`. With TLS, `security` must hold
    /// a node or administrator certificate: nodes refuse log clients with
    /// a mount's.
    pub fn new(cluster_id: &str, addrs: Vec<SocketAddr>, security: Security) -> Self {
        LogClient {
            cluster_id: cluster_id.to_string(),
            security,
            addrs,
            conns: tokio::sync::Mutex::new(HashMap::new()),
            leader: Mutex::new(HashMap::new()),
            rr: AtomicUsize::new(0),
            client_id: loop {
                let v: u64 = rand::random();
                if v != 0 {
                    break v;
                }
            },
            seq: AtomicU64::new(1),
            timeout: Duration::from_secs(10),
        }
    }

    async fn conn(&self, addr: SocketAddr) -> Result<Arc<Conn>, LogError> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&addr) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = Conn::open(addr, &self.cluster_id, &self.security).await?;
        conns.insert(addr, c.clone());
        Ok(c)
    }

    async fn drop_conn(&self, addr: SocketAddr) {
        self.conns.lock().await.remove(&addr);
    }

    /// A fresh request id of this client.
    pub fn next_request(&self) -> RequestId {
        RequestId {
            client: self.client_id,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn pick(&self, shard: ShardId) -> SocketAddr {
        if let Some(a) = self.leader.lock().expect("leader lock").get(&shard) {
            return *a;
        }
        self.addrs[self.rr.fetch_add(1, Ordering::Relaxed) % self.addrs.len()]
    }

    /// Proposes `payload` as a `DATA` entry; returns its decided position.
    pub async fn propose(&self, shard: ShardId, payload: Vec<u8>) -> Result<Position, LogError> {
        let entry = Entry::new(EntryKind::DATA, self.next_request(), payload);
        self.propose_entry(shard, entry).await
    }

    /// Proposes `entry` (which must carry a request id), retrying with the
    /// same id across redirects, elections and connection failures until
    /// `self.timeout`.
    pub async fn propose_entry(&self, shard: ShardId, entry: Entry) -> Result<Position, LogError> {
        self.call(shard, |id| Wire::Propose {
            id,
            shard,
            entry: entry.clone(),
        })
        .await
    }

    /// A linearizable read point of `shard` (see `runtime`).
    pub async fn read_barrier(&self, shard: ShardId) -> Result<Position, LogError> {
        self.call(shard, |id| Wire::ReadBarrier { id, shard }).await
    }

    async fn call(&self, shard: ShardId, make: impl Fn(u64) -> Wire) -> Result<Position, LogError> {
        let deadline = Instant::now() + self.timeout;
        let mut last = LogError::Timeout;
        while Instant::now() < deadline {
            let addr = self.pick(shard);
            let conn = match self.conn(addr).await {
                Ok(c) => c,
                Err(e) => {
                    self.leader.lock().expect("leader lock").remove(&shard);
                    last = e;
                    tokio::time::sleep(NO_LEADER_PAUSE).await;
                    continue;
                }
            };
            let (id, mut rx) = conn.request(&make)?;
            let reply = tokio::time::timeout(ATTEMPT_TIMEOUT, rx.recv()).await;
            conn.done(id);
            match reply {
                Ok(Some(Wire::Decided { result: Ok(p), .. })) => {
                    self.leader.lock().expect("leader lock").insert(shard, addr);
                    return Ok(p);
                }
                Ok(Some(Wire::Decided {
                    result: Err(LogError::NotLeader { addr: Some(a), .. }),
                    ..
                })) => {
                    if let Ok(a) = a.parse() {
                        self.leader.lock().expect("leader lock").insert(shard, a);
                    }
                }
                Ok(Some(Wire::Decided { result: Err(e), .. })) => {
                    match e {
                        LogError::Invalid(_) | LogError::UnknownShard(_) => return Err(e),
                        _ => {}
                    }
                    self.leader.lock().expect("leader lock").remove(&shard);
                    last = e;
                    tokio::time::sleep(NO_LEADER_PAUSE).await;
                }
                Ok(_) => {
                    self.drop_conn(addr).await;
                    self.leader.lock().expect("leader lock").remove(&shard);
                    last = LogError::Connection(format!("connection to {addr} lost"));
                }
                Err(_) => {
                    self.leader.lock().expect("leader lock").remove(&shard);
                    last = LogError::Timeout;
                }
            }
        }
        Err(match last {
            LogError::Connection(_) | LogError::NoLeader(_) => last,
            _ => LogError::Timeout,
        })
    }

    /// Status of every shard on the node at `addr`.
    pub async fn status(&self, addr: SocketAddr) -> Result<(u64, Vec<ShardStatus>), LogError> {
        let conn = self.conn(addr).await?;
        let (id, mut rx) = conn.request(|id| Wire::Status { id })?;
        let r = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        conn.done(id);
        match r {
            Ok(Some(Wire::StatusReply {
                node_id, shards, ..
            })) => Ok((node_id, shards)),
            Ok(_) => Err(LogError::Connection(format!("connection to {addr} lost"))),
            Err(_) => Err(LogError::Timeout),
        }
    }

    /// Reads the decided entries `[from, to)` of `shard` as the node at
    /// `addr` has them (each replica's own copy).
    pub async fn read_range(
        &self,
        addr: SocketAddr,
        shard: ShardId,
        from: Position,
        to: Position,
    ) -> Result<Vec<(Position, Entry)>, LogError> {
        let conn = self.conn(addr).await?;
        let (id, mut rx) = conn.request(|id| Wire::Subscribe { id, shard, from })?;
        let mut out = Vec::new();
        let deadline = Instant::now() + self.timeout;
        while (out.len() as u64) < to.since(from) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(Wire::Entries { result: Ok(v), .. })) => out.extend(v),
                Ok(Some(Wire::Entries { result: Err(e), .. })) => {
                    conn.done(id);
                    return Err(e);
                }
                Ok(_) => {
                    conn.done(id);
                    return Err(LogError::Connection(format!("connection to {addr} lost")));
                }
                Err(_) => {
                    conn.done(id);
                    return Err(LogError::Timeout);
                }
            }
        }
        conn.done(id);
        // The stream is left open server-side until the connection closes;
        // drop this connection so the server stops streaming.
        self.drop_conn(addr).await;
        out.truncate(to.since(from) as usize);
        Ok(out)
    }
}
