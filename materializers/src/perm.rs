//! POSIX permission checks, decided at apply time from the caller's
//! credentials carried in the log entry.

use crate::types::{Creds, Errno, FsResult, Inode};

pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;

/// Whether `c` may access `i` for every bit of `mask` (`R|W|X`): by its
/// access ACL when it has one, else by its mode bits.
pub fn allowed(i: &Inode, c: &Creds, mask: u32) -> bool {
    if c.uid == 0 {
        // Root may do anything except execute a file nobody may execute.
        return mask & X == 0 || i.is_dir() || i.mode & 0o111 != 0;
    }
    if let Some(a) = i.acl.as_ref().filter(|a| !a.access.is_empty()) {
        return crate::acl::permits(&a.access, i, c, mask);
    }
    let bits = if c.uid == i.uid {
        (i.mode >> 6) & 7
    } else if c.in_group(i.gid) {
        (i.mode >> 3) & 7
    } else {
        i.mode & 7
    };
    bits & mask == mask
}

pub fn check(i: &Inode, c: &Creds, mask: u32) -> FsResult<()> {
    if allowed(i, c, mask) {
        Ok(())
    } else {
        Err(Errno::EACCES)
    }
}

/// The sticky-directory rule: in a `+t` directory only the owner of the
/// entry, the owner of the directory or root may remove or rename it.
pub fn check_sticky(dir: &Inode, victim: &Inode, c: &Creds) -> FsResult<()> {
    if dir.mode & libc::S_ISVTX != 0 && c.uid != 0 && c.uid != dir.uid && c.uid != victim.uid {
        return Err(Errno::EPERM);
    }
    Ok(())
}

pub fn is_owner(i: &Inode, c: &Creds) -> bool {
    c.uid == 0 || c.uid == i.uid
}
