//! Where the lakehouse's deltas come from: the namespace materializer's
//! published changes say *what* changed (inodes and directory entries,
//! with the applied position of each shard); the namespace database says
//! what it is now. Namespace entries are intents whose outcome only the
//! namespace state machine knows (a create's inode number, a refused
//! rename), so the lakehouse reads outcomes instead of applying entries a
//! second time (docs/decisions.md D47).

use std::collections::{BTreeMap, HashSet};

use cfs_ids::{Position, ShardId};
use cfs_materializers::store::DbError;
use cfs_materializers::{keys, Change, NamespaceDb};
use cfs_proto::types::{Ino, Inode};

use crate::state::{Delta, Meta, Namespace};

/// Dirty inodes and entries kept between two flushes at most; past it the
/// next flush rescans the namespace (memory stays bounded under any load).
pub const DIRTY_MAX: usize = 1 << 20;

/// What changed since the last flush.
#[derive(Default, Debug)]
pub struct Dirty {
    pub inodes: HashSet<Ino>,
    pub entries: HashSet<(Ino, Box<[u8]>)>,
    /// The applied position of each shard the changes reach.
    pub positions: BTreeMap<ShardId, Position>,
    /// The changes were not all seen (a lagging subscriber, too many):
    /// read the whole namespace again.
    pub rescan: bool,
}

impl Dirty {
    /// Notes one published change.
    pub fn note(&mut self, ch: &Change) {
        let p = self.positions.entry(ch.shard).or_insert(ch.upto);
        *p = (*p).max(ch.upto);
        if self.rescan {
            return;
        }
        self.inodes.extend(ch.inodes.iter().copied());
        self.entries.extend(
            ch.entries
                .iter()
                .map(|(p, n)| (*p, n.clone().into_boxed_slice())),
        );
        if self.inodes.len() + self.entries.len() > DIRTY_MAX {
            self.lost();
        }
    }

    /// Changes were lost: the next flush rescans.
    pub fn lost(&mut self) {
        self.rescan = true;
        self.inodes = HashSet::new();
        self.entries = HashSet::new();
    }

    pub fn is_empty(&self) -> bool {
        !self.rescan && self.inodes.is_empty() && self.entries.is_empty()
    }
}

fn read_inode(db: &NamespaceDb, ino: Ino) -> Result<Delta, DbError> {
    let i: Option<Inode> = db.get(&keys::inode(ino))?;
    Ok(Delta::Inode(ino, i.as_ref().map(Meta::from)))
}

/// Brings `ns` up to date with what `dirty` names, reading each from the
/// database as it is now. Returns how many deltas were applied.
pub fn refresh(db: &NamespaceDb, ns: &mut Namespace, dirty: Dirty) -> Result<usize, DbError> {
    let mut inodes = dirty.inodes;
    let mut applied = 0;
    for (parent, name) in dirty.entries {
        let v: Option<(Ino, u32, u64)> = db.get(&keys::dentry(parent, &name))?;
        let child = v.map(|(c, _, _)| c);
        if let Some(c) = child {
            inodes.insert(c);
        }
        if let Some(lost) = ns.apply(Delta::Link {
            parent,
            name,
            child,
        }) {
            inodes.insert(lost);
        }
        applied += 1;
    }
    for ino in inodes {
        ns.apply(read_inode(db, ino)?);
        applied += 1;
    }
    Ok(applied)
}

/// Reads the whole namespace: every inode, then every directory entry.
/// The positions are read first, so the state read is at least at them;
/// changes made during the scan are published and read at the next flush.
pub fn scan(
    db: &NamespaceDb,
    shards: &[ShardId],
) -> Result<(Namespace, BTreeMap<ShardId, Position>), DbError> {
    let mut positions = BTreeMap::new();
    for &s in shards {
        positions.insert(s, db.applied(s)?);
    }
    let mut ns = Namespace::default();
    db.for_each_prefixed(b"i", |k, v| {
        if let Some(ino) = keys::inode_of(k) {
            let i: Inode = cfs_materializers::store::decode(k, v)?;
            ns.apply(Delta::Inode(ino, Some(Meta::from(&i))));
        }
        Ok(())
    })?;
    db.for_each_prefixed(b"d", |k, v| {
        if let Some((parent, name)) = keys::dentry_of(k) {
            let (child, _, _): (Ino, u32, u64) = cfs_materializers::store::decode(k, v)?;
            ns.apply(Delta::Link {
                parent,
                name: name.into(),
                child: Some(child),
            });
        }
        Ok(())
    })?;
    Ok((ns, positions))
}
