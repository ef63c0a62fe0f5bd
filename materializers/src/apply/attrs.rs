//! Attribute changes: setattr (mode, owner, size, times) and extended
//! attributes (set, remove, and who may touch which namespace).

use crate::acl;
use crate::keys;
use crate::ops::Applied;
use crate::perm::{self, W};
use crate::store::Txn;
use crate::types::*;
use cfs_proto::tenant::{valid_tenant, TENANT_XATTR};

use super::data::punch;
use super::entries::{inode, put_inode};
use super::R2;

pub(super) fn setattr(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    ino: Ino,
    set: &SetAttr,
) -> R2<Applied> {
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
        // Checked here too, not only by the kernel; the owner may always
        // (its descriptor was opened for writing before a chmod, D42).
        if !owner && !perm::allowed(&i, c, W) {
            return Err(Errno::EACCES.into());
        }
    }
    let mut changed = false;
    if let Some(size) = set.size {
        if size < i.size {
            punch(t, &mut i, size, u64::MAX - size)?;
        }
        // As a write: anyone but root drops set-user-ID (the mount asks
        // the kernel to leave this to the file system, FUSE_HANDLE_KILLPRIV).
        if c.uid != 0 && set.mode.is_none() {
            i.mode &= !libc::S_ISUID;
            if i.mode & libc::S_IXGRP != 0 {
                i.mode &= !libc::S_ISGID;
            }
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
        // The access ACL's owner, mask and other entries follow.
        if let Some(a) = i.acl.as_mut() {
            acl::chmod(&mut a.access, m);
        }
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
pub(super) fn setxattr(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    ino: Ino,
    name: &[u8],
    value: &[u8],
    flags: i32,
) -> R2<Applied> {
    let mut i = inode(t, ino)?;
    if let Some(kind) = acl::Kind::of(name) {
        return set_acl(t, c, now, i, kind, Some(value), flags);
    }
    xattr_ns_check(&i, c, name)?;
    if value.len() > XATTR_SIZE_MAX {
        return Err(Errno::E2BIG.into());
    }
    // Snapshot requests (D52): names of snapshots, never kept as
    // attributes.
    if name == SNAPSHOT_CREATE_XATTR {
        return super::snapshot::create(t, shard_of(ino), c, now, ino, value);
    }
    if name == SNAPSHOT_DELETE_XATTR {
        return super::snapshot::delete(t, c, now, ino, value);
    }
    let exists = t.get_raw(&keys::xattr(ino, name))?.is_some();
    if flags & libc::XATTR_CREATE != 0 && exists {
        return Err(Errno::EEXIST.into());
    }
    if flags & libc::XATTR_REPLACE != 0 && !exists {
        return Err(Errno::ENODATA.into());
    }
    if name == COMPRESS_XATTR {
        // A policy that does not parse is refused whole (nothing changes).
        let policy = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse::<Compression>().ok())
            .ok_or(Errno::EINVAL)?;
        if i.is_symlink() {
            return Err(Errno::EPERM.into());
        }
        i.compression = Some(policy);
        t.put_raw(keys::xattr(ino, name), policy.to_string().into_bytes());
        i.ctime = now;
        put_inode(t, &i);
        return Ok(Applied::Attr(i));
    }
    if name == DEDUPE_XATTR {
        let policy = parse_on_off(value).ok_or(Errno::EINVAL)?;
        if i.is_symlink() {
            return Err(Errno::EPERM.into());
        }
        i.dedupe = Some(policy);
        t.put_raw(keys::xattr(ino, name), on_off(policy).as_bytes().to_vec());
        i.ctime = now;
        put_inode(t, &i);
        return Ok(Applied::Attr(i));
    }
    if name == TENANT_XATTR {
        // A tenant is a certificate label; whether it has a key is the
        // first shard's to say (the mount asks before setting it).
        let tenant = std::str::from_utf8(value)
            .ok()
            .map(str::trim)
            .filter(|v| valid_tenant(v))
            .ok_or(Errno::EINVAL)?;
        // A file's tenant never changes: its sealed stripes name its
        // tenant's keys (D51). Only directories take a new one.
        if !i.is_dir() {
            return Err(Errno::EPERM.into());
        }
        i.tenant = Some(tenant.to_string());
        t.put_raw(keys::xattr(ino, name), tenant.as_bytes().to_vec());
        i.ctime = now;
        put_inode(t, &i);
        return Ok(Applied::Attr(i));
    }
    t.put_raw(keys::xattr(ino, name), value.to_vec());
    i.ctime = now;
    put_inode(t, &i);
    Ok(Applied::Attr(i))
}

pub(super) fn removexattr(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    ino: Ino,
    name: &[u8],
) -> R2<Applied> {
    let mut i = inode(t, ino)?;
    if let Some(kind) = acl::Kind::of(name) {
        return set_acl(t, c, now, i, kind, None, 0);
    }
    xattr_ns_check(&i, c, name)?;
    if t.get_raw(&keys::xattr(ino, name))?.is_none() {
        return Err(Errno::ENODATA.into());
    }
    t.delete(keys::xattr(ino, name));
    if name == COMPRESS_XATTR {
        i.compression = None;
    }
    if name == DEDUPE_XATTR {
        i.dedupe = None;
    }
    if name == TENANT_XATTR {
        if !i.is_dir() {
            return Err(Errno::EPERM.into());
        }
        i.tenant = None;
    }
    i.ctime = now;
    put_inode(t, &i);
    Ok(Applied::Attr(i))
}

/// Sets (`value`) or removes (`None`, or an empty list) an ACL, as
/// `setfacl` does through its xattr: only the owner or root; a default ACL
/// only on a directory; an access ACL sets the mode's permission bits
/// (its group bits from the mask) and is kept only if the mode cannot say
/// it all; set-group-ID goes if the caller is not in the file's group.
fn set_acl(
    t: &mut Txn<'_>,
    c: &Creds,
    now: Nanos,
    mut i: Inode,
    kind: acl::Kind,
    value: Option<&[u8]>,
    flags: i32,
) -> R2<Applied> {
    if i.is_symlink() {
        return Err(Errno::EOPNOTSUPP.into());
    }
    if !perm::is_owner(&i, c) {
        return Err(Errno::EPERM.into());
    }
    let new = match value {
        Some(v) => acl::parse(v)?,
        None => Vec::new(),
    };
    let exists = !acl::of(&i, kind).is_empty();
    if value.is_none() && !exists {
        return Err(Errno::ENODATA.into());
    }
    if flags & libc::XATTR_CREATE != 0 && exists {
        return Err(Errno::EEXIST.into());
    }
    if flags & libc::XATTR_REPLACE != 0 && !exists {
        return Err(Errno::ENODATA.into());
    }
    match kind {
        acl::Kind::Default if !i.is_dir() => {
            if !new.is_empty() {
                return Err(Errno::EACCES.into());
            }
        }
        acl::Kind::Default => acl::set(&mut i, kind, new),
        acl::Kind::Access if new.is_empty() => acl::set(&mut i, kind, new),
        acl::Kind::Access => {
            i.mode = (i.mode & !0o777) | acl::mode_bits(&new);
            if c.uid != 0 && !c.in_group(i.gid) {
                i.mode &= !libc::S_ISGID;
            }
            let keep = if acl::is_minimal(&new) {
                Vec::new()
            } else {
                new
            };
            acl::set(&mut i, kind, keep);
        }
    }
    i.ctime = now;
    put_inode(t, &i);
    Ok(Applied::Attr(i))
}
