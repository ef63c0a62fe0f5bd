//! Node-to-node TCP links: framed, checksummed, bounded; outbound links
//! reconnect with exponential backoff and report each re-established link
//! so the shard can call OmniPaxos' `reconnected`.
//!
//! Each node dials every peer and sends only on its own outbound link;
//! inbound links only receive. Bounded per-peer queues drop messages when a
//! peer is slow or down: OmniPaxos resends what matters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cfs_net::{BoxRead, BoxWrite, Security};
use omnipaxos::util::NodeId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use crate::frame;
use crate::wire::{Role, Wire, FRAME_BYTES_MAX, HELLO_FRAME_BYTES_MAX, PROTOCOL_VERSION};

/// Messages queued per peer before new ones are dropped.
pub const PEER_QUEUE_MAX: usize = 16 * 1024;
/// First and largest reconnect delay.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(20);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes gathered before a write syscall while draining a queue.
const WRITE_BATCH_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("{0}")]
    Protocol(String),
    #[error("connection closed")]
    Closed,
}

/// Reads frames from a stream, enforcing a size limit.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    pub max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        FrameReader {
            inner,
            buf: Vec::with_capacity(64 << 10),
            start: 0,
            max,
        }
    }

    /// Next message, `Err(Closed)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Wire, TransportError> {
        loop {
            let avail = &self.buf[self.start..];
            if let Some((body, used)) = frame::decode(avail, self.max)? {
                let w = Wire::decode(body).map_err(TransportError::Protocol);
                self.start += used;
                return w;
            }
            if self.start > 0 && self.start * 2 >= self.buf.len() {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let need = frame::peek_len(&self.buf[self.start..], self.max)?
                .map(|l| l + frame::FRAME_HEADER_BYTES)
                .unwrap_or(frame::FRAME_HEADER_BYTES);
            let have = self.buf.len() - self.start;
            let want = (need.saturating_sub(have)).max(64 << 10);
            self.buf.reserve(want);
            // Reads into spare capacity: no zero fill.
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(TransportError::Closed);
            }
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

pub async fn write_msg<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    msg: &Wire,
) -> Result<(), TransportError> {
    let mut out = Vec::new();
    msg.encode_frame(&mut out);
    w.write_all(&out).await?;
    Ok(())
}

/// Who this node is, for handshakes.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub incarnation: u64,
    /// TLS (or the development plaintext) for every connection.
    pub security: Security,
}

impl Identity {
    pub fn hello(&self, role: Role) -> Wire {
        Wire::Hello {
            protocol: PROTOCOL_VERSION,
            cluster_id: self.cluster_id.clone(),
            role,
            node_id: if role == Role::Peer { self.node_id } else { 0 },
            incarnation: self.incarnation,
        }
    }
}

/// Dials `addr`, says hello, waits for the welcome. With TLS, the node
/// that welcomes us must hold that node's certificate.
pub async fn dial(
    addr: SocketAddr,
    me: &Identity,
    role: Role,
) -> Result<(FrameReader<BoxRead>, BoxWrite, NodeId), TransportError> {
    let conn = me
        .security
        .connect(addr, HANDSHAKE_TIMEOUT)
        .await
        .map_err(|e| TransportError::Protocol(e.to_string()))?;
    let (r, mut w, server) = (conn.reader, conn.writer, conn.peer);
    write_msg(&mut w, &me.hello(role)).await?;
    let mut reader = FrameReader::new(r, HELLO_FRAME_BYTES_MAX);
    let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next())
        .await
        .map_err(|_| TransportError::Protocol(format!("handshake with {addr} timed out")))??;
    match reply {
        Wire::Welcome { node_id } if !server.is_node(node_id) => Err(TransportError::Protocol(
            format!("{addr} answered as node {node_id} with the certificate of {server}"),
        )),
        Wire::Welcome { node_id } => {
            reader.max = FRAME_BYTES_MAX;
            Ok((reader, w, node_id))
        }
        Wire::Refused { reason } => Err(TransportError::Protocol(format!(
            "{addr} refused us: {reason}"
        ))),
        other => Err(TransportError::Protocol(format!(
            "{addr} answered the handshake with {other:?}"
        ))),
    }
}

/// Counters for metrics.
#[derive(Default, Debug)]
pub struct LinkStats {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub reconnects: AtomicU64,
}

/// Outbound links to every peer.
pub struct PeerLinks {
    queues: std::collections::HashMap<NodeId, mpsc::Sender<Vec<u8>>>,
    pub stats: Arc<LinkStats>,
}

impl PeerLinks {
    /// Starts one dialer task per peer. `on_connect(peer)` runs after each
    /// successful handshake (first connect and every reconnect).
    pub fn start(
        me: Identity,
        peers: Vec<(NodeId, SocketAddr)>,
        on_connect: Arc<dyn Fn(NodeId) + Send + Sync>,
    ) -> Self {
        let stats = Arc::new(LinkStats::default());
        let mut queues = std::collections::HashMap::new();
        for (id, addr) in peers {
            let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
            queues.insert(id, tx);
            let me = me.clone();
            let on_connect = on_connect.clone();
            let stats = stats.clone();
            tokio::spawn(
                dial_loop(me, id, addr, rx, on_connect, stats)
                    .instrument(tracing::info_span!("peer_link", peer = id, %addr)),
            );
        }
        PeerLinks { queues, stats }
    }

    /// Queues `msg` for `to`; drops it if the queue is full or `to` unknown.
    pub fn send(&self, to: NodeId, msg: &Wire) {
        let Some(q) = self.queues.get(&to) else {
            return;
        };
        let mut buf = Vec::new();
        msg.encode_frame(&mut buf);
        if buf.len() > FRAME_BYTES_MAX {
            warn!(
                to,
                bytes = buf.len(),
                "message larger than the frame limit dropped"
            );
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match q.try_send(buf) {
            Ok(()) => {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn dial_loop(
    me: Identity,
    peer: NodeId,
    addr: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    on_connect: Arc<dyn Fn(NodeId) + Send + Sync>,
    stats: Arc<LinkStats>,
) {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let mut ever = false;
    loop {
        match dial(addr, &me, Role::Peer).await {
            Ok((mut reader, mut w, id)) if id == peer => {
                info!("link up");
                backoff = RECONNECT_BACKOFF_MIN;
                if ever {
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                ever = true;
                // Messages queued while down are stale; OmniPaxos resends.
                while rx.try_recv().is_ok() {}
                on_connect(peer);
                let closed = async {
                    // The peer never sends on our outbound link; a read
                    // returning means it closed or misbehaved.
                    let _ = reader.next().await;
                };
                tokio::pin!(closed);
                let mut batch = Vec::with_capacity(WRITE_BATCH_BYTES);
                loop {
                    tokio::select! {
                        m = rx.recv() => {
                            let Some(m) = m else { return };
                            batch.clear();
                            batch.extend_from_slice(&m);
                            while batch.len() < WRITE_BATCH_BYTES {
                                match rx.try_recv() {
                                    Ok(m) => batch.extend_from_slice(&m),
                                    Err(_) => break,
                                }
                            }
                            if let Err(e) = w.write_all(&batch).await {
                                warn!("link down: {e}");
                                break;
                            }
                        }
                        _ = &mut closed => {
                            warn!("link closed by peer");
                            break;
                        }
                    }
                }
            }
            Ok((_, _, id)) => {
                warn!(answered = id, "wrong node answered at this address");
            }
            Err(e) => {
                debug!("dial failed: {e}");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}
