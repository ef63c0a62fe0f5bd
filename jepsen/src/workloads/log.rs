//! The log workload: clients append unique values to the shards' logs and
//! read them back through read barriers. Checked: every replica holds the
//! same entries in the same order with no gaps; every acknowledged append
//! is there exactly once at the position it was acknowledged with; no
//! value appears twice or out of nowhere; and every read's barrier covers
//! every append acknowledged before the read began (no stale reads), with
//! the entries it read equal to the final log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cfs_log::{EntryKind, LogError, Position, ShardId};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{Checked, Ctx, Process};
use crate::history::{pair, Event, Kind};

/// A replica's entries: (position, appended value or `None`).
type Entries = Vec<(Position, Option<String>)>;

/// Entries a read fetches below its barrier.
const READ_WINDOW: u64 = 64;
/// How long a read waits for a (possibly cut-off, lagging) replica.
pub const OP_READ_TIMEOUT: Duration = Duration::from_secs(1);

fn definite(e: &LogError) -> bool {
    matches!(e, LogError::Invalid(_) | LogError::UnknownShard(_))
}

/// Reads `[from, to)` of `shard` from node `addr`, as (position, value)
/// (value `None` for entries that are not appends, e.g. barriers).
pub async fn read(
    ctx: &Ctx,
    addr: SocketAddr,
    shard: ShardId,
    from: Position,
    to: Position,
    timeout: Duration,
) -> Result<Entries, LogError> {
    let c = ctx.log_client();
    let v = tokio::time::timeout(timeout, c.read_range(addr, shard, from, to))
        .await
        .map_err(|_| LogError::Timeout)??;
    Ok(v.into_iter()
        .map(|(p, e)| {
            let val = (e.kind == EntryKind::DATA)
                .then(|| String::from_utf8_lossy(&e.payload).into_owned());
            (p, val)
        })
        .collect())
}

pub async fn client(ctx: Arc<Ctx>, slot: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(ctx.seed.wrapping_add(slot * 7919));
    let mut p = Process::new(slot, ctx.concurrency);
    let mut c = ctx.log_client();
    let h = &ctx.history;
    let mut n = 0u64;
    while h.now() < ctx.until {
        let shard = ctx.shards[rng.gen_range(0..ctx.shards.len())];
        let key = shard.to_string();
        if rng.gen_bool(0.7) {
            n += 1;
            let value = format!("{}-{}", p.id, n);
            h.invoke(p.id, "append", Some(&key), json!(value));
            match c.propose(shard, value.clone().into_bytes()).await {
                Ok(pos) => h.complete(
                    p.id,
                    Kind::Ok,
                    "append",
                    Some(&key),
                    json!({"value": value, "position": pos}),
                ),
                Err(e) if definite(&e) => {
                    h.complete(p.id, Kind::Fail, "append", Some(&key), json!(e.to_string()))
                }
                Err(e) => {
                    h.complete(p.id, Kind::Info, "append", Some(&key), json!(e.to_string()));
                    p.crashed();
                    c = ctx.log_client();
                }
            }
        } else {
            h.invoke(p.id, "read", Some(&key), Value::Null);
            let r = async {
                let at = c.read_barrier(shard).await?;
                let from = at.saturating_sub(READ_WINDOW);
                let entries = read_any(&ctx, &mut rng, shard, from, at).await?;
                Ok::<_, LogError>((at, from, entries))
            }
            .await;
            match r {
                Ok((at, from, entries)) => h.complete(
                    p.id,
                    Kind::Ok,
                    "read",
                    Some(&key),
                    json!({"barrier": at, "from": from, "entries": entries}),
                ),
                // A read changes nothing: a failed one is simply failed.
                Err(e) => h.complete(p.id, Kind::Fail, "read", Some(&key), json!(e.to_string())),
            }
        }
    }
}

/// Reads `[from, to)` from some replica: random ones first, each given
/// a short time (a replica cut off from the majority may never get there),
/// the last one longer.
pub async fn read_any(
    ctx: &Ctx,
    rng: &mut impl Rng,
    shard: ShardId,
    from: Position,
    to: Position,
) -> Result<Entries, LogError> {
    let mut nodes = ctx.nodes.clone();
    rand::seq::SliceRandom::shuffle(nodes.as_mut_slice(), rng);
    let mut last = LogError::Timeout;
    for (i, node) in nodes.iter().enumerate() {
        let t = if i + 1 == nodes.len() {
            OP_READ_TIMEOUT
        } else {
            Duration::from_millis(250)
        };
        match read(ctx, *node, shard, from, to, t).await {
            Ok(v) => return Ok(v),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// After healing: each node's whole log of each shard.
pub async fn final_reads(ctx: &Ctx) -> anyhow::Result<Value> {
    let mut out = serde_json::Map::new();
    let c = ctx.log_client();
    for &shard in &ctx.shards {
        let mut at = None;
        for _ in 0..30 {
            if let Ok(p) = c.read_barrier(shard).await {
                at = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let at =
            at.ok_or_else(|| anyhow::anyhow!("no read barrier on shard {shard} after healing"))?;
        let mut replicas = Vec::new();
        let failed = ctx.failed_nodes.lock().expect("failed nodes lock").clone();
        for &node in &ctx.nodes {
            let mut got = None;
            if failed.contains(&node) {
                // Reported as "shard-failed"; its shards do not answer.
                replicas.push(json!({"node": node.to_string(), "entries": null, "failed": true}));
                continue;
            }
            for _ in 0..10 {
                if let Ok(v) = read(
                    ctx,
                    node,
                    shard,
                    Position::ZERO,
                    at,
                    Duration::from_secs(10),
                )
                .await
                {
                    got = Some(v);
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            replicas.push(json!({"node": node.to_string(), "entries": got}));
        }
        out.insert(
            shard.to_string(),
            json!({"barrier": at, "replicas": replicas}),
        );
    }
    Ok(Value::Object(out))
}

fn entries_of(v: &Value) -> Option<Entries> {
    serde_json::from_value(v.clone()).ok()
}

pub fn check(events: &[Event], fin: &Value) -> Checked {
    let ops = pair(events);
    let mut anomalies = Vec::new();
    let invoked: HashSet<String> = ops
        .iter()
        .filter(|o| o.f == "append")
        .filter_map(|o| o.invoke.value.as_str().map(str::to_string))
        .collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &ops {
        let k = match (o.f.as_str(), o.kind()) {
            ("append", Kind::Ok) => "append ok",
            ("append", Kind::Info) => "append info",
            ("append", _) => "append fail",
            (_, Kind::Ok) => "read ok",
            _ => "read fail",
        };
        *counts.entry(k).or_default() += 1;
    }
    let mut shards_checked = 0;
    let Some(fin) = fin.as_object() else {
        anomalies.push(json!({"kind": "no-final-read"}));
        return Checked {
            valid: false,
            anomalies,
            summary: json!(counts),
            unknown: false,
        };
    };
    for (shard, f) in fin {
        shards_checked += 1;
        let barrier = f["barrier"].as_u64().unwrap_or(0);
        let replicas: Vec<(String, Option<Entries>)> = f["replicas"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        (
                            r["node"].as_str().unwrap_or("?").to_string(),
                            entries_of(&r["entries"]),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        // The reference: the first replica that answered.
        let Some((ref_node, reference)) = replicas
            .iter()
            .find_map(|(n, e)| e.as_ref().map(|e| (n.clone(), e.clone())))
        else {
            anomalies.push(json!({"kind": "no-replica-readable", "shard": shard}));
            continue;
        };
        for (node, e) in &replicas {
            let Some(e) = e else {
                anomalies.push(json!({"kind": "replica-unreadable", "shard": shard, "node": node}));
                continue;
            };
            for (i, (pos, _)) in e.iter().enumerate() {
                if pos.get() != i as u64 {
                    anomalies.push(json!({"kind": "gap", "shard": shard, "node": node,
                        "expected": i, "found": pos}));
                    break;
                }
            }
            if e.len() as u64 != barrier {
                anomalies.push(json!({"kind": "short-log", "shard": shard, "node": node,
                    "entries": e.len(), "barrier": barrier}));
            }
            if let Some(i) = (0..e.len().min(reference.len())).find(|i| e[*i] != reference[*i]) {
                anomalies.push(json!({"kind": "replicas-diverge", "shard": shard,
                    "nodes": [ref_node, node], "position": i,
                    "values": [reference[i].1, e[i].1]}));
            }
        }
        let mut at: HashMap<&str, Vec<Position>> = HashMap::new();
        for (pos, v) in &reference {
            if let Some(v) = v {
                at.entry(v.as_str()).or_default().push(*pos);
                if !invoked.contains(v) {
                    anomalies.push(json!({"kind": "unknown-value", "shard": shard,
                        "value": v, "position": pos}));
                }
            }
        }
        for (v, ps) in &at {
            if ps.len() > 1 {
                anomalies.push(json!({"kind": "duplicate", "shard": shard, "value": v,
                    "positions": ps}));
            }
        }
        let appended: Vec<_> = ops
            .iter()
            .filter(|o| o.f == "append" && o.ok() && o.key.as_deref() == Some(shard.as_str()))
            .collect();
        for o in &appended {
            let v = o.value()["value"].as_str().unwrap_or("");
            let pos = Position(o.value()["position"].as_u64().unwrap_or(u64::MAX));
            match at.get(v) {
                None => anomalies.push(json!({"kind": "lost", "shard": shard, "value": v,
                    "acknowledged_position": pos, "op": o.invoke.index})),
                Some(ps) if !ps.contains(&pos) => anomalies.push(json!({"kind": "moved",
                    "shard": shard, "value": v, "acknowledged_position": pos, "found": ps,
                    "op": o.invoke.index})),
                _ => {}
            }
        }
        // Reads: the barrier covers every append acknowledged before the
        // read began, and what was read is the final log.
        let mut acked: Vec<(u64, u64, usize)> = appended
            .iter()
            .filter_map(|o| {
                Some((
                    o.complete.as_ref()?.time,
                    o.value()["position"].as_u64()?,
                    o.invoke.index,
                ))
            })
            .collect();
        acked.sort_unstable();
        for o in ops
            .iter()
            .filter(|o| o.f == "read" && o.ok() && o.key.as_deref() == Some(shard.as_str()))
        {
            let b = o.value()["barrier"].as_u64().unwrap_or(0);
            let start = o.invoke.time;
            let newest = acked
                .iter()
                .take_while(|(t, _, _)| *t < start)
                .max_by_key(|(_, p, _)| *p);
            if let Some((_, p, idx)) = newest {
                if *p >= b {
                    anomalies.push(json!({"kind": "stale-read", "shard": shard,
                        "read": o.invoke.index, "barrier": b,
                        "append_acknowledged_before": idx, "its_position": p}));
                }
            }
            if let Some(es) = entries_of(&o.value()["entries"]) {
                for (pos, v) in es {
                    if reference.get(pos.get() as usize).map(|r| &r.1) != Some(&v) {
                        anomalies.push(json!({"kind": "read-differs-from-log", "shard": shard,
                            "read": o.invoke.index, "position": pos, "read_value": v}));
                        break;
                    }
                }
            }
        }
    }
    Checked {
        valid: anomalies.is_empty() && shards_checked > 0,
        anomalies,
        summary: json!({"ops": counts, "shards": shards_checked}),
        unknown: false,
    }
}
