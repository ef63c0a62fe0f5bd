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
//!
//! Sealed stripes (D51) are opened with their tenant's key and the copy
//! sealed with the tenant's newest: the same [`Mover`] re-encrypts a
//! tenant's stripes after a rotation (`reencrypt.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use cfs_materializers::keys;
use cfs_materializers::store::decode;
use cfs_materializers::types::*;
use cfs_meta::MetaService;
use cfs_proto::ops::{Relocation, RELOCATIONS_MAX};
use cfs_proto::tenant::KeyId;
use cfs_segments::client::{SegmentClient, StripeReader, StripeWriter};
use cfs_segments::layout::Layout;
use cfs_segments::seal::{DataKey, KeyRing};
use tracing::{debug, info};

/// Live bytes copied per pass at most.
pub const COMPACT_BYTES_PER_PASS: u64 = 256 << 20;
/// Data bytes per fragment of the stripes compaction writes (as a mount's).
const FRAGMENT_BYTES: usize = 256 << 10;

/// The keys the collector opens and seals stripes with (D51): every
/// tenant's generations, which tenant each key belongs to, and each
/// tenant's newest key (what a moved stripe is sealed with).
#[derive(Default)]
pub struct NodeKeys {
    ring: Arc<KeyRing>,
    tenant_of: HashMap<KeyId, String>,
    newest: HashMap<String, Arc<DataKey>>,
}

impl NodeKeys {
    /// The keys of every tenant, opened with this node's master key.
    pub async fn load(meta: &MetaService) -> anyhow::Result<Self> {
        let all = meta
            .all_tenant_keys()
            .await
            .map_err(|e| anyhow::anyhow!("opening the tenants' keys: {e}"))?;
        let mut k = NodeKeys::default();
        for t in all {
            for c in &t.keys {
                let dk = Arc::new(DataKey::new(c.id, &c.key));
                k.ring.insert(dk.clone());
                k.tenant_of.insert(c.id, t.tenant.clone());
                k.newest.insert(t.tenant.clone(), dk);
            }
        }
        Ok(k)
    }

    /// The tenant `key` belongs to.
    pub fn tenant_of(&self, key: KeyId) -> Option<&str> {
        self.tenant_of.get(&key).map(String::as_str)
    }

    /// `tenant`'s newest key.
    pub fn newest(&self, tenant: &str) -> Option<&Arc<DataKey>> {
        self.newest.get(tenant)
    }

    /// The key a copy of a stripe sealed with `key` is sealed with: its
    /// tenant's newest.
    fn reseal(&self, key: KeyId) -> anyhow::Result<Arc<DataKey>> {
        self.tenant_of(key)
            .and_then(|t| self.newest(t))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{key} belongs to no tenant this node can open"))
    }
}

/// Copies extents' live bytes into new stripes, as a mount writes them:
/// compressed by default, sealed with their tenant's newest key if they
/// were sealed (so a copy is never stored in the clear, and a rotation's
/// re-encryption is a copy too). Whole deduplicated chunks stay chunks,
/// and a chunk named by several files is copied once.
pub struct Mover<'k> {
    reader: StripeReader,
    writer: StripeWriter,
    keys: &'k NodeKeys,
    stripes: HashMap<(SegmentId, u32), Arc<Vec<u8>>>,
    whole_copies: HashMap<(SegmentId, u32), Extent>,
}

impl<'k> Mover<'k> {
    pub fn new(client: &Arc<SegmentClient>, keys: &'k NodeKeys) -> anyhow::Result<Self> {
        let nodes = client.nodes();
        let layout = Layout::for_cluster(nodes.len());
        let place: Vec<u64> = nodes.iter().copied().take(layout.width()).collect();
        let mut writer = StripeWriter::new(client.clone(), layout, place, FRAGMENT_BYTES)?;
        writer.set_compression(cfs_segments::client::Compression::default());
        Ok(Mover {
            reader: StripeReader::with_keys(client.clone(), keys.ring.clone()),
            writer,
            keys,
            stripes: HashMap::new(),
            whole_copies: HashMap::new(),
        })
    }

    /// The new pieces tiling `old`'s file range (a stripe extent `x`).
    pub async fn copy(&mut self, old: &ExtentRef, x: &Extent) -> anyhow::Result<Vec<ExtentRef>> {
        let at = (x.segment, x.stripe);
        let whole = old.skip == 0 && old.len == u64::from(x.data_len);
        if let Some(copy) = self.whole_copies.get(&at).filter(|_| whole) {
            return Ok(vec![ExtentRef {
                offset: old.offset,
                len: old.len,
                skip: 0,
                backing: Backing::Stripe(copy.clone()),
            }]);
        }
        let seal = match &x.seal {
            Some(s) => Some(self.keys.reseal(s.key)?),
            None => None,
        };
        let data = match self.stripes.get(&at) {
            Some(d) => d.clone(),
            None => {
                let d = Arc::new(self.reader.read(x).await?.data);
                self.stripes.insert(at, d.clone());
                d
            }
        };
        let (from, to) = (old.skip as usize, (old.skip + old.len) as usize);
        let Some(bytes) = data.get(from..to) else {
            anyhow::bail!("{} stripe {}: extent past its data", x.segment, x.stripe);
        };
        self.writer.set_seal(seal);
        // Flushed after each extent: the stripes returned are this
        // extent's, in order.
        let mut written = self.writer.write(bytes).await?;
        written.extend(self.writer.flush().await?);
        // A whole chunk copied stays that chunk (D50): its copy is found
        // by later writers of the same bytes (a tenant's chunk ids do not
        // change with its key, D51).
        if let ([e], true) = (written.as_mut_slice(), whole) {
            e.chunk = x.chunk;
            self.whole_copies.insert(at, e.clone());
        }
        let mut at = old.offset;
        let mut new = Vec::with_capacity(written.len());
        for e in written {
            let len = u64::from(e.data_len);
            new.push(ExtentRef {
                offset: at,
                len,
                skip: 0,
                backing: Backing::Stripe(e),
            });
            at += len;
        }
        Ok(new)
    }

    /// Seals the segments written.
    pub async fn finish(self) -> anyhow::Result<()> {
        self.writer.finish().await?;
        Ok(())
    }
}

/// What one segment's compaction did.
#[derive(Debug, Default)]
pub struct Compacted {
    pub extents: usize,
    /// Files whose extents moved (the others changed since the copy).
    pub files: usize,
    pub bytes: u64,
}

/// The extents of `shard` naming `segment`.
pub async fn extents_in(
    meta: &MetaService,
    shard: ShardId,
    segment: SegmentId,
) -> anyhow::Result<Vec<(Ino, ExtentRef)>> {
    let (db, _) = meta.namespace();
    Ok(tokio::task::spawn_blocking(move || {
        let mut v = Vec::new();
        db.for_each_prefixed(&keys::segment_where_prefix(shard, segment), |k, _| {
            let Some(ekey) = keys::extent_key_of_where(k) else {
                return Ok(());
            };
            if let (Some(ino), Some(raw)) = (keys::extent_ino(&ekey), db.get_raw(&ekey)?) {
                v.push((ino, decode::<ExtentRef>(&ekey, &raw)?));
            }
            Ok(())
        })?;
        Ok::<_, cfs_materializers::store::DbError>(v)
    })
    .await??)
}

/// Proposes `moves` on `shard`, in entries of at most
/// [`RELOCATIONS_MAX`]; the files whose extents moved.
pub async fn relocate(meta: &MetaService, shard: ShardId, moves: Vec<Relocation>) -> usize {
    let mut files = 0;
    for part in moves.chunks(RELOCATIONS_MAX) {
        match meta.relocate_extents(shard, part.to_vec()).await {
            Ok(n) => files += n,
            Err(e) => debug!(shard = %shard, "relocating: {e}"),
        }
    }
    files
}

/// Copies the live extents of `segment` (on every shard of `shards`) to
/// new stripes and proposes their relocation.
pub async fn compact(
    meta: &MetaService,
    client: &Arc<SegmentClient>,
    keys: &NodeKeys,
    shards: &[ShardId],
    segment: SegmentId,
) -> anyhow::Result<Compacted> {
    let mut out = Compacted::default();
    let mut mover = Mover::new(client, keys)?;
    for &shard in shards {
        let extents = extents_in(meta, shard, segment).await?;
        let mut moves = Vec::new();
        for (ino, old) in extents {
            let Backing::Stripe(x) = &old.backing else {
                continue;
            };
            if x.segment != segment {
                continue;
            }
            out.extents += 1;
            let new = mover.copy(&old, x).await?;
            out.bytes += old.len;
            moves.push(Relocation { ino, old, new });
        }
        out.files += relocate(meta, shard, moves).await;
    }
    mover.finish().await?;
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
