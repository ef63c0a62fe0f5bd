//! Applies one namespace operation to the state, deterministically: the
//! outcome depends only on the state and the entry (its credentials and
//! timestamp included), so every replica and every replay agrees.

use crate::keys;
use crate::ops::{Applied, ApplyResult, LoggedOp, Op};
use crate::perm::{self, W, X};
use crate::store::{DbError, Txn};
use crate::types::*;

/// Link count beyond which `link` fails with EMLINK.
pub const LINK_MAX: u32 = 65_000;
/// Longest extent reference: writes are split so that overlap search can
/// look back a bounded distance.
pub const EXTENT_LEN_MAX: u64 = 8 << 20;

/// Why an operation did not apply: a POSIX error (a normal outcome, the
/// same on every replica) or a failure of the local database (fatal).
pub(crate) enum Fail {
    Fs(Errno),
    Db(DbError),
    /// Not applied and not recorded as the operation's outcome: the
    /// proposer retries (EAGAIN: keys held by an open transaction) or
    /// turns to a cross-shard transaction (EXDEV).
    Retry(Errno),
}

impl From<Errno> for Fail {
    fn from(e: Errno) -> Self {
        Fail::Fs(e)
    }
}
impl From<DbError> for Fail {
    fn from(e: DbError) -> Self {
        Fail::Db(e)
    }
}

pub(crate) type R2<T> = Result<T, Fail>;

/// Applies `op` (decided on `shard`) to `txn`. The outer error is a
/// database failure; the inner result is the operation's outcome. A failed
/// operation leaves `txn` unchanged.
///
/// Two outcomes are not recorded for retries of the same operation id,
/// because the operation did not happen and the proposer tries again:
/// EXDEV (it needs another shard's keys: the proposer runs it as a
/// cross-shard transaction, see [`crate::tx`]) and EAGAIN (it touches keys
/// an open transaction holds).
pub fn apply(txn: &mut Txn<'_>, shard: u32, lop: &LoggedOp) -> Result<ApplyResult, DbError> {
    txn.set_owner(Some(shard));
    let outcome_key = (lop.op_id != 0).then(|| keys::outcome(shard, lop.client, lop.op_id));
    if let Some(k) = &outcome_key {
        if let Some(r) = txn.get::<ApplyResult>(k)? {
            return Ok(r);
        }
    }
    let res = match &lop.op {
        Op::TxPrepare { .. } | Op::TxDecide { .. } | Op::TxFinish { .. } => {
            crate::tx::apply(txn, shard, lop)
        }
        _ => apply_inner(txn, shard, lop, None).and_then(|a| {
            if let Some(e) = txn.foreign_write() {
                return Err(Fail::Db(e));
            }
            crate::tx::check_locks(txn, shard)?;
            Ok(a)
        }),
    };
    let r = match res {
        Ok(a) => {
            txn.keep();
            Ok(a)
        }
        Err(Fail::Fs(e)) => {
            txn.rollback();
            Err(e)
        }
        Err(Fail::Retry(e)) => {
            txn.rollback();
            return Ok(Err(e));
        }
        Err(Fail::Db(DbError::NotOwned { .. })) => {
            // What it read here may be held by an open transaction: then
            // wait for that (EAGAIN) rather than plan on half of it.
            let e = match crate::tx::check_locks(txn, shard) {
                Err(Fail::Retry(e)) => e,
                Err(Fail::Db(e)) => return Err(e),
                _ => Errno::EXDEV,
            };
            txn.rollback();
            return Ok(Err(e));
        }
        Err(Fail::Db(e)) => {
            txn.rollback();
            return Err(e);
        }
    };
    if let Some(k) = outcome_key {
        txn.put(k, &r);
        if lop.op_id > OUTCOMES_KEPT {
            // Forget this client's outcomes on this shard that are too old
            // to be retried (op ids of a client spread over the shards, so
            // this is a range, usually holding one key or none). The scan
            // starts where the last one ended: from 0 it would step over
            // the tombstones of every outcome forgotten before, a cost
            // growing with the client's age (measured: 25 ms per small
            // file after ~60 000 operations of one mount).
            let low_key = keys::outcomes_low(shard, lop.client);
            let low = txn.get::<u64>(&low_key)?.unwrap_or(0);
            let high = lop.op_id - OUTCOMES_KEPT;
            if high > low {
                let from = keys::outcome(shard, lop.client, low);
                let to = keys::outcome(shard, lop.client, high);
                for (k, _) in txn.scan(&from, &to)? {
                    txn.delete(k);
                }
                txn.put(low_key, &high);
            }
        }
        txn.keep();
    }
    Ok(r)
}

/// Runs `lop` against the whole namespace without the one-shard
/// restriction, leaving its changes in `txn`'s current entry: how a
/// coordinator plans a cross-shard operation. `new_ino` places a created
/// inode (a directory on another shard).
pub fn plan(
    txn: &mut Txn<'_>,
    lop: &LoggedOp,
    new_ino: Option<Ino>,
) -> Result<ApplyResult, DbError> {
    txn.set_owner(None);
    match apply_inner(txn, shard_of(lop.op.home()), lop, new_ino) {
        Ok(a) => Ok(Ok(a)),
        Err(Fail::Fs(e)) | Err(Fail::Retry(e)) => Ok(Err(e)),
        Err(Fail::Db(e)) => Err(e),
    }
}

/// Outcomes remembered per client for retries: a client never has more
/// operations than this outstanding.
pub const OUTCOMES_KEPT: u64 = 16_384;

/// Creates the root directory if the shard owning it has none yet.
pub fn ensure_root(txn: &mut Txn<'_>, shard: u32) -> Result<(), DbError> {
    if shard != shard_of(ROOT_INO) || txn.get_raw(&keys::inode(ROOT_INO))?.is_some() {
        return Ok(());
    }
    let root = Inode {
        ino: ROOT_INO,
        mode: libc::S_IFDIR | 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        nlink: 2,
        atime: 0,
        mtime: 0,
        ctime: 0,
        crtime: 0,
        rdev: 0,
        generation: 1,
        allocated: 0,
        parent: ROOT_INO,
        next_cookie: 3,
        entries: 0,
    };
    txn.put(keys::inode(ROOT_INO), &root);
    txn.put(keys::next_ino(shard), &2u64);
    txn.keep();
    Ok(())
}

fn apply_inner(t: &mut Txn<'_>, shard: u32, lop: &LoggedOp, new_ino: Option<Ino>) -> R2<Applied> {
    let c = &lop.creds;
    let now = lop.now;
    if lop.op.shard() != shard {
        return Err(Errno::EXDEV.into());
    }
    match &lop.op {
        Op::Create {
            parent,
            name,
            mode,
            rdev,
            target,
            excl,
        } => create(
            t,
            shard,
            c,
            now,
            *parent,
            name,
            *mode,
            *rdev,
            target.as_deref(),
            *excl,
            new_ino,
        ),
        Op::Link { ino, parent, name } => link(t, c, now, *ino, *parent, name),
        Op::Unlink {
            parent,
            name,
            held_open,
        } => unlink(t, c, now, *parent, name, held_open),
        Op::Rmdir { parent, name } => rmdir(t, c, now, *parent, name),
        Op::Rename {
            parent,
            name,
            newparent,
            newname,
            flags,
            held_open,
        } => rename(
            t, c, now, *parent, name, *newparent, newname, *flags, held_open,
        ),
        Op::SetAttr { ino, set } => setattr(t, c, now, *ino, set),
        Op::SetXattr {
            ino,
            name,
            value,
            flags,
        } => setxattr(t, c, now, *ino, name, value, *flags),
        Op::RemoveXattr { ino, name } => removexattr(t, c, now, *ino, name),
        Op::Write { ino, extents, then } => {
            let written = write(t, c, now, *ino, extents)?;
            match then {
                Some(late) => setattr(t, &late.creds, now, *ino, &late.set),
                None => Ok(written),
            }
        }
        Op::Fallocate {
            ino,
            offset,
            len,
            mode,
        } => fallocate(t, now, *ino, *offset, *len, *mode),
        Op::Lock { ino, lock } => set_lock(t, *ino, lock),
        Op::ReleaseLocks {
            ino,
            client,
            owner,
            flock,
        } => {
            for (k, v) in t.scan(
                &keys::lock_prefix(*ino),
                &keys::prefix_end(&keys::lock_prefix(*ino)),
            )? {
                let l: LockRange = crate::store::decode(&k, &v)?;
                if l.client == *client && l.owner == *owner && l.flock == *flock {
                    t.delete(k);
                }
            }
            Ok(Applied::None)
        }
        Op::Reclaim { ino } => {
            if let Some(i) = get_inode(t, *ino)? {
                if i.nlink == 0 {
                    delete_inode(t, &i)?;
                }
            }
            Ok(Applied::None)
        }
        Op::TxPrepare { .. } | Op::TxDecide { .. } | Op::TxFinish { .. } => {
            Err(Errno::EINVAL.into())
        }
    }
}

pub fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::EINVAL);
    }
    if name.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(())
}

fn get_inode(t: &Txn<'_>, ino: Ino) -> R2<Option<Inode>> {
    Ok(t.get::<Inode>(&keys::inode(ino))?)
}

fn inode(t: &Txn<'_>, ino: Ino) -> R2<Inode> {
    get_inode(t, ino)?.ok_or(Fail::Fs(Errno::ENOENT))
}

fn put_inode(t: &mut Txn<'_>, i: &Inode) {
    t.put(keys::inode(i.ino), i);
}

fn dir(t: &Txn<'_>, ino: Ino) -> R2<Inode> {
    let d = inode(t, ino)?;
    if !d.is_dir() {
        return Err(Errno::ENOTDIR.into());
    }
    Ok(d)
}

/// Dentry value: (ino, kind, cookie).
type DentryVal = (Ino, u32, u64);

fn get_dentry(t: &Txn<'_>, parent: Ino, name: &[u8]) -> R2<Option<DentryVal>> {
    Ok(t.get::<DentryVal>(&keys::dentry(parent, name))?)
}

fn add_dentry(t: &mut Txn<'_>, parent: &mut Inode, name: &[u8], ino: Ino, kind: u32) {
    let cookie = parent.next_cookie;
    parent.next_cookie += 1;
    parent.entries += 1;
    t.put(keys::dentry(parent.ino, name), &(ino, kind, cookie));
    t.put_raw(keys::cookie(parent.ino, cookie), name.to_vec());
}

fn remove_dentry(t: &mut Txn<'_>, parent: &mut Inode, name: &[u8], cookie: u64) {
    parent.entries = parent.entries.saturating_sub(1);
    t.delete(keys::dentry(parent.ino, name));
    t.delete(keys::cookie(parent.ino, cookie));
}

fn touch_dir(d: &mut Inode, now: Nanos) {
    d.mtime = now;
    d.ctime = now;
}

/// Drops one link of `i` (already removed from its directory); deletes a
/// directory, and a file with no links left unless the mount that asked
/// holds it open (`held_open`): then it becomes an orphan that
/// [`Op::Reclaim`] deletes once closed.
fn drop_link(t: &mut Txn<'_>, i: &mut Inode, now: Nanos, held_open: &[Ino]) -> R2<()> {
    i.ctime = now;
    if i.is_dir() {
        i.nlink = 0;
        delete_inode(t, i)?;
        return Ok(());
    }
    i.nlink = i.nlink.saturating_sub(1);
    if i.nlink == 0 {
        if !held_open.contains(&i.ino) {
            return delete_inode(t, i);
        }
        t.put(keys::orphan(i.ino), &now);
    }
    put_inode(t, i);
    Ok(())
}

fn delete_inode(t: &mut Txn<'_>, i: &Inode) -> R2<()> {
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

#[allow(clippy::too_many_arguments)]
fn create(
    t: &mut Txn<'_>,
    shard: u32,
    c: &Creds,
    now: Nanos,
    parent: Ino,
    name: &[u8],
    mode: u32,
    rdev: u32,
    target: Option<&[u8]>,
    excl: bool,
    new_ino: Option<Ino>,
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
        Some(ino) => {
            if get_inode(t, ino)?.is_some() {
                return Err(Errno::EEXIST.into());
            }
            (ino, ino & 0xffff_ffff)
        }
        None => {
            let n: u64 = t.get(&keys::next_ino(shard))?.unwrap_or(2);
            t.put(keys::next_ino(shard), &(n + 1));
            (make_ino(shard, n), n)
        }
    };
    let mut perms = mode & 0o7777;
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
        parent,
        next_cookie: 3,
        entries: 0,
    };
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

fn link(t: &mut Txn<'_>, c: &Creds, now: Nanos, ino: Ino, parent: Ino, name: &[u8]) -> R2<Applied> {
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

fn unlink(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    parent: Ino,
    name: &[u8],
    held_open: &[Ino],
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
    drop_link(t, &mut i, now, held_open)?;
    Ok(Applied::Attr(i))
}

fn rmdir(t: &mut Txn<'_>, c: &Creds, now: Nanos, parent: Ino, name: &[u8]) -> R2<Applied> {
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
    drop_link(t, &mut i, now, &[])?;
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
fn rename(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    parent: Ino,
    name: &[u8],
    newparent: Ino,
    newname: &[u8],
    flags: u32,
    held_open: &[Ino],
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
        drop_link(t, d, now, held_open)?;
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

fn setattr(t: &mut Txn<'_>, c: &Creds, now: Nanos, ino: Ino, set: &SetAttr) -> R2<Applied> {
    let mut i = inode(t, ino)?;
    let owner = perm::is_owner(&i, c);
    if let Some(uid) = set.uid {
        if c.uid != 0 && uid != i.uid {
            return Err(Errno::EPERM.into());
        }
    }
    if let Some(gid) = set.gid {
        if c.uid != 0 && (c.uid != i.uid || (gid != i.gid && !c.in_group(gid))) {
            return Err(Errno::EPERM.into());
        }
    }
    if set.mode.is_some() && !owner {
        return Err(Errno::EPERM.into());
    }
    for ts in [set.atime, set.mtime].into_iter().flatten() {
        match ts {
            TimeSet::At(_) if !owner => return Err(Errno::EPERM.into()),
            TimeSet::Now if !owner && !perm::allowed(&i, c, W) => return Err(Errno::EACCES.into()),
            _ => {}
        }
    }
    if let Some(size) = set.size {
        if i.is_dir() {
            return Err(Errno::EISDIR.into());
        }
        if !i.is_reg() {
            return Err(Errno::EINVAL.into());
        }
        if size > FILE_SIZE_MAX {
            return Err(Errno::EFBIG.into());
        }
    }
    let mut changed = false;
    if let Some(size) = set.size {
        if size < i.size {
            punch(t, &mut i, size, u64::MAX - size)?;
        }
        i.size = size;
        i.mtime = now;
        changed = true;
    }
    if let Some(mode) = set.mode {
        let mut m = mode & 0o7777;
        if c.uid != 0 && !i.is_dir() && !c.in_group(set.gid.unwrap_or(i.gid)) {
            m &= !libc::S_ISGID;
        }
        i.mode = (i.mode & libc::S_IFMT) | m;
        changed = true;
    }
    if set.uid.is_some() || set.gid.is_some() {
        let uid_changes = set.uid.is_some_and(|u| u != i.uid);
        let gid_changes = set.gid.is_some_and(|g| g != i.gid);
        if let Some(u) = set.uid {
            i.uid = u;
        }
        if let Some(g) = set.gid {
            i.gid = g;
        }
        // As Linux: a chown of a non-directory drops set-user-ID, and
        // set-group-ID when group execution is on, unless mode is set too.
        if !i.is_dir() && set.mode.is_none() && (uid_changes || gid_changes || c.uid != 0) {
            i.mode &= !libc::S_ISUID;
            if i.mode & libc::S_IXGRP != 0 {
                i.mode &= !libc::S_ISGID;
            }
        }
        changed = true;
    }
    if let Some(a) = set.atime {
        i.atime = match a {
            TimeSet::Now => now,
            TimeSet::At(ns) => ns,
        };
        changed = true;
    }
    if let Some(m) = set.mtime {
        i.mtime = match m {
            TimeSet::Now => now,
            TimeSet::At(ns) => ns,
        };
        changed = true;
    }
    if changed {
        i.ctime = set.ctime.unwrap_or(now);
    }
    put_inode(t, &i);
    Ok(Applied::Attr(i))
}

fn xattr_ns_check(i: &Inode, c: &Creds, name: &[u8]) -> R2<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(Errno::ERANGE.into());
    }
    if name.starts_with(b"user.") {
        if !i.is_reg() && !i.is_dir() {
            return Err(Errno::EPERM.into());
        }
        if i.is_dir() && i.mode & libc::S_ISVTX != 0 && !perm::is_owner(i, c) {
            return Err(Errno::EPERM.into());
        }
        Ok(())
    } else if name.starts_with(b"trusted.") || name.starts_with(b"security.") {
        if c.uid != 0 && name.starts_with(b"trusted.") {
            return Err(Errno::EPERM.into());
        }
        Ok(())
    } else {
        Err(Errno::EOPNOTSUPP.into())
    }
}

#[allow(clippy::too_many_arguments)]
fn setxattr(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    ino: Ino,
    name: &[u8],
    value: &[u8],
    flags: i32,
) -> R2<Applied> {
    let mut i = inode(t, ino)?;
    xattr_ns_check(&i, c, name)?;
    if value.len() > XATTR_SIZE_MAX {
        return Err(Errno::E2BIG.into());
    }
    let exists = t.get_raw(&keys::xattr(ino, name))?.is_some();
    if flags & libc::XATTR_CREATE != 0 && exists {
        return Err(Errno::EEXIST.into());
    }
    if flags & libc::XATTR_REPLACE != 0 && !exists {
        return Err(Errno::ENODATA.into());
    }
    t.put_raw(keys::xattr(ino, name), value.to_vec());
    i.ctime = now;
    put_inode(t, &i);
    Ok(Applied::Attr(i))
}

fn removexattr(t: &mut Txn<'_>, c: &Creds, now: Nanos, ino: Ino, name: &[u8]) -> R2<Applied> {
    let mut i = inode(t, ino)?;
    xattr_ns_check(&i, c, name)?;
    if t.get_raw(&keys::xattr(ino, name))?.is_none() {
        return Err(Errno::ENODATA.into());
    }
    t.delete(keys::xattr(ino, name));
    i.ctime = now;
    put_inode(t, &i);
    Ok(Applied::Attr(i))
}

/// Removes the mapping of `[off, off + len)`, splitting extents that
/// straddle its ends. Adjusts `allocated`.
fn punch(t: &mut Txn<'_>, i: &mut Inode, off: u64, len: u64) -> R2<()> {
    let end = off.saturating_add(len);
    let from = off.saturating_sub(EXTENT_LEN_MAX);
    let lo = keys::extent(i.ino, from);
    let hi = if end == u64::MAX {
        keys::prefix_end(&keys::extent_prefix(i.ino))
    } else {
        keys::extent(i.ino, end)
    };
    for (k, v) in t.scan(&lo, &hi)? {
        let e: ExtentRef = crate::store::decode(&k, &v)?;
        let e_end = e.offset + e.len;
        if e_end <= off || e.offset >= end {
            continue;
        }
        t.delete(k);
        i.allocated = i.allocated.saturating_sub(e.len);
        if e.offset < off {
            let head = e.part(e.offset, off);
            i.allocated += head.len;
            t.put(keys::extent(i.ino, head.offset), &head);
        }
        if e_end > end {
            let tail = e.part(end, e_end);
            i.allocated += tail.len;
            t.put(keys::extent(i.ino, tail.offset), &tail);
        }
    }
    Ok(())
}

fn write(t: &mut Txn<'_>, c: &Creds, now: Nanos, ino: Ino, extents: &[ExtentRef]) -> R2<Applied> {
    let mut i = inode(t, ino)?;
    if i.is_dir() {
        return Err(Errno::EISDIR.into());
    }
    if !i.is_reg() {
        return Err(Errno::EINVAL.into());
    }
    if !extents.iter().all(|e| e.valid(EXTENT_LEN_MAX)) {
        return Err(Errno::EINVAL.into());
    }
    for e in extents {
        punch(t, &mut i, e.offset, e.len)?;
        t.put(keys::extent(ino, e.offset), e);
        i.allocated += e.len;
        i.size = i.size.max(e.offset + e.len);
    }
    if c.uid != 0 {
        i.mode &= !libc::S_ISUID;
        if i.mode & libc::S_IXGRP != 0 {
            i.mode &= !libc::S_ISGID;
        }
    }
    i.mtime = now;
    i.ctime = now;
    put_inode(t, &i);
    Ok(Applied::Attr(i))
}

fn fallocate(
    t: &mut Txn<'_>,
    now: Nanos,
    ino: Ino,
    offset: u64,
    len: u64,
    mode: i32,
) -> R2<Applied> {
    let mut i = inode(t, ino)?;
    if i.is_dir() {
        return Err(Errno::EISDIR.into());
    }
    if !i.is_reg() {
        return Err(Errno::ENODEV.into());
    }
    if len == 0 {
        return Err(Errno::EINVAL.into());
    }
    let end = offset
        .checked_add(len)
        .filter(|e| *e <= FILE_SIZE_MAX)
        .ok_or(Fail::Fs(Errno::EFBIG))?;
    let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    match mode & !libc::FALLOC_FL_KEEP_SIZE {
        0 => {}
        libc::FALLOC_FL_PUNCH_HOLE if keep => punch(t, &mut i, offset, len)?,
        libc::FALLOC_FL_ZERO_RANGE => punch(t, &mut i, offset, len)?,
        _ => return Err(Errno::EOPNOTSUPP.into()),
    }
    if !keep && end > i.size {
        i.size = end;
    }
    i.mtime = now;
    i.ctime = now;
    put_inode(t, &i);
    Ok(Applied::Attr(i))
}

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

fn set_lock(t: &mut Txn<'_>, ino: Ino, l: &LockRange) -> R2<Applied> {
    inode(t, ino)?;
    if l.start >= l.end {
        return Err(Errno::EINVAL.into());
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
    }
    Ok(Applied::None)
}
