//! The RocksDB key layout of the namespace. All integers big-endian so that
//! keys sort by them.
//!
//! | key                                   | value                 |
//! |---------------------------------------|-----------------------|
//! | `a` shard:u32                         | applied position u64  |
//! | `n` shard:u32                         | next inode counter    |
//! | `N` shard:u32                         | inode numbers skipped at leader changes |
//! | `N` shard:u32 end_block:u64           | first number of a skipped range |
//! | `i` ino                               | [`Inode`]             |
//! | `d` parent name                       | (ino, kind, cookie)   |
//! | `c` parent cookie                     | name                  |
//! | `l` ino                               | symlink target        |
//! | `x` ino name                          | xattr value           |
//! | `e` ino offset                        | [`ExtentRef`]         |
//! | `k` ino flock:u8 client owner start   | [`LockRange`]         |
//! | `o` ino                               | (orphan: nlink 0)     |
//! | `h` shard client                      | hold lapses at (Nanos) |
//! | `O` shard client ino                  | orphan a mount holds open |
//! | `r` shard client op_id                | outcome of the op     |
//! | `t` key                               | tx holding `key` (lock) |
//! | `p` shard tx                          | prepared intent       |
//! | `q` shard tx                          | decision (kept a while after finish) |
//! | `Q` shard finished_at tx              | decisions by age (for their GC) |
//! | `T` shard                             | intents open (count)  |
//! | `u` shard segment:u128                | [`SegmentUse`]: what the shard's extents reference of it |
//! | `f` shard segment:u128                | fence of a segment being freed (Nanos) |
//! | `w` shard segment:u128 ino offset     | (an extent naming the segment: `e` ino offset) |
//! | `H` shard chunk:[u8;32] ino offset    | (an extent naming a stripe that holds the chunk, D50) |
//! | `K` shard tenant_len:u8 tenant generation:u32 | [`TenantKeyRecord`]: a tenant's key, sealed under the master key (D51) |
//! | `Y` shard                             | next key id u64       |
//! | `E` shard tenant                      | [`Reencryption`]: how far re-encrypting the tenant has gone |
//! | `V`                                   | layout format u32 (no shard) |
//!
//! Every key belongs to one shard ([`owner`]): a shard's entries
//! read and write only its own keys, so replicas that applied other shards
//! to different points still agree.
//! [`Inode`]: crate::types::Inode
//! [`ExtentRef`]: crate::types::ExtentRef
//! [`LockRange`]: crate::types::LockRange
//! [`SegmentUse`]: crate::segment_use::SegmentUse
//! [`TenantKeyRecord`]: cfs_proto::tenant::TenantKeyRecord
//! [`Reencryption`]: cfs_proto::tenant::Reencryption

use crate::types::{Ino, ShardId};
use cfs_proto::tx::TxId;
use cfs_proto::types::{ChunkId, SegmentId};

fn with(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

/// The database's layout format ([`crate::store::FORMAT`]); written when
/// the database is created, checked when it is opened.
pub const FORMAT: &[u8] = b"V";

pub fn applied(shard: ShardId) -> Vec<u8> {
    with(b'a', &[&shard.to_be_bytes()])
}
pub fn next_ino(shard: ShardId) -> Vec<u8> {
    with(b'n', &[&shard.to_be_bytes()])
}
/// The counter of `shard`'s snapshot inodes (D52): numbered from
/// [`crate::apply::SNAPSHOT_INO_BASE`] up, apart from the counter that
/// creates use, so a snapshot promises none of the numbers a leader
/// answers creates with ahead of the log (D41).
pub fn next_snapshot_ino(shard: ShardId) -> Vec<u8> {
    with(b'n', &[&shard.to_be_bytes(), b"s"])
}
/// Inode numbers the counter skipped at leadership terms (D41), so that
/// the count of inodes allocated leaves them out.
pub fn ino_skipped(shard: ShardId) -> Vec<u8> {
    with(b'N', &[&shard.to_be_bytes()])
}
/// A range of inode numbers a new term skipped, by the block of
/// `TERM_INO_SKIP` numbers it ends at: its first number.
pub fn term_skip(shard: ShardId, end_block: u64) -> Vec<u8> {
    with(b'N', &[&shard.to_be_bytes(), &end_block.to_be_bytes()])
}
pub fn inode(ino: Ino) -> Vec<u8> {
    with(b'i', &[&ino.to_be_bytes()])
}
/// The inode an [`inode`] key names; `None` for any other key.
pub fn inode_of(key: &[u8]) -> Option<Ino> {
    match key {
        [b'i', rest @ ..] => Some(Ino::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}
/// The inode an `e` (extent) key belongs to.
pub fn extent_ino(key: &[u8]) -> Option<Ino> {
    match key {
        [b'e', rest @ ..] => Some(Ino::from_be_bytes(rest.get(..8)?.try_into().ok()?)),
        _ => None,
    }
}
pub fn dentry(parent: Ino, name: &[u8]) -> Vec<u8> {
    with(b'd', &[&parent.to_be_bytes(), name])
}
pub fn cookie(parent: Ino, cookie: u64) -> Vec<u8> {
    with(b'c', &[&parent.to_be_bytes(), &cookie.to_be_bytes()])
}
pub fn cookie_prefix(parent: Ino) -> Vec<u8> {
    with(b'c', &[&parent.to_be_bytes()])
}
pub fn symlink(ino: Ino) -> Vec<u8> {
    with(b'l', &[&ino.to_be_bytes()])
}
pub fn xattr(ino: Ino, name: &[u8]) -> Vec<u8> {
    with(b'x', &[&ino.to_be_bytes(), name])
}
pub fn xattr_prefix(ino: Ino) -> Vec<u8> {
    with(b'x', &[&ino.to_be_bytes()])
}
pub fn extent(ino: Ino, offset: u64) -> Vec<u8> {
    with(b'e', &[&ino.to_be_bytes(), &offset.to_be_bytes()])
}
pub fn extent_prefix(ino: Ino) -> Vec<u8> {
    with(b'e', &[&ino.to_be_bytes()])
}
pub fn lock(ino: Ino, flock: bool, client: u64, owner: u64, start: u64) -> Vec<u8> {
    with(
        b'k',
        &[
            &ino.to_be_bytes(),
            &[flock as u8],
            &client.to_be_bytes(),
            &owner.to_be_bytes(),
            &start.to_be_bytes(),
        ],
    )
}
pub fn lock_prefix(ino: Ino) -> Vec<u8> {
    with(b'k', &[&ino.to_be_bytes()])
}
pub fn orphan(ino: Ino) -> Vec<u8> {
    with(b'o', &[&ino.to_be_bytes()])
}

/// When `client`'s hold on `shard` lapses (`cfs_proto::hold`).
pub fn hold(shard: ShardId, client: u64) -> Vec<u8> {
    with(b'h', &[&shard.to_be_bytes(), &client.to_be_bytes()])
}
pub fn hold_prefix(shard: ShardId) -> Vec<u8> {
    with(b'h', &[&shard.to_be_bytes()])
}
/// The client of a [`hold`] key.
pub fn hold_client_of(key: &[u8]) -> Option<u64> {
    match key.first() {
        Some(b'h') if key.len() == 13 => be64_at(key, 5),
        _ => None,
    }
}
/// An orphan `client` holds open on `shard` (deleted with its hold).
pub fn held_orphan(shard: ShardId, client: u64, ino: Ino) -> Vec<u8> {
    with(
        b'O',
        &[
            &shard.to_be_bytes(),
            &client.to_be_bytes(),
            &ino.to_be_bytes(),
        ],
    )
}
pub fn held_orphan_prefix(shard: ShardId, client: u64) -> Vec<u8> {
    with(b'O', &[&shard.to_be_bytes(), &client.to_be_bytes()])
}
/// The inode of a [`held_orphan`] key.
pub fn held_orphan_ino(key: &[u8]) -> Option<Ino> {
    match key.first() {
        Some(b'O') if key.len() == 21 => be64_at(key, 13),
        _ => None,
    }
}
/// The lock keys of every inode of `shard`: `[from, to)`.
pub fn shard_locks(shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    let first = crate::types::make_ino(shard, 0);
    let last = crate::types::make_ino(shard, u64::MAX);
    (lock_prefix(first), prefix_end(&lock_prefix(last)))
}

/// The outcome of a client's operation as `shard` applied it (each shard
/// records and forgets only its own).
pub fn outcome(shard: ShardId, client: u64, op_id: u64) -> Vec<u8> {
    with(
        b'r',
        &[
            &shard.to_be_bytes(),
            &client.to_be_bytes(),
            &op_id.to_be_bytes(),
        ],
    )
}

/// Below which operation id `client`'s outcomes on `shard` are forgotten
/// (so forgetting scans only what it deletes, never old tombstones).
pub fn outcomes_low(shard: ShardId, client: u64) -> Vec<u8> {
    with(b'R', &[&shard.to_be_bytes(), &client.to_be_bytes()])
}

/// When `client` last had an outcome recorded on `shard`, and its
/// highest operation id there ([`ClientSeen`]).
pub fn client_seen(shard: ShardId, client: u64) -> Vec<u8> {
    with(b'S', &[&shard.to_be_bytes(), &client.to_be_bytes()])
}
pub fn client_seen_prefix(shard: ShardId) -> Vec<u8> {
    with(b'S', &[&shard.to_be_bytes()])
}
/// The client of a [`client_seen`] key.
pub fn client_seen_of(key: &[u8]) -> Option<u64> {
    match key.first() {
        Some(b'S') if key.len() == 13 => be64_at(key, 5),
        _ => None,
    }
}
/// A client whose outcomes on `shard` were forgotten: the highest
/// operation id it had there (a retry at or below it gets ESTALE).
/// A used mount token, by expiry (Unix nanoseconds) then id.
pub fn token_used(shard: ShardId, expires: u64, id: u128) -> Vec<u8> {
    with(
        b'U',
        &[
            &shard.to_be_bytes(),
            &expires.to_be_bytes(),
            &id.to_be_bytes(),
        ],
    )
}
pub fn token_used_prefix(shard: ShardId) -> Vec<u8> {
    with(b'U', &[&shard.to_be_bytes()])
}

pub fn client_forgotten(shard: ShardId, client: u64) -> Vec<u8> {
    with(b'G', &[&shard.to_be_bytes(), &client.to_be_bytes()])
}
/// Every outcome of `client` on `shard`.
pub fn outcomes_of(shard: ShardId, client: u64) -> Vec<u8> {
    with(b'r', &[&shard.to_be_bytes(), &client.to_be_bytes()])
}

pub fn tx_lock(key: &[u8]) -> Vec<u8> {
    with(b't', &[key])
}
pub fn intent(shard: ShardId, tx: TxId) -> Vec<u8> {
    with(
        b'p',
        &[
            &shard.to_be_bytes(),
            &tx.coordinator.to_be_bytes(),
            &tx.seq.to_be_bytes(),
        ],
    )
}
pub fn intent_prefix() -> Vec<u8> {
    vec![b'p']
}
pub fn decision(shard: ShardId, tx: TxId) -> Vec<u8> {
    with(
        b'q',
        &[
            &shard.to_be_bytes(),
            &tx.coordinator.to_be_bytes(),
            &tx.seq.to_be_bytes(),
        ],
    )
}
pub fn decision_prefix() -> Vec<u8> {
    vec![b'q']
}
/// Finished decisions of `shard` ordered by the time they finished.
pub fn decision_age(shard: ShardId, finished_at: u64, tx: TxId) -> Vec<u8> {
    with(
        b'Q',
        &[
            &shard.to_be_bytes(),
            &finished_at.to_be_bytes(),
            &tx.coordinator.to_be_bytes(),
            &tx.seq.to_be_bytes(),
        ],
    )
}
pub fn decision_age_prefix(shard: ShardId) -> Vec<u8> {
    with(b'Q', &[&shard.to_be_bytes()])
}
pub fn open_intents(shard: ShardId) -> Vec<u8> {
    with(b'T', &[&shard.to_be_bytes()])
}

/// What `shard`'s extents reference of `segment` (D48).
pub fn segment_use(shard: ShardId, segment: SegmentId) -> Vec<u8> {
    with(b'u', &[&shard.to_be_bytes(), &segment.0.to_be_bytes()])
}
pub fn segment_use_prefix(shard: ShardId) -> Vec<u8> {
    with(b'u', &[&shard.to_be_bytes()])
}
/// `segment`'s fence on `shard` (D48).
pub fn segment_fence(shard: ShardId, segment: SegmentId) -> Vec<u8> {
    with(b'f', &[&shard.to_be_bytes(), &segment.0.to_be_bytes()])
}
pub fn segment_fence_prefix(shard: ShardId) -> Vec<u8> {
    with(b'f', &[&shard.to_be_bytes()])
}
/// Where `segment` is referenced on `shard`: one key per extent key
/// (`extent_key`, an `e` key) naming one of its stripes.
pub fn segment_where(shard: ShardId, segment: SegmentId, extent_key: &[u8]) -> Vec<u8> {
    with(
        b'w',
        &[
            &shard.to_be_bytes(),
            &segment.0.to_be_bytes(),
            extent_key.get(1..).unwrap_or_default(),
        ],
    )
}
pub fn segment_where_prefix(shard: ShardId, segment: SegmentId) -> Vec<u8> {
    with(b'w', &[&shard.to_be_bytes(), &segment.0.to_be_bytes()])
}
/// The extent key a `w` key points at.
pub fn extent_key_of_where(key: &[u8]) -> Option<Vec<u8>> {
    let rest = key.get(21..)?;
    (rest.len() == 16).then(|| with(b'e', &[rest]))
}

/// Where chunk `id` is stored, as `shard` knows it: one key per extent key
/// (`extent_key`) naming a stripe written as that chunk (D50). Their
/// number over all shards is the chunk's reference count.
pub fn chunk_where(shard: ShardId, id: &ChunkId, extent_key: &[u8]) -> Vec<u8> {
    with(
        b'H',
        &[
            &shard.to_be_bytes(),
            &id.0,
            extent_key.get(1..).unwrap_or_default(),
        ],
    )
}
pub fn chunk_where_prefix(shard: ShardId, id: &ChunkId) -> Vec<u8> {
    with(b'H', &[&shard.to_be_bytes(), &id.0])
}
/// The extent key an `H` key points at.
pub fn extent_key_of_chunk_where(key: &[u8]) -> Option<Vec<u8>> {
    let rest = key.get(37..)?;
    (rest.len() == 16).then(|| with(b'e', &[rest]))
}

/// Generation `generation` of `tenant`'s key (D51).
pub fn tenant_key(shard: ShardId, tenant: &str, generation: u32) -> Vec<u8> {
    let mut k = tenant_keys_prefix(shard, tenant);
    k.extend_from_slice(&generation.to_be_bytes());
    k
}
/// Every generation of `tenant`'s key, oldest first.
pub fn tenant_keys_prefix(shard: ShardId, tenant: &str) -> Vec<u8> {
    // Tenant names are at most 63 bytes (`cfs_proto::tenant`).
    let len = [tenant.len().min(255) as u8];
    with(b'K', &[&shard.to_be_bytes(), &len, tenant.as_bytes()])
}
/// Every tenant's keys on `shard`.
pub fn all_tenant_keys(shard: ShardId) -> Vec<u8> {
    with(b'K', &[&shard.to_be_bytes()])
}
pub fn next_key_id(shard: ShardId) -> Vec<u8> {
    with(b'Y', &[&shard.to_be_bytes()])
}
/// How far re-encrypting `tenant` has gone.
pub fn reencryption(shard: ShardId, tenant: &str) -> Vec<u8> {
    with(b'E', &[&shard.to_be_bytes(), tenant.as_bytes()])
}
pub fn all_reencryption(shard: ShardId) -> Vec<u8> {
    with(b'E', &[&shard.to_be_bytes()])
}

/// The segment a `u`, `f` or `w` key names.
pub fn segment_of(key: &[u8]) -> Option<SegmentId> {
    Some(SegmentId(u128::from_be_bytes(
        key.get(5..21)?.try_into().ok()?,
    )))
}

/// Whether `key` is namespace data (inodes, entries, attributes, locks)
/// rather than bookkeeping: only data keys may be in a transaction.
pub fn is_data(key: &[u8]) -> bool {
    matches!(
        key.first(),
        Some(b'i' | b'd' | b'c' | b'l' | b'x' | b'e' | b'k' | b'o' | b'n' | b'h' | b'O')
    )
}

/// The shard `key` belongs to; `None` for malformed keys.
pub fn owner(key: &[u8]) -> Option<ShardId> {
    match key.first()? {
        b'i' | b'd' | b'c' | b'l' | b'x' | b'e' | b'k' | b'o' => {
            be64_at(key, 1).map(crate::types::shard_of)
        }
        b'n' | b'N' | b'a' | b'p' | b'q' | b'Q' | b'T' | b'r' | b'R' | b'h' | b'O' | b'S'
        | b'G' | b'U' | b'u' | b'f' | b'w' | b'H' | b'K' | b'Y' | b'E' => {
            be32_at(key, 1).map(ShardId)
        }
        b't' => owner(&key[1..]),
        _ => None,
    }
}

// --- decoding: the only place that knows where fields sit in a key ---

fn be64_at(key: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(at..at + 8)?.try_into().ok()?))
}

fn be32_at(key: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(key.get(at..at + 4)?.try_into().ok()?))
}

/// The parent and name of a [`dentry`] key.
pub fn dentry_of(key: &[u8]) -> Option<(Ino, &[u8])> {
    match key.first() {
        Some(b'd') if key.len() > 9 => Some((be64_at(key, 1)?, &key[9..])),
        _ => None,
    }
}

/// The attribute name of an [`xattr`] key.
pub fn xattr_name_of(key: &[u8]) -> Option<&[u8]> {
    match key.first() {
        Some(b'x') if key.len() >= 9 => Some(&key[9..]),
        _ => None,
    }
}

/// The directory and cookie of a [`cookie`] key.
pub fn cookie_of(key: &[u8]) -> Option<(Ino, u64)> {
    match key.first() {
        Some(b'c') if key.len() == 17 => Some((be64_at(key, 1)?, be64_at(key, 9)?)),
        _ => None,
    }
}

/// The shard and transaction of an [`intent`] or [`decision`] key.
pub fn tx_record_of(key: &[u8]) -> Option<(ShardId, TxId)> {
    match key.first() {
        Some(b'p' | b'q') if key.len() == 21 => Some((
            ShardId(be32_at(key, 1)?),
            TxId::new(be64_at(key, 5)?, be64_at(key, 13)?),
        )),
        _ => None,
    }
}

/// The transaction of a [`decision_age`] key.
pub fn decision_age_tx(key: &[u8]) -> Option<TxId> {
    match key.first() {
        Some(b'Q') if key.len() == 29 => Some(TxId::new(be64_at(key, 13)?, be64_at(key, 21)?)),
        _ => None,
    }
}

/// The part of a per-inode key (`i`, `d`, `c`, `l`, `x`, `e`, `k`, `o`)
/// that names its inode: the tag and the inode number. A scan that stays
/// below `prefix_end` of it stays within that inode's keys.
pub fn inode_scope(key: &[u8]) -> Option<&[u8]> {
    match key.first()? {
        b'i' | b'd' | b'c' | b'l' | b'x' | b'e' | b'k' | b'o' => key.get(..9),
        _ => None,
    }
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut e = prefix.to_vec();
    while let Some(last) = e.pop() {
        if last < 0xff {
            e.push(last + 1);
            return e;
        }
    }
    vec![0xff; prefix.len() + 1]
}

#[cfg(test)]
mod codec_tests {
    use super::*;

    #[test]
    fn keys_decode_to_what_encoded_them() {
        assert_eq!(inode_of(&inode(0xfeed)), Some(0xfeed));
        assert_eq!(inode_of(&dentry(1, b"x")), None);
        assert_eq!(dentry_of(&dentry(7, b"name")), Some((7, &b"name"[..])));
        assert_eq!(dentry_of(&inode(7)), None);
        assert_eq!(cookie_of(&cookie(9, 42)), Some((9, 42)));
        assert_eq!(
            tx_record_of(&intent(ShardId(3), TxId::new(4, 5))),
            Some((ShardId(3), TxId::new(4, 5)))
        );
        assert_eq!(
            tx_record_of(&decision(ShardId(3), TxId::new(4, 5))),
            Some((ShardId(3), TxId::new(4, 5)))
        );
        assert_eq!(tx_record_of(&b"q"[..]), None);
        assert_eq!(
            decision_age_tx(&decision_age(ShardId(2), 99, TxId::new(4, 5))),
            Some(TxId::new(4, 5))
        );
        assert_eq!(
            owner(&inode(crate::types::make_ino(ShardId(3), 1))),
            Some(ShardId(3))
        );
        assert_eq!(owner(&applied(ShardId(6))), Some(ShardId(6)));
        assert_eq!(owner(&b"i"[..]), None);
        assert_eq!(inode_scope(&xattr(5, b"user.a")), Some(&xattr(5, b"")[..]));
        assert_eq!(inode_scope(&applied(ShardId(1))), None);
    }
}
