//! The extent map of a file: writes, fallocate, and punching out ranges
//! (also how a truncation drops what lies past the new size).

use crate::keys;
use crate::ops::Applied;
use crate::store::Txn;
use crate::types::*;
use cfs_proto::ops::Relocation;

use super::entries::{inode, put_inode};
use super::{Fail, EXTENT_LEN_MAX, R2};

/// Removes the mapping of `[off, off + len)`, splitting extents that
/// straddle its ends. Adjusts `allocated`.
pub(super) fn punch(t: &mut Txn<'_>, i: &mut Inode, off: u64, len: u64) -> R2<()> {
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
        i.stored = i.stored.saturating_sub(e.stored_bytes());
        if e.offset < off {
            let head = e.part(e.offset, off);
            i.allocated += head.len;
            i.stored += head.stored_bytes();
            t.put(keys::extent(i.ino, head.offset), &head);
        }
        if e_end > end {
            let tail = e.part(end, e_end);
            i.allocated += tail.len;
            i.stored += tail.stored_bytes();
            t.put(keys::extent(i.ino, tail.offset), &tail);
        }
    }
    Ok(())
}

pub(super) fn write(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    ino: Ino,
    extents: &[ExtentRef],
) -> R2<Applied> {
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
    may_write(&i, c)?;
    refuse_fenced(t, shard_of(ino), extents)?;
    for e in extents {
        punch(t, &mut i, e.offset, e.len)?;
        t.put(keys::extent(ino, e.offset), e);
        i.allocated += e.len;
        i.stored += e.stored_bytes();
        i.size = i.size.max(e.offset + e.len);
    }
    drop_privileges(&mut i, c);
    i.mtime = now;
    i.ctime = now;
    put_inode(t, &i);
    Ok(Applied::Attr(i))
}

/// FREED_DATA if an extent names a segment fenced on `shard` (being
/// freed, D48): the writer writes those bytes again.
fn refuse_fenced(t: &Txn<'_>, shard: ShardId, extents: &[ExtentRef]) -> R2<()> {
    let mut seen: Vec<SegmentId> = Vec::new();
    for e in extents {
        let Backing::Stripe(s) = &e.backing else {
            continue;
        };
        if seen.contains(&s.segment) {
            continue;
        }
        seen.push(s.segment);
        if t.peek(&keys::segment_fence(shard, s.segment))?.is_some() {
            return Err(Errno::FREED_DATA.into());
        }
    }
    Ok(())
}

/// Fences the `segments` no extent of `shard` references, or lifts their
/// fences (D48).
pub(super) fn fence_segments(
    t: &mut Txn<'_>,
    now: Nanos,
    shard: ShardId,
    segments: &[SegmentId],
    fence: bool,
) -> R2<Applied> {
    if segments.len() > cfs_proto::ops::FENCE_SEGMENTS_MAX {
        return Err(Errno::EINVAL.into());
    }
    for &segment in segments {
        let key = keys::segment_fence(shard, segment);
        if !fence {
            t.delete(key);
        } else if t.peek(&keys::segment_use(shard, segment))?.is_none() {
            t.put(key, &now);
        }
    }
    Ok(Applied::None)
}

/// Compaction's relocations (D48): each applied only where the file still
/// maps exactly the extent copied. Returns the inodes changed.
pub(super) fn relocate(t: &mut Txn<'_>, shard: ShardId, moves: &[Relocation]) -> R2<Applied> {
    if moves.len() > cfs_proto::ops::RELOCATIONS_MAX {
        return Err(Errno::EINVAL.into());
    }
    for m in moves {
        if shard_of(m.ino) != shard || !m.tiles() || !m.new.iter().all(|e| e.valid(EXTENT_LEN_MAX))
        {
            return Err(Errno::EINVAL.into());
        }
    }
    let mut inodes = Vec::new();
    for m in moves {
        let key = keys::extent(m.ino, m.old.offset);
        if t.get::<ExtentRef>(&key)?.as_ref() != Some(&m.old) {
            continue;
        }
        if refuse_fenced(t, shard, &m.new).is_err() {
            continue;
        }
        t.delete(key);
        for e in &m.new {
            t.put(keys::extent(m.ino, e.offset), e);
        }
        // Sizes and times stay; what the bytes take may not (the copy may
        // be compressed differently).
        let mut i = inode(t, m.ino)?;
        i.stored = i.stored.saturating_sub(m.old.stored_bytes())
            + m.new.iter().map(ExtentRef::stored_bytes).sum::<u64>();
        put_inode(t, &i);
        if !inodes.contains(&m.ino) {
            inodes.push(m.ino);
        }
    }
    Ok(Applied::Changed {
        inodes,
        entries: Vec::new(),
    })
}

/// Whether `c` may change `i`'s bytes. The kernel checked the file's mode
/// when the writer opened it; this checks again on the server, so a mount
/// cannot write what its users could not open. As knfsd does, the owner
/// may always write (a file opened for writing and then made read-only,
/// as `cp -p` and tar do, keeps taking its bytes).
fn may_write(i: &Inode, c: &Creds) -> R2<()> {
    if c.uid == i.uid {
        return Ok(());
    }
    Ok(crate::perm::check(i, c, crate::perm::W)?)
}

/// A change of the bytes by anyone but root drops set-user-ID, and
/// set-group-ID where it means "setgid executable" (group-execute set),
/// as every local file system does (`file_remove_privs`).
fn drop_privileges(i: &mut Inode, c: &Creds) {
    if c.uid != 0 {
        i.mode &= !libc::S_ISUID;
        if i.mode & libc::S_IXGRP != 0 {
            i.mode &= !libc::S_ISGID;
        }
    }
}

pub(super) fn fallocate(
    t: &mut Txn<'_>,
    c: &Creds,
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
    may_write(&i, c)?;
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
    drop_privileges(&mut i, c);
    i.mtime = now;
    i.ctime = now;
    put_inode(t, &i);
    Ok(Applied::Attr(i))
}
