//! The segment server's metric families (docs/metrics.md). Requests and
//! their latency are counted on the connection path; the store's own
//! statistics and the device's space are read at a scrape
//! ([`SegmentMetrics::refresh`]).

use cfs_metrics::{self as m, Histogram, IntCounter, IntGauge, IntGaugeVec};

use crate::proto::{Request, StatInfo};

/// The `op` label of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Append,
    Read,
    Other,
}

impl Op {
    const ALL: [Op; 3] = [Op::Append, Op::Read, Op::Other];

    fn name(self) -> &'static str {
        match self {
            Op::Append => "append",
            Op::Read => "read",
            Op::Other => "other",
        }
    }
}

/// Why a request was refused (`claudefs_segments_refused_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The store's queue was full (`STORE_QUEUE_MAX`): the client retries.
    Overloaded,
    /// An administrative request from a peer without an admin identity.
    Denied,
}

impl Refusal {
    const ALL: [Refusal; 2] = [Refusal::Overloaded, Refusal::Denied];

    fn name(self) -> &'static str {
        match self {
            Refusal::Overloaded => "overloaded",
            Refusal::Denied => "denied",
        }
    }
}

pub fn op_of(r: &Request) -> Op {
    match r {
        Request::Append { .. } => Op::Append,
        Request::Read { .. } => Op::Read,
        _ => Op::Other,
    }
}

pub struct SegmentMetrics {
    pub registry: m::Registry,
    /// The device label: the segment directory.
    device: String,
    /// Per [`Op`], made once: no label lookup per request.
    requests: Vec<IntCounter>,
    seconds: Vec<Histogram>,
    /// Per [`Refusal`].
    refusals: Vec<IntCounter>,
    /// Held from `refresh` through encoding (concurrent scrapes).
    pub scrape: std::sync::Mutex<()>,
    written: IntCounter,
    read: IntCounter,
    syncs: IntCounter,
    checksum_failures: IntCounter,
    write_errors: IntCounter,
    no_space: IntCounter,
    rejected: IntCounter,
    capacity: IntGaugeVec,
    free: IntGaugeVec,
    used: IntGaugeVec,
    fragments: IntGauge,
    io_mode: IntGaugeVec,
}

impl SegmentMetrics {
    pub fn new(device: String) -> Self {
        let r = m::Registry::new();
        let c = |name: &str, help: &str| m::counter(&r, name, help);
        let dev = |name: &str, help: &str| m::gauge_vec(&r, name, help, &["device"]);
        SegmentMetrics {
            device,
            requests: {
                let v = m::counter_vec(
                    &r,
                    "claudefs_segments_requests_total",
                    "Segment requests served, by operation.",
                    &["op"],
                );
                Op::ALL
                    .iter()
                    .map(|o| v.with_label_values(&[o.name()]))
                    .collect()
            },
            seconds: {
                let v = m::histogram_vec(
                    &r,
                    "claudefs_segments_request_duration_seconds",
                    "Time from a segment request's arrival to its answer (fragment I/O and fdatasync included).",
                    &["op"],
                    m::LATENCY_BUCKETS,
                );
                Op::ALL
                    .iter()
                    .map(|o| v.with_label_values(&[o.name()]))
                    .collect()
            },
            refusals: {
                let v = m::counter_vec(
                    &r,
                    "claudefs_segments_refused_total",
                    "Segment requests refused: the store's queue was full (overloaded) or an administrative request came without an admin identity (denied).",
                    &["reason"],
                );
                Refusal::ALL
                    .iter()
                    .map(|x| v.with_label_values(&[x.name()]))
                    .collect()
            },
            scrape: std::sync::Mutex::new(()),
            written: c(
                "claudefs_segments_written_bytes_total",
                "Fragment bytes written.",
            ),
            read: c("claudefs_segments_read_bytes_total", "Fragment bytes read."),
            syncs: c(
                "claudefs_segments_syncs_total",
                "fdatasync calls of fragment files.",
            ),
            checksum_failures: c(
                "claudefs_segments_checksum_failures_total",
                "Fragments whose blake3 did not match on read.",
            ),
            write_errors: c(
                "claudefs_segments_write_errors_total",
                "Failed fragment writes.",
            ),
            no_space: c(
                "claudefs_segments_no_space_errors_total",
                "Fragment writes failed with ENOSPC.",
            ),
            rejected: c(
                "claudefs_segments_rejected_connections_total",
                "Connections to the segment port closed for bad input or over the per-peer limit.",
            ),
            capacity: dev(
                "claudefs_segments_device_capacity_bytes",
                "Size of the file system under the segment directory.",
            ),
            free: dev(
                "claudefs_segments_device_free_bytes",
                "Free bytes under the segment directory.",
            ),
            used: dev(
                "claudefs_segments_device_used_bytes",
                "Used bytes of the file system under the segment directory (capacity minus free).",
            ),
            fragments: m::gauge(&r, "claudefs_segments_fragments", "Fragment files held."),
            io_mode: m::gauge_vec(
                &r,
                "claudefs_segments_io_mode",
                "I/O engine in use (1 for the active mode).",
                &["mode"],
            ),
            registry: r,
        }
    }

    /// A request of `op` answered after `seconds`.
    pub fn served(&self, op: Op, seconds: f64) {
        self.requests[op as usize].inc();
        self.seconds[op as usize].observe(seconds);
    }

    /// A request refused for `why`.
    pub fn refused(&self, why: Refusal) {
        self.refusals[why as usize].inc();
    }

    /// Sets the families kept by the store from its last stat.
    pub fn refresh(&self, s: &StatInfo, checksum_failures: u64, rejected: u64) {
        let st = &s.stats;
        m::advance(&self.written, st.bytes_written);
        m::advance(&self.read, st.bytes_read);
        m::advance(&self.syncs, st.syncs);
        m::advance(&self.checksum_failures, checksum_failures);
        m::advance(&self.write_errors, st.write_errors);
        m::advance(&self.no_space, st.no_space_errors);
        m::advance(&self.rejected, rejected);
        let d = [self.device.as_str()];
        self.capacity
            .with_label_values(&d)
            .set(m::to_i64(s.total_bytes));
        self.free.with_label_values(&d).set(m::to_i64(s.free_bytes));
        self.used
            .with_label_values(&d)
            .set(m::to_i64(s.total_bytes.saturating_sub(s.free_bytes)));
        self.fragments.set(m::to_i64(s.fragments));
        self.io_mode.with_label_values(&[&s.io_mode]).set(1);
    }
}
