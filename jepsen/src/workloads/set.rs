//! The set workload on the file system: clients create uniquely named
//! files in one directory through different mounts (one per node, strict
//! cache mode) and list it. Checked: every acknowledged create is in the
//! final listing of every mount, nothing unknown is there, all mounts
//! agree, and a listing never misses a file whose create was acknowledged
//! before the listing began.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{definite, Checked, Ctx, Process};
use crate::history::{pair, Event, Kind};

pub const DIR: &str = "set";

pub fn setup(mount: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(mount.join(DIR))
}

fn list(dir: PathBuf) -> std::io::Result<BTreeSet<String>> {
    let mut s = BTreeSet::new();
    for e in std::fs::read_dir(dir)? {
        s.insert(e?.file_name().to_string_lossy().into_owned());
    }
    Ok(s)
}

pub async fn client(ctx: Arc<Ctx>, slot: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(ctx.seed.wrapping_add(slot * 31));
    let mut p = Process::new(slot, ctx.concurrency);
    let h = &ctx.history;
    let mut n = 0u64;
    while h.now() < ctx.until {
        let m = ctx.mounts[(p.id as usize) % ctx.mounts.len()].join(DIR);
        if rng.gen_bool(0.8) {
            n += 1;
            let v = format!("{}-{}", p.id, n);
            h.invoke(p.id, "add", None, json!(v));
            let path = m.join(&v);
            let r = tokio::task::spawn_blocking(move || {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map(|_| ())
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match r {
                Ok(()) => h.complete(p.id, Kind::Ok, "add", None, json!(v)),
                Err(e) if definite(&e) => {
                    h.complete(p.id, Kind::Fail, "add", None, json!(e.to_string()))
                }
                Err(e) => {
                    h.complete(p.id, Kind::Info, "add", None, json!(e.to_string()));
                    p.crashed();
                }
            }
        } else {
            h.invoke(p.id, "read", None, Value::Null);
            let r = tokio::task::spawn_blocking(move || list(m))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match r {
                Ok(s) => h.complete(p.id, Kind::Ok, "read", None, json!(s)),
                Err(e) => h.complete(p.id, Kind::Fail, "read", None, json!(e.to_string())),
            }
        }
    }
}

/// Every mount's listing after healing.
pub async fn final_reads(ctx: &Ctx) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    for m in &ctx.mounts {
        let d = m.join(DIR);
        let mut got = Err(anyhow::anyhow!("not read"));
        for _ in 0..10 {
            let d2 = d.clone();
            match tokio::task::spawn_blocking(move || list(d2)).await? {
                Ok(s) => {
                    got = Ok(s);
                    break;
                }
                Err(e) => got = Err(e.into()),
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        out.push(json!({"mount": m.display().to_string(), "values": got.ok()}));
    }
    Ok(Value::Array(out))
}

pub fn check(events: &[Event], fin: &Value) -> Checked {
    let ops = pair(events);
    let mut anomalies = Vec::new();
    let invoked: HashSet<String> = ops
        .iter()
        .filter(|o| o.f == "add")
        .filter_map(|o| o.invoke.value.as_str().map(str::to_string))
        .collect();
    let acked: Vec<_> = ops.iter().filter(|o| o.f == "add" && o.ok()).collect();
    let finals: Vec<(String, Option<BTreeSet<String>>)> = fin
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["mount"].as_str().unwrap_or("?").to_string(),
                        serde_json::from_value(m["values"].clone()).ok(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut first: Option<&BTreeSet<String>> = None;
    for (mount, s) in &finals {
        let Some(s) = s else {
            anomalies.push(json!({"kind": "final-read-failed", "mount": mount}));
            continue;
        };
        for o in &acked {
            let v = o.invoke.value.as_str().unwrap_or("");
            if !s.contains(v) {
                anomalies.push(json!({"kind": "lost", "value": v, "op": o.invoke.index,
                    "mount": mount}));
            }
        }
        for v in s {
            if !invoked.contains(v) {
                anomalies.push(json!({"kind": "unexpected", "value": v, "mount": mount}));
            }
        }
        match first {
            None => first = Some(s),
            Some(f) if f != s => anomalies.push(json!({"kind": "mounts-disagree",
                "mount": mount, "only_here": s.difference(f).collect::<Vec<_>>(),
                "missing_here": f.difference(s).collect::<Vec<_>>()})),
            _ => {}
        }
    }
    if finals.is_empty() {
        anomalies.push(json!({"kind": "no-final-read"}));
    }
    // Listings during the run: linearizable (strict mode), so nothing
    // acknowledged before a listing began may be missing from it.
    let mut acked_at: Vec<(u64, &str, usize)> = acked
        .iter()
        .filter_map(|o| {
            Some((
                o.complete.as_ref()?.time,
                o.invoke.value.as_str()?,
                o.invoke.index,
            ))
        })
        .collect();
    acked_at.sort_unstable();
    let mut stale = 0;
    for o in ops.iter().filter(|o| o.f == "read" && o.ok()) {
        let seen: HashSet<&str> = o
            .value()
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        if let Some((_, v, idx)) = acked_at
            .iter()
            .take_while(|(t, _, _)| *t < o.invoke.time)
            .find(|(_, v, _)| !seen.contains(v))
        {
            stale += 1;
            if stale <= 20 {
                anomalies.push(json!({"kind": "stale-read", "read": o.invoke.index,
                    "missing": v, "acknowledged_by": idx}));
            }
        }
    }
    Checked {
        valid: anomalies.is_empty(),
        anomalies,
        summary: json!({"adds": invoked.len(), "acknowledged": acked.len(),
            "reads": ops.iter().filter(|o| o.f == "read" && o.ok()).count(),
            "stale_reads": stale}),
        unknown: false,
    }
}
