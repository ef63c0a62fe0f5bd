//! Prometheus metrics shared by the ClaudeFS daemons (docs/metrics.md).
//!
//! Each daemon owns one [`Registry`]; each component registers its families
//! there when it starts and updates them on its own paths. Gauges that
//! describe current state are set by the component's `refresh` just before
//! a scrape encodes the registry with [`render`]. Names are checked here
//! once: every family carries the `claudefs_` prefix (D45).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// The prefix of every family.
pub const PREFIX: &str = "claudefs_";

/// Latency buckets in seconds, 25 µs to 10 s: the fast end resolves a
/// page-cache fdatasync (~60 µs) and a cached FUSE answer, the slow end a
/// stalled disk or an election.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets for counts per batch (entries, inputs): powers of two to 4096.
pub const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

fn checked(name: &str) -> &str {
    assert!(
        name.starts_with(PREFIX),
        "metric {name} lacks the {PREFIX} prefix"
    );
    name
}

fn register<C: prometheus::core::Collector + Clone + 'static>(reg: &Registry, c: C) -> C {
    // A second family of one name is a programming error, found by the
    // first test that starts the component.
    reg.register(Box::new(c.clone()))
        .expect("metric families have distinct names");
    c
}

/// A floating-point gauge (a timestamp in seconds) registered in `reg`.
pub fn float_gauge(reg: &Registry, name: &str, help: &str) -> Gauge {
    register(
        reg,
        Gauge::with_opts(Opts::new(checked(name), help)).expect("valid gauge"),
    )
}

/// A counter registered in `reg`.
pub fn counter(reg: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::with_opts(Opts::new(checked(name), help)).expect("valid counter");
    register(reg, c)
}

/// A counter family with `labels`, registered in `reg`.
pub fn counter_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(checked(name), help), labels).expect("valid counter");
    register(reg, c)
}

/// A gauge registered in `reg`.
pub fn gauge(reg: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::with_opts(Opts::new(checked(name), help)).expect("valid gauge");
    register(reg, g)
}

/// A gauge family with `labels`, registered in `reg`.
pub fn gauge_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(checked(name), help), labels).expect("valid gauge");
    register(reg, g)
}

/// A histogram with `buckets`, registered in `reg`.
pub fn histogram(reg: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(checked(name), help).buckets(buckets.to_vec()))
        .expect("valid histogram");
    register(reg, h)
}

/// A histogram family with `labels` and `buckets`, registered in `reg`.
pub fn histogram_vec(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(checked(name), help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid histogram");
    register(reg, h)
}

/// Registers `claudefs_build_info{version, daemon}` (1) and
/// `claudefs_process_start_time_seconds`.
pub fn build_info(reg: &Registry, daemon: &str, version: &str) {
    gauge_vec(
        reg,
        "claudefs_build_info",
        "The build serving: 1, labelled with its version and daemon.",
        &["version", "daemon"],
    )
    .with_label_values(&[version, daemon])
    .set(1);
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    gauge(
        reg,
        "claudefs_process_start_time_seconds",
        "Unix time the daemon started.",
    )
    .set(i64::try_from(start).unwrap_or(i64::MAX));
}

/// The registry in the Prometheus text format 0.0.4.
pub fn render(reg: &Registry) -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    // The text encoder fails only on a write error, which a Vec never has.
    if let Err(e) = prometheus::TextEncoder::new().encode(&reg.gather(), &mut out) {
        return format!("# encoding failed: {e}\n");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Seconds since `start`, for `Histogram::observe`.
pub fn seconds_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// Brings `counter` up to `total`, a running count kept elsewhere (a
/// component's own statistics, read at a scrape). Counts never go down, so
/// a total below the counter changes nothing.
pub fn advance(counter: &IntCounter, total: u64) {
    let have = counter.get();
    if total > have {
        counter.inc_by(total - have);
    }
}

/// Saturating conversion for gauges fed from unsigned counts.
pub fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The symbolic name of an errno value, for `claudefs_fuse_errors_total`.
/// A fixed set, so the label stays bounded: anything else is `other`.
pub fn errno_name(code: i32) -> &'static str {
    match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EDQUOT => "EDQUOT",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EINTR => "EINTR",
        libc::ENOTCONN => "ENOTCONN",
        libc::ESTALE => "ESTALE",
        libc::E2BIG => "E2BIG",
        libc::EDEADLK => "EDEADLK",
        libc::ENODEV => "ENODEV",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_in_the_text_format() {
        let reg = Registry::new();
        build_info(&reg, "node", "0.1.0");
        let c = counter_vec(&reg, "claudefs_x_total", "X.", &["shard"]);
        c.with_label_values(&["0"]).inc_by(3);
        let h = histogram(&reg, "claudefs_y_seconds", "Y.", LATENCY_BUCKETS);
        h.observe(0.002);
        let t = render(&reg);
        assert!(t.contains("claudefs_build_info{daemon=\"node\",version=\"0.1.0\"} 1\n"));
        assert!(t.contains("# TYPE claudefs_x_total counter\nclaudefs_x_total{shard=\"0\"} 3\n"));
        assert!(t.contains("claudefs_y_seconds_bucket{le=\"0.0025\"} 1\n"));
        assert!(t.contains("claudefs_y_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(t.contains("claudefs_y_seconds_count 1\n"));
        assert!(!t.contains("# EOF"), "0.0.4 text, not OpenMetrics");
    }

    #[test]
    #[should_panic(expected = "lacks the claudefs_ prefix")]
    fn a_family_without_the_prefix_is_refused() {
        counter(&Registry::new(), "cfs_x_total", "X.");
    }

    #[test]
    fn errno_names_are_a_fixed_set() {
        assert_eq!(errno_name(libc::ENOENT), "ENOENT");
        assert_eq!(errno_name(4242), "other");
    }
}
