//! Operations that change names: create (files, directories, symlinks,
//! devices), link, unlink, rmdir and rename.

use crate::keys;
use crate::ops::Applied;
use crate::perm::{self, W, X};
use crate::store::Txn;
use crate::types::*;
use cfs_proto::tenant::TENANT_XATTR;

use super::entries::{
    add_dentry, dir, drop_link, get_dentry, get_inode, inode, put_inode, remove_dentry, touch_dir,
    Held,
};
use super::{check_name, Fail, LINK_MAX, R2};

/// Where a created inode's number comes from.
pub(super) enum NewIno {
    /// The shard's counter.
    Counter,
    /// Chosen by a coordinator (a directory placed on another shard).
    Placed(Ino),
    /// A replayed create's answered number (D41).
    Replayed(Ino),
}

#[allow(clippy::too_many_arguments)]
pub(super) fn create(
    t: &mut Txn<'_>,
    shard: ShardId,
    c: &Creds,
    now: Nanos,
    parent: Ino,
    name: &[u8],
    (mode, umask): (u32, u32),
    rdev: u32,
    target: Option<&[u8]>,
    excl: bool,
    new_ino: NewIno,
) -> R2<Applied> {
    check_name(name)?;
    let mut p = dir(t, parent)?;
    if p.nlink == 0 {
        return Err(Errno::ENOENT.into());
    }
    if name == b"." || name == b".." {
        return Err(Errno::EEXIST.into());
    }
    if let Some((ino, _, _)) = get_dentry(t, parent, name)? {
        let existing = inode(t, ino)?;
        if !excl && mode & libc::S_IFMT == libc::S_IFREG && existing.is_reg() {
            return Ok(Applied::Attr(existing));
        }
        return Err(Errno::EEXIST.into());
    }
    perm::check(&p, c, W | X)?;
    let kind = mode & libc::S_IFMT;
    match kind {
        libc::S_IFREG
        | libc::S_IFDIR
        | libc::S_IFIFO
        | libc::S_IFSOCK
        | libc::S_IFCHR
        | libc::S_IFBLK => {}
        libc::S_IFLNK => match target {
            None => return Err(Errno::EINVAL.into()),
            Some([]) => return Err(Errno::ENOENT.into()),
            Some(tg) if tg.len() >= PATH_MAX => return Err(Errno::ENAMETOOLONG.into()),
            Some(_) => {}
        },
        _ => return Err(Errno::EINVAL.into()),
    }
    if kind == libc::S_IFDIR && p.nlink >= LINK_MAX {
        return Err(Errno::EMLINK.into());
    }
    let (ino, n) = match new_ino {
        NewIno::Placed(ino) => {
            if get_inode(t, ino)?.is_some() {
                return Err(Errno::EEXIST.into());
            }
            (ino, ino & 0xffff_ffff)
        }
        NewIno::Replayed(ino) => {
            let n = ino & INO_COUNTER_MASK;
            if shard_of(ino) != shard || !super::promised_in_a_past_term(t, shard, n)? {
                return Err(Errno::EINVAL.into());
            }
            if get_inode(t, ino)?.is_some() {
                return Err(Errno::EEXIST.into());
            }
            // Counted as allocated again.
            let skipped: u64 = t.get(&keys::ino_skipped(shard))?.unwrap_or(0);
            t.put(keys::ino_skipped(shard), &skipped.saturating_sub(1));
            (ino, n)
        }
        NewIno::Counter => {
            let n: u64 = t.get(&keys::next_ino(shard))?.unwrap_or(2);
            t.put(keys::next_ino(shard), &(n + 1));
            (make_ino(shard, n), n)
        }
    };
    // A directory's default ACL decides the new inode's ACL and
    // permission bits instead of the umask (symlinks take neither).
    let inherited = match crate::acl::of(&p, crate::acl::Kind::Default) {
        d if d.is_empty() || kind == libc::S_IFLNK => None,
        d => Some(d.to_vec()),
    };
    let mut perms = match &inherited {
        Some(d) => crate::acl::inherit(d, mode & 0o7777).1,
        None => mode & 0o7777 & !(umask & 0o777),
    };
    let gid = if p.mode & libc::S_ISGID != 0 {
        if kind == libc::S_IFDIR {
            perms |= libc::S_ISGID;
        }
        p.gid
    } else {
        c.gid
    };
    if kind != libc::S_IFDIR && perms & libc::S_ISGID != 0 && c.uid != 0 && !c.in_group(gid) {
        perms &= !libc::S_ISGID;
    }
    if kind == libc::S_IFLNK {
        perms = 0o777;
    }
    let i = Inode {
        ino,
        mode: kind | perms,
        uid: c.uid,
        gid,
        size: target.map(|t| t.len() as u64).unwrap_or(0),
        nlink: if kind == libc::S_IFDIR { 2 } else { 1 },
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        rdev: if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
            rdev
        } else {
            0
        },
        generation: n,
        allocated: 0,
        stored: 0,
        parent,
        next_cookie: 3,
        entries: 0,
        acl: None,
        // A subtree's compression policy goes to what is made in it.
        compression: p.compression,
        dedupe: p.dedupe,
        tenant: p.tenant.clone(),
        snapshot: false,
    };
    let mut i = i;
    if let Some(d) = inherited {
        let (access, _) = crate::acl::inherit(&d, mode & 0o7777);
        if !crate::acl::is_minimal(&access) {
            crate::acl::set(&mut i, crate::acl::Kind::Access, access);
        }
        if kind == libc::S_IFDIR {
            crate::acl::set(&mut i, crate::acl::Kind::Default, d);
        }
    }
    if let Some(c) = i.compression.filter(|_| kind != libc::S_IFLNK) {
        t.put_raw(keys::xattr(ino, COMPRESS_XATTR), c.to_string().into_bytes());
    } else {
        i.compression = None;
    }
    if let Some(d) = i.dedupe.filter(|_| kind != libc::S_IFLNK) {
        t.put_raw(
            keys::xattr(ino, DEDUPE_XATTR),
            on_off(d).as_bytes().to_vec(),
        );
    } else {
        i.dedupe = None;
    }
    match i.tenant.clone().filter(|_| kind != libc::S_IFLNK) {
        Some(tn) => t.put_raw(keys::xattr(ino, TENANT_XATTR), tn.into_bytes()),
        None => i.tenant = None,
    }
    if let Some(tg) = target {
        t.put_raw(keys::symlink(ino), tg.to_vec());
    }
    put_inode(t, &i);
    add_dentry(t, &mut p, name, ino, kind);
    if kind == libc::S_IFDIR {
        p.nlink += 1;
    }
    touch_dir(&mut p, now);
    put_inode(t, &p);
    Ok(Applied::Attr(i))
}

pub(super) fn link(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    ino: Ino,
    parent: Ino,
    name: &[u8],
) -> R2<Applied> {
    check_name(name)?;
    let mut i = inode(t, ino)?;
    let mut p = dir(t, parent)?;
    if i.is_dir() {
        return Err(Errno::EPERM.into());
    }
    if name == b"." || name == b".." || get_dentry(t, parent, name)?.is_some() {
        return Err(Errno::EEXIST.into());
    }
    perm::check(&p, c, W | X)?;
    if i.nlink == 0 {
        return Err(Errno::ENOENT.into());
    }
    if i.nlink >= LINK_MAX {
        return Err(Errno::EMLINK.into());
    }
    i.nlink += 1;
    i.ctime = now;
    put_inode(t, &i);
    add_dentry(t, &mut p, name, ino, i.kind());
    touch_dir(&mut p, now);
    put_inode(t, &p);
    Ok(Applied::Attr(i))
}

pub(super) fn unlink(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    parent: Ino,
    name: &[u8],
    held: Held<'_>,
) -> R2<Applied> {
    check_name(name)?;
    let mut p = dir(t, parent)?;
    let (ino, _, cookie) = get_dentry(t, parent, name)?.ok_or(Fail::Fs(Errno::ENOENT))?;
    let mut i = inode(t, ino)?;
    if i.is_dir() {
        return Err(Errno::EISDIR.into());
    }
    perm::check(&p, c, W | X)?;
    perm::check_sticky(&p, &i, c)?;
    remove_dentry(t, &mut p, name, cookie);
    touch_dir(&mut p, now);
    put_inode(t, &p);
    drop_link(t, &mut i, now, held)?;
    Ok(Applied::Attr(i))
}

pub(super) fn rmdir(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    parent: Ino,
    name: &[u8],
) -> R2<Applied> {
    if name == b"." {
        return Err(Errno::EINVAL.into());
    }
    if name == b".." {
        return Err(Errno::ENOTEMPTY.into());
    }
    check_name(name)?;
    let mut p = dir(t, parent)?;
    let (ino, _, cookie) = get_dentry(t, parent, name)?.ok_or(Fail::Fs(Errno::ENOENT))?;
    let mut i = inode(t, ino)?;
    if !i.is_dir() {
        return Err(Errno::ENOTDIR.into());
    }
    perm::check(&p, c, W | X)?;
    perm::check_sticky(&p, &i, c)?;
    if i.entries > 0 {
        return Err(Errno::ENOTEMPTY.into());
    }
    remove_dentry(t, &mut p, name, cookie);
    p.nlink = p.nlink.saturating_sub(1);
    touch_dir(&mut p, now);
    put_inode(t, &p);
    drop_link(t, &mut i, now, Held::NOTHING)?;
    Ok(Applied::Attr(i))
}

/// Whether `ancestor` is `ino` or one of its ancestors.
fn is_ancestor(t: &Txn<'_>, ancestor: Ino, mut ino: Ino) -> R2<bool> {
    for _ in 0..100_000 {
        if ino == ancestor {
            return Ok(true);
        }
        if ino == ROOT_INO {
            return Ok(false);
        }
        ino = inode(t, ino)?.parent;
    }
    Err(Errno::ELOOP.into())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rename(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    parent: Ino,
    name: &[u8],
    newparent: Ino,
    newname: &[u8],
    flags: u32,
    held: Held<'_>,
) -> R2<Applied> {
    const NOREPLACE: u32 = libc::RENAME_NOREPLACE;
    const EXCHANGE: u32 = libc::RENAME_EXCHANGE;
    if flags & !(NOREPLACE | EXCHANGE) != 0 || flags == NOREPLACE | EXCHANGE {
        return Err(Errno::EINVAL.into());
    }
    check_name(name)?;
    check_name(newname)?;
    for n in [name, newname] {
        if n == b"." || n == b".." {
            return Err(Errno::EINVAL.into());
        }
    }
    let mut p = dir(t, parent)?;
    let (sino, skind, scookie) = get_dentry(t, parent, name)?.ok_or(Fail::Fs(Errno::ENOENT))?;
    let mut np = if newparent == parent {
        p.clone()
    } else {
        dir(t, newparent)?
    };
    let dst = get_dentry(t, newparent, newname)?;
    let mut s = inode(t, sino)?;
    perm::check(&p, c, W | X)?;
    perm::check(&np, c, W | X)?;
    perm::check_sticky(&p, &s, c)?;
    if flags & EXCHANGE != 0 {
        let (dino, dkind, dcookie) = dst.ok_or(Fail::Fs(Errno::ENOENT))?;
        if dino == sino {
            return Ok(Applied::Attr(s));
        }
        let mut d = inode(t, dino)?;
        perm::check_sticky(&np, &d, c)?;
        if parent != newparent {
            if s.is_dir() {
                perm::check(&s, c, W)?;
                if is_ancestor(t, sino, newparent)? {
                    return Err(Errno::EINVAL.into());
                }
            }
            if d.is_dir() {
                perm::check(&d, c, W)?;
                if is_ancestor(t, dino, parent)? {
                    return Err(Errno::EINVAL.into());
                }
            }
        }
        t.put(keys::dentry(parent, name), &(dino, dkind, scookie));
        t.put(keys::dentry(newparent, newname), &(sino, skind, dcookie));
        if parent != newparent {
            if s.is_dir() {
                s.parent = newparent;
                p.nlink -= 1;
                np.nlink += 1;
            }
            if d.is_dir() {
                d.parent = parent;
                np.nlink -= 1;
                p.nlink += 1;
            }
        }
        s.ctime = now;
        d.ctime = now;
        put_inode(t, &s);
        put_inode(t, &d);
        touch_dir(&mut p, now);
        touch_dir(&mut np, now);
        if parent == newparent {
            put_inode(t, &p);
        } else {
            put_inode(t, &p);
            put_inode(t, &np);
        }
        return Ok(Applied::Attr(s));
    }
    if let Some((dino, _, _)) = dst {
        if flags & NOREPLACE != 0 {
            return Err(Errno::EEXIST.into());
        }
        if dino == sino {
            return Ok(Applied::Attr(s));
        }
    }
    let mut victim = match dst {
        Some((dino, _, dcookie)) => {
            let d = inode(t, dino)?;
            perm::check_sticky(&np, &d, c)?;
            if s.is_dir() && !d.is_dir() {
                return Err(Errno::ENOTDIR.into());
            }
            if !s.is_dir() && d.is_dir() {
                return Err(Errno::EISDIR.into());
            }
            if d.is_dir() && d.entries > 0 {
                return Err(Errno::ENOTEMPTY.into());
            }
            Some((d, dcookie))
        }
        None => None,
    };
    if s.is_dir() && parent != newparent {
        perm::check(&s, c, W)?;
        if is_ancestor(t, sino, newparent)? {
            return Err(Errno::EINVAL.into());
        }
    }
    // Unlink the source name.
    remove_dentry(t, &mut p, name, scookie);
    if parent == newparent {
        np = p.clone();
    }
    if let Some((d, dcookie)) = victim.as_mut() {
        remove_dentry(t, &mut np, newname, *dcookie);
        if d.is_dir() {
            np.nlink -= 1;
        }
        drop_link(t, d, now, held)?;
    }
    add_dentry(t, &mut np, newname, sino, skind);
    if s.is_dir() && parent != newparent {
        p.nlink -= 1;
        np.nlink += 1;
        s.parent = newparent;
    }
    s.ctime = now;
    put_inode(t, &s);
    touch_dir(&mut np, now);
    if parent == newparent {
        put_inode(t, &np);
    } else {
        touch_dir(&mut p, now);
        put_inode(t, &p);
        put_inode(t, &np);
    }
    Ok(Applied::Attr(s))
}
