//! Compaction of mostly-dead sealed segments (docs/decisions.md D48,
//! step 3), run by the garbage collector on the node leading the first
//! shard: the live bytes of each extent naming such a segment are copied
//! into new stripes, and each shard commits the move as one
//! `RelocateExtents` entry, which replaces an extent only if it is still
//! the one copied (a file changed meanwhile keeps its new bytes, and the
//! copy is left unreferenced). Once no extent names the old segment, the
//! collector fences and frees it as any other.
//!
//! A crash at any step loses nothing: before the entry, the copy is an
//! unreferenced segment the collector frees; after it, the old segment is.

use std::collections::HashMap;
use std::sync::Arc;

use cfs_materializers::keys;
use cfs_materializers::store::decode;
use cfs_materializers::types::*;
use cfs_meta::MetaService;
use cfs_proto::ops::{Relocation, RELOCATIONS_MAX};
use cfs_segments::client::{SegmentClient, StripeReader, StripeWriter};
use cfs_segments::layout::Layout;
use tracing::{debug, info};

/// Live bytes copied per pass at most.
pub const COMPACT_BYTES_PER_PASS: u64 = 256 << 20;
/// Data bytes per fragment of the stripes compaction writes (as a mount's).
const FRAGMENT_BYTES: usize = 256 << 10;

/// What one segment's compaction did.
#[derive(Debug, Default)]
pub struct Compacted {
    pub extents: usize,
    /// Files whose extents moved (the others changed since the copy).
    pub files: usize,
    pub bytes: u64,
}

/// Copies the live extents of `segment` (on every shard of `shards`) to
/// new stripes and proposes their relocation.
pub async fn compact(
    meta: &MetaService,
    client: &Arc<SegmentClient>,
    shards: &[ShardId],
    segment: SegmentId,
) -> anyhow::Result<Compacted> {
    let (db, _) = meta.namespace();
    let mut out = Compacted::default();
    let nodes = client.nodes();
    let layout = Layout::for_cluster(nodes.len());
    let place: Vec<u64> = nodes.iter().copied().take(layout.width()).collect();
    let reader = StripeReader::new(client.clone());
    let mut stripes: HashMap<u32, Arc<Vec<u8>>> = HashMap::new();
    // Whole stripes already copied (a deduplicated chunk named by several
    // files, D50): the later references take the same copy.
    let mut whole_copies: HashMap<u32, Extent> = HashMap::new();
    for &shard in shards {
        let db2 = db.clone();
        let extents: Vec<(Ino, ExtentRef)> = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            db2.for_each_prefixed(&keys::segment_where_prefix(shard, segment), |k, _| {
                let Some(ekey) = keys::extent_key_of_where(k) else {
                    return Ok(());
                };
                if let (Some(ino), Some(raw)) = (keys::extent_ino(&ekey), db2.get_raw(&ekey)?) {
                    v.push((ino, decode::<ExtentRef>(&ekey, &raw)?));
                }
                Ok(())
            })?;
            Ok::<_, cfs_materializers::store::DbError>(v)
        })
        .await??;
        if extents.is_empty() {
            continue;
        }
        let mut writer = StripeWriter::new(client.clone(), layout, place.clone(), FRAGMENT_BYTES)?;
        // Live bytes are copied as a mount writes them by default.
        writer.set_compression(cfs_segments::client::Compression::default());
        let mut moves = Vec::new();
        for (ino, old) in extents {
            let Backing::Stripe(x) = &old.backing else {
                continue;
            };
            if x.segment != segment {
                continue;
            }
            out.extents += 1;
            let whole = old.skip == 0 && old.len == u64::from(x.data_len);
            if let Some(copy) = whole_copies.get(&x.stripe).filter(|_| whole) {
                let new = vec![ExtentRef {
                    offset: old.offset,
                    len: old.len,
                    skip: 0,
                    backing: Backing::Stripe(copy.clone()),
                }];
                out.bytes += old.len;
                moves.push(Relocation { ino, old, new });
                continue;
            }
            let data = match stripes.get(&x.stripe) {
                Some(d) => d.clone(),
                None => {
                    let d = Arc::new(reader.read(x).await?.data);
                    stripes.insert(x.stripe, d.clone());
                    d
                }
            };
            let (from, to) = (old.skip as usize, (old.skip + old.len) as usize);
            let Some(bytes) = data.get(from..to) else {
                anyhow::bail!("{segment} stripe {}: extent past its data", x.stripe);
            };
            // Flushed after each extent: the stripes returned are this
            // extent's, in order.
            let mut written = writer.write(bytes).await?;
            written.extend(writer.flush().await?);
            // A whole chunk copied stays that chunk (D50): its copy is
            // found by later writers of the same bytes.
            if let ([e], true) = (written.as_mut_slice(), whole) {
                e.chunk = x.chunk;
                whole_copies.insert(x.stripe, e.clone());
            }
            let mut at = old.offset;
            let mut new = Vec::new();
            for e in written {
                let len = e.data_len as u64;
                new.push(ExtentRef {
                    offset: at,
                    len,
                    skip: 0,
                    backing: Backing::Stripe(e),
                });
                at += len;
            }
            out.bytes += old.len;
            moves.push(Relocation { ino, old, new });
        }
        writer.finish().await?;
        for part in moves.chunks(RELOCATIONS_MAX) {
            match meta.relocate_extents(shard, part.to_vec()).await {
                Ok(n) => out.files += n,
                Err(e) => debug!(%segment, shard = %shard, "relocating: {e}"),
            }
        }
    }
    if out.extents == 0 {
        debug!(%segment, "nothing to compact");
        return Ok(out);
    }
    info!(
        %segment,
        extents = out.extents,
        files = out.files,
        bytes = out.bytes,
        "compacted"
    );
    Ok(out)
}
