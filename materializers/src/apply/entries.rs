//! Reading and writing inodes and directory entries inside a write batch:
//! the building blocks the operations share (lookups that fail with the
//! POSIX error, adding and removing a name, dropping a link, deleting an
//! inode with everything it owns).

use crate::keys;
use crate::store::Txn;
use crate::types::*;

use super::{Fail, R2};

pub(super) fn get_inode(t: &Txn<'_>, ino: Ino) -> R2<Option<Inode>> {
    Ok(t.get::<Inode>(&keys::inode(ino))?)
}

pub(super) fn inode(t: &Txn<'_>, ino: Ino) -> R2<Inode> {
    get_inode(t, ino)?.ok_or(Fail::Fs(Errno::ENOENT))
}

pub(super) fn put_inode(t: &mut Txn<'_>, i: &Inode) {
    t.put(keys::inode(i.ino), i);
}

pub(super) fn dir(t: &Txn<'_>, ino: Ino) -> R2<Inode> {
    let d = inode(t, ino)?;
    if !d.is_dir() {
        return Err(Errno::ENOTDIR.into());
    }
    Ok(d)
}

/// Dentry value: (ino, kind, cookie).
pub(super) type DentryVal = (Ino, u32, u64);

pub(super) fn get_dentry(t: &Txn<'_>, parent: Ino, name: &[u8]) -> R2<Option<DentryVal>> {
    Ok(t.get::<DentryVal>(&keys::dentry(parent, name))?)
}

pub(super) fn add_dentry(t: &mut Txn<'_>, parent: &mut Inode, name: &[u8], ino: Ino, kind: u32) {
    let cookie = parent.next_cookie;
    parent.next_cookie += 1;
    parent.entries += 1;
    t.put(keys::dentry(parent.ino, name), &(ino, kind, cookie));
    t.put_raw(keys::cookie(parent.ino, cookie), name.to_vec());
}

pub(super) fn remove_dentry(t: &mut Txn<'_>, parent: &mut Inode, name: &[u8], cookie: u64) {
    parent.entries = parent.entries.saturating_sub(1);
    t.delete(keys::dentry(parent.ino, name));
    t.delete(keys::cookie(parent.ino, cookie));
}

pub(super) fn touch_dir(d: &mut Inode, now: Nanos) {
    d.mtime = now;
    d.ctime = now;
}

/// The files the mount asking for an unlink or rename holds open, and
/// which mount that is.
#[derive(Clone, Copy)]
pub(super) struct Held<'a> {
    pub client: u64,
    pub open: &'a [Ino],
}

impl Held<'_> {
    pub const NOTHING: Held<'static> = Held {
        client: 0,
        open: &[],
    };
}

/// Drops one link of `i` (already removed from its directory); deletes a
/// directory, and a file with no links left unless the mount that asked
/// holds it open (`held_open`): then it becomes an orphan that
/// [`Op::Reclaim`] deletes once closed.
pub(super) fn drop_link(t: &mut Txn<'_>, i: &mut Inode, now: Nanos, held: Held<'_>) -> R2<()> {
    i.ctime = now;
    if i.is_dir() {
        i.nlink = 0;
        delete_inode(t, i)?;
        return Ok(());
    }
    i.nlink = i.nlink.saturating_sub(1);
    if i.nlink == 0 {
        if !held.open.contains(&i.ino) {
            return delete_inode(t, i);
        }
        t.put(keys::orphan(i.ino), &now);
        super::holds::keep_orphan(t, held.client, i.ino, now)?;
    }
    put_inode(t, i);
    Ok(())
}

pub(super) fn delete_inode(t: &mut Txn<'_>, i: &Inode) -> R2<()> {
    for p in [
        keys::xattr_prefix(i.ino),
        keys::extent_prefix(i.ino),
        keys::lock_prefix(i.ino),
    ] {
        for (k, _) in t.scan(&p, &keys::prefix_end(&p))? {
            t.delete(k);
        }
    }
    t.delete(keys::symlink(i.ino));
    t.delete(keys::orphan(i.ino));
    t.delete(keys::inode(i.ino));
    Ok(())
}
