//! The client side of the segment store: connections to segment servers,
//! the stripe writer (buffer → encode → k+m fragments to k+m nodes in
//! parallel → extent descriptors) and the stripe reader (verify end to end,
//! reconstruct from any k, report bad fragments).
//!
//! Write policy: a stripe is acknowledged once at least `min_durable`
//! fragments are durable (fdatasync'd on their nodes). The default is
//! `k + m - 1` when `m > 0` (one server may fail mid-write; the extent lists
//! the missing fragment for repair) and `k` when `m = 0`. With fewer, the
//! write fails and no extent is returned for that stripe.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::ec::{Codec, EcError};
use crate::format::{self, SegmentId};
use crate::layout::Layout;
use crate::proof;
use crate::proto::{
    self, Envelope, FrameReader, Request, Response, StatInfo, FRAME_BYTES_MAX,
    HELLO_FRAME_BYTES_MAX,
};
use crate::store::{FragmentInfo, StoreError};
pub use cfs_stripe::Compression;
use cfs_stripe::Packing;

use crate::seal::{DataKey, KeyRing, SealError};

/// How long one request may take before the server is treated as down.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Stripes a writer keeps in flight.
pub const WRITE_WINDOW_STRIPES: usize = 8;
/// Stripes per segment before the writer seals it and opens another
/// (64 MiB per fragment file with the default fragment size).
pub const SEGMENT_STRIPES_MAX: u32 = 256;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("node {node}: {reason}")]
    Unreachable { node: u64, reason: String },
    #[error("node {node}: {error}")]
    Store { node: u64, error: StoreError },
    #[error("node {node}: unexpected reply {reply}")]
    Protocol { node: u64, reply: String },
    #[error("stripe {stripe} of segment {segment}: only {durable} of the required {required} fragments durable: {errors}")]
    NotDurable {
        segment: SegmentId,
        stripe: u32,
        durable: usize,
        required: usize,
        errors: String,
        /// Some fragment failed because its device is full.
        no_space: bool,
    },
    #[error("cannot read extent (segment {segment} stripe {stripe}): {reason}")]
    Unreadable {
        segment: SegmentId,
        stripe: u32,
        reason: String,
    },
    #[error("bad layout or placement: {0}")]
    Placement(String),
    #[error("cannot open extent (segment {segment} stripe {stripe}): {error}")]
    Sealed {
        segment: SegmentId,
        stripe: u32,
        error: SealError,
    },
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

struct Conn {
    tx: mpsc::UnboundedSender<Envelope<Request>>,
    pending: Pending,
    next: AtomicU64,
    /// Set when the reader saw the connection end: no reply will come.
    dead: Arc<std::sync::atomic::AtomicBool>,
}

impl Conn {
    async fn open(
        addr: SocketAddr,
        cluster_id: &str,
        node: u64,
        security: &cfs_net::Security,
    ) -> Result<Arc<Conn>, ClientError> {
        let err = |reason: String| ClientError::Unreachable { node, reason };
        let conn = security
            .connect(addr, Duration::from_secs(3))
            .await
            .map_err(|e| err(e.to_string()))?;
        if !conn.peer.is_node(node) {
            return Err(err(format!(
                "{addr} holds the certificate of {}, not node {node}",
                conn.peer
            )));
        }
        let (r, mut w) = (conn.reader, conn.writer);
        let mut buf = Vec::new();
        proto::encode(
            &Envelope {
                id: 0,
                body: Request::Hello {
                    protocol: proto::PROTOCOL_VERSION,
                    cluster_id: cluster_id.to_string(),
                },
            },
            &mut buf,
        );
        use tokio::io::AsyncWriteExt;
        w.write_all(&buf).await.map_err(|e| err(e.to_string()))?;
        let mut reader = FrameReader::new(r, HELLO_FRAME_BYTES_MAX);
        let hello: Envelope<Response> = tokio::time::timeout(Duration::from_secs(5), reader.next())
            .await
            .map_err(|_| err("handshake timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        match hello.body {
            Response::Welcome { .. } => {}
            Response::Refused { reason } => return Err(err(format!("refused: {reason}"))),
            other => return Err(err(format!("bad handshake reply {other:?}"))),
        }
        reader.set_max(FRAME_BYTES_MAX);
        let (tx, rx) = mpsc::unbounded_channel::<Envelope<Request>>();
        tokio::spawn(cfs_frame::write_batched(w, rx, proto::encode::<Request>));
        let pending: Pending = Arc::default();
        let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p2, d2) = (pending.clone(), dead.clone());
        tokio::spawn(async move {
            while let Ok(m) = reader.next::<Response>().await {
                if let Some(tx) = p2.lock().expect("pending lock").remove(&m.id) {
                    let _ = tx.send(m.body);
                }
            }
            d2.store(true, Ordering::SeqCst);
            p2.lock().expect("pending lock").clear();
        });
        Ok(Arc::new(Conn {
            tx,
            pending,
            next: AtomicU64::new(1),
            dead,
        }))
    }
}

/// Connections to every segment server of a cluster.
pub struct SegmentClient {
    cluster_id: String,
    security: cfs_net::Security,
    servers: proto::ServerMap,
    conns: tokio::sync::Mutex<HashMap<u64, Arc<Conn>>>,
    /// Nodes that just failed, and until when calls to them fail at once
    /// (so a dead node costs one connect attempt per interval, not one per
    /// request).
    down_until: Mutex<HashMap<u64, std::time::Instant>>,
}

/// How long a node that failed is skipped.
pub const DOWN_RETRY_INTERVAL: Duration = Duration::from_millis(500);

impl SegmentClient {
    /// A client of `servers`. With TLS, `security` holds this process's
    /// certificate; administrative calls need a node's or an
    /// administrator's.
    pub fn new(
        cluster_id: &str,
        servers: proto::ServerMap,
        security: cfs_net::Security,
    ) -> Arc<Self> {
        Arc::new(SegmentClient {
            cluster_id: cluster_id.to_string(),
            security,
            servers,
            conns: tokio::sync::Mutex::new(HashMap::new()),
            down_until: Mutex::new(HashMap::new()),
        })
    }

    fn mark_down(&self, node: u64) {
        self.down_until
            .lock()
            .expect("down lock")
            .insert(node, std::time::Instant::now() + DOWN_RETRY_INTERVAL);
    }

    pub fn nodes(&self) -> Vec<u64> {
        self.servers.keys().copied().collect()
    }

    async fn conn(&self, node: u64) -> Result<Arc<Conn>, ClientError> {
        if let Some(t) = self.down_until.lock().expect("down lock").get(&node) {
            if std::time::Instant::now() < *t {
                return Err(ClientError::Unreachable {
                    node,
                    reason: "recently unreachable".into(),
                });
            }
        }
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&node) {
            if !c.tx.is_closed() && !c.dead.load(Ordering::SeqCst) {
                return Ok(c.clone());
            }
        }
        let addr = *self
            .servers
            .get(&node)
            .ok_or_else(|| ClientError::Unreachable {
                node,
                reason: "unknown node".into(),
            })?;
        match Conn::open(addr, &self.cluster_id, node, &self.security).await {
            Ok(c) => {
                conns.insert(node, c.clone());
                self.down_until.lock().expect("down lock").remove(&node);
                Ok(c)
            }
            Err(e) => {
                conns.remove(&node);
                self.mark_down(node);
                Err(e)
            }
        }
    }

    /// Sends one request to `node` and waits for its reply.
    pub async fn call(&self, node: u64, req: Request) -> Result<Response, ClientError> {
        let conn = self.conn(node).await?;
        let id = conn.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().expect("pending lock").insert(id, tx);
        let lost = || ClientError::Unreachable {
            node,
            reason: "connection lost".into(),
        };
        if conn.dead.load(Ordering::SeqCst) {
            conn.pending.lock().expect("pending lock").remove(&id);
            self.conns.lock().await.remove(&node);
            return Err(lost());
        }
        conn.tx
            .send(Envelope { id, body: req })
            .map_err(|_| lost())?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(Response::Error(error))) => Err(ClientError::Store { node, error }),
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => {
                self.conns.lock().await.remove(&node);
                self.mark_down(node);
                Err(lost())
            }
            Err(_) => {
                conn.pending.lock().expect("pending lock").remove(&id);
                self.conns.lock().await.remove(&node);
                self.mark_down(node);
                Err(ClientError::Unreachable {
                    node,
                    reason: "request timed out".into(),
                })
            }
        }
    }

    pub async fn read_fragment(
        &self,
        node: u64,
        segment: SegmentId,
        fragment: u8,
        stripe: u32,
    ) -> Result<(Vec<u8>, [u8; 32]), ClientError> {
        match self
            .call(
                node,
                Request::Read {
                    segment,
                    fragment,
                    stripe,
                },
            )
            .await?
        {
            Response::Data { data, checksum } => Ok((data.into_vec(), checksum)),
            other => Err(ClientError::Protocol {
                node,
                reply: format!("{other:?}"),
            }),
        }
    }

    /// Bytes `[offset, offset + len)` of a stripe's fragment on `node`, as
    /// whole groups from the first covering one, with every group's
    /// chaining value; unverified (see [`StripeReader::read_range`]).
    pub async fn read_fragment_range(
        &self,
        node: u64,
        segment: SegmentId,
        fragment: u8,
        stripe: u32,
        offset: u32,
        len: u32,
    ) -> Result<(u32, Vec<u8>, Vec<[u8; 32]>), ClientError> {
        match self
            .call(
                node,
                Request::ReadRange {
                    segment,
                    fragment,
                    stripe,
                    offset,
                    len,
                },
            )
            .await?
        {
            Response::Range {
                first_group,
                data,
                cvs,
            } => Ok((first_group, data.into_vec(), cvs)),
            other => Err(ClientError::Protocol {
                node,
                reply: format!("{other:?}"),
            }),
        }
    }

    pub async fn list(&self, node: u64) -> Result<Vec<FragmentInfo>, ClientError> {
        match self.call(node, Request::List).await? {
            Response::Fragments(v) => Ok(v),
            other => Err(ClientError::Protocol {
                node,
                reply: format!("{other:?}"),
            }),
        }
    }

    pub async fn stat(&self, node: u64) -> Result<StatInfo, ClientError> {
        match self.call(node, Request::Stat).await? {
            Response::Stat(s) => Ok(s),
            other => Err(ClientError::Protocol {
                node,
                reply: format!("{other:?}"),
            }),
        }
    }
}

pub use cfs_stripe::Extent;

/// Policy default: see the module docs.
pub fn default_min_durable(layout: Layout) -> usize {
    if layout.m == 0 {
        layout.k as usize
    } else {
        layout.width() - 1
    }
}

/// How a writer stores each stripe.
#[derive(Clone, Debug)]
struct WritePolicy {
    /// Fragments that must be durable before the stripe is acknowledged.
    min_durable: usize,
    compression: Compression,
    /// The data key stripes are sealed with (D51), if any.
    seal: Option<Arc<DataKey>>,
}

async fn write_stripe(
    client: Arc<SegmentClient>,
    codec: Arc<Codec>,
    segment: SegmentId,
    nodes: Vec<u64>,
    stripe: u32,
    data: Vec<u8>,
    policy: WritePolicy,
) -> Result<Extent, ClientError> {
    let WritePolicy {
        min_durable,
        compression,
        seal: key,
    } = policy;
    let layout = codec.layout();
    let data_len = data.len() as u32;
    let (stored, packing) = crate::pack::pack(data, compression);
    let (stored, packing, seal) = match &key {
        None => (stored, packing, None),
        Some(key) => {
            let (stored, packing, seal) = crate::seal::seal(stored, packing, data_len, key)
                .map_err(|e| ClientError::Placement(format!("sealing a stripe: {e}")))?;
            (stored, packing, Some(seal))
        }
    };
    let frags = codec
        .encode(&stored)
        .map_err(|e| ClientError::Placement(e.to_string()))?;
    let fragment_len = frags[0].len() as u32;
    let checksums: Vec<[u8; 32]> = frags.iter().map(|f| format::checksum(f)).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, f) in frags.into_iter().enumerate() {
        let client = client.clone();
        let node = nodes[i];
        let nodes = nodes.clone();
        tasks.spawn(async move {
            let r = client
                .call(
                    node,
                    Request::Append {
                        segment,
                        fragment: i as u8,
                        layout,
                        nodes,
                        stripe,
                        data: ByteBuf::from(f),
                    },
                )
                .await;
            (i, r)
        });
    }
    let mut missing = Vec::new();
    let mut errors = Vec::new();
    let mut no_space = false;
    while let Some(r) = tasks.join_next().await {
        let (i, r) = r.map_err(|e| ClientError::Placement(format!("append task: {e}")))?;
        match r {
            Ok(Response::Appended { checksum }) if checksum == checksums[i] => {}
            Ok(other) => {
                missing.push(i as u8);
                errors.push(format!("fragment {i}: unexpected reply {other:?}"));
            }
            Err(e) => {
                no_space |= matches!(
                    e,
                    ClientError::Store {
                        error: StoreError::NoSpace(_),
                        ..
                    }
                );
                missing.push(i as u8);
                errors.push(format!("fragment {i}: {e}"));
            }
        }
    }
    missing.sort_unstable();
    let durable = layout.width() - missing.len();
    if durable < min_durable {
        return Err(ClientError::NotDurable {
            segment,
            stripe,
            durable,
            required: min_durable,
            errors: errors.join("; "),
            no_space,
        });
    }
    if !missing.is_empty() {
        warn!(%segment, stripe, ?missing, "stripe acknowledged with missing fragments: {}", errors.join("; "));
    }
    Ok(Extent {
        segment,
        layout,
        nodes,
        stripe,
        data_len,
        packing,
        fragment_len,
        checksums,
        missing,
        chunk: None,
        seal,
    })
}

/// Buffers a stream of writes into stripes and writes them to `k + m`
/// nodes, keeping up to [`WRITE_WINDOW_STRIPES`] stripes in flight.
pub struct StripeWriter {
    client: Arc<SegmentClient>,
    codec: Arc<Codec>,
    nodes: Vec<u64>,
    stripe_bytes: usize,
    policy: WritePolicy,
    segment: SegmentId,
    next_stripe: u32,
    buf: Vec<u8>,
    in_flight: VecDeque<tokio::task::JoinHandle<Result<Extent, ClientError>>>,
    /// Segments this writer filled, sealed at the next flush (once their
    /// stripes are all written).
    finished_segments: Vec<SegmentId>,
    /// When a stripe was last launched.
    last_write: std::time::Instant,
}

impl StripeWriter {
    /// A writer placing fragment `i` on `nodes[i]`; `fragment_bytes` of
    /// data per fragment per full stripe.
    pub fn new(
        client: Arc<SegmentClient>,
        layout: Layout,
        nodes: Vec<u64>,
        fragment_bytes: usize,
    ) -> Result<Self, ClientError> {
        if nodes.len() != layout.width() {
            return Err(ClientError::Placement(format!(
                "layout {layout} needs {} nodes, got {}",
                layout.width(),
                nodes.len()
            )));
        }
        let mut distinct = nodes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != nodes.len() {
            return Err(ClientError::Placement(format!(
                "nodes {nodes:?} are not distinct"
            )));
        }
        let codec = Arc::new(
            Codec::new(layout).map_err(|e: EcError| ClientError::Placement(e.to_string()))?,
        );
        Ok(StripeWriter {
            client,
            codec,
            nodes,
            stripe_bytes: fragment_bytes * layout.k as usize,
            policy: WritePolicy {
                min_durable: default_min_durable(layout),
                compression: Compression::Off,
                seal: None,
            },
            segment: SegmentId::random(),
            next_stripe: 0,
            buf: Vec::new(),
            in_flight: VecDeque::new(),
            finished_segments: Vec::new(),
            last_write: std::time::Instant::now(),
        })
    }

    pub fn set_min_durable(&mut self, n: usize) {
        self.policy.min_durable =
            n.clamp(self.codec.layout().k as usize, self.codec.layout().width());
    }

    /// How stripes launched from now on are stored (default: plain; the
    /// mount and compaction set their own).
    pub fn set_compression(&mut self, c: Compression) {
        self.policy.compression = c;
    }

    /// The key stripes launched from now on are sealed with (D51); `None`:
    /// stored unsealed.
    pub fn set_seal(&mut self, key: Option<Arc<DataKey>>) {
        self.policy.seal = key;
    }

    fn launch(&mut self, data: Vec<u8>) {
        if self.next_stripe >= SEGMENT_STRIPES_MAX {
            self.finished_segments.push(self.segment);
            self.segment = SegmentId::random();
            self.next_stripe = 0;
        }
        let h = tokio::spawn(write_stripe(
            self.client.clone(),
            self.codec.clone(),
            self.segment,
            self.nodes.clone(),
            self.next_stripe,
            data,
            self.policy.clone(),
        ));
        self.next_stripe += 1;
        self.last_write = std::time::Instant::now();
        self.in_flight.push_back(h);
    }

    /// How long since this writer last launched a stripe.
    pub fn idle_for(&self) -> Duration {
        self.last_write.elapsed()
    }

    /// Seals `segment`'s fragment on every node (best effort: a down
    /// node's fragment stays open, and the segment is not freed, until
    /// repaired).
    async fn seal(&self, segment: SegmentId) {
        let calls = self.nodes.iter().enumerate().map(|(i, n)| {
            self.client.call(
                *n,
                Request::Seal {
                    segment,
                    fragment: i as u8,
                },
            )
        });
        for (i, r) in join_all(calls).await.into_iter().enumerate() {
            if let Err(e) = r {
                tracing::debug!(%segment, fragment = i, "seal: {e}");
            }
        }
    }

    async fn reap_one(&mut self) -> Result<Extent, ClientError> {
        let h = self.in_flight.pop_front().expect("something in flight");
        h.await
            .map_err(|e| ClientError::Placement(format!("stripe task: {e}")))?
    }

    /// Buffers `data`; launches every full stripe. Returns the extents that
    /// completed (in order). An error means a stripe could not be made
    /// durable: nothing after the last returned extent is durable.
    pub async fn write(&mut self, data: &[u8]) -> Result<Vec<Extent>, ClientError> {
        self.buf.extend_from_slice(data);
        let mut done = Vec::new();
        while self.buf.len() >= self.stripe_bytes {
            let rest = self.buf.split_off(self.stripe_bytes);
            let stripe = std::mem::replace(&mut self.buf, rest);
            while self.in_flight.len() >= WRITE_WINDOW_STRIPES {
                done.push(self.reap_one().await?);
            }
            self.launch(stripe);
        }
        Ok(done)
    }

    /// Launches `data` as one stripe of its own (after the partial stripe
    /// buffered, if any, as another), without waiting for the stripes in
    /// flight beyond the window. Returns the extents that completed (in
    /// order). `data` longer than a stripe is an error.
    pub async fn write_stripe(&mut self, data: &[u8]) -> Result<Vec<Extent>, ClientError> {
        if data.len() > self.stripe_bytes {
            return Err(ClientError::Placement(format!(
                "{} bytes do not fit a stripe of {}",
                data.len(),
                self.stripe_bytes
            )));
        }
        let mut done = Vec::new();
        for stripe in [std::mem::take(&mut self.buf), data.to_vec()] {
            if stripe.is_empty() {
                continue;
            }
            while self.in_flight.len() >= WRITE_WINDOW_STRIPES {
                done.push(self.reap_one().await?);
            }
            self.launch(stripe);
        }
        Ok(done)
    }

    /// File bytes in a full stripe.
    pub fn stripe_bytes(&self) -> usize {
        self.stripe_bytes
    }

    /// Writes the partial stripe and waits for every stripe in flight.
    pub async fn flush(&mut self) -> Result<Vec<Extent>, ClientError> {
        if !self.buf.is_empty() {
            let stripe = std::mem::take(&mut self.buf);
            self.launch(stripe);
        }
        let mut done = Vec::new();
        while !self.in_flight.is_empty() {
            done.push(self.reap_one().await?);
        }
        // Every stripe of the filled segments is written: seal them, so
        // that the garbage collector may free them once unreferenced.
        for s in std::mem::take(&mut self.finished_segments) {
            self.seal(s).await;
        }
        Ok(done)
    }

    /// Flushes, then seals every segment this writer wrote on every node
    /// (best effort: a down node's fragment stays open until repaired).
    pub async fn finish(mut self) -> Result<Vec<Extent>, ClientError> {
        let done = self.flush().await?;
        if self.next_stripe > 0 {
            self.seal(self.segment).await;
        }
        Ok(done)
    }
}

/// A fragment that could not be used, and why.
#[derive(Clone, Debug)]
pub struct BadFragment {
    pub fragment: u8,
    pub node: u64,
    pub reason: String,
    /// True when the data was there but failed its checksum.
    pub corrupt: bool,
}

/// The result of reading one extent.
#[derive(Debug)]
pub struct ReadOutcome {
    pub data: Vec<u8>,
    /// Fragments that were missing, unreachable or corrupt: the data was
    /// reconstructed around them; repair should recreate them.
    pub bad: Vec<BadFragment>,
}

/// Reads extents: data fragments only when healthy, reconstruction from
/// any `k` otherwise. Every fragment is verified against the extent's
/// blake3 (end to end), besides the server's own check.
pub struct StripeReader {
    client: Arc<SegmentClient>,
    codecs: Mutex<BTreeMap<(u8, u8), Arc<Codec>>>,
    /// The keys sealed stripes are opened with (D51).
    keys: Arc<KeyRing>,
}

impl StripeReader {
    /// A reader without keys: sealed stripes are refused.
    pub fn new(client: Arc<SegmentClient>) -> Self {
        Self::with_keys(client, Arc::default())
    }

    /// A reader opening sealed stripes with the keys of `keys`.
    pub fn with_keys(client: Arc<SegmentClient>, keys: Arc<KeyRing>) -> Self {
        StripeReader {
            client,
            codecs: Mutex::new(BTreeMap::new()),
            keys,
        }
    }

    /// The frames `frames` of sealed stripe `e`, opened from their stored
    /// bytes, then (if compressed) decompressed: their file bytes.
    fn open(
        &self,
        e: &Extent,
        seal: &cfs_stripe::Seal,
        stored: &[u8],
        frames: std::ops::Range<usize>,
    ) -> Result<Vec<u8>, ClientError> {
        let sealed = |error| ClientError::Sealed {
            segment: e.segment,
            stripe: e.stripe,
            error,
        };
        let key = self
            .keys
            .get(seal.key)
            .ok_or(sealed(SealError::NoKey(seal.key)))?;
        let ends = e
            .frame_ends()
            .ok_or(sealed(SealError::Unsupported))?
            .into_owned();
        let opened =
            crate::seal::open_frames(stored, &ends, frames.clone(), e.data_len, seal, &key)
                .map_err(sealed)?;
        match &e.packing {
            Packing::Frames { .. } => crate::pack::unpack_frames(
                &opened,
                &crate::seal::unsealed_ends(&ends),
                frames,
                e.data_len as usize,
            )
            .map_err(|err| unreadable(e, err.to_string())),
            _ => Ok(opened),
        }
    }

    fn codec(&self, layout: Layout) -> Result<Arc<Codec>, ClientError> {
        let mut c = self.codecs.lock().expect("codecs lock");
        if let Some(c) = c.get(&(layout.k, layout.m)) {
            return Ok(c.clone());
        }
        let codec =
            Arc::new(Codec::new(layout).map_err(|e| ClientError::Placement(e.to_string()))?);
        c.insert((layout.k, layout.m), codec.clone());
        Ok(codec)
    }

    /// Fetches fragment `i` from its home node, or with `search` from the
    /// other nodes (repair may have moved it there).
    async fn fetch(&self, e: &Extent, i: usize, search: bool) -> Result<Vec<u8>, BadFragment> {
        let node = e.nodes[i];
        let candidates: Vec<u64> = if search {
            self.client
                .nodes()
                .into_iter()
                .filter(|n| *n != node)
                .collect()
        } else {
            vec![node]
        };
        if candidates.is_empty() {
            return Err(BadFragment {
                fragment: i as u8,
                node,
                reason: "no other node to search".into(),
                corrupt: false,
            });
        }
        let mut first_err: Option<BadFragment> = None;
        for (attempt, n) in candidates.into_iter().enumerate() {
            let r = self
                .client
                .read_fragment(n, e.segment, i as u8, e.stripe)
                .await;
            let bad = match r {
                Ok((data, _)) if format::checksum(&data) == e.checksums[i] => return Ok(data),
                Ok(_) => BadFragment {
                    fragment: i as u8,
                    node: n,
                    reason: "data does not match the extent's checksum".into(),
                    corrupt: true,
                },
                Err(ClientError::Store {
                    error: StoreError::Checksum { detail, .. },
                    ..
                }) => BadFragment {
                    fragment: i as u8,
                    node: n,
                    reason: format!("checksum mismatch on the server: {detail}"),
                    corrupt: true,
                },
                Err(err) => BadFragment {
                    fragment: i as u8,
                    node: n,
                    reason: err.to_string(),
                    corrupt: false,
                },
            };
            if attempt == 0 {
                first_err = Some(bad);
            }
        }
        Err(first_err.expect("at least one candidate"))
    }

    /// `len` file bytes at `offset` of a stripe without reading the whole:
    /// for plain bytes, the verified groups of the data fragments
    /// holding them; for framed compressed bytes (D49), those of the
    /// frames covering them, decompressed. An error when that is not
    /// possible (a data fragment missing or bad, a single zstd frame): the
    /// caller reads the whole stripe.
    pub async fn read_range(
        &self,
        e: &Extent,
        offset: u32,
        len: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let unreadable = |reason: String| unreadable(e, reason);
        if !e.reads_in_parts() {
            return Err(unreadable(
                "a stripe of one zstd frame is read whole".into(),
            ));
        }
        if e.frame_ends().is_none() {
            return self.read_stored_range(e, offset, len).await;
        }
        let span = e.frame_span(offset, len).ok_or_else(|| {
            unreadable(format!("range {offset}+{len} outside the stripe's frames"))
        })?;
        let stored = self
            .read_stored_range(e, span.stored.start, span.stored.end - span.stored.start)
            .await?;
        let data = match (&e.seal, &e.packing) {
            (Some(seal), _) => self.open(e, seal, &stored, span.frames)?,
            (None, Packing::Frames { ends }) => {
                crate::pack::unpack_frames(&stored, ends, span.frames, e.data_len as usize)
                    .map_err(|err| unreadable(err.to_string()))?
            }
            (None, _) => return Err(unreadable("frames of a plain stripe".into())),
        };
        let from = (offset - span.file_start) as usize;
        data.get(from..from + len as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| unreadable("frames shorter than the range".into()))
    }

    /// `len` stored bytes at `offset` of a stripe's stored form, from the
    /// verified groups of the data fragments holding them (fetched in
    /// parallel when the range crosses from one into the next).
    async fn read_stored_range(
        &self,
        e: &Extent,
        offset: u32,
        len: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let flen = e.fragment_len as u64;
        let (off, n) = (offset as u64, len as u64);
        let unreadable = |reason: String| unreadable(e, reason);
        if n == 0 || flen == 0 || off + n > e.stored_len() as u64 {
            return Err(unreadable(format!("range {off}+{n} outside the stripe")));
        }
        let first = off / flen;
        let last = (off + n - 1) / flen;
        if last >= e.layout.k as u64 {
            return Err(unreadable("range past the data fragments".into()));
        }
        // Each fragment's part of the range: (fragment, offset in it, len).
        let parts = (first..=last).map(|i| {
            let from = off.max(i * flen);
            let to = (off + n).min((i + 1) * flen);
            (i as usize, (from - i * flen) as u32, (to - from) as u32)
        });
        let got = join_all(parts.map(|(i, at, len)| self.read_fragment_part(e, i, at, len))).await;
        let mut out = Vec::with_capacity(n as usize);
        for part in got {
            out.extend_from_slice(&part?);
        }
        Ok(out)
    }

    /// `len` bytes at `at` of data fragment `i` of a stripe, from its
    /// verified groups.
    async fn read_fragment_part(
        &self,
        e: &Extent,
        i: usize,
        at: u32,
        len: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let flen = e.fragment_len as u64;
        let (at, n) = (at as u64, len as u64);
        let unreadable = |reason: String| unreadable(e, reason);
        if at + n > flen || i >= e.layout.k as usize || e.missing.contains(&(i as u8)) {
            return Err(unreadable(format!(
                "fragment {i} is not a durable data fragment"
            )));
        }
        let node = *e.nodes.get(i).ok_or_else(|| unreadable("no node".into()))?;
        let sum = e
            .checksums
            .get(i)
            .ok_or_else(|| unreadable("no checksum".into()))?;
        let (first, data, cvs) = self
            .client
            .read_fragment_range(node, e.segment, i as u8, e.stripe, at as u32, len)
            .await?;
        let from = first as u64 * proof::GROUP_BYTES as u64;
        if cvs.is_empty() {
            // A one-group fragment comes whole: its plain blake3.
            if first != 0 || data.len() as u64 != flen || format::checksum(&data) != *sum {
                return Err(unreadable("fragment does not match its checksum".into()));
            }
        } else {
            proof::verify_groups(sum, flen as usize, first as usize, &data, &cvs)
                .map_err(|err| unreadable(format!("fragment {i} on node {node}: {err}")))?;
        }
        if at < from || at + n > from + data.len() as u64 {
            return Err(unreadable("server sent groups that miss the range".into()));
        }
        let s = (at - from) as usize;
        Ok(data[s..s + n as usize].to_vec())
    }

    /// Reads one extent's data.
    pub async fn read(&self, e: &Extent) -> Result<ReadOutcome, ClientError> {
        let layout = e.layout;
        let k = layout.k as usize;
        let codec = self.codec(layout)?;
        let mut frags: Vec<Option<Vec<u8>>> = vec![None; layout.width()];
        let mut bad = Vec::new();
        // First the data fragments from their nodes, in parallel; then, if
        // some failed, the parity fragments; then moved fragments elsewhere.
        let mut have = 0;
        let stages: [(Vec<usize>, bool); 3] = [
            ((0..k).collect(), false),
            ((k..layout.width()).collect(), false),
            ((0..layout.width()).collect(), true),
        ];
        for (wanted, search) in stages {
            if have >= k {
                break;
            }
            let wanted: Vec<usize> = wanted.into_iter().filter(|i| frags[*i].is_none()).collect();
            for (i, r) in futures_join(self, e, wanted, search).await {
                match r {
                    Ok(d) => frags[i] = Some(d),
                    Err(b) if !search => bad.push(b),
                    Err(_) => {}
                }
            }
            have = frags.iter().filter(|f| f.is_some()).count();
        }
        for b in &bad {
            warn!(segment = %e.segment, stripe = e.stripe, fragment = b.fragment, node = b.node,
                corrupt = b.corrupt, "bad fragment: {}", b.reason);
        }
        if have < k {
            return Err(ClientError::Unreadable {
                segment: e.segment,
                stripe: e.stripe,
                reason: format!(
                    "{have} of {k} needed fragments readable: {}",
                    bad.iter()
                        .map(|b| format!(
                            "fragment {} on node {}: {}",
                            b.fragment, b.node, b.reason
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            });
        }
        let unreadable = |reason: String| unreadable(e, reason);
        let stored = codec
            .decode(frags, e.stored_len() as usize)
            .map_err(|err| unreadable(err.to_string()))?;
        let data = match &e.seal {
            Some(seal) => {
                let frames = e.frame_ends().map_or(0, |x| x.len());
                let data = self.open(e, seal, &stored, 0..frames)?;
                if data.len() != e.data_len as usize {
                    return Err(unreadable("sealed frames open to the wrong length".into()));
                }
                data
            }
            None => crate::pack::unpack(stored, &e.packing, e.data_len as usize)
                .map_err(|err| unreadable(err.to_string()))?,
        };
        Ok(ReadOutcome { data, bad })
    }
}

async fn futures_join(
    reader: &StripeReader,
    e: &Extent,
    wanted: Vec<usize>,
    search: bool,
) -> Vec<(usize, Result<Vec<u8>, BadFragment>)> {
    // All at once: each awaits its own network round trip.
    join_all(
        wanted
            .into_iter()
            .map(|i| async move { (i, reader.fetch(e, i, search).await) }),
    )
    .await
}

/// Extent `e` cannot be read (as asked) for `reason`.
fn unreadable(e: &Extent, reason: String) -> ClientError {
    ClientError::Unreadable {
        segment: e.segment,
        stripe: e.stripe,
        reason,
    }
}

/// Runs futures concurrently on the current task.
pub async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    futures::future::join_all(futs).await
}
