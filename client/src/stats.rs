//! The mount's own counters: FUSE requests per operation, round trips to
//! nodes, and what the caches answered, so a benchmark can report requests
//! per operation. Served as Prometheus text by `metrics_http`.

use std::time::Duration;

use cfs_metrics::{self as m, Histogram, IntCounter, IntCounterVec, Registry};

/// FUSE operations counted by name (`claudefs_fuse_requests_total{op}`).
pub const OPS: &[&str] = &[
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "readdirplus",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "create",
    "getlk",
    "setlk",
    "fallocate",
    "copy_file_range",
    "lseek",
];

/// Caches whose hits and misses are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    /// Attributes kept from open/create served a read, write or setattr.
    OpenAttrs,
    /// The capability probe answered without a round trip (`caps`).
    NoCaps,
    /// Decoded stripes (`data`).
    Stripes,
    /// Attributes under a lease (`cache`): getattr and open without a
    /// round trip.
    Attrs,
    /// Extended attribute names under a lease: absent attributes and
    /// listings without a round trip.
    XattrNames,
    /// Directory listings under a lease (`cache::MetaCache::listing`).
    Listings,
    /// Lookups answered from cached entries or listings under a lease.
    Names,
}

/// How many caches [`Cache`] names.
const CACHES: usize = 7;

impl Cache {
    const ALL: [Cache; CACHES] = [
        Cache::OpenAttrs,
        Cache::NoCaps,
        Cache::Stripes,
        Cache::Attrs,
        Cache::XattrNames,
        Cache::Listings,
        Cache::Names,
    ];

    fn name(self) -> &'static str {
        match self {
            Cache::OpenAttrs => "open_attrs",
            Cache::NoCaps => "no_caps",
            Cache::Stripes => "stripes",
            Cache::Attrs => "attrs",
            Cache::XattrNames => "xattr_names",
            Cache::Listings => "listings",
            Cache::Names => "names",
        }
    }
}

/// The metric families of one mount (docs/metrics.md), in its own
/// registry. Cheap to update from any thread.
pub struct MountStats {
    registry: Registry,
    /// Per entry of `OPS`, then one for anything else.
    requests: Vec<IntCounter>,
    latency: Vec<Histogram>,
    errors: IntCounterVec,
    round_trips: IntCounter,
    meta_calls: IntCounter,
    fresh_reads: IntCounter,
    segment_requests: IntCounter,
    reconstructions: IntCounter,
    /// Stripes written, by how they were stored (plain, zstd).
    stripes_written: Vec<IntCounter>,
    /// File bytes written into stripes, and the bytes stored for them.
    stripe_data_bytes: IntCounter,
    stripe_stored_bytes: IntCounter,
    /// Chunks of flushes looked up for dedupe, and their file bytes, by
    /// outcome: `[new, found]` (D50).
    dedupe_chunks: Vec<IntCounter>,
    dedupe_bytes: Vec<IntCounter>,
    /// Stripes whose bytes did not match the chunk id they were written
    /// as (refused, never served).
    chunk_mismatches: IntCounter,
    /// Stripe reads that missed the stripe cache: `[part, whole]`.
    stripe_reads: Vec<IntCounter>,
    hits: Vec<IntCounter>,
    misses: Vec<IntCounter>,
    evictions: Vec<IntCounter>,
    writeback_bytes: IntCounter,
    negative_entries: IntCounter,
    invalidations: IntCounter,
    /// Background (write-behind) flushes that failed; their bytes were
    /// kept (client/src/fs/io.rs).
    flush_failures: IntCounter,
}

impl Default for MountStats {
    fn default() -> Self {
        let reg = Registry::new();
        m::build_info(&reg, "mount", env!("CARGO_PKG_VERSION"));
        let names = || OPS.iter().copied().chain(std::iter::once("other"));
        let requests = m::counter_vec(
            &reg,
            "claudefs_fuse_requests_total",
            "FUSE requests the kernel sent to this mount, per operation.",
            &["op"],
        );
        let latency = m::histogram_vec(
            &reg,
            "claudefs_fuse_request_duration_seconds",
            "Time from a FUSE request's arrival to its reply, per operation.",
            &["op"],
            m::LATENCY_BUCKETS,
        );
        let caches = |name: &str, help: &str| {
            let v = m::counter_vec(&reg, name, help, &["cache"]);
            Cache::ALL
                .iter()
                .map(|c| v.with_label_values(&[c.name()]))
                .collect::<Vec<_>>()
        };
        MountStats {
            requests: names()
                .map(|op| requests.with_label_values(&[op]))
                .collect(),
            latency: names().map(|op| latency.with_label_values(&[op])).collect(),
            errors: m::counter_vec(
                &reg,
                "claudefs_fuse_errors_total",
                "Error replies to the kernel, per errno name (other past the known set).",
                &["errno"],
            ),
            round_trips: m::counter(
                &reg,
                "claudefs_fuse_round_trips_total",
                "Requests this mount sent to nodes: metadata calls plus fragment requests (a stripe read in parallel from k servers counts k).",
            ),
            meta_calls: m::counter(
                &reg,
                "claudefs_fuse_meta_calls_total",
                "Metadata calls this mount made.",
            ),
            fresh_reads: m::counter(
                &reg,
                "claudefs_fuse_fresh_reads_total",
                "Metadata reads that asked for a linearizable read.",
            ),
            segment_requests: m::counter(
                &reg,
                "claudefs_fuse_segment_requests_total",
                "Fragment requests this mount sent to segment servers.",
            ),
            reconstructions: m::counter(
                &reg,
                "claudefs_fuse_reconstructions_total",
                "Stripes rebuilt from parity because a fragment was missing or bad.",
            ),
            stripes_written: {
                let v = m::counter_vec(
                    &reg,
                    "claudefs_fuse_stripes_written_total",
                    "Stripes this mount wrote, by how their bytes were stored.",
                    &["packing"],
                );
                ["plain", "zstd"]
                    .iter()
                    .map(|p| v.with_label_values(&[p]))
                    .collect()
            },
            stripe_data_bytes: m::counter(
                &reg,
                "claudefs_fuse_stripe_data_bytes_total",
                "File bytes this mount wrote into stripes (before compression).",
            ),
            stripe_stored_bytes: m::counter(
                &reg,
                "claudefs_fuse_stripe_stored_bytes_total",
                "Bytes stored for them (after compression, before erasure coding).",
            ),
            dedupe_chunks: {
                let v = m::counter_vec(
                    &reg,
                    "claudefs_fuse_dedupe_chunks_total",
                    "Chunks this mount flushed, by whether the cluster already stored them (found) or they were written (new).",
                    &["result"],
                );
                ["new", "found"]
                    .iter()
                    .map(|p| v.with_label_values(&[p]))
                    .collect()
            },
            dedupe_bytes: {
                let v = m::counter_vec(
                    &reg,
                    "claudefs_fuse_dedupe_bytes_total",
                    "File bytes of those chunks: `found` bytes were referenced, not written again.",
                    &["result"],
                );
                ["new", "found"]
                    .iter()
                    .map(|p| v.with_label_values(&[p]))
                    .collect()
            },
            stripe_reads: {
                let v = m::counter_vec(
                    &reg,
                    "claudefs_fuse_stripe_reads_total",
                    "Small random reads that missed the stripe cache, by whether only the part asked was fetched (part: a plain stripe's groups or a compressed stripe's frames) or the whole stripe was read and decoded (whole).",
                    &["how"],
                );
                ["part", "whole"]
                    .iter()
                    .map(|p| v.with_label_values(&[p]))
                    .collect()
            },
            chunk_mismatches: m::counter(
                &reg,
                "claudefs_fuse_chunk_mismatches_total",
                "Stripes read whose bytes did not match their chunk id: refused with EIO.",
            ),
            hits: caches(
                "claudefs_fuse_cache_hits_total",
                "Answers a cache of this mount gave without a round trip.",
            ),
            misses: caches(
                "claudefs_fuse_cache_misses_total",
                "Lookups in a cache of this mount that needed a round trip.",
            ),
            evictions: caches(
                "claudefs_fuse_cache_evictions_total",
                "Entries a cache of this mount dropped to make room.",
            ),
            writeback_bytes: m::counter(
                &reg,
                "claudefs_fuse_writeback_bytes_total",
                "Bytes flushed from the write-back buffer to segment servers.",
            ),
            negative_entries: m::counter(
                &reg,
                "claudefs_fuse_negative_entries_total",
                "Names answered as absent and cached by the kernel.",
            ),
            invalidations: m::counter(
                &reg,
                "claudefs_fuse_invalidations_total",
                "Invalidations received from nodes (another mount changed something).",
            ),
            flush_failures: m::counter(
                &reg,
                "claudefs_fuse_background_flush_failures_total",
                "Write-behind flushes that failed (their bytes were kept and retried).",
            ),
            registry: reg,
        }
    }
}

impl MountStats {
    fn op_index(op: &str) -> usize {
        OPS.iter().position(|o| *o == op).unwrap_or(OPS.len())
    }

    pub fn request(&self, op: &str) {
        self.requests[Self::op_index(op)].inc();
    }

    /// A request of `op` answered `took` after it arrived.
    pub fn answered(&self, op: &str, took: Duration) {
        self.latency[Self::op_index(op)].observe(took.as_secs_f64());
    }

    /// An error reply with errno `code`.
    pub fn error(&self, code: i32) {
        self.errors.with_label_values(&[m::errno_name(code)]).inc();
    }

    /// One request/reply exchange with a metadata service; `fresh` if it
    /// asked for a linearizable read.
    pub fn meta_round_trip(&self, fresh: bool) {
        self.meta_calls.inc();
        self.round_trips.inc();
        if fresh {
            self.fresh_reads.inc();
        }
    }

    /// `n` fragment requests to segment servers (sent in parallel: one
    /// round trip of latency, `n` requests).
    pub fn segment_requests(&self, n: u64) {
        self.segment_requests.inc_by(n);
        self.round_trips.inc_by(n);
    }

    /// A stripe written: its file bytes and how they were stored.
    pub fn stripe_written(&self, e: &cfs_proto::types::Extent) {
        let i = usize::from(e.is_packed());
        self.stripes_written[i].inc();
        self.stripe_data_bytes.inc_by(u64::from(e.data_len));
        self.stripe_stored_bytes.inc_by(u64::from(e.stored_len()));
    }

    /// A flushed chunk of `len` bytes, `found` stored already or new.
    pub fn chunk_flushed(&self, found: bool, len: u64) {
        let i = usize::from(found);
        self.dedupe_chunks[i].inc();
        self.dedupe_bytes[i].inc_by(len);
    }

    /// A read that missed the stripe cache, served from only the part
    /// asked (`part`) or by reading the whole stripe.
    pub fn stripe_read(&self, part: bool) {
        self.stripe_reads[usize::from(!part)].inc();
    }

    pub fn chunk_mismatch(&self) {
        self.chunk_mismatches.inc();
    }

    /// A stripe decoded with parity in place of a missing or bad fragment.
    pub fn reconstruction(&self) {
        self.reconstructions.inc();
    }

    pub fn cache(&self, c: Cache, hit: bool) {
        let i = c as usize;
        if hit {
            self.hits[i].inc();
        } else {
            self.misses[i].inc();
        }
    }

    /// `n` entries of cache `c` dropped to make room.
    pub fn evicted(&self, c: Cache, n: u64) {
        self.evictions[c as usize].inc_by(n);
    }

    /// `n` bytes flushed from the write-back buffer.
    pub fn written_back(&self, n: u64) {
        self.writeback_bytes.inc_by(n);
    }

    pub fn negative_entry(&self) {
        self.negative_entries.inc();
    }

    pub fn invalidation(&self) {
        self.invalidations.inc();
    }

    pub fn flush_failure(&self) {
        self.flush_failures.inc();
    }

    pub fn round_trips(&self) -> u64 {
        self.round_trips.get()
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        m::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_up_in_the_text() {
        let s = MountStats::default();
        s.request("lookup");
        s.request("lookup");
        s.request("no-such-op");
        s.meta_round_trip(true);
        s.segment_requests(3);
        s.cache(Cache::Stripes, true);
        s.answered("lookup", Duration::from_micros(300));
        s.error(libc::ENOENT);
        let t = s.render();
        assert!(t.contains("claudefs_fuse_requests_total{op=\"lookup\"} 2\n"));
        assert!(t.contains("claudefs_fuse_requests_total{op=\"other\"} 1\n"));
        assert!(t.contains("claudefs_fuse_round_trips_total 4\n"));
        assert!(t.contains("claudefs_fuse_fresh_reads_total 1\n"));
        assert!(t.contains("claudefs_fuse_cache_hits_total{cache=\"stripes\"} 1\n"));
        assert!(t.contains("claudefs_fuse_cache_misses_total{cache=\"stripes\"} 0\n"));
        assert!(t.contains(
            "claudefs_fuse_request_duration_seconds_bucket{op=\"lookup\",le=\"0.0005\"} 1\n"
        ));
        assert!(t.contains("claudefs_fuse_errors_total{errno=\"ENOENT\"} 1\n"));
        assert!(t.contains("claudefs_build_info{daemon=\"mount\""));
    }
}
