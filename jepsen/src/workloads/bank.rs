//! The bank workload on the file system: accounts are directories (placed
//! on different shards), coins are files, a transfer renames a coin from
//! one account into another (a cross-shard rename when the two accounts
//! live on different shards). Checked at the end, on every mount: every
//! coin is in exactly one account and the total is conserved. Listings
//! during the run read the accounts one after another (not a snapshot), so
//! they are reported, not checked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{definite, Checked, Ctx, Process};
use crate::history::{pair, Event, Kind};

pub const ACCOUNTS: usize = 5;
pub const COINS: usize = 50;

fn account(mount: &Path, a: usize) -> PathBuf {
    mount.join("bank").join(format!("acct-{a}"))
}

pub fn setup(mount: &Path) -> std::io::Result<()> {
    for a in 0..ACCOUNTS {
        std::fs::create_dir_all(account(mount, a))?;
    }
    for c in 0..COINS {
        std::fs::write(account(mount, c % ACCOUNTS).join(format!("coin-{c}")), b"")?;
    }
    Ok(())
}

fn coins_of(mount: &Path, a: usize) -> std::io::Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(account(mount, a))? {
        v.push(e?.file_name().to_string_lossy().into_owned());
    }
    v.sort();
    Ok(v)
}

fn read_all(mount: &Path) -> std::io::Result<Vec<Vec<String>>> {
    (0..ACCOUNTS).map(|a| coins_of(mount, a)).collect()
}

pub async fn client(ctx: Arc<Ctx>, slot: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(ctx.seed.wrapping_add(slot * 613));
    let mut p = Process::new(slot, ctx.concurrency);
    let h = &ctx.history;
    while h.now() < ctx.until {
        let m = ctx.mounts[(p.id as usize) % ctx.mounts.len()].clone();
        if rng.gen_bool(0.8) {
            let from = rng.gen_range(0..ACCOUNTS);
            let to = (from + rng.gen_range(1..ACCOUNTS)) % ACCOUNTS;
            let pick: u64 = rng.gen();
            h.invoke(p.id, "transfer", None, json!({"from": from, "to": to}));
            let r = tokio::task::spawn_blocking(move || {
                let coins = coins_of(&m, from)?;
                if coins.is_empty() {
                    return Ok(None);
                }
                let c = coins[(pick as usize) % coins.len()].clone();
                std::fs::rename(account(&m, from).join(&c), account(&m, to).join(&c))?;
                Ok::<_, std::io::Error>(Some(c))
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match r {
                Ok(Some(c)) => h.complete(
                    p.id,
                    Kind::Ok,
                    "transfer",
                    None,
                    json!({"from": from, "to": to, "coin": c}),
                ),
                Ok(None) => h.complete(p.id, Kind::Fail, "transfer", None, json!("empty account")),
                Err(e) if definite(&e) => {
                    h.complete(p.id, Kind::Fail, "transfer", None, json!(e.to_string()))
                }
                Err(e) => {
                    h.complete(p.id, Kind::Info, "transfer", None, json!(e.to_string()));
                    p.crashed();
                }
            }
        } else {
            h.invoke(p.id, "read", None, Value::Null);
            let r = tokio::task::spawn_blocking(move || read_all(&m))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match r {
                Ok(accts) => {
                    let total: usize = accts.iter().map(Vec::len).sum();
                    h.complete(p.id, Kind::Ok, "read", None, json!({"total": total}))
                }
                Err(e) => h.complete(p.id, Kind::Fail, "read", None, json!(e.to_string())),
            }
        }
    }
}

pub async fn final_reads(ctx: &Ctx) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    for m in &ctx.mounts {
        let mut got = None;
        for _ in 0..10 {
            let m2 = m.clone();
            if let Ok(Ok(a)) = tokio::task::spawn_blocking(move || read_all(&m2)).await {
                got = Some(a);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        out.push(json!({"mount": m.display().to_string(), "accounts": got}));
    }
    Ok(Value::Array(out))
}

pub fn check(events: &[Event], fin: &Value) -> Checked {
    let ops = pair(events);
    let mut anomalies = Vec::new();
    let mut first: Option<Vec<Vec<String>>> = None;
    for m in fin.as_array().cloned().unwrap_or_default() {
        let mount = m["mount"].as_str().unwrap_or("?").to_string();
        let Ok(accts) = serde_json::from_value::<Vec<Vec<String>>>(m["accounts"].clone()) else {
            anomalies.push(json!({"kind": "final-read-failed", "mount": mount}));
            continue;
        };
        let mut seen: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (a, coins) in accts.iter().enumerate() {
            for c in coins {
                seen.entry(c.as_str()).or_default().push(a);
            }
        }
        let total: usize = accts.iter().map(Vec::len).sum();
        if total != COINS {
            anomalies.push(
                json!({"kind": "total-changed", "mount": mount, "total": total,
                "expected": COINS}),
            );
        }
        for c in 0..COINS {
            let name = format!("coin-{c}");
            match seen.get(name.as_str()).map(Vec::len).unwrap_or(0) {
                1 => {}
                0 => anomalies.push(json!({"kind": "coin-lost", "mount": mount, "coin": name})),
                _ => anomalies.push(json!({"kind": "coin-duplicated", "mount": mount,
                    "coin": name, "accounts": seen[name.as_str()]})),
            }
        }
        match &first {
            None => first = Some(accts),
            Some(f) if *f != accts => {
                anomalies.push(json!({"kind": "mounts-disagree", "mount": mount}))
            }
            _ => {}
        }
    }
    if first.is_none() {
        anomalies.push(json!({"kind": "no-final-read"}));
    }
    let totals: Vec<u64> = ops
        .iter()
        .filter(|o| o.f == "read" && o.ok())
        .filter_map(|o| o.value()["total"].as_u64())
        .collect();
    let count = |f: &str, k: Kind| ops.iter().filter(|o| o.f == f && o.kind() == k).count();
    Checked {
        valid: anomalies.is_empty(),
        anomalies,
        summary: json!({
            "transfers_ok": count("transfer", Kind::Ok),
            "transfers_failed": count("transfer", Kind::Fail),
            "transfers_info": count("transfer", Kind::Info),
            "reads": totals.len(),
            "read_totals_off": totals.iter().filter(|t| **t != COINS as u64).count(),
        }),
        unknown: false,
    }
}
