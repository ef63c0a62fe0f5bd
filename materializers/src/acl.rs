//! POSIX ACLs (`system.posix_acl_access`, `system.posix_acl_default`):
//! the kernel's xattr encoding, validation, the access check, and how an
//! ACL and the mode bits follow each other (as Linux's `fs/posix_acl.c`).
//!
//! An inode's ACLs live in its [`Inode::acl`], so every permission check
//! and every create (which inherits its parent's default ACL) has them
//! without another read.

use crate::types::{AclEntry, Acls, Creds, Errno, FsResult, Inode};

pub const ACCESS_XATTR: &[u8] = b"system.posix_acl_access";
pub const DEFAULT_XATTR: &[u8] = b"system.posix_acl_default";

pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;

/// The xattr format's version (`POSIX_ACL_XATTR_VERSION`).
const XATTR_VERSION: u32 = 2;
/// The id of entries that name none (`ACL_UNDEFINED_ID`).
const UNDEFINED_ID: u32 = u32::MAX;
/// Entries one ACL may hold (ext4 fits about 500 in a 4 KiB block; more
/// is refused with ENOSPC, as there).
pub const ENTRIES_MAX: usize = 1024;

/// Which of an inode's ACLs an xattr name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Access,
    Default,
}

impl Kind {
    pub fn of(name: &[u8]) -> Option<Kind> {
        match name {
            ACCESS_XATTR => Some(Kind::Access),
            DEFAULT_XATTR => Some(Kind::Default),
            _ => None,
        }
    }
}

/// Decodes and validates an ACL xattr value: sorted, each required entry
/// once, a mask when named entries exist, no id twice (EINVAL otherwise).
/// An empty list (a header alone) means "no ACL".
pub fn parse(value: &[u8]) -> FsResult<Vec<AclEntry>> {
    let (head, body) = value.split_at_checked(4).ok_or(Errno::EINVAL)?;
    if u32::from_le_bytes(head.try_into().map_err(|_| Errno::EINVAL)?) != XATTR_VERSION
        || body.len() % 8 != 0
    {
        return Err(Errno::EINVAL);
    }
    if body.len() / 8 > ENTRIES_MAX {
        return Err(Errno::ENOSPC);
    }
    let mut v: Vec<AclEntry> = body
        .chunks_exact(8)
        .map(|c| AclEntry {
            tag: u16::from_le_bytes([c[0], c[1]]),
            perm: u16::from_le_bytes([c[2], c[3]]),
            id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    for e in v.iter_mut() {
        if e.perm & !7 != 0 {
            return Err(Errno::EINVAL);
        }
        match e.tag {
            USER_OBJ | GROUP_OBJ | MASK | OTHER => e.id = UNDEFINED_ID,
            USER | GROUP => {}
            _ => return Err(Errno::EINVAL),
        }
    }
    v.sort();
    if v.is_empty() {
        return Ok(v);
    }
    let count = |t: u16| v.iter().filter(|e| e.tag == t).count();
    let named = count(USER) + count(GROUP);
    let ok = count(USER_OBJ) == 1
        && count(GROUP_OBJ) == 1
        && count(OTHER) == 1
        && count(MASK) <= 1
        && (named == 0 || count(MASK) == 1)
        && v.windows(2)
            .all(|w| (w[0].tag, w[0].id) != (w[1].tag, w[1].id));
    if ok {
        Ok(v)
    } else {
        Err(Errno::EINVAL)
    }
}

/// The xattr value of `acl` (as the kernel encodes it).
pub fn format(acl: &[AclEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 * acl.len());
    out.extend_from_slice(&XATTR_VERSION.to_le_bytes());
    for e in acl {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        out.extend_from_slice(&e.id.to_le_bytes());
    }
    out
}

/// Whether `acl` says no more than mode bits can (the three base
/// entries): then it is not kept, the mode holds it.
pub fn is_minimal(acl: &[AclEntry]) -> bool {
    acl.len() == 3
}

/// The permission bits `acl` implies: owner from `USER_OBJ`, group from
/// the mask (or `GROUP_OBJ` without one), other from `OTHER`.
pub fn mode_bits(acl: &[AclEntry]) -> u32 {
    let perm = |t: u16| acl.iter().find(|e| e.tag == t).map_or(0, |e| e.perm as u32);
    let group = if acl.iter().any(|e| e.tag == MASK) {
        perm(MASK)
    } else {
        perm(GROUP_OBJ)
    };
    (perm(USER_OBJ) << 6) | (group << 3) | perm(OTHER)
}

/// A chmod's effect on the access ACL: the owner, mask (or group) and
/// other entries take the new bits (`posix_acl_chmod`).
pub fn chmod(acl: &mut [AclEntry], mode: u32) {
    let has_mask = acl.iter().any(|e| e.tag == MASK);
    for e in acl.iter_mut() {
        match e.tag {
            USER_OBJ => e.perm = ((mode >> 6) & 7) as u16,
            MASK => e.perm = ((mode >> 3) & 7) as u16,
            GROUP_OBJ if !has_mask => e.perm = ((mode >> 3) & 7) as u16,
            OTHER => e.perm = (mode & 7) as u16,
            _ => {}
        }
    }
}

/// The access ACL a new inode with requested permission bits `mode`
/// takes from its directory's default ACL `default`, and its resulting
/// permission bits (`posix_acl_create_masq`).
pub fn inherit(default: &[AclEntry], mode: u32) -> (Vec<AclEntry>, u32) {
    let mut acl = default.to_vec();
    let has_mask = acl.iter().any(|e| e.tag == MASK);
    for e in acl.iter_mut() {
        let limit = match e.tag {
            USER_OBJ => (mode >> 6) & 7,
            MASK => (mode >> 3) & 7,
            GROUP_OBJ if !has_mask => (mode >> 3) & 7,
            OTHER => mode & 7,
            _ => 7,
        };
        e.perm &= limit as u16;
    }
    let bits = mode_bits(&acl);
    (acl, (mode & !0o777) | bits)
}

/// The access check with an access ACL (`posix_acl_permission`): the
/// owner's entry, else a named user's (under the mask), else any
/// matching group entry that grants all of `want` (under the mask; a
/// matching one that does not denies), else other's. `want` is `R|W|X`.
pub fn permits(acl: &[AclEntry], i: &Inode, c: &Creds, want: u32) -> bool {
    let want = want as u16;
    let mask = acl.iter().find(|e| e.tag == MASK).map_or(7, |e| e.perm);
    let mut group_matched = false;
    for e in acl {
        match e.tag {
            USER_OBJ if c.uid == i.uid => return e.perm & want == want,
            USER if c.uid == e.id => return e.perm & mask & want == want,
            GROUP_OBJ | GROUP => {
                let gid = if e.tag == GROUP_OBJ { i.gid } else { e.id };
                if c.in_group(gid) {
                    if e.perm & mask & want == want {
                        return true;
                    }
                    group_matched = true;
                }
            }
            OTHER if !group_matched => return e.perm & want == want,
            _ => {}
        }
    }
    false
}

/// The ACL of `kind` an inode holds (empty: none).
pub fn of(i: &Inode, kind: Kind) -> &[AclEntry] {
    match (&i.acl, kind) {
        (Some(a), Kind::Access) => &a.access,
        (Some(a), Kind::Default) => &a.default,
        (None, _) => &[],
    }
}

/// Sets (or with an empty list, drops) `i`'s ACL of `kind`.
pub fn set(i: &mut Inode, kind: Kind, acl: Vec<AclEntry>) {
    let a = i.acl.get_or_insert_with(Box::<Acls>::default);
    match kind {
        Kind::Access => a.access = acl,
        Kind::Default => a.default = acl,
    }
    if a.access.is_empty() && a.default.is_empty() {
        i.acl = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(tag: u16, perm: u16, id: u32) -> AclEntry {
        AclEntry { tag, perm, id }
    }

    fn inode(mode: u32, uid: u32, gid: u32) -> Inode {
        Inode {
            ino: 2,
            mode: libc::S_IFREG | mode,
            uid,
            gid,
            size: 0,
            nlink: 1,
            atime: 0,
            mtime: 0,
            ctime: 0,
            crtime: 0,
            rdev: 0,
            generation: 0,
            allocated: 0,
            stored: 0,
            parent: 1,
            next_cookie: 0,
            entries: 0,
            acl: None,
            compression: None,
            dedupe: None,
            tenant: None,
            snapshot: false,
        }
    }

    fn creds(uid: u32, gid: u32) -> Creds {
        Creds {
            uid,
            gid,
            groups: vec![],
        }
    }

    /// `u::rw-,u:1000:rw-,g::r--,g:50:rwx,m::rw-,o::---`
    fn sample() -> Vec<AclEntry> {
        vec![
            e(USER_OBJ, 6, UNDEFINED_ID),
            e(USER, 6, 1000),
            e(GROUP_OBJ, 4, UNDEFINED_ID),
            e(GROUP, 7, 50),
            e(MASK, 6, UNDEFINED_ID),
            e(OTHER, 0, UNDEFINED_ID),
        ]
    }

    #[test]
    fn the_xattr_encoding_round_trips_and_bad_lists_are_refused() {
        let a = sample();
        assert_eq!(parse(&format(&a)).unwrap(), a);
        let mut shuffled = a.clone();
        shuffled.reverse();
        assert_eq!(parse(&format(&shuffled)).unwrap(), a, "sorted");
        assert_eq!(parse(&format(&[])).unwrap(), vec![]);
        let no_mask: Vec<_> = a.iter().copied().filter(|x| x.tag != MASK).collect();
        let two_users = [a.clone(), vec![e(USER, 4, 1000)]].concat();
        let no_other: Vec<_> = a.iter().copied().filter(|x| x.tag != OTHER).collect();
        for bad in [no_mask, two_users, no_other, vec![e(0x40, 0, 0)]] {
            assert_eq!(parse(&format(&bad)), Err(Errno::EINVAL), "{bad:?}");
        }
        assert_eq!(parse(&[2, 0, 0]), Err(Errno::EINVAL));
        assert_eq!(parse(&[1, 0, 0, 0]), Err(Errno::EINVAL), "version");
        let mut bad_perm = a.clone();
        bad_perm[0].perm = 8;
        assert_eq!(parse(&format(&bad_perm)), Err(Errno::EINVAL));
        let many = vec![e(USER, 4, 1); ENTRIES_MAX + 1];
        assert_eq!(parse(&format(&many)), Err(Errno::ENOSPC));
    }

    #[test]
    fn the_check_follows_owner_named_user_groups_mask_other() {
        let a = sample();
        let i = inode(0o660, 10, 20);
        assert!(permits(&a, &i, &creds(10, 99), 6), "owner");
        assert!(!permits(&a, &i, &creds(10, 99), 1), "owner: no x");
        assert!(permits(&a, &i, &creds(1000, 99), 6), "named user");
        assert!(!permits(&a, &i, &creds(1001, 99), 4), "other: nothing");
        assert!(permits(&a, &i, &creds(1001, 20), 4), "owning group");
        assert!(!permits(&a, &i, &creds(1001, 20), 2), "owning group: no w");
        assert!(
            permits(&a, &i, &creds(1001, 50), 6),
            "named group under mask"
        );
        assert!(!permits(&a, &i, &creds(1001, 50), 1), "the mask takes x");
        // A matching group that does not grant denies, even if other would.
        let mut open_other = a.clone();
        open_other[5].perm = 7;
        assert!(!permits(&open_other, &i, &creds(1001, 20), 2));
        assert!(permits(&open_other, &i, &creds(1001, 99), 2));
    }

    #[test]
    fn chmod_and_inheritance_keep_mode_and_acl_in_step() {
        let mut a = sample();
        assert_eq!(mode_bits(&a), 0o660);
        chmod(&mut a, 0o604);
        assert_eq!(mode_bits(&a), 0o604);
        let i = inode(0o604, 10, 20);
        assert!(!permits(&a, &i, &creds(1000, 99), 2), "the mask is now ---");
        assert!(permits(&a, &i, &creds(1001, 99), 4));
        // A default ACL over a create asking 0666: the named entries
        // keep theirs, the mask and base entries are limited by it.
        let (acl, mode) = inherit(&sample(), libc::S_IFREG | 0o640);
        assert_eq!(mode, libc::S_IFREG | 0o640);
        assert_eq!(acl.iter().find(|x| x.tag == MASK).unwrap().perm, 4);
        assert_eq!(acl.iter().find(|x| x.tag == USER).unwrap().perm, 6);
        assert!(is_minimal(
            &inherit(
                &[
                    e(USER_OBJ, 7, UNDEFINED_ID),
                    e(GROUP_OBJ, 5, UNDEFINED_ID),
                    e(OTHER, 5, UNDEFINED_ID)
                ],
                0o700
            )
            .0
        ));
    }
}
