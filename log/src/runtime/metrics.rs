//! The log's metric families (docs/metrics.md). Counters and histograms
//! are updated on the request and shard-thread paths; gauges describing
//! state (positions, leadership, peers) are set by [`LogMetrics::refresh`]
//! just before a scrape encodes the registry.

use cfs_metrics::{self as m, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use crate::ShardId;

/// Per-shard counters, cloned into the shard's thread.
#[derive(Clone)]
pub struct ShardCounters {
    pub proposals: IntCounter,
    pub decided_entries: IntCounter,
    pub batches: IntCounter,
    pub inbox_full: IntCounter,
    /// Elections this node started to lead every shard (`affinity`).
    pub campaigns: IntCounter,
    pub leader_changes: IntCounter,
    /// Shared by every shard: inputs per batch.
    pub batch_entries: Histogram,
}

/// What one shard reports at a scrape.
pub(super) struct ShardGauges {
    pub decided: u64,
    pub trimmed: u64,
    pub is_leader: bool,
    pub ballot: u32,
    pub failed: bool,
}

/// What the node reports at a scrape, beside its shards.
pub(super) struct NodeGauges {
    pub wal: crate::wal::WalStats,
    /// Free bytes of the WAL's file system, once read (`None` before the
    /// first reading or while it fails: the family then has no series).
    pub disk_free: Option<u64>,
    /// The WAL's directory (the `path` label).
    pub wal_dir: String,
    pub peers: usize,
    pub peers_connected: usize,
    pub sent: u64,
    pub dropped: u64,
    pub reconnects: u64,
    pub rejected_connections: u64,
}

pub(super) struct LogMetrics {
    pub registry: m::Registry,
    /// Held from `refresh` through encoding: concurrent scrapes would
    /// otherwise both `advance` the same counters.
    pub scrape: std::sync::Mutex<()>,
    proposals: IntCounterVec,
    decided_entries: IntCounterVec,
    batches: IntCounterVec,
    inbox_full: IntCounterVec,
    campaigns: IntCounterVec,
    leader_changes: IntCounterVec,
    decided_position: IntGaugeVec,
    trimmed_position: IntGaugeVec,
    entries: IntGaugeVec,
    is_leader: IntGaugeVec,
    ballot: IntGaugeVec,
    failed: IntGaugeVec,
    /// Inputs handled per shard batch.
    pub batch_entries: Histogram,
    /// Proposal accepted by this node's API → decided.
    pub commit: Histogram,
    wal_syncs: IntCounter,
    wal_bytes: IntCounter,
    wal_recycled: IntCounter,
    wal_zero_filled: IntCounter,
    disk_free: IntGaugeVec,
    peers: IntGauge,
    peers_connected: IntGauge,
    sent: IntCounter,
    dropped: IntCounter,
    reconnects: IntCounter,
    rejected: IntCounter,
}

impl LogMetrics {
    /// The families, with the WAL's flush histogram registered beside them.
    pub fn new(wal_flush: Histogram) -> Self {
        let r = m::Registry::new();
        let shard_counter = |name: &str, help: &str| m::counter_vec(&r, name, help, &["shard"]);
        let shard_gauge = |name: &str, help: &str| m::gauge_vec(&r, name, help, &["shard"]);
        let me = LogMetrics {
            proposals: shard_counter(
                "claudefs_log_proposals_total",
                "Proposals submitted through this node.",
            ),
            decided_entries: shard_counter(
                "claudefs_log_decided_entries_total",
                "Entries this replica learned were decided.",
            ),
            batches: shard_counter(
                "claudefs_log_batches_total",
                "Input batches of the shard's thread (one fdatasync at most each).",
            ),
            inbox_full: shard_counter(
                "claudefs_log_inbox_full_total",
                "Inputs refused because the shard's inbox was full.",
            ),
            campaigns: shard_counter(
                "claudefs_log_leader_campaigns_total",
                "Elections this node started so that one node leads every shard.",
            ),
            leader_changes: shard_counter(
                "claudefs_log_leader_changes_total",
                "Times this replica saw the shard's leader change.",
            ),
            decided_position: shard_gauge(
                "claudefs_log_decided_position",
                "One past the last decided position.",
            ),
            trimmed_position: shard_gauge(
                "claudefs_log_trimmed_position",
                "First position this replica still holds; everything below is trimmed.",
            ),
            entries: shard_gauge(
                "claudefs_log_entries",
                "Entries this replica holds (decided minus trimmed).",
            ),
            is_leader: shard_gauge("claudefs_log_is_leader", "1 if this node leads the shard."),
            ballot: shard_gauge(
                "claudefs_log_ballot",
                "Round of the ballot this replica promised; rises with every leadership term.",
            ),
            failed: shard_gauge(
                "claudefs_log_shard_failed",
                "1 if this replica stopped on a storage error.",
            ),
            batch_entries: m::histogram(
                &r,
                "claudefs_log_batch_entries",
                "Inputs (proposals, messages, reads) handled per batch of a shard's thread.",
                m::COUNT_BUCKETS,
            ),
            commit: m::histogram(
                &r,
                "claudefs_log_commit_duration_seconds",
                "Time from a proposal made through this node's API to its answer (decided, refused or timed out).",
                m::LATENCY_BUCKETS,
            ),
            wal_syncs: m::counter(
                &r,
                "claudefs_log_wal_syncs_total",
                "fdatasync calls of the node's WAL (one covers every shard's batch).",
            ),
            wal_bytes: m::counter(
                &r,
                "claudefs_log_wal_written_bytes_total",
                "Bytes written to the node's WAL.",
            ),
            wal_recycled: m::counter(
                &r,
                "claudefs_log_wal_segments_recycled_total",
                "WAL segments started in a trimmed segment's file (no zero-fill).",
            ),
            wal_zero_filled: m::counter(
                &r,
                "claudefs_log_wal_segments_zero_filled_total",
                "WAL segments started in a zero-filled file (no trimmed one to reuse).",
            ),
            disk_free: m::gauge_vec(
                &r,
                "claudefs_log_disk_free_bytes",
                "Free bytes on the file system of the node's WAL (no series until first read).",
                &["path"],
            ),
            peers: m::gauge(&r, "claudefs_log_peers", "Other members configured."),
            peers_connected: m::gauge(
                &r,
                "claudefs_log_peers_connected",
                "Other members heard from recently (within the quorum silence limit).",
            ),
            sent: m::counter(
                &r,
                "claudefs_log_peer_messages_sent_total",
                "Messages queued to peers.",
            ),
            dropped: m::counter(
                &r,
                "claudefs_log_peer_messages_dropped_total",
                "Messages to peers dropped (queue full or too large).",
            ),
            reconnects: m::counter(
                &r,
                "claudefs_log_peer_reconnects_total",
                "Peer links re-established.",
            ),
            rejected: m::counter(
                &r,
                "claudefs_log_rejected_connections_total",
                "Connections to the log port closed for bad input or over the per-peer limit.",
            ),
            registry: r,
            scrape: std::sync::Mutex::new(()),
        };
        me.registry
            .register(Box::new(wal_flush))
            .expect("the WAL's histogram has its own name");
        me
    }

    /// The counters of `shard`, for its handle and thread.
    pub fn shard(&self, shard: ShardId) -> ShardCounters {
        let l = [shard.to_string()];
        let l: [&str; 1] = [&l[0]];
        ShardCounters {
            proposals: self.proposals.with_label_values(&l),
            decided_entries: self.decided_entries.with_label_values(&l),
            batches: self.batches.with_label_values(&l),
            inbox_full: self.inbox_full.with_label_values(&l),
            campaigns: self.campaigns.with_label_values(&l),
            leader_changes: self.leader_changes.with_label_values(&l),
            batch_entries: self.batch_entries.clone(),
        }
    }

    /// Sets the state gauges from what the node reports now.
    pub fn refresh(&self, shards: &[(ShardId, ShardGauges)], node: &NodeGauges) {
        for (id, g) in shards {
            let l = [id.to_string()];
            let l: [&str; 1] = [&l[0]];
            self.decided_position
                .with_label_values(&l)
                .set(m::to_i64(g.decided));
            self.trimmed_position
                .with_label_values(&l)
                .set(m::to_i64(g.trimmed));
            self.entries
                .with_label_values(&l)
                .set(m::to_i64(g.decided.saturating_sub(g.trimmed)));
            self.is_leader.with_label_values(&l).set(g.is_leader as i64);
            self.ballot.with_label_values(&l).set(i64::from(g.ballot));
            self.failed.with_label_values(&l).set(g.failed as i64);
        }
        m::advance(&self.wal_syncs, node.wal.syncs);
        m::advance(&self.wal_bytes, node.wal.bytes_written);
        m::advance(&self.wal_recycled, node.wal.segments_recycled);
        m::advance(&self.wal_zero_filled, node.wal.segments_zero_filled);
        if let Some(free) = node.disk_free {
            self.disk_free
                .with_label_values(&[&node.wal_dir])
                .set(m::to_i64(free));
        }
        self.peers.set(m::to_i64(node.peers as u64));
        self.peers_connected
            .set(m::to_i64(node.peers_connected as u64));
        m::advance(&self.sent, node.sent);
        m::advance(&self.dropped, node.dropped);
        m::advance(&self.reconnects, node.reconnects);
        m::advance(&self.rejected, node.rejected_connections);
    }
}
