//! A namespace consistency check (an fsck of the metadata): the
//! invariants every replica must hold between operations, across shards.

use std::collections::{BTreeMap, HashMap};

use crate::keys;
use crate::store::{decode, DbError, NamespaceDb};
use crate::types::*;

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    pub inodes: usize,
    pub entries: usize,
    /// Unlinked files kept because a mount holds them open.
    pub orphans: usize,
    /// Broken invariants, one line each.
    pub problems: Vec<String>,
    /// Cross-shard transactions still open (intents, locks, decisions):
    /// normal while operations run, a problem once the cluster is idle.
    pub open_transactions: usize,
    /// (shard, segment) pairs the extents reference.
    pub segments_used: usize,
}

/// Checks that every entry names an existing inode of its kind; that link
/// counts equal the entries naming a file (directories: 2 + their
/// subdirectories); that each directory's entry count, cookies and parent
/// agree with its entries; and that every directory reaches the root (no
/// cycles, nothing detached); and that each shard's segment counts equal
/// a recount from its extents (D48).
pub fn check(db: &NamespaceDb) -> Result<Report, DbError> {
    let mut r = Report::default();
    let mut inodes: BTreeMap<Ino, Inode> = BTreeMap::new();
    for (k, v) in db.scan(b"i", b"j", usize::MAX)? {
        let i: Inode = decode(&k, &v)?;
        inodes.insert(i.ino, i);
    }
    r.inodes = inodes.len();
    let mut links: HashMap<Ino, u32> = HashMap::new();
    let mut subdirs: HashMap<Ino, u32> = HashMap::new();
    let mut counts: HashMap<Ino, u64> = HashMap::new();
    let mut named_by: HashMap<Ino, Ino> = HashMap::new();
    for (k, v) in db.scan(b"d", b"e", usize::MAX)? {
        r.entries += 1;
        let Some((parent, name_bytes)) = keys::dentry_of(&k) else {
            r.problems.push(format!("malformed entry key {k:02x?}"));
            continue;
        };
        let name_bytes = name_bytes.to_vec();
        let name = String::from_utf8_lossy(&name_bytes).into_owned();
        let (ino, kind, cookie): (Ino, u32, u64) = decode(&k, &v)?;
        *counts.entry(parent).or_default() += 1;
        match inodes.get(&parent) {
            Some(p) if p.is_dir() => {}
            _ => r.problems.push(format!(
                "entry {parent:#x}/{name}: parent is not a directory"
            )),
        }
        match db.get_raw(&keys::cookie(parent, cookie))? {
            Some(n) if n == name_bytes => {}
            _ => r
                .problems
                .push(format!("entry {parent:#x}/{name}: cookie {cookie} missing")),
        }
        let Some(i) = inodes.get(&ino) else {
            r.problems.push(format!(
                "entry {parent:#x}/{name} names missing inode {ino:#x}"
            ));
            continue;
        };
        if i.kind() != kind {
            r.problems.push(format!(
                "entry {parent:#x}/{name}: kind differs from inode {ino:#x}"
            ));
        }
        *links.entry(ino).or_default() += 1;
        if i.is_dir() {
            *subdirs.entry(parent).or_default() += 1;
            if let Some(other) = named_by.insert(ino, parent) {
                r.problems.push(format!(
                    "directory {ino:#x} is named in {other:#x} and {parent:#x}"
                ));
            }
            if i.parent != parent {
                r.problems.push(format!(
                    "directory {ino:#x} records parent {:#x} but is named in {parent:#x}",
                    i.parent
                ));
            }
        }
    }
    for (ino, i) in &inodes {
        let n = links.get(ino).copied().unwrap_or(0);
        if i.is_dir() {
            let want = 2 + subdirs.get(ino).copied().unwrap_or(0);
            if i.nlink != want {
                r.problems.push(format!(
                    "directory {ino:#x}: nlink {} but {want} expected",
                    i.nlink
                ));
            }
            if i.entries != counts.get(ino).copied().unwrap_or(0) {
                r.problems.push(format!(
                    "directory {ino:#x}: {} entries recorded, {} present",
                    i.entries,
                    counts.get(ino).copied().unwrap_or(0)
                ));
            }
            if *ino != ROOT_INO && n == 0 {
                r.problems.push(format!("directory {ino:#x} has no entry"));
            }
            // Reaches the root?
            let mut at = *ino;
            let mut steps = 0;
            while at != ROOT_INO {
                at = match inodes.get(&at) {
                    Some(d) => d.parent,
                    None => break,
                };
                steps += 1;
                if steps > inodes.len() {
                    r.problems.push(format!("directory {ino:#x} is in a cycle"));
                    break;
                }
            }
            if at != ROOT_INO {
                r.problems
                    .push(format!("directory {ino:#x} does not reach the root"));
            }
        } else {
            if i.nlink != n {
                r.problems.push(format!(
                    "inode {ino:#x}: nlink {} but {n} entries name it",
                    i.nlink
                ));
            }
            if n == 0 {
                if db.get_raw(&keys::orphan(*ino))?.is_none() {
                    r.problems
                        .push(format!("inode {ino:#x} has no entry and is not an orphan"));
                } else {
                    r.orphans += 1;
                }
            }
        }
    }
    if !inodes.contains_key(&ROOT_INO) {
        r.problems.push("no root directory".into());
    }
    // The segment counts (D48) equal a recount from the extent keys, and
    // nothing fenced for freeing is referenced.
    let kept = crate::segment_use::kept(db)?;
    let recounted = crate::segment_use::recount(db)?;
    r.segments_used = recounted.len();
    for (at, want) in &recounted {
        if kept.get(at) != Some(want) {
            r.problems.push(format!(
                "segment {} on shard {}: counted {:?}, extents say {want:?}",
                at.1,
                at.0,
                kept.get(at)
            ));
        }
    }
    for (at, got) in &kept {
        if !recounted.contains_key(at) {
            r.problems.push(format!(
                "segment {} on shard {}: counted {got:?}, no extent names it",
                at.1, at.0
            ));
        }
    }
    let want = crate::segment_use::rederive_index(db)?;
    let held = crate::segment_use::index(db)?;
    for k in want.difference(&held).take(20) {
        r.problems.push(format!(
            "segment/chunk index: missing {k:02x?} (an extent names the segment or chunk)"
        ));
    }
    for k in held.difference(&want).take(20) {
        r.problems
            .push(format!("segment/chunk index: {k:02x?} names no extent"));
    }
    for (segment, shards) in crate::segment_use::fences(db)? {
        for shard in shards {
            if recounted.contains_key(&(shard, segment)) {
                r.problems.push(format!(
                    "segment {segment} is fenced for freeing on shard {shard} but referenced there"
                ));
            }
        }
    }
    for tag in [b't', b'p'] {
        r.open_transactions += db.scan(&[tag], &[tag + 1], usize::MAX)?.len();
    }
    // Decisions stay a while after their transaction finished; only
    // unfinished ones are open.
    r.open_transactions += crate::tx::decisions(db)?
        .iter()
        .filter(|(_, _, d)| !d.finished)
        .count();
    Ok(r)
}
