//! The metadata service's and the namespace materializer's metric families
//! (docs/metrics.md). Counters and histograms are updated on the request
//! and apply paths; positions, lag and inode counts are set by
//! [`MetaMetrics::refresh`] just before a scrape.

use cfs_log::{Position, ShardId};
use cfs_metrics::{self as m, Histogram, IntCounter, IntGauge, IntGaugeVec};

/// The materializer label of the namespace materializer.
pub const NAMESPACE: &str = "namespace";

/// The `kind` label of `claudefs_meta_request_duration_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Mutation,
    Lease,
}

impl RequestKind {
    const ALL: [RequestKind; 3] = [RequestKind::Read, RequestKind::Mutation, RequestKind::Lease];

    pub fn name(self) -> &'static str {
        match self {
            RequestKind::Read => "read",
            RequestKind::Mutation => "mutation",
            RequestKind::Lease => "lease",
        }
    }
}

/// One unit of a gauge held while it lives (an open session), released
/// however its holder ends (a cancelled task included).
pub struct Held(IntGauge);

impl Held {
    pub fn new(g: &IntGauge) -> Held {
        g.inc();
        Held(g.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct MetaMetrics {
    pub registry: m::Registry,
    pub mutations: IntCounter,
    pub reads: IntCounter,
    pub barriers: IntCounter,
    pub reads_held: IntCounter,
    pub errors: IntCounter,
    pub sessions: IntCounter,
    pub sessions_open: IntGauge,
    pub leases_granted: IntCounter,
    pub clean_waits: IntCounter,
    pub sequenced: IntCounter,
    pub early: IntCounter,
    pub mispredicted: IntCounter,
    pub finishes_early: IntCounter,
    pub holds_broken: IntCounter,
    pub clients_forgotten: IntCounter,
    pub lease_refusals: IntCounter,
    /// Chunk ids mounts asked for (inline dedupe) and those found stored.
    pub chunks_asked: IntCounter,
    pub chunks_found: IntCounter,
    /// Request received → answer queued, per [`RequestKind`] (children
    /// made once: no label lookup per request).
    request_seconds: Vec<Histogram>,
    /// One batch applied by the namespace materializer.
    pub apply_seconds: Histogram,
    applied: IntGaugeVec,
    lag: IntGaugeVec,
    failed: IntGaugeVec,
    inodes: IntGauge,
    /// Held from `refresh` through encoding (concurrent scrapes).
    pub scrape: std::sync::Mutex<()>,
}

impl Default for MetaMetrics {
    fn default() -> Self {
        Self::families()
    }
}

impl MetaMetrics {
    fn families() -> Self {
        let r = m::Registry::new();
        let c = |name: &str, help: &str| m::counter(&r, name, help);
        MetaMetrics {
            mutations: c("claudefs_meta_mutations_total", "Namespace mutations proposed."),
            reads: c("claudefs_meta_reads_total", "Namespace reads served."),
            barriers: c(
                "claudefs_meta_barriers_total",
                "Read barriers passed for fresh reads.",
            ),
            chunks_asked: c(
                "claudefs_meta_chunks_asked_total",
                "Chunk ids mounts looked up before writing (inline dedupe).",
            ),
            chunks_found: c(
                "claudefs_meta_chunks_found_total",
                "Chunk ids looked up that the cluster already stored (dedupe hits).",
            ),
            reads_held: c(
                "claudefs_meta_reads_held_total",
                "Reads on a leader held until other clients' early-answered changes were decided.",
            ),
            errors: c(
                "claudefs_meta_errors_total",
                "Requests answered with an I/O error.",
            ),
            sessions: c("claudefs_meta_sessions_total", "Client sessions accepted."),
            sessions_open: m::gauge(
                &r,
                "claudefs_meta_sessions",
                "Mount sessions connected now.",
            ),
            leases_granted: c(
                "claudefs_meta_leases_granted_total",
                "Shard leases granted or renewed to client sessions.",
            ),
            clean_waits: c(
                "claudefs_meta_clean_waits_total",
                "Mutations that waited for leased sessions to apply invalidations.",
            ),
            sequenced: c(
                "claudefs_meta_sequenced_total",
                "Mutations ordered and predicted by this node's sequencer (D30).",
            ),
            early: c(
                "claudefs_meta_early_answers_total",
                "Mutations answered before their entry was decided.",
            ),
            mispredicted: c(
                "claudefs_meta_mispredicted_total",
                "Sequenced mutations whose decided outcome differed from the prediction.",
            ),
            finishes_early: c(
                "claudefs_meta_tx_finishes_early_total",
                "Cross-shard finish steps answered once ordered, before they were decided (D37).",
            ),
            holds_broken: c(
                "claudefs_meta_holds_broken_total",
                "Lapsed mount holds this node broke (locks and orphans of vanished mounts released).",
            ),
            clients_forgotten: c(
                "claudefs_meta_idle_clients_forgotten_total",
                "Entries this node proposed that forgot idle clients' outcome tables.",
            ),
            lease_refusals: c(
                "claudefs_meta_lease_refusals_total",
                "Lease renewals refused because the session's invalidation acknowledgements lagged (D29).",
            ),
            request_seconds: {
                let v = m::histogram_vec(
                    &r,
                    "claudefs_meta_request_duration_seconds",
                    "Time from a metadata request's arrival to its answer queued, by kind.",
                    &["kind"],
                    m::LATENCY_BUCKETS,
                );
                RequestKind::ALL
                    .iter()
                    .map(|k| v.with_label_values(&[k.name()]))
                    .collect()
            },
            apply_seconds: m::histogram_vec(
                &r,
                "claudefs_materializer_apply_duration_seconds",
                "Time to apply one batch of decided entries (the RocksDB write included).",
                &["materializer"],
                m::LATENCY_BUCKETS,
            )
            .with_label_values(&[NAMESPACE]),
            applied: m::gauge_vec(
                &r,
                "claudefs_materializer_applied_position",
                "One past the last log entry the materializer applied.",
                &["materializer", "shard"],
            ),
            lag: m::gauge_vec(
                &r,
                "claudefs_materializer_lag_entries",
                "Entries decided on this node and not yet applied by the materializer.",
                &["materializer", "shard"],
            ),
            failed: m::gauge_vec(
                &r,
                "claudefs_materializer_failed",
                "1 once the materializer stopped on an error (the node's replicas stop too).",
                &["materializer"],
            ),
            inodes: m::gauge(
                &r,
                "claudefs_namespace_inodes",
                "Inode numbers handed out by this node's namespace replica, every shard (statfs's files).",
            ),
            registry: r,
            scrape: std::sync::Mutex::new(()),
        }
    }
}

impl MetaMetrics {
    /// A request of `kind` answered `seconds` after it arrived.
    pub fn served(&self, kind: RequestKind, seconds: f64) {
        self.request_seconds[kind as usize].observe(seconds);
    }

    /// Sets the gauges: per shard the applied and decided positions.
    pub fn refresh(
        &self,
        shards: &[(ShardId, Position, Position)],
        failed: bool,
        inodes: Option<u64>,
    ) {
        for (shard, applied, decided) in shards {
            let s = shard.to_string();
            let l = [NAMESPACE, s.as_str()];
            self.applied
                .with_label_values(&l)
                .set(m::to_i64(applied.get()));
            self.lag
                .with_label_values(&l)
                .set(m::to_i64(decided.get().saturating_sub(applied.get())));
        }
        self.failed
            .with_label_values(&[NAMESPACE])
            .set(failed as i64);
        if let Some(n) = inodes {
            self.inodes.set(m::to_i64(n));
        }
    }
}
