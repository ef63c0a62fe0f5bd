//! The segment server inside `cfs-node`: a TCP listener whose connections
//! feed one store thread. The store thread takes every queued request,
//! appends all fragments with one `fdatasync` per file (group commit), and
//! answers each request on its connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, info_span, warn, Instrument};

use crate::proto::{
    self, Envelope, FrameReader, ReadError, Request, Response, StatInfo, FRAME_BYTES_MAX,
    HELLO_FRAME_BYTES_MAX, PROTOCOL_VERSION,
};
use crate::server_metrics::{op_of, Refusal, SegmentMetrics};
use crate::store::{AppendReq, FragmentKey, Store, StoreError};

/// Requests queued for the store thread before new ones are refused.
pub const STORE_QUEUE_MAX: usize = 4096;
/// Requests one store-thread batch takes at most.
pub const STORE_BATCH_MAX: usize = 256;
/// Replies queued per connection.
const CONN_REPLY_QUEUE_MAX: usize = 1024;
/// Below this many free bytes (or 10 % of the device, if smaller), /health
/// reports the store as nearly full.
pub const LOW_SPACE_BYTES: u64 = 64 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct SegmentServerConfig {
    pub node_id: u64,
    pub cluster_id: String,
    pub listen: SocketAddr,
    pub dir: PathBuf,
    /// False forces plain pread/pwrite (io_uring is still probed if true).
    pub io_uring: bool,
    /// Open connections one remote address may keep; more are closed at
    /// once.
    pub connections_per_peer: usize,
    /// Mutual TLS (or the development plaintext).
    pub security: cfs_net::Security,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("segment store {dir}: {source}")]
    Store {
        dir: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

struct Job {
    req: Request,
    reply: oneshot::Sender<Response>,
}

/// A running segment server. Cheap to clone.
#[derive(Clone)]
pub struct SegmentServer {
    jobs: std_mpsc::SyncSender<Job>,
    checksum_failures: Arc<AtomicU64>,
    stat: Arc<Mutex<StatInfo>>,
    rejected: Arc<AtomicU64>,
    metrics: Arc<SegmentMetrics>,
}

impl SegmentServer {
    pub async fn start(cfg: SegmentServerConfig) -> Result<SegmentServer, ServerError> {
        let dir = cfg.dir.display().to_string();
        let store = Store::open(&cfg.dir, cfg.io_uring)
            .map_err(|source| ServerError::Store { dir, source })?;
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
        let stat = Arc::new(Mutex::new(stat_of(cfg.node_id, &store)));
        let checksum_failures = store.checksum_failure_counter();
        let (tx, rx) = std_mpsc::sync_channel(STORE_QUEUE_MAX);
        let s2 = stat.clone();
        let node_id = cfg.node_id;
        std::thread::Builder::new()
            .name("segment-store".into())
            .spawn(move || {
                let _g = info_span!("segment_store").entered();
                store_loop(store, rx, s2, node_id)
            })
            .map_err(|source| ServerError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let server = SegmentServer {
            jobs: tx,
            checksum_failures,
            stat,
            rejected: Arc::new(AtomicU64::new(0)),
            metrics: Arc::new(SegmentMetrics::new(cfg.dir.display().to_string())),
        };
        info!(listen = %cfg.listen, io_mode = %server.stat().io_mode, "segment server started");
        let s = server.clone();
        let cluster_id = cfg.cluster_id.clone();
        let security = cfg.security.clone();
        let peers = cfs_frame::peers::PeerLimiter::new(cfg.connections_per_peer);
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((sock, addr)) => {
                        let Some(slot) = peers.admit(addr.ip()) else {
                            s.rejected.fetch_add(1, Ordering::Relaxed);
                            warn!(peer = %addr, max = peers.max(),
                                "closing segment connection: too many open from this address");
                            continue;
                        };
                        let _ = sock.set_nodelay(true);
                        let s = s.clone();
                        let cid = cluster_id.clone();
                        let security = security.clone();
                        tokio::spawn(
                            async move {
                                let _slot = slot;
                                let served = match security.accept(sock).await {
                                    Ok(conn) => s.serve(conn, &cid, node_id).await,
                                    Err(e) => Err(e.to_string()),
                                };
                                if let Err(reason) = served {
                                    s.rejected.fetch_add(1, Ordering::Relaxed);
                                    warn!("closing segment connection: {reason}");
                                }
                            }
                            .instrument(info_span!("segment_conn", peer = %addr)),
                        );
                    }
                    Err(e) => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(server)
    }

    /// The store's state as of its last batch.
    pub fn stat(&self) -> StatInfo {
        self.stat.lock().expect("stat lock").clone()
    }

    /// Why this node's segment store is unhealthy (empty when healthy).
    pub fn problems(&self) -> Vec<String> {
        let s = self.stat();
        let mut p = Vec::new();
        if let Some(e) = &s.stats.last_write_error {
            p.push(format!("segment store: last write failed: {e}"));
        }
        if s.free_bytes < LOW_SPACE_BYTES.min(s.total_bytes / 10) {
            p.push(format!("segment store: only {} bytes free", s.free_bytes));
        }
        p
    }

    /// Prometheus text exposition of the segment server's families.
    pub fn metrics_text(&self) -> String {
        let _one = self.metrics.scrape.lock().expect("scrape lock");
        self.metrics.refresh(
            &self.stat(),
            self.checksum_failures.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
        );
        cfs_metrics::render(&self.metrics.registry)
    }

    async fn serve(
        &self,
        conn: cfs_net::Conn,
        cluster_id: &str,
        node_id: u64,
    ) -> Result<(), String> {
        let (r, mut w, peer) = (conn.reader, conn.writer, conn.peer);
        let mut reader = FrameReader::new(r, HELLO_FRAME_BYTES_MAX);
        let hello: Envelope<Request> =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
                Err(_) => return Err("no hello within the handshake timeout".into()),
                Ok(Err(e)) => return Err(format!("bad hello: {e}")),
                Ok(Ok(h)) => h,
            };
        let verdict = match &hello.body {
            Request::Hello { protocol, .. } if *protocol != PROTOCOL_VERSION => Err(format!(
                "protocol {protocol} not supported (this node speaks {PROTOCOL_VERSION})"
            )),
            Request::Hello { cluster_id: c, .. } if c != cluster_id => {
                Err(format!("wrong cluster id {c:?}"))
            }
            Request::Hello { .. } => Ok(()),
            _ => Err("first message is not a hello".into()),
        };
        let mut out = Vec::new();
        let reply = match &verdict {
            Ok(()) => Response::Welcome { node_id },
            Err(reason) => Response::Refused {
                reason: reason.clone(),
            },
        };
        proto::encode(
            &Envelope {
                id: hello.id,
                body: reply,
            },
            &mut out,
        );
        use tokio::io::AsyncWriteExt;
        let _ = w.write_all(&out).await;
        verdict?;
        reader.set_max(FRAME_BYTES_MAX);
        let (tx, rx) = mpsc::channel::<Envelope<Response>>(CONN_REPLY_QUEUE_MAX);
        let writer = tokio::spawn(cfs_frame::write_batched(w, rx, proto::encode::<Response>));
        let result = loop {
            let msg: Envelope<Request> = match reader.next().await {
                Ok(m) => m,
                Err(ReadError::Closed) => break Ok(()),
                Err(e) => break Err(format!("{e}")),
            };
            if matches!(msg.body, Request::Hello { .. }) {
                break Err("second hello".into());
            }
            // Freeing, marking dead and listing fragments are for nodes
            // and administrators (repair, compaction), never mounts.
            if msg.body.is_administrative() && !peer.is_admin() {
                warn!(%peer, "administrative segment request refused");
                self.metrics.refused(Refusal::Denied);
                let denied = Response::Error(StoreError::Denied(format!(
                    "{peer} may not free, mark dead or list fragments"
                )));
                if tx
                    .send(Envelope {
                        id: msg.id,
                        body: denied,
                    })
                    .await
                    .is_err()
                {
                    break Ok(());
                }
                continue;
            }
            let (otx, orx) = oneshot::channel();
            let id = msg.id;
            let (op, arrived) = (op_of(&msg.body), Instant::now());
            let read_of = match &msg.body {
                Request::Read {
                    segment,
                    fragment,
                    stripe,
                } => Some((
                    FragmentKey {
                        segment: *segment,
                        fragment: *fragment,
                    },
                    *stripe,
                )),
                _ => None,
            };
            if self
                .jobs
                .try_send(Job {
                    req: msg.body,
                    reply: otx,
                })
                .is_err()
            {
                self.metrics.refused(Refusal::Overloaded);
                let busy =
                    Response::Error(StoreError::Io("segment store overloaded; retry".into()));
                let _ = tx.send(Envelope { id, body: busy }).await;
                continue;
            }
            let tx = tx.clone();
            let failures = self.checksum_failures.clone();
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                if let Ok(mut body) = orx.await {
                    if let (Some((key, stripe)), Response::Data { data, checksum }) =
                        (read_of, &body)
                    {
                        if let Err(e) = crate::store::verify(key, stripe, data, checksum, &failures)
                        {
                            body = Response::Error(e);
                        }
                    }
                    let _ = tx.send(Envelope { id, body }).await;
                    metrics.served(op, arrived.elapsed().as_secs_f64());
                }
            });
        };
        drop(tx);
        let _ = writer.await;
        result
    }
}

fn stat_of(node_id: u64, store: &Store) -> StatInfo {
    let (free_bytes, total_bytes) = store.space();
    StatInfo {
        node_id,
        io_mode: store.io_mode().to_string(),
        free_bytes,
        total_bytes,
        fragments: store.fragment_count() as u64,
        stats: store.stats(),
    }
}

/// Interval between refreshes of the shared stat (statvfs, file counts).
const STAT_REFRESH: Duration = Duration::from_millis(200);

fn store_loop(
    mut store: Store,
    rx: std_mpsc::Receiver<Job>,
    stat: Arc<Mutex<StatInfo>>,
    node_id: u64,
) {
    let mut last_stat = Instant::now();
    loop {
        let first = match rx.recv_timeout(STAT_REFRESH) {
            Ok(j) => Some(j),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut jobs: Vec<Job> = first.into_iter().collect();
        while jobs.len() < STORE_BATCH_MAX {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (appends, others): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| matches!(j.req, Request::Append { .. }));
        if !appends.is_empty() {
            let mut replies = Vec::with_capacity(appends.len());
            let mut reqs = Vec::with_capacity(appends.len());
            for j in appends {
                if let Request::Append {
                    segment,
                    fragment,
                    layout,
                    nodes,
                    stripe,
                    data,
                } = j.req
                {
                    reqs.push(AppendReq {
                        key: FragmentKey { segment, fragment },
                        layout,
                        nodes,
                        stripe,
                        data: data.into_vec(),
                    });
                    replies.push(j.reply);
                }
            }
            for (r, reply) in store.append_batch(reqs).into_iter().zip(replies) {
                let _ = reply.send(match r {
                    Ok(checksum) => Response::Appended { checksum },
                    Err(e) => Response::Error(e),
                });
            }
        }
        let (reads, others): (Vec<Job>, Vec<Job>) = others
            .into_iter()
            .partition(|j| matches!(j.req, Request::Read { .. }));
        if !reads.is_empty() {
            let wanted: Vec<(FragmentKey, u32)> = reads
                .iter()
                .map(|j| match j.req {
                    Request::Read {
                        segment,
                        fragment,
                        stripe,
                    } => (FragmentKey { segment, fragment }, stripe),
                    _ => unreachable!("partitioned on Read"),
                })
                .collect();
            // Unverified here: the connection task checks the blake3, so
            // hashing runs on the tokio workers, not this thread.
            for (r, j) in store.read_batch_raw(&wanted).into_iter().zip(reads) {
                let _ = j.reply.send(match r {
                    Ok((data, checksum)) => Response::Data {
                        data: ByteBuf::from(data),
                        checksum,
                    },
                    Err(e) => Response::Error(e),
                });
            }
        }
        for j in others {
            let resp = match j.req {
                Request::Seal { segment, fragment } => {
                    match store.seal(FragmentKey { segment, fragment }) {
                        Ok(()) => Response::Done,
                        Err(e) => Response::Error(e),
                    }
                }
                Request::Free { segment } => match store.free(segment) {
                    Ok(n) => Response::Freed {
                        fragments: n as u32,
                    },
                    Err(e) => Response::Error(e),
                },
                Request::MarkDead {
                    segment,
                    fragment,
                    bytes,
                } => match store.mark_dead(FragmentKey { segment, fragment }, bytes) {
                    Ok(()) => Response::Done,
                    Err(e) => Response::Error(e),
                },
                Request::ReadRange {
                    segment,
                    fragment,
                    stripe,
                    offset,
                    len,
                } => match store.read_range(FragmentKey { segment, fragment }, stripe, offset, len)
                {
                    Ok(r) => Response::Range {
                        first_group: r.first_group,
                        data: ByteBuf::from(r.data),
                        cvs: r.cvs.to_vec(),
                    },
                    Err(e) => Response::Error(e),
                },
                Request::List => Response::Fragments(store.list()),
                Request::Stat => Response::Stat(stat_of(node_id, &store)),
                Request::Append { .. } | Request::Read { .. } | Request::Hello { .. } => {
                    Response::Error(StoreError::BadRequest("unexpected request".into()))
                }
            };
            let _ = j.reply.send(resp);
        }
        if last_stat.elapsed() >= STAT_REFRESH {
            *stat.lock().expect("stat lock") = stat_of(node_id, &store);
            last_stat = Instant::now();
        } else {
            let mut s = stat.lock().expect("stat lock");
            s.stats = store.stats();
        }
    }
}
