//! The garbage collector of segments (docs/decisions.md D48).
//!
//! Every node with a metadata service and segment servers to reach runs
//! one. A pass:
//! 1. lists every segment server's fragments; a segment is a candidate
//!    once each of its listed fragments is sealed and it has been seen
//!    so for the grace period;
//! 2. reads each shard's counts from this node's namespace (every node
//!    materializes every shard): a candidate no shard references is
//!    fenced on the shards this node leads (one `FenceSegments` entry per
//!    shard; the leaders of the other shards do theirs). A fence that
//!    finds a reference is simply not set;
//! 3. a segment fenced on every shard is freed on every segment server
//!    that lists it, by the node leading the first shard (`Free` is
//!    idempotent: a crash between the fences and the frees, or a server
//!    that was down, is finished by a later pass);
//! 4. a segment that is fenced somewhere but referenced again (a fence
//!    raced with a reference the local view had not applied yet) has its
//!    fences lifted on the shards this node leads.
//!
//! Nothing referenced is freed: once a shard's fence is decided, no entry
//! after it can make that shard reference the segment (its writes fail
//! with FREED_DATA and the writer writes the bytes again), and a fence is
//! set only where the count is zero at its place in the log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cfs_materializers::segment_use;
use cfs_materializers::types::SegmentId;
use cfs_meta::MetaService;
use cfs_segments::client::SegmentClient;
use cfs_segments::proto::{Request, Response};
use tracing::{debug, info, warn, Instrument};

/// Segments fenced per pass (one entry per shard carries up to
/// `cfs_proto::ops::FENCE_SEGMENTS_MAX` of them).
pub const FENCES_PER_PASS: usize = 1024;
/// A referenced sealed segment whose live bytes are below this share of
/// its data is compacted (its live extents copied to new stripes).
pub const COMPACT_LIVE_BELOW: f64 = 0.5;
/// While the store's dead data is more than [`DEAD_SHARE_MAX`] of its
/// live data, segments up to this live share are compacted too (least
/// live first), so that space comes back to within that share of what
/// is live (each byte reclaimed then costs up to 9 copied).
pub const COMPACT_LIVE_BELOW_WHEN_WASTEFUL: f64 = 0.9;
pub const DEAD_SHARE_MAX: f64 = 0.1;
/// Segments freed per pass.
pub const FREES_PER_PASS: usize = 1024;
/// Sealed segments whose first sighting is remembered (for the grace
/// period); beyond it the oldest sightings are dropped and start again.
pub const SIGHTINGS_MAX: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct GcConfig {
    pub interval: Duration,
    pub grace: Duration,
}

/// What one pass saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Segments listed by the servers that answered.
    pub segments: usize,
    pub sealed: usize,
    /// Sealed segments some shard's extents reference.
    pub referenced: usize,
    /// Fragment bytes listed, and the file bytes the extents map.
    pub fragment_bytes: u64,
    pub live_bytes: u64,
    pub fenced: usize,
    pub freed: usize,
    pub freed_bytes: u64,
    pub unfenced: usize,
    /// Mostly-dead segments whose live extents this pass copied away, and
    /// the file bytes copied.
    pub compacted: usize,
    pub compacted_bytes: u64,
    /// File bytes moved from older keys to their tenant's newest (D51).
    pub reencrypted_bytes: u64,
    /// Fragments sealed by the collector (their writer sealed the others).
    pub sealed_here: usize,
    /// Segment servers that did not answer the listing.
    pub unreachable: usize,
}

pub struct Gc {
    meta: MetaService,
    segments: Arc<SegmentClient>,
    cfg: GcConfig,
    sightings: tokio::sync::Mutex<HashMap<SegmentId, Instant>>,
    metrics: Metrics,
}

struct Metrics {
    reg: cfs_metrics::Registry,
    passes: cfs_metrics::IntCounterVec,
    freed: cfs_metrics::IntCounter,
    freed_bytes: cfs_metrics::IntCounter,
    fenced: cfs_metrics::IntCounter,
    compacted: cfs_metrics::IntCounter,
    compacted_bytes: cfs_metrics::IntCounter,
    reencrypted_bytes: cfs_metrics::IntCounter,
    reencrypt_left: cfs_metrics::IntGaugeVec,
    unfenced: cfs_metrics::IntCounter,
    fragment_bytes: cfs_metrics::IntGauge,
    live_bytes: cfs_metrics::IntGauge,
    capacity: cfs_metrics::IntGauge,
    free: cfs_metrics::IntGauge,
    segments: cfs_metrics::IntGaugeVec,
}

impl Metrics {
    fn new() -> Metrics {
        let reg = cfs_metrics::Registry::new();
        Metrics {
            passes: cfs_metrics::counter_vec(
                &reg,
                "claudefs_gc_passes_total",
                "Garbage collection passes of this node, by result (ok, failed).",
                &["result"],
            ),
            freed: cfs_metrics::counter(
                &reg,
                "claudefs_gc_segments_freed_total",
                "Segments this node freed on the segment servers (every shard had fenced them).",
            ),
            freed_bytes: cfs_metrics::counter(
                &reg,
                "claudefs_gc_freed_bytes_total",
                "Fragment bytes (data and parity) of the segments this node freed.",
            ),
            fenced: cfs_metrics::counter(
                &reg,
                "claudefs_gc_segments_fenced_total",
                "Segment fences set on the shards this node leads.",
            ),
            compacted: cfs_metrics::counter(
                &reg,
                "claudefs_gc_segments_compacted_total",
                "Mostly-dead sealed segments whose live extents this node copied to new stripes.",
            ),
            compacted_bytes: cfs_metrics::counter(
                &reg,
                "claudefs_gc_compacted_bytes_total",
                "File bytes compaction copied.",
            ),
            reencrypted_bytes: cfs_metrics::counter(
                &reg,
                "claudefs_gc_reencrypted_bytes_total",
                "File bytes re-encryption moved from older keys to their tenant's newest (D51).",
            ),
            reencrypt_left: cfs_metrics::gauge_vec(
                &reg,
                "claudefs_gc_reencrypt_left_bytes",
                "File bytes of a rotated tenant still sealed with older keys, at this node's last pass.",
                &["tenant"],
            ),
            unfenced: cfs_metrics::counter(
                &reg,
                "claudefs_gc_segments_unfenced_total",
                "Segment fences lifted because the segment was referenced again.",
            ),
            fragment_bytes: cfs_metrics::gauge(
                &reg,
                "claudefs_store_fragment_bytes",
                "Fragment bytes (data and parity) the segment servers held at the last pass.",
            ),
            live_bytes: cfs_metrics::gauge(
                &reg,
                "claudefs_store_live_bytes",
                "Stored bytes (compressed where the stripe is, before erasure coding) the namespace's extents keep in segments at the last pass.",
            ),
            capacity: cfs_metrics::gauge(
                &reg,
                "claudefs_store_capacity_bytes",
                "Bytes of the segment servers' devices, all servers (before erasure coding's share).",
            ),
            free: cfs_metrics::gauge(
                &reg,
                "claudefs_store_free_bytes",
                "Free bytes on the segment servers' devices, all servers.",
            ),
            segments: cfs_metrics::gauge_vec(
                &reg,
                "claudefs_gc_segments",
                "Segments at the last pass, by state (open, sealed, referenced, fenced).",
                &["state"],
            ),
            reg,
        }
    }
}

impl Gc {
    /// Starts the collector's loop (every `cfg.interval`).
    pub fn start(meta: MetaService, segments: Arc<SegmentClient>, cfg: GcConfig) -> Arc<Gc> {
        let gc = Arc::new(Gc {
            meta,
            segments,
            cfg,
            sightings: tokio::sync::Mutex::new(HashMap::new()),
            metrics: Metrics::new(),
        });
        let g = gc.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(g.cfg.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match g.pass().instrument(tracing::info_span!("gc")).await {
                    Ok(r) => {
                        g.metrics.passes.with_label_values(&["ok"]).inc();
                        if r.fenced + r.freed + r.unfenced + r.compacted > 0 {
                            info!(
                                fenced = r.fenced,
                                compacted = r.compacted,
                                freed = r.freed,
                                freed_bytes = r.freed_bytes,
                                unfenced = r.unfenced,
                                "garbage collection pass"
                            );
                        }
                    }
                    Err(e) => {
                        g.metrics.passes.with_label_values(&["failed"]).inc();
                        warn!("garbage collection pass: {e:#}");
                    }
                }
            }
        });
        gc
    }

    pub fn metrics_text(&self) -> String {
        cfs_metrics::render(&self.metrics.reg)
    }

    /// One pass (see the module's documentation).
    pub async fn pass(&self) -> anyhow::Result<PassReport> {
        let mut r = PassReport::default();
        self.measure_space().await;
        let listed = self.list(&mut r).await;
        let (db, _) = self.meta.namespace();
        let shards = self.meta.shards();
        let (uses, fences) = tokio::task::spawn_blocking(move || {
            Ok::<_, cfs_materializers::store::DbError>((
                segment_use::kept(&db)?,
                segment_use::fences(&db)?,
            ))
        })
        .await??;
        let mut referenced: BTreeSet<SegmentId> = BTreeSet::new();
        let mut live: HashMap<SegmentId, u64> = HashMap::new();
        for ((_, segment), u) in &uses {
            referenced.insert(*segment);
            r.live_bytes += u.bytes;
            *live.entry(*segment).or_default() += u.bytes;
        }
        let layout = cfs_segments::layout::Layout::for_cluster(self.segments.nodes().len());
        let data_share = |b: u64| b * layout.k as u64 / layout.width().max(1) as u64;
        let mut to_compact: Vec<(f64, SegmentId)> = Vec::new();
        let stored_data: u64 = listed.values().map(|l| data_share(l.bytes)).sum();
        let wasteful =
            stored_data.saturating_sub(r.live_bytes) as f64 > DEAD_SHARE_MAX * r.live_bytes as f64;
        let compact_below = if wasteful {
            COMPACT_LIVE_BELOW_WHEN_WASTEFUL
        } else {
            COMPACT_LIVE_BELOW
        };
        let now = Instant::now();
        let mut sightings = self.sightings.lock().await;
        sightings.retain(|s, _| listed.get(s).is_some_and(|l| l.sealed));
        let (mut to_fence, mut to_free, mut to_unfence) = (Vec::new(), Vec::new(), Vec::new());
        let mut open = 0usize;
        let mut to_seal = Vec::new();
        for (segment, l) in &listed {
            r.fragment_bytes += l.bytes;
            if !l.sealed {
                open += 1;
                // A writer seals its segment's fragments only when done
                // with it; one it could not reach then (down, restarting)
                // is sealed here.
                if l.sealed_any && to_seal.len() < FREES_PER_PASS {
                    to_seal.push(*segment);
                }
                continue;
            }
            r.sealed += 1;
            let fenced_on = fences.get(segment).map(Vec::as_slice).unwrap_or(&[]);
            if referenced.contains(segment) {
                r.referenced += 1;
                if !fenced_on.is_empty() {
                    to_unfence.push(*segment);
                } else {
                    let data = data_share(l.bytes).max(1);
                    let share = live.get(segment).copied().unwrap_or(0) as f64 / data as f64;
                    if share < compact_below {
                        to_compact.push((share, *segment));
                    }
                }
                continue;
            }
            if shards.iter().all(|s| fenced_on.contains(s)) {
                if to_free.len() < FREES_PER_PASS {
                    to_free.push(*segment);
                }
                continue;
            }
            if sightings.len() < SIGHTINGS_MAX || sightings.contains_key(segment) {
                let first = *sightings.entry(*segment).or_insert(now);
                if now.duration_since(first) >= self.cfg.grace && to_fence.len() < FENCES_PER_PASS {
                    to_fence.push(*segment);
                }
            }
        }
        drop(sightings);
        for segment in to_seal {
            for &(node, fragment) in &listed[&segment].open {
                match self
                    .segments
                    .call(node, Request::Seal { segment, fragment })
                    .await
                {
                    Ok(_) => {
                        r.sealed_here += 1;
                        debug!(%segment, node, fragment, "sealed a fragment its writer left open");
                    }
                    Err(e) => debug!(%segment, node, fragment, "sealing: {e}"),
                }
            }
        }
        self.metrics.fragment_bytes.set(gauge(r.fragment_bytes));
        self.metrics.live_bytes.set(gauge(r.live_bytes));
        for (state, n) in [
            ("open", open),
            ("sealed", r.sealed),
            ("referenced", r.referenced),
            ("fenced", fences.len()),
        ] {
            self.metrics
                .segments
                .with_label_values(&[state])
                .set(gauge(n as u64));
        }
        if !to_unfence.is_empty() {
            for (shard, res) in self.meta.fence_segments(&shards, &to_unfence, false).await {
                match res {
                    // Counted once per segment and shard whose fence went.
                    Ok(()) => {
                        let n = to_unfence
                            .iter()
                            .filter(|s| fences.get(s).is_some_and(|on| on.contains(&shard)))
                            .count();
                        r.unfenced += n;
                        self.metrics.unfenced.inc_by(n as u64);
                    }
                    Err(e) => warn!(shard = %shard, "lifting segment fences: {e}"),
                }
            }
        }
        if !to_fence.is_empty() {
            for (shard, res) in self.meta.fence_segments(&shards, &to_fence, true).await {
                if let Err(e) = res {
                    warn!(shard = %shard, "fencing segments: {e}");
                }
            }
            // What the entries fenced (a referenced segment stays unfenced).
            let (db, _) = self.meta.namespace();
            let after = tokio::task::spawn_blocking(move || segment_use::fences(&db)).await??;
            let n: usize = to_fence
                .iter()
                .map(|s| after.get(s).map_or(0, |on| on.len()))
                .sum::<usize>()
                .saturating_sub(
                    to_fence
                        .iter()
                        .map(|s| fences.get(s).map_or(0, |on| on.len()))
                        .sum::<usize>(),
                );
            r.fenced = n;
            self.metrics.fenced.inc_by(n as u64);
        }
        if shards.first().is_some_and(|s| self.meta.leads(*s)) {
            for segment in to_free {
                let l = &listed[&segment];
                match self.free(segment, &l.holders).await {
                    Ok(()) => {
                        r.freed += 1;
                        r.freed_bytes += l.bytes;
                        self.metrics.freed.inc();
                        self.metrics.freed_bytes.inc_by(l.bytes);
                    }
                    Err(e) => warn!(%segment, "freeing: {e:#}"),
                }
            }
        }
        let leads_first = shards.first().is_some_and(|s| self.meta.leads(*s));
        // The tenants' keys, for sealed stripes compaction copies and for
        // re-encryption (D51). Without them only unsealed stripes move.
        let keys = if leads_first {
            crate::compact::NodeKeys::load(&self.meta)
                .await
                .unwrap_or_else(|e| {
                    warn!("{e:#}: sealed stripes are neither compacted nor re-encrypted");
                    crate::compact::NodeKeys::default()
                })
        } else {
            crate::compact::NodeKeys::default()
        };
        if leads_first && !to_compact.is_empty() {
            to_compact.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut budget = crate::compact::COMPACT_BYTES_PER_PASS;
            for (_, segment) in to_compact {
                let need = live.get(&segment).copied().unwrap_or(0);
                if need > budget {
                    break;
                }
                budget -= need;
                match crate::compact::compact(&self.meta, &self.segments, &keys, &shards, segment)
                    .await
                {
                    Ok(c) if c.extents == 0 => {}
                    Ok(c) => {
                        r.compacted += 1;
                        r.compacted_bytes += c.bytes;
                        self.metrics.compacted.inc();
                        self.metrics.compacted_bytes.inc_by(c.bytes);
                        // Readers that looked up the old extents before
                        // the move get the grace period to finish.
                        self.sightings.lock().await.insert(segment, Instant::now());
                    }
                    Err(e) => warn!(%segment, "compacting: {e:#}"),
                }
            }
        }
        if leads_first {
            match crate::reencrypt::pass(&self.meta, &self.segments, &keys).await {
                Ok(d) => {
                    r.reencrypted_bytes = d.moved_bytes;
                    self.metrics.reencrypted_bytes.inc_by(d.moved_bytes);
                    for (tenant, left) in &d.left {
                        self.metrics
                            .reencrypt_left
                            .with_label_values(&[tenant])
                            .set(gauge(*left));
                    }
                }
                Err(e) => warn!("re-encrypting: {e:#}"),
            }
        }
        debug!(?r, "gc pass");
        Ok(r)
    }

    /// Tells the metadata service the store's capacity and free space
    /// in bytes of file data (statfs): every server's device, times the
    /// layout's data share (k of k + m fragments). Only when every server
    /// answered.
    async fn measure_space(&self) {
        let nodes = self.segments.nodes();
        let layout = cfs_segments::layout::Layout::for_cluster(nodes.len());
        let (mut total, mut free) = (0u64, 0u64);
        for node in nodes {
            match self.segments.stat(node).await {
                Ok(s) => {
                    total += s.total_bytes;
                    free += s.free_bytes;
                }
                Err(e) => {
                    debug!(node, "stat: {e}");
                    return;
                }
            }
        }
        let share = |b: u64| (b as u128 * layout.k as u128 / layout.width().max(1) as u128) as u64;
        self.meta.set_store_space(share(total), share(free));
        self.metrics.capacity.set(gauge(total));
        self.metrics.free.set(gauge(free));
    }

    /// Every answering server's fragments, by segment.
    async fn list(&self, r: &mut PassReport) -> BTreeMap<SegmentId, Listed> {
        let mut out: BTreeMap<SegmentId, Listed> = BTreeMap::new();
        for node in self.segments.nodes() {
            match self.segments.list(node).await {
                Ok(frags) => {
                    for f in frags {
                        let l = out.entry(f.key.segment).or_insert(Listed {
                            sealed: true,
                            sealed_any: false,
                            open: Vec::new(),
                            bytes: 0,
                            holders: Vec::new(),
                        });
                        l.sealed &= f.sealed;
                        l.sealed_any |= f.sealed;
                        if !f.sealed {
                            l.open.push((node, f.key.fragment));
                        }
                        l.bytes += f.bytes;
                        if !l.holders.contains(&node) {
                            l.holders.push(node);
                        }
                    }
                }
                Err(e) => {
                    r.unreachable += 1;
                    debug!(node, "listing fragments: {e}");
                }
            }
        }
        r.segments = out.len();
        out
    }

    /// Frees `segment` on every server in `holders`.
    async fn free(&self, segment: SegmentId, holders: &[u64]) -> anyhow::Result<()> {
        for &node in holders {
            match self.segments.call(node, Request::Free { segment }).await? {
                Response::Freed { fragments } => {
                    debug!(%segment, node, fragments, "freed");
                }
                other => anyhow::bail!("node {node} answered Free with {other:?}"),
            }
        }
        Ok(())
    }
}

/// One segment as the servers list it.
struct Listed {
    /// Every listed fragment is sealed.
    sealed: bool,
    /// Some fragment is sealed: its writer is done with the segment.
    sealed_any: bool,
    /// Fragments still open: (node, fragment index).
    open: Vec<(u64, u8)>,
    bytes: u64,
    holders: Vec<u64>,
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
