//! Snapshots of a subtree (docs/decisions.md D52): one log entry (a
//! `SetXattr` of [`SNAPSHOT_CREATE_XATTR`] on the directory, root only)
//! copies the directory's whole subtree, as it is at that entry's place in
//! the log, into a read-only tree at `DIR/.snapshots/NAME`: new inodes
//! with the same attributes, names, symlink targets, extended attributes
//! and extent maps. The copies name the same stripes, so the data is
//! shared, not copied, and pinned: the segment counts and the chunk index
//! count the copies' extents like any others (`Txn::keep`), so nothing a
//! snapshot names is freed until the snapshot is deleted
//! ([`SNAPSHOT_DELETE_XATTR`]), which removes the copy in one entry.
//!
//! One entry is one shard's: the subtree must live on the directory's
//! shard (every directory deeper than the spread depth does, unless
//! entries were moved or linked in from another shard): otherwise EXDEV
//! and nothing changes. At most [`SNAPSHOT_INODES_MAX`] inodes.

use crate::keys;
use crate::ops::{Applied, Op};
use crate::store::Txn;
use crate::types::*;

use super::entries::{add_dentry, delete_inode, dir, get_dentry, inode, put_inode, remove_dentry};
use super::{check_name, Fail, R2};

/// The entries of directory `parent`: (name, inode, kind).
fn entries_of(t: &Txn<'_>, parent: Ino) -> R2<Vec<(Vec<u8>, Ino, u32)>> {
    let p = keys::dentry(parent, b"");
    let mut out = Vec::new();
    for (k, v) in t.scan(&p, &keys::prefix_end(&p))? {
        let Some((_, name)) = keys::dentry_of(&k) else {
            continue;
        };
        let (ino, kind, _): (Ino, u32, u64) = crate::store::decode(&k, &v)?;
        out.push((name.to_vec(), ino, kind));
    }
    Ok(out)
}

/// The next snapshot inode of `shard` (never one a create may be given:
/// creates count up from 2 and would need 2^47 of them to get here).
fn new_ino(t: &mut Txn<'_>, shard: ShardId) -> R2<Ino> {
    let n: u64 = t
        .get(&keys::next_snapshot_ino(shard))?
        .unwrap_or(super::SNAPSHOT_INO_BASE);
    t.put(keys::next_snapshot_ino(shard), &(n + 1));
    Ok(make_ino(shard, n))
}

/// A read-only copy of `from` numbered `ino` (no entries yet; a
/// directory's links are counted as its copied subdirectories arrive).
fn copy_of(from: &Inode, ino: Ino, parent: Ino) -> Inode {
    Inode {
        ino,
        nlink: if from.is_dir() { 2 } else { 0 },
        parent,
        generation: ino & INO_COUNTER_MASK,
        next_cookie: 3,
        entries: 0,
        snapshot: true,
        ..from.clone()
    }
}

/// Copies what `from` owns besides its inode record: extended
/// attributes, a symlink's target, the extent map.
fn copy_owned(t: &mut Txn<'_>, from: Ino, to: Ino) -> R2<()> {
    for (k, v) in t.scan(
        &keys::xattr_prefix(from),
        &keys::prefix_end(&keys::xattr_prefix(from)),
    )? {
        if let Some(name) = keys::xattr_name_of(&k) {
            t.put_raw(keys::xattr(to, name), v);
        }
    }
    if let Some(target) = t.get_raw(&keys::symlink(from))? {
        t.put_raw(keys::symlink(to), target);
    }
    let ep = keys::extent_prefix(from);
    for (k, v) in t.scan(&ep, &keys::prefix_end(&ep))? {
        let Some(offset) = k
            .get(9..17)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
        else {
            continue;
        };
        t.put_raw(keys::extent(to, offset), v);
    }
    Ok(())
}

/// Makes `DIR/.snapshots/name`, a read-only copy of `DIR`'s subtree.
pub(super) fn create(
    t: &mut Txn<'_>,
    shard: ShardId,
    c: &Creds,
    now: Nanos,
    ino: Ino,
    name: &[u8],
) -> R2<Applied> {
    if c.uid != 0 {
        return Err(Errno::EPERM.into());
    }
    check_name(name)?;
    if name == b"." || name == b".." {
        return Err(Errno::EINVAL.into());
    }
    let mut d = dir(t, ino)?;
    if d.snapshot {
        return Err(Errno::EROFS.into());
    }
    // The subtree, parents before children, each entry once: walked
    // before anything is written, so a refusal changes nothing.
    let mut walk: Vec<(Ino, Vec<u8>, Ino, u32)> = Vec::new();
    let mut dirs = vec![ino];
    let mut i = 0;
    while i < dirs.len() {
        let parent = dirs[i];
        i += 1;
        for (n, child, kind) in entries_of(t, parent)? {
            // Snapshots of the directory or of one below it are not
            // copied again.
            if n == SNAPSHOTS_DIR {
                continue;
            }
            if shard_of(child) != shard {
                return Err(Errno::EXDEV.into());
            }
            if walk.len() >= SNAPSHOT_INODES_MAX {
                return Err(Errno::EFBIG.into());
            }
            if kind == libc::S_IFDIR {
                dirs.push(child);
            }
            walk.push((parent, n, child, kind));
        }
    }
    // The container, made with the first snapshot.
    let mut container = match get_dentry(t, ino, SNAPSHOTS_DIR)? {
        Some((c_ino, _, _)) => inode(t, c_ino)?,
        None => {
            let c_ino = new_ino(t, shard)?;
            let cont = Inode {
                snapshot: true,
                ..super::root_owned_dir(c_ino, 0o555, ino, now, c_ino)
            };
            add_dentry(t, &mut d, SNAPSHOTS_DIR, c_ino, libc::S_IFDIR);
            d.nlink += 1;
            cont
        }
    };
    if get_dentry(t, container.ino, name)?.is_some() {
        return Err(Errno::EEXIST.into());
    }
    // The copy's root: the directory as it is, under the container.
    let root_ino = new_ino(t, shard)?;
    let mut copies: std::collections::BTreeMap<Ino, Inode> = Default::default();
    let mut root = copy_of(&d, root_ino, container.ino);
    // The copy's root tells when the snapshot was taken.
    root.ctime = now;
    copy_owned(t, ino, root_ino)?;
    copies.insert(ino, root);
    for (parent, n, child, kind) in walk {
        let new = match copies.get(&child) {
            // Another link to a file already copied.
            Some(c) => c.ino,
            None => {
                let from = inode(t, child)?;
                let new_ino = new_ino(t, shard)?;
                let new_parent = copies.get(&parent).map_or(0, |p| p.ino);
                copy_owned(t, child, new_ino)?;
                copies.insert(child, copy_of(&from, new_ino, new_parent));
                new_ino
            }
        };
        let Some(mut p) = copies.remove(&parent) else {
            return Err(Errno::EIO.into());
        };
        add_dentry(t, &mut p, &n, new, kind);
        if kind == libc::S_IFDIR {
            p.nlink += 1;
        }
        copies.insert(parent, p);
        if kind != libc::S_IFDIR {
            if let Some(f) = copies.get_mut(&child) {
                f.nlink += 1;
            }
        }
    }
    for i in copies.values() {
        put_inode(t, i);
    }
    add_dentry(t, &mut container, name, root_ino, libc::S_IFDIR);
    container.nlink += 1;
    container.mtime = now;
    container.ctime = now;
    put_inode(t, &container);
    d.ctime = now;
    put_inode(t, &d);
    Ok(Applied::Changed {
        inodes: vec![ino, container.ino],
        entries: vec![
            (ino, SNAPSHOTS_DIR.to_vec()),
            (container.ino, name.to_vec()),
        ],
    })
}

/// Deletes `DIR/.snapshots/name` and everything in it (and the container
/// with the last snapshot): the data it alone named is then free.
pub(super) fn delete(t: &mut Txn<'_>, c: &Creds, now: Nanos, ino: Ino, name: &[u8]) -> R2<Applied> {
    if c.uid != 0 {
        return Err(Errno::EPERM.into());
    }
    check_name(name)?;
    let mut d = dir(t, ino)?;
    let (c_ino, _, _) = get_dentry(t, ino, SNAPSHOTS_DIR)?.ok_or(Errno::ENOENT)?;
    let mut container = inode(t, c_ino)?;
    let (snap, _, cookie) = get_dentry(t, c_ino, name)?.ok_or(Errno::ENOENT)?;
    // Every inode of the copy (all on this shard, all read-only).
    let mut inos = vec![snap];
    let mut seen = std::collections::BTreeSet::from([snap]);
    let mut i = 0;
    while i < inos.len() {
        let parent = inos[i];
        i += 1;
        let pi = inode(t, parent)?;
        if !pi.is_dir() {
            continue;
        }
        for (n, child, _) in entries_of(t, parent)? {
            let cookie = t
                .get::<(Ino, u32, u64)>(&keys::dentry(parent, &n))?
                .map_or(0, |(_, _, c)| c);
            t.delete(keys::dentry(parent, &n));
            t.delete(keys::cookie(parent, cookie));
            if seen.insert(child) {
                inos.push(child);
            }
        }
    }
    for i in &inos {
        if let Some(x) = t.get::<Inode>(&keys::inode(*i))? {
            if !x.snapshot {
                // Never: a snapshot's copy names only its own inodes.
                return Err(Errno::EIO.into());
            }
            delete_inode(t, &x)?;
        }
    }
    remove_dentry(t, &mut container, name, cookie);
    container.nlink = container.nlink.saturating_sub(1);
    container.mtime = now;
    container.ctime = now;
    let mut entries = vec![(c_ino, name.to_vec())];
    if container.entries == 0 {
        let (_, _, cc) = get_dentry(t, ino, SNAPSHOTS_DIR)?.ok_or(Errno::EIO)?;
        remove_dentry(t, &mut d, SNAPSHOTS_DIR, cc);
        d.nlink = d.nlink.saturating_sub(1);
        delete_inode(t, &container)?;
        entries.push((ino, SNAPSHOTS_DIR.to_vec()));
    } else {
        put_inode(t, &container);
    }
    d.ctime = now;
    put_inode(t, &d);
    Ok(Applied::Changed {
        inodes: vec![ino, c_ino],
        entries,
    })
}

/// Refuses a change to a snapshot (EROFS) or to the name of a snapshot
/// container (EPERM): checked before every namespace change.
pub(super) fn refuse_read_only(t: &Txn<'_>, op: &Op) -> R2<()> {
    let (inos, names): (Vec<Ino>, Vec<&[u8]>) = match op {
        Op::Create { parent, name, .. } => (vec![*parent], vec![name]),
        Op::Unlink { parent, name, .. } | Op::Rmdir { parent, name } => (vec![*parent], vec![name]),
        Op::Rename {
            parent,
            name,
            newparent,
            newname,
            ..
        } => (vec![*parent, *newparent], vec![name, newname]),
        Op::Link { ino, parent, name } => (vec![*ino, *parent], vec![name]),
        Op::SetAttr { ino, .. }
        | Op::SetXattr { ino, .. }
        | Op::RemoveXattr { ino, .. }
        | Op::Write { ino, .. }
        | Op::Fallocate { ino, .. } => (vec![*ino], vec![]),
        _ => return Ok(()),
    };
    if names.contains(&SNAPSHOTS_DIR) {
        return Err(Errno::EPERM.into());
    }
    for ino in inos {
        match t.get::<Inode>(&keys::inode(ino)) {
            Ok(Some(i)) if i.snapshot => return Err(Errno::EROFS.into()),
            Ok(_) => {}
            Err(e) => return Err(Fail::Db(e)),
        }
    }
    Ok(())
}
