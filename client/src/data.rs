//! File data: stripes written to the segment store through a small pool of
//! [`StripeWriter`]s, read back through a cache of decoded stripes that
//! read-ahead fills.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::dedupe::{ChunkKey, KnownCuts, RecentChunks};
use crate::stats::{Cache, MountStats};
use crate::tenants::{TenantSeal, Tenants};
use cfs_proto::types::{Backing, ChunkId, Compression, Errno, ExtentRef};
use cfs_segments::client::{ClientError, Extent, SegmentClient, StripeReader, StripeWriter};
use cfs_segments::format::SegmentId;
use cfs_segments::layout::Layout;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{debug, warn};

/// Concurrent flushes (one stripe writer each).
const WRITERS: usize = 4;
/// A stripe writer idle this long seals its open segment.
pub const SEAL_IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);
/// Data bytes per fragment of a full stripe.
pub const FRAGMENT_BYTES: usize = 256 << 10;

type StripeKey = (SegmentId, u32);

/// Decoded stripes, least recently used out first.
struct StripeCache {
    map: HashMap<StripeKey, Arc<Vec<u8>>>,
    order: VecDeque<StripeKey>,
    bytes: usize,
    max_bytes: usize,
}

impl StripeCache {
    fn get(&mut self, k: &StripeKey) -> Option<Arc<Vec<u8>>> {
        let v = self.map.get(k)?.clone();
        if let Some(pos) = self.order.iter().position(|x| x == k) {
            self.order.remove(pos);
        }
        self.order.push_back(*k);
        Some(v)
    }
    /// Keeps `v`; returns how many stripes were dropped to make room.
    fn put(&mut self, k: StripeKey, v: Arc<Vec<u8>>) -> u64 {
        if self.map.contains_key(&k) {
            return 0;
        }
        let mut evicted = 0;
        self.bytes += v.len();
        self.map.insert(k, v);
        self.order.push_back(k);
        while self.bytes > self.max_bytes {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(v) = self.map.remove(&old) {
                self.bytes -= v.len();
                evicted += 1;
            }
        }
        evicted
    }
}

pub struct DataPath {
    client: Arc<SegmentClient>,
    layout: Layout,
    nodes: Vec<u64>,
    writers: Vec<AsyncMutex<Option<StripeWriter>>>,
    next_writer: AtomicUsize,
    reader: StripeReader,
    cache: Mutex<StripeCache>,
    /// Stripes being fetched, so concurrent readers share one fetch.
    fetching: AsyncMutex<HashMap<StripeKey, Arc<AsyncMutex<()>>>>,
    stats: Arc<MountStats>,
    chunk_key: ChunkKey,
    recent: Mutex<RecentChunks>,
    tenants: Arc<Tenants>,
    /// Failpoint `chunk-wrong-id` (`CFS_FAILPOINT`, tests only): this
    /// mount names every chunk it writes with a wrong id, as a faulty or
    /// hostile writer would, so that readers' refusal can be tested.
    lie_about_chunks: bool,
}

/// How a flush stores its bytes (the file's policy, else the mount's):
/// compressed or not, deduplicated or not, sealed with its tenant's key
/// or not (D49, D50, D51).
#[derive(Clone)]
pub struct Storing {
    pub packing: Compression,
    pub dedupe: bool,
    pub seal: Option<Arc<TenantSeal>>,
}

/// One content-defined chunk of a flush (D50).
#[derive(Clone, Debug)]
pub struct PlannedChunk {
    /// Index of the range it is cut from.
    pub range: usize,
    /// Its bytes within that range.
    pub bytes: std::ops::Range<usize>,
    pub id: ChunkId,
}

type WriterGuard<'a> = tokio::sync::MutexGuard<'a, Option<StripeWriter>>;

fn io_err(what: &str, e: impl std::fmt::Display) -> Errno {
    warn!("{what}: {e}");
    Errno::EIO
}

/// A failed stripe read: ENOKEY when this mount lacks the key of a sealed
/// stripe (D51), else EIO (a stripe that does not open with its key is
/// never served).
fn read_err(e: ClientError) -> Errno {
    match e {
        ClientError::Sealed {
            error: cfs_segments::seal::SealError::NoKey(_),
            ..
        } => {
            debug!("segment read: {e}");
            Errno::ENOKEY
        }
        e => io_err("segment read", e),
    }
}

/// A failed stripe write: ENOSPC when full devices caused it, else EIO.
fn write_err(e: ClientError) -> Errno {
    let full = matches!(e, ClientError::NotDurable { no_space: true, .. });
    warn!("segment write: {e}");
    if full {
        Errno::ENOSPC
    } else {
        Errno::EIO
    }
}

impl DataPath {
    pub fn new(
        cluster_id: &str,
        security: cfs_net::Security,
        servers: &[(u64, String)],
        cache_bytes: usize,
        stats: Arc<MountStats>,
        tenants: Arc<Tenants>,
    ) -> Result<Self, String> {
        let mut map = cfs_segments::proto::ServerMap::new();
        for (id, addr) in servers {
            let a = addr
                .parse()
                .map_err(|e| format!("segment server {addr}: {e}"))?;
            map.insert(*id, a);
        }
        if map.len() < 2 {
            return Err(format!(
                "need at least 2 segment servers, the cluster has {}",
                map.len()
            ));
        }
        let layout = Layout::for_cluster(map.len());
        let nodes: Vec<u64> = map.keys().copied().collect();
        let client = SegmentClient::new(cluster_id, map, security);
        Ok(DataPath {
            reader: StripeReader::with_keys(client.clone(), tenants.ring()),
            client,
            layout,
            nodes,
            writers: (0..WRITERS).map(|_| AsyncMutex::new(None)).collect(),
            next_writer: AtomicUsize::new(0),
            cache: Mutex::new(StripeCache {
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                max_bytes: cache_bytes,
            }),
            fetching: AsyncMutex::new(HashMap::new()),
            stats,
            chunk_key: ChunkKey::for_cluster(cluster_id),
            recent: Mutex::new(RecentChunks::default()),
            tenants,
            lie_about_chunks: std::env::var("CFS_FAILPOINT").is_ok_and(|f| f == "chunk-wrong-id"),
        })
    }

    /// Fragment placement of writer `w`: rotate over the nodes so that
    /// writers spread load when the cluster is wider than the layout.
    fn placement(&self, w: usize) -> Vec<u64> {
        let n = self.nodes.len();
        (0..self.layout.width())
            .map(|i| self.nodes[(w + i) % n])
            .collect()
    }

    /// A free stripe writer if there is one, else the next one in turn
    /// once free; made on first use.
    async fn writer(&self) -> Result<(WriterGuard<'_>, usize), Errno> {
        let start = self.next_writer.fetch_add(1, Ordering::Relaxed);
        let mut guard = None;
        for i in 0..WRITERS {
            if let Ok(g) = self.writers[(start + i) % WRITERS].try_lock() {
                guard = Some((g, (start + i) % WRITERS));
                break;
            }
        }
        let (mut g, w) = match guard {
            Some(x) => x,
            None => (self.writers[start % WRITERS].lock().await, start % WRITERS),
        };
        if g.is_none() {
            let sw = StripeWriter::new(
                self.client.clone(),
                self.layout,
                self.placement(w),
                FRAGMENT_BYTES,
            )
            .map_err(|e| io_err("stripe writer", e))?;
            *g = Some(sw);
        }
        Ok((g, w))
    }

    /// Writes `ranges` (file offset, bytes) durably; returns the extent
    /// references to commit, in file order; the stripes stored as `how`
    /// says (its dedupe aside).
    pub async fn write_ranges(
        &self,
        ranges: &[(u64, &[u8])],
        how: &Storing,
    ) -> Result<Vec<ExtentRef>, Errno> {
        let (mut g, _) = self.writer().await?;
        let sw = g.as_mut().ok_or(Errno::EIO)?;
        // The writer holds nothing between calls (each range is flushed).
        sw.set_compression(how.packing);
        sw.set_seal(how.seal.as_ref().map(|s| s.key.clone()));
        let mut out = Vec::new();
        for (off, data) in ranges {
            let written = match sw.write(data).await {
                Ok(mut exts) => sw.flush().await.map(|more| {
                    exts.extend(more);
                    exts
                }),
                Err(e) => Err(e),
            };
            let exts: Vec<Extent> = match written {
                Ok(x) => {
                    self.stats.written_back(data.len() as u64);
                    x
                }
                Err(e) => {
                    // The writer may still hold bytes or stripes of this
                    // range: start the next flush with a fresh one.
                    *g = None;
                    return Err(write_err(e));
                }
            };
            let mut at = *off;
            for e in exts {
                self.stats.segment_requests(e.layout.width() as u64);
                self.stats.stripe_written(&e);
                let len = e.data_len as u64;
                out.push(ExtentRef {
                    offset: at,
                    len,
                    skip: 0,
                    backing: Backing::Stripe(e),
                });
                at += len;
            }
        }
        Ok(out)
    }

    /// The stripe this mount lately wrote or referenced for chunk `id`.
    pub fn recent_chunk(&self, id: &ChunkId) -> Option<Extent> {
        self.recent
            .lock()
            .expect("recent chunks lock")
            .get(id)
            .cloned()
    }

    /// Largest chunk: one stripe's data.
    fn chunk_max(&self) -> usize {
        FRAGMENT_BYTES * self.layout.k as usize
    }

    /// What a background flush of `ranges` writes now and what it keeps
    /// buffered ([`crate::dedupe::hold_back`], chunks cut as
    /// [`DataPath::plan_chunks`] cuts them).
    pub fn hold_back(&self, ranges: &[(u64, &[u8])], hold_max: usize) -> crate::dedupe::Held {
        crate::dedupe::hold_back(ranges, self.chunk_max(), hold_max)
    }

    /// The content-defined chunks of `ranges`, each at most one stripe,
    /// with their ids (D50); a range `known` cuts (sorted by offset) is
    /// not cut again. Chunk ids are made with the tenant's chunk key when
    /// `how` seals (its dedupe domain, D51), else the cluster's.
    pub fn plan_chunks(
        &self,
        ranges: &[(u64, &[u8])],
        known: &[KnownCuts],
        how: &Storing,
    ) -> Vec<PlannedChunk> {
        let max = self.chunk_max();
        let key = how.seal.as_ref().map_or(&self.chunk_key, |s| &s.chunk_key);
        let mut out = Vec::new();
        for (i, (off, data)) in ranges.iter().enumerate() {
            let known = known
                .binary_search_by_key(off, |k| k.offset)
                .ok()
                .and_then(|at| known[at].of(*off, data));
            let cuts = match known {
                Some(c) => c.to_vec(),
                None => crate::dedupe::cut(data, max),
            };
            for r in cuts {
                let mut id = key.id(&data[r.clone()]);
                if self.lie_about_chunks {
                    id.0[0] ^= 1;
                }
                out.push(PlannedChunk {
                    range: i,
                    id,
                    bytes: r,
                });
            }
        }
        out
    }

    /// Writes the chunks of `plan` not `found` stored (one stripe each,
    /// named by its chunk id) and references those found; returns the
    /// extent references to commit, in file order. A `found` stripe that
    /// is not exactly the chunk asked for is ignored (the chunk is
    /// written).
    pub async fn write_chunks(
        &self,
        ranges: &[(u64, &[u8])],
        plan: &[PlannedChunk],
        found: &[Option<Extent>],
        how: &Storing,
    ) -> Result<Vec<ExtentRef>, Errno> {
        let (mut g, _) = self.writer().await?;
        let sw = g.as_mut().ok_or(Errno::EIO)?;
        sw.set_compression(how.packing);
        sw.set_seal(how.seal.as_ref().map(|s| s.key.clone()));
        let mut out: Vec<Option<ExtentRef>> = vec![None; plan.len()];
        // Chunks written, in order, waiting for their extents.
        let mut waiting: VecDeque<usize> = VecDeque::new();
        let mut written: Vec<Extent> = Vec::new();
        for (i, c) in plan.iter().enumerate() {
            let (off, data) = ranges[c.range];
            let bytes = &data[c.bytes.clone()];
            let offset = off + c.bytes.start as u64;
            let len = bytes.len() as u64;
            let same = found.get(i).and_then(Option::as_ref).filter(|x| {
                x.chunk == Some(c.id)
                    && u64::from(x.data_len) == len
                    && x.seal.is_some() == how.seal.is_some()
            });
            if let Some(x) = same {
                self.stats.chunk_flushed(true, len);
                out[i] = Some(ExtentRef {
                    offset,
                    len,
                    skip: 0,
                    backing: Backing::Stripe(x.clone()),
                });
                continue;
            }
            self.stats.chunk_flushed(false, len);
            waiting.push_back(i);
            match sw.write_stripe(bytes).await {
                Ok(done) => written.extend(done),
                Err(e) => {
                    *g = None;
                    return Err(write_err(e));
                }
            }
        }
        match sw.flush().await {
            Ok(done) => written.extend(done),
            Err(e) => {
                *g = None;
                return Err(write_err(e));
            }
        }
        if written.len() != waiting.len() {
            *g = None;
            warn!(
                written = written.len(),
                chunks = waiting.len(),
                "stripes and chunks disagree"
            );
            return Err(Errno::EIO);
        }
        for (mut e, i) in written.into_iter().zip(waiting) {
            let c = &plan[i];
            let (off, _) = ranges[c.range];
            self.stats.written_back(u64::from(e.data_len));
            self.stats.segment_requests(e.layout.width() as u64);
            self.stats.stripe_written(&e);
            e.chunk = Some(c.id);
            out[i] = Some(ExtentRef {
                offset: off + c.bytes.start as u64,
                len: u64::from(e.data_len),
                skip: 0,
                backing: Backing::Stripe(e),
            });
        }
        let mut recent = self.recent.lock().expect("recent chunks lock");
        for r in out.iter().flatten() {
            if let Backing::Stripe(e) = &r.backing {
                recent.remember(e);
            }
        }
        drop(recent);
        out.into_iter().map(|r| r.ok_or(Errno::EIO)).collect()
    }

    /// Seals the open segments of writers idle for `idle` (and drops
    /// those writers: the next flush starts a new segment), so that what
    /// an idle mount wrote can be freed once nothing references it. A
    /// writer in use is left alone.
    pub async fn seal_idle(&self, idle: std::time::Duration) {
        for w in &self.writers {
            let Ok(mut g) = w.try_lock() else {
                continue;
            };
            if g.as_ref().is_some_and(|sw| sw.idle_for() >= idle) {
                if let Some(sw) = g.take() {
                    if let Err(e) = sw.finish().await {
                        debug!("sealing an idle writer's segment: {e}");
                    }
                }
            }
        }
    }

    /// The decoded bytes of one stripe, from the cache or the servers.
    pub async fn stripe(&self, e: &Extent) -> Result<Arc<Vec<u8>>, Errno> {
        let key = (e.segment, e.stripe);
        if let Some(v) = self.cache.lock().expect("cache lock").get(&key) {
            self.stats.cache(Cache::Stripes, true);
            return Ok(v);
        }
        let gate = self
            .fetching
            .lock()
            .await
            .entry(key)
            .or_insert_with(|| Arc::new(AsyncMutex::new(())))
            .clone();
        let _g = gate.lock().await;
        if let Some(v) = self.cache.lock().expect("cache lock").get(&key) {
            self.stats.cache(Cache::Stripes, true);
            return Ok(v);
        }
        self.stats.cache(Cache::Stripes, false);
        self.stats.segment_requests(e.layout.k as u64);
        let r = match self.reader.read(e).await {
            Ok(r) => r,
            Err(err) => {
                self.fetching.lock().await.remove(&key);
                return Err(read_err(err));
            }
        };
        // A sealed chunk's id is made with its tenant's key (D51); the
        // seal itself already proved the bytes are what was written.
        let chunk_key = match &e.seal {
            Some(s) => self.tenants.chunk_key_of(s.key),
            None => Some(self.chunk_key.clone()),
        };
        if let (Some(id), Some(chunk_key)) = (e.chunk, chunk_key) {
            // A stripe written as a chunk is served only if its bytes are
            // the chunk (a writer that named the wrong id must not feed
            // other files the bytes it stored).
            if chunk_key.id(&r.data) != id {
                self.stats.chunk_mismatch();
                warn!(segment = %e.segment, stripe = e.stripe, chunk = %id,
                    "stripe bytes do not match the chunk id they were stored as: refused");
                self.fetching.lock().await.remove(&key);
                return Err(Errno::EIO);
            }
        }
        if !r.bad.is_empty() {
            self.stats.reconstruction();
            warn!(segment = %e.segment, stripe = e.stripe, bad = r.bad.len(), "stripe read around bad fragments");
        }
        let v = Arc::new(r.data);
        let evicted = self.cache.lock().expect("cache lock").put(key, v.clone());
        self.stats.evicted(Cache::Stripes, evicted);
        self.fetching.lock().await.remove(&key);
        Ok(v)
    }

    /// `len` bytes at `offset` of a stripe's data: from the cache if it is
    /// decoded there, else only the verified groups that cover them from
    /// the one fragment holding them, else (a fragment missing, bad or
    /// across two) the whole stripe, reconstructed.
    pub async fn read_range(
        &self,
        e: &Extent,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, Errno> {
        let key = (e.segment, e.stripe);
        let cached = self.cache.lock().expect("cache lock").get(&key);
        let whole = match cached {
            Some(v) => {
                self.stats.cache(Cache::Stripes, true);
                v
            }
            // A stripe of one zstd frame has no part readable alone.
            None if !e.reads_in_parts() => {
                self.stats.stripe_read(false);
                self.stripe(e).await?
            }
            None => {
                self.stats.segment_requests(1);
                match self.reader.read_range(e, offset as u32, len as u32).await {
                    Ok(d) => {
                        self.stats.stripe_read(true);
                        return Ok(d);
                    }
                    Err(
                        err @ ClientError::Sealed {
                            error: cfs_segments::seal::SealError::NoKey(_),
                            ..
                        },
                    ) => return Err(read_err(err)),
                    Err(err) => {
                        debug!(segment = %e.segment, stripe = e.stripe, "partial read, reading the stripe: {err}");
                        self.stats.stripe_read(false);
                        self.stripe(e).await?
                    }
                }
            }
        };
        whole
            .get(offset..offset + len)
            .map(<[u8]>::to_vec)
            .ok_or(Errno::EIO)
    }

    /// Whether a stripe is already decoded in the cache.
    pub fn cached(&self, e: &Extent) -> bool {
        self.cache
            .lock()
            .expect("cache lock")
            .map
            .contains_key(&(e.segment, e.stripe))
    }
}
