//! What each shard's extents reference of each segment (docs/decisions.md
//! D48), and the fences that let a segment nothing references be freed.
//!
//! Counts are derived, never proposed: whenever an entry's changes are
//! kept ([`crate::store::Txn::keep`]), every extent key it wrote or deleted
//! moves its segment's count on the key's shard by one extent and by its
//! length. Being computed at apply time from the state the entry found,
//! they are the same on every replica, rebuilt by replay, and a
//! transaction's intent (planned earlier) never carries a stale count.
//! [`recount`] derives them again from the extent keys for the fsck.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::keys;
use crate::store::{decode, DbError, NamespaceDb};
use crate::types::*;

/// What one shard's extents reference of one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentUse {
    /// Extent keys naming one of its stripes.
    pub extents: u64,
    /// Stored bytes those extents keep: each extent's share of its
    /// stripe's stored (possibly compressed) bytes, `Extent::stored_share`
    /// (a stripe shared by several extents, e.g. after `copy_file_range`,
    /// counts once per extent).
    pub bytes: u64,
}

/// Signed change of one [`SegmentUse`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UseDelta {
    pub extents: i64,
    pub bytes: i64,
}

impl SegmentUse {
    /// `self` moved by `d`; `None` if a count would go below zero (the
    /// counts and the extent keys disagree: reported by the fsck).
    pub fn moved(self, d: UseDelta) -> Option<SegmentUse> {
        Some(SegmentUse {
            extents: self.extents.checked_add_signed(d.extents)?,
            bytes: self.bytes.checked_add_signed(d.bytes)?,
        })
    }
}

/// The segment an extent value names and the stored bytes it keeps there;
/// `None` for inline bytes (and for values that do not decode, which the
/// read path reports).
pub fn stripe_of(key: &[u8], value: &[u8]) -> Option<(SegmentId, u64)> {
    let e: ExtentRef = decode(key, value).ok()?;
    match e.backing {
        Backing::Stripe(s) => Some((s.segment, s.stored_share(e.len))),
        Backing::Inline(_) => None,
    }
}

/// The chunk an extent value's stripe holds, if it was written as one
/// (D50).
pub fn chunk_of(key: &[u8], value: &[u8]) -> Option<ChunkId> {
    let e: ExtentRef = decode(key, value).ok()?;
    match e.backing {
        Backing::Stripe(s) => s.chunk,
        Backing::Inline(_) => None,
    }
}

/// Adds to `deltas` what replacing `old` by `new` at extent key `key`
/// changes, and to `index` the `w` and `H` keys to delete (`None`) and
/// put.
pub fn account(
    deltas: &mut BTreeMap<(ShardId, SegmentId), UseDelta>,
    index: &mut BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    key: &[u8],
    old: Option<&[u8]>,
    new: Option<&[u8]>,
) {
    let Some(shard) = keys::owner(key) else {
        return;
    };
    for (v, sign) in [(old, -1i64), (new, 1i64)] {
        if let Some((segment, len)) = v.and_then(|v| stripe_of(key, v)) {
            let d = deltas.entry((shard, segment)).or_default();
            d.extents += sign;
            d.bytes += sign * len as i64;
            let w = keys::segment_where(shard, segment, key);
            index.insert(w, (sign > 0).then(Vec::new));
        }
        if let Some(id) = v.and_then(|v| chunk_of(key, v)) {
            index.insert(
                keys::chunk_where(shard, &id, key),
                (sign > 0).then(Vec::new),
            );
        }
    }
}

/// Every `w` and `H` key the extent keys imply.
pub fn rederive_index(db: &NamespaceDb) -> Result<std::collections::BTreeSet<Vec<u8>>, DbError> {
    let mut out = std::collections::BTreeSet::new();
    db.for_each_prefixed(b"e", |k, v| {
        let Some(shard) = keys::owner(k) else {
            return Ok(());
        };
        if let Some((segment, _)) = stripe_of(k, v) {
            out.insert(keys::segment_where(shard, segment, k));
        }
        if let Some(id) = chunk_of(k, v) {
            out.insert(keys::chunk_where(shard, &id, k));
        }
        Ok(())
    })?;
    Ok(out)
}

/// Every `w` and `H` key held.
pub fn index(db: &NamespaceDb) -> Result<std::collections::BTreeSet<Vec<u8>>, DbError> {
    let mut out = std::collections::BTreeSet::new();
    for tag in [b"w", b"H"] {
        db.for_each_prefixed(tag, |k, _| {
            out.insert(k.to_vec());
            Ok(())
        })?;
    }
    Ok(out)
}

/// Every shard's counts, derived from the extent keys alone.
pub fn recount(db: &NamespaceDb) -> Result<BTreeMap<(ShardId, SegmentId), SegmentUse>, DbError> {
    let mut out: BTreeMap<(ShardId, SegmentId), SegmentUse> = BTreeMap::new();
    db.for_each_prefixed(b"e", |k, v| {
        let Some(shard) = keys::owner(k) else {
            return Ok(());
        };
        if let Some((segment, len)) = stripe_of(k, v) {
            let u = out.entry((shard, segment)).or_default();
            u.extents += 1;
            u.bytes += len;
        }
        Ok(())
    })?;
    Ok(out)
}

/// Every shard's counts as the materializer keeps them.
pub fn kept(db: &NamespaceDb) -> Result<BTreeMap<(ShardId, SegmentId), SegmentUse>, DbError> {
    let mut out = BTreeMap::new();
    db.for_each_prefixed(b"u", |k, v| {
        let (Some(shard), Some(segment)) = (keys::owner(k), keys::segment_of(k)) else {
            return Err(DbError::Corrupt {
                key: k.to_vec(),
                reason: "malformed segment use key".into(),
            });
        };
        out.insert((shard, segment), decode::<SegmentUse>(k, v)?);
        Ok(())
    })?;
    Ok(out)
}

/// The segments fenced on each shard.
pub fn fences(db: &NamespaceDb) -> Result<BTreeMap<SegmentId, Vec<ShardId>>, DbError> {
    let mut out: BTreeMap<SegmentId, Vec<ShardId>> = BTreeMap::new();
    db.for_each_prefixed(b"f", |k, _| {
        if let (Some(shard), Some(segment)) = (keys::owner(k), keys::segment_of(k)) {
            out.entry(segment).or_default().push(shard);
        }
        Ok(())
    })?;
    Ok(out)
}
