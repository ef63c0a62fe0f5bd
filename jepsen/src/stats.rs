//! Latency and throughput of successful operations per window of the run:
//! each fault window and the quiet stretches between them.

use serde::Serialize;

use crate::history::Op;

#[derive(Debug, Serialize)]
pub struct Window {
    pub from_s: f64,
    pub to_s: f64,
    /// "quiet" or the faults in force.
    pub what: String,
    pub ok: usize,
    pub not_ok: usize,
    pub ok_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

fn pct(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i] as f64 / 1e6)
}

/// Splits `[0, end)` into the fault windows and the quiet gaps between
/// them; counts operations by when they completed.
pub fn windows(ops: &[Op], faults: &[(u64, u64, String)], end: u64) -> Vec<Window> {
    let mut spans: Vec<(u64, u64, String)> = Vec::new();
    let mut at = 0;
    for (s, e, d) in faults {
        if *s > at {
            spans.push((at, *s, "quiet".into()));
        }
        spans.push((*s, *e, d.clone()));
        at = *e;
    }
    if end > at {
        spans.push((at, end, "quiet".into()));
    }
    spans
        .into_iter()
        .map(|(s, e, what)| {
            let mut lat: Vec<u64> = Vec::new();
            let mut not_ok = 0;
            for o in ops {
                let Some(c) = &o.complete else { continue };
                if c.time < s || c.time >= e {
                    continue;
                }
                if o.ok() {
                    lat.push(o.latency_ns().unwrap_or(0));
                } else {
                    not_ok += 1;
                }
            }
            lat.sort_unstable();
            let secs = (e - s) as f64 / 1e9;
            Window {
                from_s: s as f64 / 1e9,
                to_s: e as f64 / 1e9,
                what,
                ok: lat.len(),
                not_ok,
                ok_per_s: if secs > 0.0 {
                    lat.len() as f64 / secs
                } else {
                    0.0
                },
                p50_ms: pct(&lat, 0.5),
                p99_ms: pct(&lat, 0.99),
            }
        })
        .collect()
}
