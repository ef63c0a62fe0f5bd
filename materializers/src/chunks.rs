//! The chunk index (docs/decisions.md D50): which stored stripes hold a
//! deduplicated chunk, derived from the extent keys like the segment
//! counts (`crate::segment_use`), so it is rebuilt by replay and checked
//! by the fsck. A chunk's reference count is the number of extent keys,
//! over all shards, naming a stripe written as it.

use crate::keys;
use crate::store::{decode, DbError, NamespaceDb};
use crate::types::*;

/// Index keys read per chunk looked up before giving up on finding one
/// that still decodes (a corrupt entry is reported and skipped).
const ENTRIES_TRIED_MAX: usize = 4;

/// A stored stripe holding chunk `id`, from the index of `shards` (the
/// first shard that has one); `None` when none of them references it.
///
/// An index entry whose extent is gone or no longer names `id` is a
/// corrupt index (the fsck reports it too): logged and skipped, never
/// answered.
pub fn find(db: &NamespaceDb, shards: &[ShardId], id: &ChunkId) -> Result<Option<Extent>, DbError> {
    for &shard in shards {
        let mut tried = 0;
        let mut found = None;
        db.for_each_prefixed(&keys::chunk_where_prefix(shard, id), |k, _| {
            if found.is_some() || tried >= ENTRIES_TRIED_MAX {
                return Ok(());
            }
            tried += 1;
            let Some(ekey) = keys::extent_key_of_chunk_where(k) else {
                tracing::error!("chunk index: malformed key {k:02x?} (run the fsck)");
                return Ok(());
            };
            let stripe = match db.get_raw(&ekey)? {
                Some(raw) => match decode::<ExtentRef>(&ekey, &raw)?.backing {
                    Backing::Stripe(s) if s.chunk.as_ref() == Some(id) => Some(s),
                    _ => None,
                },
                None => None,
            };
            match stripe {
                Some(s) => found = Some(s),
                None => tracing::error!(
                    chunk = %id,
                    "chunk index: {k:02x?} names an extent that does not hold the chunk (run the fsck)"
                ),
            }
            Ok(())
        })?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// How many extent keys of `shards` name a stripe holding chunk `id`.
pub fn references(db: &NamespaceDb, shards: &[ShardId], id: &ChunkId) -> Result<u64, DbError> {
    let mut n = 0;
    for &shard in shards {
        db.for_each_prefixed(&keys::chunk_where_prefix(shard, id), |_, _| {
            n += 1;
            Ok(())
        })?;
    }
    Ok(n)
}

/// Chunks indexed and their references, summed over `shards` (a chunk
/// referenced from two shards counts on each).
pub fn totals(db: &NamespaceDb, shards: &[ShardId]) -> Result<(u64, u64), DbError> {
    let (mut chunks, mut refs) = (0u64, 0u64);
    for &shard in shards {
        let prefix = [&[b'H'][..], &shard.to_be_bytes()[..]].concat();
        let mut last: Option<Vec<u8>> = None;
        db.for_each_prefixed(&prefix, |k, _| {
            refs += 1;
            let id = k.get(5..37);
            if id != last.as_deref() {
                chunks += 1;
                last = id.map(<[u8]>::to_vec);
            }
            Ok(())
        })?;
    }
    Ok((chunks, refs))
}
