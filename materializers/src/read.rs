//! Reads of the materialized namespace, as the metadata service serves
//! them.

use crate::apply::EXTENT_LEN_MAX;
use crate::keys;
use crate::store::{decode, DbError, KeyValue, NamespaceDb, Overlay};
use crate::types::*;
use serde::de::DeserializeOwned;

/// A read that found nothing (`Errno`) or a database failure.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Fs(Errno),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<Errno> for ReadError {
    fn from(e: Errno) -> Self {
        ReadError::Fs(e)
    }
}

type Rd<T> = Result<T, ReadError>;

/// The namespace as reads see it: the database, or the database under
/// the sequencer's overlay of answered, undecided changes ([`Overlaid`]).
pub trait NsRead {
    fn raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError>;
    /// Live keys in `[start, end)`, at most `limit`, in order.
    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, DbError>;

    fn value<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, DbError> {
        match self.raw(key)? {
            Some(v) => Ok(Some(decode(key, &v)?)),
            None => Ok(None),
        }
    }

    fn inode(&self, ino: Ino) -> Rd<Inode> {
        self.value::<Inode>(&keys::inode(ino))?
            .ok_or(ReadError::Fs(Errno::ENOENT))
    }

    fn lookup(&self, parent: Ino, name: &[u8]) -> Rd<Inode> {
        crate::apply::check_name(name)?;
        let p = self.inode(parent)?;
        if !p.is_dir() {
            return Err(Errno::ENOTDIR.into());
        }
        let (ino, _, _): (Ino, u32, u64) = self
            .value(&keys::dentry(parent, name))?
            .ok_or(ReadError::Fs(Errno::ENOENT))?;
        self.inode(ino)
    }

    /// Entries with cookies greater than `after`, at most `max`.
    fn readdir(&self, ino: Ino, after: u64, max: usize) -> Rd<Vec<DirEntry>> {
        Ok(self.readdir_scan(ino, after, max)?.0)
    }

    /// [`readdir`](Self::readdir), and whether the scan reached the end.
    fn readdir_scan(&self, ino: Ino, after: u64, max: usize) -> Rd<(Vec<DirEntry>, bool)> {
        let d = self.inode(ino)?;
        if !d.is_dir() {
            return Err(Errno::ENOTDIR.into());
        }
        let start = keys::cookie(ino, after.saturating_add(1));
        let end = keys::prefix_end(&keys::cookie_prefix(ino));
        let mut out = Vec::new();
        let scanned = self.range(&start, &end, max)?;
        let at_end = scanned.len() < max;
        for (k, name) in scanned {
            let (_, cookie) = keys::cookie_of(&k).ok_or_else(|| DbError::Corrupt {
                key: k.clone(),
                reason: "malformed cookie key".into(),
            })?;
            // A directory's snapshots are reached by name only (D52), as
            // ZFS's `.zfs` and NetApp's `.snapshot`: `find`, `du`, `cp -a`
            // and `rsync` of the directory do not walk into them.
            if name == SNAPSHOTS_DIR {
                continue;
            }
            if let Some((ino, kind, _)) =
                self.value::<(Ino, u32, u64)>(&keys::dentry(ino, &name))?
            {
                out.push(DirEntry {
                    name,
                    ino,
                    kind,
                    cookie,
                });
            }
        }
        Ok((out, at_end))
    }

    /// [`readdir`](Self::readdir) with each entry's inode. An entry whose
    /// inode is not here yet (a cross-shard change half applied on this
    /// node) is left out and the part says so.
    fn readdir_plus(&self, ino: Ino, after: u64, max: usize) -> Rd<ListingPart> {
        let (found, end) = self.readdir_scan(ino, after, max)?;
        let mut part = ListingPart {
            entries: Vec::with_capacity(found.len()),
            end,
            skipped: false,
        };
        for e in found {
            match self.inode(e.ino) {
                Ok(i) => {
                    let names = self.listxattr(i.ino)?;
                    part.entries.push((e, i, names))
                }
                Err(ReadError::Fs(_)) => part.skipped = true,
                Err(err) => return Err(err),
            }
        }
        Ok(part)
    }

    fn readlink(&self, ino: Ino) -> Rd<Vec<u8>> {
        let i = self.inode(ino)?;
        if !i.is_symlink() {
            return Err(Errno::EINVAL.into());
        }
        Ok(self.raw(&keys::symlink(ino))?.unwrap_or_default())
    }

    fn getxattr(&self, ino: Ino, name: &[u8]) -> Rd<Vec<u8>> {
        let i = self.inode(ino)?;
        if let Some(kind) = crate::acl::Kind::of(name) {
            let a = crate::acl::of(&i, kind);
            if a.is_empty() {
                return Err(ReadError::Fs(Errno::ENODATA));
            }
            return Ok(crate::acl::format(a));
        }
        self.raw(&keys::xattr(ino, name))?
            .ok_or(ReadError::Fs(Errno::ENODATA))
    }

    fn listxattr(&self, ino: Ino) -> Rd<Vec<Vec<u8>>> {
        let i = self.inode(ino)?;
        let p = keys::xattr_prefix(ino);
        let mut names: Vec<Vec<u8>> = [crate::acl::Kind::Access, crate::acl::Kind::Default]
            .into_iter()
            .filter(|k| !crate::acl::of(&i, *k).is_empty())
            .map(|k| match k {
                crate::acl::Kind::Access => crate::acl::ACCESS_XATTR.to_vec(),
                crate::acl::Kind::Default => crate::acl::DEFAULT_XATTR.to_vec(),
            })
            .collect();
        names.extend(
            self.range(&p, &keys::prefix_end(&p), usize::MAX)?
                .into_iter()
                .filter_map(|(k, _)| keys::xattr_name_of(&k).map(<[u8]>::to_vec)),
        );
        Ok(names)
    }

    /// Extent references overlapping `[offset, offset + len)`, in order.
    fn extents(&self, ino: Ino, offset: u64, len: u64) -> Rd<Vec<ExtentRef>> {
        self.inode(ino)?;
        let end = offset.saturating_add(len);
        let lo = keys::extent(ino, offset.saturating_sub(EXTENT_LEN_MAX));
        let hi = keys::extent(ino, end);
        let mut out = Vec::new();
        for (k, v) in self.range(&lo, &hi, usize::MAX)? {
            let e: ExtentRef = decode(&k, &v)?;
            if e.offset + e.len > offset && e.offset < end {
                out.push(e);
            }
        }
        Ok(out)
    }
}

impl NsRead for NamespaceDb {
    fn raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.get_raw(key)
    }
    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, DbError> {
        self.scan(start, end, limit)
    }
}

/// The database under an overlay of changes not yet written to it.
pub struct Overlaid<'a> {
    pub db: &'a NamespaceDb,
    pub overlay: &'a Overlay,
}

impl NsRead for Overlaid<'_> {
    fn raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.db.get_raw(key),
        }
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, DbError> {
        let over: Vec<_> = self.overlay.range(start.to_vec()..end.to_vec()).collect();
        // Deleted keys may hide as many of the database's: read past them.
        let want = limit.saturating_add(over.len());
        let mut m: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> = self
            .db
            .scan(start, end, want)?
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect();
        // A database scan cut short ends where its keys end: overlay keys
        // beyond that point are only safe to add up to it.
        let cut = (m.len() >= want)
            .then(|| m.keys().next_back().cloned())
            .flatten();
        for (k, v) in over {
            if cut.as_ref().is_some_and(|c| k > c) {
                break;
            }
            m.insert(k.clone(), v.clone());
        }
        Ok(m.into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .take(limit)
            .collect())
    }
}

impl NamespaceDb {
    /// The first lock held by another owner that conflicts with `l`.
    pub fn get_lock(&self, ino: Ino, l: &LockRange) -> Rd<Option<LockRange>> {
        self.inode(ino)?;
        let txn = crate::store::Txn::new(self);
        Ok(crate::apply::find_conflict(&txn, ino, l)?)
    }

    /// Inodes allocated so far on `shards` (an upper bound of live files).
    pub fn files(&self, shards: &[ShardId]) -> Rd<u64> {
        let mut n = 0;
        for s in shards {
            let next = self.get::<u64>(&keys::next_ino(*s))?.unwrap_or(2);
            let skipped = self.get::<u64>(&keys::ino_skipped(*s))?.unwrap_or(0);
            n += next.saturating_sub(2 + skipped);
        }
        Ok(n)
    }
}
