//! The mount's own counters: FUSE requests per operation, round trips to
//! nodes, and what the caches answered, so a benchmark can report requests
//! per operation. Served as Prometheus text by `metrics_http`.

use std::sync::atomic::{AtomicU64, Ordering};

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

/// Counters of one mount. Cheap to update from any thread.
pub struct MountStats {
    requests: Vec<AtomicU64>,
    /// Requests that are not in `OPS` (counted, never dropped).
    other: AtomicU64,
    meta_round_trips: AtomicU64,
    fresh_reads: AtomicU64,
    segment_round_trips: AtomicU64,
    hits: [AtomicU64; CACHES],
    misses: [AtomicU64; CACHES],
    negative_entries: AtomicU64,
    invalidations: AtomicU64,
    /// Background (write-behind) flushes that failed; their bytes were
    /// kept (client/src/fs/io.rs).
    flush_failures: AtomicU64,
}

impl Default for MountStats {
    fn default() -> Self {
        MountStats {
            requests: OPS.iter().map(|_| AtomicU64::new(0)).collect(),
            other: AtomicU64::new(0),
            meta_round_trips: AtomicU64::new(0),
            fresh_reads: AtomicU64::new(0),
            segment_round_trips: AtomicU64::new(0),
            hits: Default::default(),
            misses: Default::default(),
            negative_entries: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flush_failures: AtomicU64::new(0),
        }
    }
}

impl MountStats {
    pub fn request(&self, op: &str) {
        match OPS.iter().position(|o| *o == op) {
            Some(i) => self.requests[i].fetch_add(1, Ordering::Relaxed),
            None => self.other.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// One request/reply exchange with a metadata service; `fresh` if it
    /// asked for a linearizable read.
    pub fn meta_round_trip(&self, fresh: bool) {
        self.meta_round_trips.fetch_add(1, Ordering::Relaxed);
        if fresh {
            self.fresh_reads.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `n` fragment requests to segment servers (sent in parallel: one
    /// round trip of latency, `n` requests).
    pub fn segment_requests(&self, n: u64) {
        self.segment_round_trips.fetch_add(n, Ordering::Relaxed);
    }

    pub fn cache(&self, c: Cache, hit: bool) {
        let i = c as usize;
        if hit {
            self.hits[i].fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn negative_entry(&self) {
        self.negative_entries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn invalidation(&self) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    pub fn flush_failure(&self) {
        self.flush_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn round_trips(&self) -> u64 {
        self.meta_round_trips.load(Ordering::Relaxed)
            + self.segment_round_trips.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut family = |name: &str, help: &str, lines: Vec<(String, u64)>| {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for (labels, v) in lines {
                s.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut reqs: Vec<(String, u64)> = OPS
            .iter()
            .zip(&self.requests)
            .map(|(op, n)| (format!("{{op=\"{op}\"}}"), get(n)))
            .collect();
        reqs.push(("{op=\"other\"}".into(), get(&self.other)));
        family(
            "claudefs_fuse_requests_total",
            "FUSE requests the kernel sent to this mount, per operation.",
            reqs,
        );
        family(
            "claudefs_fuse_round_trips_total",
            "Requests this mount sent to nodes (metadata calls and fragment reads).",
            vec![(String::new(), self.round_trips())],
        );
        family(
            "claudefs_fuse_meta_calls_total",
            "Metadata calls this mount made.",
            vec![(String::new(), get(&self.meta_round_trips))],
        );
        family(
            "claudefs_fuse_fresh_reads_total",
            "Metadata reads that asked for a linearizable read.",
            vec![(String::new(), get(&self.fresh_reads))],
        );
        family(
            "claudefs_fuse_segment_requests_total",
            "Fragment requests this mount sent to segment servers.",
            vec![(String::new(), get(&self.segment_round_trips))],
        );
        let per_cache = |a: &[AtomicU64; CACHES]| {
            Cache::ALL
                .iter()
                .map(|c| (format!("{{cache=\"{}\"}}", c.name()), get(&a[*c as usize])))
                .collect::<Vec<_>>()
        };
        family(
            "claudefs_fuse_cache_hits_total",
            "Answers a cache of this mount gave without a round trip.",
            per_cache(&self.hits),
        );
        family(
            "claudefs_fuse_cache_misses_total",
            "Lookups in a cache of this mount that needed a round trip.",
            per_cache(&self.misses),
        );
        family(
            "claudefs_fuse_negative_entries_total",
            "Names answered as absent and cached by the kernel.",
            vec![(String::new(), get(&self.negative_entries))],
        );
        family(
            "claudefs_fuse_invalidations_total",
            "Invalidations received from nodes (another mount changed something).",
            vec![(String::new(), get(&self.invalidations))],
        );
        family(
            "claudefs_fuse_background_flush_failures_total",
            "Write-behind flushes that failed (their bytes were kept and retried).",
            vec![(String::new(), get(&self.flush_failures))],
        );
        s
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
        let t = s.render();
        assert!(t.contains("claudefs_fuse_requests_total{op=\"lookup\"} 2\n"));
        assert!(t.contains("claudefs_fuse_requests_total{op=\"other\"} 1\n"));
        assert!(t.contains("claudefs_fuse_round_trips_total 4\n"));
        assert!(t.contains("claudefs_fuse_fresh_reads_total 1\n"));
        assert!(t.contains("claudefs_fuse_cache_hits_total{cache=\"stripes\"} 1\n"));
        assert!(t.contains("claudefs_fuse_cache_misses_total{cache=\"stripes\"} 0\n"));
    }
}
