//! Byte-range and flock locks: finding a conflicting lock and setting or
//! releasing one owner's locks over a range.

use crate::keys;
use crate::ops::Applied;
use crate::store::{DbError, Txn};
use crate::types::*;

use super::entries::inode;
use super::R2;

fn conflicts(a: &LockRange, b: &LockRange) -> bool {
    a.flock == b.flock
        && (a.client, a.owner) != (b.client, b.owner)
        && a.start < b.end
        && b.start < a.end
        && (a.typ == libc::F_WRLCK || b.typ == libc::F_WRLCK)
}

/// The first lock held by someone else that conflicts with `l`.
pub fn find_conflict(t: &Txn<'_>, ino: Ino, l: &LockRange) -> Result<Option<LockRange>, DbError> {
    let p = keys::lock_prefix(ino);
    for (k, v) in t.scan(&p, &keys::prefix_end(&p))? {
        let h: LockRange = crate::store::decode(&k, &v)?;
        if conflicts(l, &h) {
            return Ok(Some(h));
        }
    }
    Ok(None)
}

/// Sets (or with `F_UNLCK` releases) `l`. Taking a lock needs some
/// access to the file: its owner, or a caller the mode (or ACL) lets read
/// or write. Whether the descriptor was opened for writing (which a
/// POSIX write lock needs) only the mount's kernel knows and checks; a
/// flock, which needs no write access, arrives the same way through this
/// FUSE binding, so no more is asked here. Without this, any user of any
/// mount could lock up files they cannot even read.
pub(super) fn set_lock(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    ino: Ino,
    l: &LockRange,
) -> R2<Applied> {
    let i = inode(t, ino)?;
    if l.start >= l.end {
        return Err(Errno::EINVAL.into());
    }
    if l.typ != libc::F_UNLCK
        && !crate::perm::is_owner(&i, c)
        && !crate::perm::allowed(&i, c, crate::perm::R)
        && !crate::perm::allowed(&i, c, crate::perm::W)
    {
        return Err(Errno::EACCES.into());
    }
    if l.typ != libc::F_UNLCK {
        if let Some(h) = find_conflict(t, ino, l)? {
            return Ok(Applied::Conflict(h));
        }
    }
    // Replace this owner's locks over the range: cut them around it.
    let p = keys::lock_prefix(ino);
    for (k, v) in t.scan(&p, &keys::prefix_end(&p))? {
        let h: LockRange = crate::store::decode(&k, &v)?;
        if h.flock != l.flock || (h.client, h.owner) != (l.client, l.owner) {
            continue;
        }
        if h.end <= l.start || h.start >= l.end {
            continue;
        }
        t.delete(k);
        if h.start < l.start {
            let head = LockRange {
                end: l.start,
                ..h.clone()
            };
            t.put(
                keys::lock(ino, head.flock, head.client, head.owner, head.start),
                &head,
            );
        }
        if h.end > l.end {
            let tail = LockRange {
                start: l.end,
                ..h.clone()
            };
            t.put(
                keys::lock(ino, tail.flock, tail.client, tail.owner, tail.start),
                &tail,
            );
        }
    }
    if l.typ != libc::F_UNLCK {
        t.put(keys::lock(ino, l.flock, l.client, l.owner, l.start), l);
        super::holds::extend(t, shard_of(ino), l.client, now)?;
    }
    Ok(Applied::None)
}
