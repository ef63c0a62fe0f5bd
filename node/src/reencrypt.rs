//! Re-encryption after a key rotation (docs/decisions.md D51), run by the
//! collector on the node leading the first shard. A pass finds the
//! stripes sealed with a key that is no longer their tenant's newest,
//! copies up to [`REENCRYPT_BYTES_PER_PASS`] of their file bytes into
//! stripes sealed with the newest key (the compaction `Mover`), commits
//! each shard's moves as `RelocateExtents` entries, and logs how far the
//! tenant has got (`ReencryptProgress`: `cfs admin keys list`, `cfs admin
//! status`). The old stripes are then dead data the collector frees as
//! any other.
//!
//! A crash at any step loses nothing, as for compaction: a copy not yet
//! committed is an unreferenced segment; a committed one replaced only an
//! extent that was still the one copied. A file changed meanwhile keeps
//! its new bytes (sealed with whatever key its writer had) and is found
//! again by the next pass.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cfs_materializers::store::decode;
use cfs_materializers::types::*;
use cfs_meta::MetaService;
use cfs_proto::ops::Relocation;
use cfs_proto::tenant::{KeyId, Reencryption};
use cfs_segments::client::SegmentClient;
use tracing::{debug, info, warn};

use crate::compact::{relocate, Mover, NodeKeys};

/// File bytes re-encrypted per pass at most.
pub const REENCRYPT_BYTES_PER_PASS: u64 = 256 << 20;
/// A rotation is declared done only once its key is this old: a mount
/// uses the keys it fetched for up to `cfs_client::tenants::KEYS_FRESH_FOR`
/// (5 s), so stripes sealed with the old key may still be committed
/// shortly after a rotation.
pub const DONE_AFTER: Duration = Duration::from_secs(30);
/// Extents the scan of one pass keeps at most (the rest wait for the
/// next pass).
const STALE_EXTENTS_MAX: usize = 100_000;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassDone {
    pub moved_bytes: u64,
    /// Bytes still under older keys, by tenant, after the pass.
    pub left: BTreeMap<String, u64>,
}

/// `CFS_FAILPOINT=NAME`: this process aborts at point `NAME` (the crash
/// tests: after the copies are written and before any relocation;
/// after each shard's relocation).
fn failpoint(name: &str) {
    if std::env::var("CFS_FAILPOINT").is_ok_and(|f| f == name) {
        tracing::error!("failpoint {name} reached: aborting (CFS_FAILPOINT)");
        std::process::abort();
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// One re-encryption pass; nothing to do (no tenant has a rotation
/// pending) costs no scan.
pub async fn pass(
    meta: &MetaService,
    client: &Arc<SegmentClient>,
    keys: &NodeKeys,
) -> anyhow::Result<PassDone> {
    let logged: HashMap<String, Reencryption> = meta
        .reencryption()
        .map_err(|e| anyhow::anyhow!("reading re-encryption progress: {e}"))?
        .into_iter()
        .map(|p| (p.tenant.clone(), p))
        .collect();
    let report = meta
        .all_tenant_keys()
        .await
        .map_err(|e| anyhow::anyhow!("reading tenants' keys: {e}"))?;
    let records = meta_key_ages(meta)?;
    // Tenants rotated whose last word is not "done with this key".
    let pending: Vec<String> = report
        .iter()
        .filter(|t| t.keys.len() > 1)
        .filter(|t| {
            let newest = t.keys.last().map(|k| k.id);
            !logged.get(&t.tenant).is_some_and(|p| {
                Some(p.to) == newest
                    && p.left_bytes == 0
                    && records.get(&p.to).is_some_and(|made| {
                        now_ns().saturating_sub(*made) > DONE_AFTER.as_nanos() as i64
                    })
            })
        })
        .map(|t| t.tenant.clone())
        .collect();
    if pending.is_empty() {
        return Ok(PassDone::default());
    }
    // Every stripe extent sealed with a key that is not its tenant's
    // newest: read in one scan of the extent keys, off the runtime.
    let old_keys: HashMap<KeyId, String> = report
        .iter()
        .filter(|t| pending.contains(&t.tenant))
        .flat_map(|t| {
            let n = t.keys.len().saturating_sub(1);
            t.keys[..n].iter().map(|k| (k.id, t.tenant.clone()))
        })
        .collect();
    let (db, _) = meta.namespace();
    let pending2 = pending.clone();
    let (stale, left) = tokio::task::spawn_blocking(move || {
        let mut stale: Vec<(Ino, ExtentRef, String)> = Vec::new();
        let mut left: BTreeMap<String, u64> = pending2.into_iter().map(|t| (t, 0)).collect();
        db.for_each_prefixed(b"e", |k, v| {
            let Some(ino) = cfs_materializers::keys::extent_ino(k) else {
                return Ok(());
            };
            let r: ExtentRef = decode(k, v)?;
            let tenant = match &r.backing {
                Backing::Stripe(x) => x.seal.as_ref().and_then(|s| old_keys.get(&s.key)),
                Backing::Inline(_) => None,
            };
            if let Some(t) = tenant {
                *left.entry(t.clone()).or_default() += r.len;
                if stale.len() < STALE_EXTENTS_MAX {
                    let t = t.clone();
                    stale.push((ino, r, t));
                }
            }
            Ok(())
        })?;
        Ok::<_, cfs_materializers::store::DbError>((stale, left))
    })
    .await??;
    let mut done = PassDone::default();
    let mut moved: BTreeMap<String, u64> = BTreeMap::new();
    if !stale.is_empty() {
        let mut mover = Mover::new(client, keys)?;
        let mut by_shard: BTreeMap<ShardId, Vec<Relocation>> = BTreeMap::new();
        let mut budget = REENCRYPT_BYTES_PER_PASS;
        for (ino, old, tenant) in stale {
            if old.len > budget {
                break;
            }
            let Backing::Stripe(x) = &old.backing else {
                continue;
            };
            let new = match mover.copy(&old, x).await {
                Ok(n) => n,
                Err(e) => {
                    warn!(ino, "re-encrypting an extent: {e:#}");
                    continue;
                }
            };
            budget -= old.len;
            *moved.entry(tenant).or_default() += old.len;
            by_shard
                .entry(shard_of(ino))
                .or_default()
                .push(Relocation { ino, old, new });
        }
        mover.finish().await?;
        failpoint("reencrypt-copied");
        for (shard, moves) in by_shard {
            relocate(meta, shard, moves).await;
            failpoint("reencrypt-relocated-one");
        }
    }
    for t in &report {
        let Some(l) = left.get(&t.tenant) else {
            continue;
        };
        let Some(newest) = t.keys.last() else {
            continue;
        };
        let m = moved.get(&t.tenant).copied().unwrap_or(0);
        let before = logged
            .get(&t.tenant)
            .filter(|p| p.to == newest.id)
            .map_or(0, |p| p.moved_bytes);
        let p = Reencryption {
            tenant: t.tenant.clone(),
            to: newest.id,
            moved_bytes: before + m,
            left_bytes: l.saturating_sub(m),
            at: now_ns(),
        };
        let unchanged = logged.get(&t.tenant).is_some_and(|q| {
            q.to == p.to && q.moved_bytes == p.moved_bytes && q.left_bytes == p.left_bytes
        });
        if !unchanged {
            if let Err(e) = meta.log_reencryption(p.clone()).await {
                warn!(tenant = %t.tenant, "logging re-encryption progress: {e}");
            }
        }
        if m > 0 {
            info!(tenant = %t.tenant, moved = m, left = p.left_bytes, to = %p.to, "re-encrypted");
        } else {
            debug!(tenant = %t.tenant, left = p.left_bytes, "re-encryption: nothing moved");
        }
        done.moved_bytes += m;
        done.left.insert(t.tenant.clone(), p.left_bytes);
    }
    Ok(done)
}

/// When each key was made (the entry's time), by key id.
fn meta_key_ages(meta: &MetaService) -> anyhow::Result<HashMap<KeyId, i64>> {
    let (db, _) = meta.namespace();
    let shard = meta
        .shards()
        .into_iter()
        .min()
        .ok_or_else(|| anyhow::anyhow!("no shards"))?;
    Ok(cfs_materializers::tenant_keys::all(&db, shard)?
        .into_iter()
        .map(|r| (r.id, r.made))
        .collect())
}
