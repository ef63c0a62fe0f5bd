//! Attribute changes made behind buffered bytes. `tar -x` writes a file,
//! then `futimens`, `fchown` and `fchmod` it before closing: three log
//! commits on top of the data's. A setattr on a file whose bytes this mount
//! still buffers is kept with those bytes instead and committed in the same
//! log entry as their extents ([`Op::Write`]'s `then`). That also orders it
//! after the bytes, so a time set with futimens is not overwritten by the
//! later flush of bytes written before it.
//!
//! Only changes the server cannot refuse are deferred: by root, or by the
//! owner when they change neither owner nor group. Another mount changing
//! the owner in between can still make the server refuse; the bytes are
//! then committed alone and the error is returned by the flush (close or
//! fsync). Strict mode never defers.

use std::time::Instant;

use cfs_proto::ops::{LateAttrs, Op};
use cfs_proto::types::*;
use fuser::FileAttr;

use super::{attr_of, now_ns, FileInner, Shared};

/// Whether `set` by `c` on `i` may wait for the buffered bytes.
fn deferrable(c: &Creds, i: &Inode, set: &SetAttr) -> bool {
    set.size.is_none()
        && i.is_reg()
        && (c.uid == 0 || (c.uid == i.uid && set.uid.is_none() && set.gid.is_none()))
}

/// `later` on top of `earlier` (the same caller's credentials).
fn merge(earlier: &mut SetAttr, later: SetAttr) {
    let SetAttr {
        mode,
        uid,
        gid,
        size,
        atime,
        mtime,
        ctime,
    } = later;
    earlier.mode = mode.or(earlier.mode);
    earlier.uid = uid.or(earlier.uid);
    earlier.gid = gid.or(earlier.gid);
    earlier.size = size.or(earlier.size);
    earlier.atime = atime.or(earlier.atime);
    earlier.mtime = mtime.or(earlier.mtime);
    earlier.ctime = ctime.or(earlier.ctime);
}

/// `i` as it will be once `set` is applied (as far as attributes go).
pub(super) fn overlay(i: &Inode, set: &SetAttr) -> Inode {
    let mut o = i.clone();
    let at = |t: &TimeSet| match t {
        TimeSet::Now => now_ns(),
        TimeSet::At(n) => *n,
    };
    if let Some(m) = set.mode {
        o.mode = (i.mode & libc::S_IFMT) | (m & 0o7777);
    }
    o.uid = set.uid.unwrap_or(o.uid);
    o.gid = set.gid.unwrap_or(o.gid);
    if let Some(t) = &set.atime {
        o.atime = at(t);
    }
    if let Some(t) = &set.mtime {
        o.mtime = at(t);
    }
    o.ctime = set.ctime.unwrap_or_else(now_ns);
    o
}

/// Fixes `Now` to this moment: the change is applied later.
fn pin_times(mut set: SetAttr) -> SetAttr {
    for t in [&mut set.atime, &mut set.mtime] {
        if let Some(TimeSet::Now) = t {
            *t = Some(TimeSet::At(now_ns()));
        }
    }
    set
}

impl Shared {
    /// A setattr from the kernel: deferred behind buffered bytes when it
    /// can be, otherwise applied after flushing them (the order the
    /// caller made the changes in).
    pub(super) async fn setattr(
        &self,
        c: Creds,
        ino: Ino,
        set: SetAttr,
    ) -> Result<FileAttr, Errno> {
        let st = self.file(ino);
        let mut f = st.lock().await;
        let buffered = !f.dirty.is_empty() || f.inflight.is_some() || f.late.is_some();
        if buffered && !self.strict() {
            // The attributes read at open while fresh (ours have not
            // changed since: a commit forgets them), else the replica's.
            let i = match &f.opened {
                Some((i, until)) if Instant::now() < *until => i.clone(),
                _ => self.getattr(ino, false).await?,
            };
            let same_caller = f.late.as_ref().is_none_or(|l| l.creds == c);
            if same_caller && deferrable(&c, &i, &set) {
                let set = pin_times(set);
                match &mut f.late {
                    Some(l) => merge(&mut l.set, set),
                    None => f.late = Some(LateAttrs { creds: c, set }),
                }
                let late = f.late.as_ref().map(|l| l.set.clone()).unwrap_or_default();
                return Ok(attr_of(&overlay(&i, &late), f.size.map(|s| s.max(i.size))));
            }
        }
        if buffered || set.size.is_some() {
            self.flush_locked(ino, &mut f).await?;
        }
        let truncates = set.size.is_some();
        let i = self.mutate_attr(c, Op::SetAttr { ino, set }).await?;
        f.opened = None;
        if truncates {
            f.size = None;
            f.ext.clear();
        }
        Ok(attr_of(&i, f.size.map(|s| s.max(i.size))))
    }

    /// Commits a deferred setattr (with the buffered bytes) before an
    /// operation that must see it.
    pub(super) async fn flush_late(&self, ino: Ino) -> Result<(), Errno> {
        let st = self.files.lock().expect("files lock").get(&ino).cloned();
        if let Some(st) = st {
            let mut f = st.lock().await;
            if f.late.is_some() {
                self.flush_locked(ino, &mut f).await?;
            }
        }
        Ok(())
    }
}

/// The attributes `f` defers, if any.
pub(super) fn pending(f: &FileInner) -> Option<&SetAttr> {
    f.late.as_ref().map(|l| &l.set)
}
