//! A mount's hold on a shard (`cfs_proto::hold`): recorded when it takes a
//! lock or keeps an unlinked file open, renewed by the mount, and broken
//! once lapsed, which releases its locks and deletes its orphans there.

use crate::keys;
use crate::ops::Applied;
use crate::store::Txn;
use crate::types::*;

use super::entries::{delete_inode, get_inode};
use super::R2;

fn hold_nanos() -> Nanos {
    Nanos::try_from(cfs_proto::hold::HOLD.as_nanos()).unwrap_or(Nanos::MAX)
}

/// Makes `client`'s hold on `shard` last at least [`cfs_proto::hold::HOLD`]
/// from `now`.
pub(super) fn extend(t: &mut Txn<'_>, shard: ShardId, client: u64, now: Nanos) -> R2<()> {
    let key = keys::hold(shard, client);
    let until = now.saturating_add(hold_nanos());
    if t.get::<Nanos>(&key)?.is_none_or(|old| until > old) {
        t.put(key, &until);
    }
    Ok(())
}

/// Records that `client` holds the orphan `ino` open.
pub(super) fn keep_orphan(t: &mut Txn<'_>, client: u64, ino: Ino, now: Nanos) -> R2<()> {
    let shard = shard_of(ino);
    t.put(keys::held_orphan(shard, client, ino), &());
    extend(t, shard, client, now)
}

/// The mount renews its hold; ESTALE if there is none (it lapsed and was
/// broken, or the mount never had one here).
pub(super) fn renew(t: &mut Txn<'_>, shard: ShardId, client: u64, now: Nanos) -> R2<Applied> {
    if t.get::<Nanos>(&keys::hold(shard, client))?.is_none() {
        return Err(Errno::ESTALE.into());
    }
    extend(t, shard, client, now)?;
    Ok(Applied::None)
}

/// Breaks `client`'s hold on `shard` if it lapsed by `now`: deletes its
/// locks and the orphans it held open, and returns the inodes that had
/// them (`Applied::Changed`; `Applied::None` if nothing was held). A hold
/// renewed since the proposal stays (the entry changes nothing).
pub(super) fn expire(t: &mut Txn<'_>, shard: ShardId, client: u64, now: Nanos) -> R2<Applied> {
    let key = keys::hold(shard, client);
    match t.get::<Nanos>(&key)? {
        Some(until) if until < now => {}
        _ => return Ok(Applied::None),
    }
    t.delete(key);
    let mut released = std::collections::BTreeSet::new();
    let (from, to) = keys::shard_locks(shard);
    for (k, v) in t.scan(&from, &to)? {
        let l: LockRange = crate::store::decode(&k, &v)?;
        if l.client == client {
            t.delete(k.clone());
            released.extend(
                keys::inode_scope(&k)
                    .and_then(|s| s.get(1..9))
                    .and_then(|b| <[u8; 8]>::try_from(b).ok().map(Ino::from_be_bytes)),
            );
        }
    }
    let p = keys::held_orphan_prefix(shard, client);
    for (k, _) in t.scan(&p, &keys::prefix_end(&p))? {
        if let Some(ino) = keys::held_orphan_ino(&k) {
            if let Some(i) = get_inode(t, ino)? {
                if i.nlink == 0 && t.get_raw(&keys::orphan(ino))?.is_some() {
                    delete_inode(t, &i)?;
                    released.insert(ino);
                }
            }
        }
        t.delete(k);
    }
    if released.is_empty() {
        return Ok(Applied::None);
    }
    Ok(Applied::Changed {
        inodes: released.into_iter().collect(),
        entries: Vec::new(),
    })
}

/// The clients whose hold on `shard` lapsed before `now` (at most
/// `limit`): what a shard's leader proposes to break.
pub fn lapsed(
    db: &crate::store::NamespaceDb,
    shard: ShardId,
    now: Nanos,
    limit: usize,
) -> Result<Vec<u64>, crate::store::DbError> {
    let p = keys::hold_prefix(shard);
    let mut out = Vec::new();
    for (k, v) in db.scan(&p, &keys::prefix_end(&p), usize::MAX)? {
        if out.len() >= limit {
            break;
        }
        let until: Nanos = crate::store::decode(&k, &v)?;
        if let (true, Some(client)) = (until < now, keys::hold_client_of(&k)) {
            out.push(client);
        }
    }
    Ok(out)
}
