//! The register workload: a key-value store whose every operation is an
//! entry in shard 0's log (the test API on the log). Each client
//! materializes the log itself, in order: a write is an append; a
//! compare-and-set is an append whose result is decided by the state just
//! before its position; a read takes a read barrier (odd client slots at
//! one fixed node, even ones wherever they last got answers) and returns the state
//! at it. Checked per key for linearizability (Wing–Gong/Lowe search).

use std::collections::HashMap;
use std::sync::Arc;

use cfs_log::{LogError, Position, ShardId};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Checked, Ctx, Process};
use crate::history::{pair, Event, Kind};
use crate::linearizable::{check_register, Op as LinOp, Outcome, RegOp};

const KEYS: u64 = 5;
const VALUES: i64 = 5;
/// States the linearizability search may visit per key.
const SEARCH_BUDGET: usize = 5_000_000;
const SHARD: ShardId = ShardId(0);

#[derive(Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "lowercase")]
enum Cmd {
    W { k: String, v: i64 },
    Cas { k: String, old: i64, new: i64 },
}

/// A client's copy of the store, built from the log in order.
struct Replica {
    applied: Position,
    map: HashMap<String, i64>,
}

impl Replica {
    /// Applies the log up to (not including) `to`; returns the result of
    /// the entry at `to - 1` if it is a compare-and-set.
    async fn catch_up(
        &mut self,
        ctx: &Ctx,
        rng: &mut impl Rng,
        to: Position,
    ) -> Result<Option<bool>, LogError> {
        let mut last = None;
        if to <= self.applied {
            return Ok(None);
        }
        let entries = super::log::read_any(ctx, rng, SHARD, self.applied, to).await?;
        if entries.len() as u64 != to - self.applied {
            return Err(LogError::Timeout);
        }
        for (_, v) in entries {
            last = None;
            let Some(v) = v else { continue };
            match serde_json::from_str::<Cmd>(&v) {
                Ok(Cmd::W { k, v }) => {
                    self.map.insert(k, v);
                }
                Ok(Cmd::Cas { k, old, new }) => {
                    let ok = self.map.get(&k) == Some(&old);
                    if ok {
                        self.map.insert(k, new);
                    }
                    last = Some(ok);
                }
                Err(_) => {}
            }
        }
        self.applied = to;
        Ok(last)
    }
}

pub async fn client(ctx: Arc<Ctx>, slot: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(ctx.seed.wrapping_add(slot * 104_729));
    let mut p = Process::new(slot, ctx.concurrency);
    let mut c = ctx.log_client();
    // Odd slots read through one node, as a client reading from its
    // nearest replica: the read protocol must make that linearizable too
    // (a follower asks the leader), and a broken one is caught in quiet
    // periods as well, not only when a partition happens to cut off the
    // node the clients settled on.
    let pinned = (slot % 2 == 1 && !ctx.nodes.is_empty()).then(|| {
        let node = ctx.nodes[(slot / 2) as usize % ctx.nodes.len()];
        let mut r =
            cfs_log::client::LogClient::new(&ctx.cluster_id, vec![node], ctx.security.clone());
        r.timeout = std::time::Duration::from_secs(5);
        r
    });
    let mut rep = Replica {
        applied: Position::ZERO,
        map: HashMap::new(),
    };
    let h = &ctx.history;
    while h.now() < ctx.until {
        let k = format!("k{}", rng.gen_range(0..KEYS));
        let roll = rng.gen_range(0..4);
        if roll < 2 {
            h.invoke(p.id, "read", Some(&k), Value::Null);
            let r = async {
                let at = pinned.as_ref().unwrap_or(&c).read_barrier(SHARD).await?;
                rep.catch_up(&ctx, &mut rng, at).await?;
                Ok::<_, LogError>(rep.map.get(&k).copied())
            }
            .await;
            match r {
                Ok(v) => h.complete(p.id, Kind::Ok, "read", Some(&k), json!(v)),
                Err(e) => h.complete(p.id, Kind::Fail, "read", Some(&k), json!(e.to_string())),
            }
        } else if roll == 2 {
            let v = rng.gen_range(0..VALUES);
            h.invoke(p.id, "write", Some(&k), json!(v));
            let cmd = serde_json::to_vec(&Cmd::W { k: k.clone(), v }).expect("json");
            match c.propose(SHARD, cmd).await {
                Ok(_) => h.complete(p.id, Kind::Ok, "write", Some(&k), json!(v)),
                Err(e) => {
                    h.complete(p.id, Kind::Info, "write", Some(&k), json!(e.to_string()));
                    p.crashed();
                    c = ctx.log_client();
                }
            }
        } else {
            let (old, new) = (rng.gen_range(0..VALUES), rng.gen_range(0..VALUES));
            h.invoke(p.id, "cas", Some(&k), json!([old, new]));
            let cmd = serde_json::to_vec(&Cmd::Cas {
                k: k.clone(),
                old,
                new,
            })
            .expect("json");
            let r = match c.propose(SHARD, cmd).await {
                Ok(pos) => rep.catch_up(&ctx, &mut rng, pos + 1).await.map(Some),
                Err(e) => Err(e),
            };
            match r {
                Ok(Some(Some(true))) => {
                    h.complete(p.id, Kind::Ok, "cas", Some(&k), json!([old, new]))
                }
                Ok(Some(Some(false))) => {
                    h.complete(p.id, Kind::Fail, "cas", Some(&k), json!([old, new]))
                }
                // Appended but its result unknown (or this replica was
                // already past it): indeterminate.
                Ok(_) | Err(_) => {
                    h.complete(p.id, Kind::Info, "cas", Some(&k), json!([old, new]));
                    p.crashed();
                    c = ctx.log_client();
                    rep = Replica {
                        applied: Position::ZERO,
                        map: HashMap::new(),
                    };
                }
            }
        }
    }
}

pub fn check(events: &[Event]) -> Checked {
    let ops = pair(events);
    let mut by_key: HashMap<String, Vec<LinOp>> = HashMap::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for o in &ops {
        *counts
            .entry(format!("{} {:?}", o.f, o.kind()).to_lowercase())
            .or_default() += 1;
        let Some(k) = &o.key else { continue };
        let complete = match o.kind() {
            Kind::Ok => o.complete.as_ref().map(|c| c.time),
            Kind::Info => None,
            _ => continue,
        };
        let op = match o.f.as_str() {
            "read" if complete.is_some() => RegOp::Read(o.value().as_i64()),
            "read" => continue,
            "write" => match o.invoke.value.as_i64() {
                Some(v) => RegOp::Write(v),
                None => continue,
            },
            "cas" => match (o.invoke.value[0].as_i64(), o.invoke.value[1].as_i64()) {
                (Some(a), Some(b)) => RegOp::Cas(a, b),
                _ => continue,
            },
            _ => continue,
        };
        by_key.entry(k.clone()).or_default().push(LinOp {
            index: o.invoke.index,
            process: o.process,
            invoke: o.invoke.time,
            complete,
            op,
        });
    }
    let mut anomalies = Vec::new();
    let mut unknown = false;
    let mut keys: Vec<_> = by_key.keys().cloned().collect();
    keys.sort();
    for k in keys {
        match check_register(&by_key[&k], None, SEARCH_BUDGET) {
            Outcome::Linearizable => {}
            Outcome::Unknown => unknown = true,
            Outcome::NotLinearizable {
                stuck,
                prefix,
                detail,
            } => anomalies.push(json!({"kind": "not-linearizable", "key": k,
                "op": stuck, "linearized_before": prefix, "detail": detail})),
        }
    }
    Checked {
        valid: anomalies.is_empty() && !unknown,
        anomalies,
        summary: json!({"ops": counts, "keys": by_key.len()}),
        unknown,
    }
}
