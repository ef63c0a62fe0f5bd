//! Reads of the materialized namespace, as the metadata service serves
//! them.

use crate::apply::EXTENT_LEN_MAX;
use crate::keys;
use crate::store::{decode, DbError, NamespaceDb};
use crate::types::*;

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

impl NamespaceDb {
    pub fn inode(&self, ino: Ino) -> Rd<Inode> {
        self.get::<Inode>(&keys::inode(ino))?
            .ok_or(ReadError::Fs(Errno::ENOENT))
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Rd<Inode> {
        crate::apply::check_name(name)?;
        let p = self.inode(parent)?;
        if !p.is_dir() {
            return Err(Errno::ENOTDIR.into());
        }
        let (ino, _, _): (Ino, u32, u64) = self
            .get(&keys::dentry(parent, name))?
            .ok_or(ReadError::Fs(Errno::ENOENT))?;
        self.inode(ino)
    }

    /// Entries with cookies greater than `after`, at most `max`.
    pub fn readdir(&self, ino: Ino, after: u64, max: usize) -> Rd<Vec<DirEntry>> {
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
        let scanned = self.scan(&start, &end, max)?;
        let at_end = scanned.len() < max;
        for (k, name) in scanned {
            let (_, cookie) = keys::cookie_of(&k).ok_or_else(|| DbError::Corrupt {
                key: k.clone(),
                reason: "malformed cookie key".into(),
            })?;
            if let Some((ino, kind, _)) = self.get::<(Ino, u32, u64)>(&keys::dentry(ino, &name))? {
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
    pub fn readdir_plus(&self, ino: Ino, after: u64, max: usize) -> Rd<ListingPart> {
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

    pub fn readlink(&self, ino: Ino) -> Rd<Vec<u8>> {
        let i = self.inode(ino)?;
        if !i.is_symlink() {
            return Err(Errno::EINVAL.into());
        }
        Ok(self.get_raw(&keys::symlink(ino))?.unwrap_or_default())
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Rd<Vec<u8>> {
        self.inode(ino)?;
        self.get_raw(&keys::xattr(ino, name))?
            .ok_or(ReadError::Fs(Errno::ENODATA))
    }

    pub fn listxattr(&self, ino: Ino) -> Rd<Vec<Vec<u8>>> {
        self.inode(ino)?;
        let p = keys::xattr_prefix(ino);
        Ok(self
            .scan(&p, &keys::prefix_end(&p), usize::MAX)?
            .into_iter()
            .filter_map(|(k, _)| keys::xattr_name_of(&k).map(<[u8]>::to_vec))
            .collect())
    }

    /// Extent references overlapping `[offset, offset + len)`, in order.
    pub fn extents(&self, ino: Ino, offset: u64, len: u64) -> Rd<Vec<ExtentRef>> {
        self.inode(ino)?;
        let end = offset.saturating_add(len);
        let lo = keys::extent(ino, offset.saturating_sub(EXTENT_LEN_MAX));
        let hi = keys::extent(ino, end);
        let mut out = Vec::new();
        for (k, v) in self.scan(&lo, &hi, usize::MAX)? {
            let e: ExtentRef = decode(&k, &v)?;
            if e.offset + e.len > offset && e.offset < end {
                out.push(e);
            }
        }
        Ok(out)
    }

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
            n += self.get::<u64>(&keys::next_ino(*s))?.unwrap_or(2) - 2;
        }
        Ok(n)
    }
}
