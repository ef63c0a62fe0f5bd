//! The namespace's RocksDB, and [`Txn`]: the overlay one batch of log
//! entries is applied in before it is written atomically with the shard's
//! applied position.

use crate::types::{Position, ShardId};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::keys;
use crate::types::Ino;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("rocksdb at {path}: {source}")]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt value under key {key:02x?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
    /// An entry of one shard reached for a key of another (the operation
    /// needs a cross-shard transaction); not a database failure.
    #[error("key {key:02x?} belongs to shard {shard}")]
    NotOwned { key: Vec<u8>, shard: ShardId },
    /// A database written by a build with another layout.
    #[error(
        "namespace database at {path} has format {found}, this build reads format {expected}: \
         recreate the cluster (there are no migrations yet, docs/filesystem.md)"
    )]
    Format {
        path: String,
        found: u32,
        expected: u32,
    },
}

/// A raw key and value.
pub use cfs_proto::tx::KeyValue;

/// The layout this build reads and writes (`keys::FORMAT`): 2 since extent
/// references may hold inline bytes (docs/decisions.md D20), 3 since each
/// shard counts what its extents reference of each segment (D48), 4
/// since stripes may be stored compressed and the counts are of stored
/// bytes (D49), 5 since an extent may name the chunk its stripe holds
/// and each shard indexes chunks (D50), 6 since extents may be sealed and
/// inodes name a tenant, whose keys the first shard keeps (D51), 7 since
/// inodes say whether they belong to a snapshot (D52).
pub const FORMAT: u32 = 7;

/// Values larger than this in the namespace are corruption.
const VALUE_BYTES_MAX: usize = 16 << 20;

pub struct NamespaceDb {
    db: rocksdb::DB,
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("namespace values serialize")
}

pub fn decode<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, DbError> {
    cfs_frame::decode_body(v, VALUE_BYTES_MAX).map_err(|reason| DbError::Corrupt {
        key: key.to_vec(),
        reason,
    })
}

impl NamespaceDb {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let mut o = rocksdb::Options::default();
        o.create_if_missing(true);
        o.set_max_background_jobs(2);
        o.set_keep_log_file_num(4);
        let db = rocksdb::DB::open(&o, path).map_err(|source| DbError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let empty = db
            .iterator(rocksdb::IteratorMode::Start)
            .next()
            .transpose()?
            .is_none();
        if empty {
            db.put(keys::FORMAT, FORMAT.to_be_bytes())?;
        } else {
            // Databases from before the marker are format 1.
            let found = match db.get(keys::FORMAT)? {
                Some(v) => v
                    .as_slice()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| DbError::Corrupt {
                        key: keys::FORMAT.to_vec(),
                        reason: "format marker length".into(),
                    })?,
                None => 1,
            };
            if found != FORMAT {
                return Err(DbError::Format {
                    path: path.display().to_string(),
                    found,
                    expected: FORMAT,
                });
            }
        }
        Ok(NamespaceDb { db })
    }

    /// Opens a database another process may have open (for inspection).
    pub fn open_read_only(path: &Path) -> Result<Self, DbError> {
        let o = rocksdb::Options::default();
        let db =
            rocksdb::DB::open_for_read_only(&o, path, false).map_err(|source| DbError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(NamespaceDb { db })
    }

    pub fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        Ok(self.db.get(key)?)
    }

    pub fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, DbError> {
        match self.db.get_pinned(key)? {
            Some(v) => Ok(Some(decode(key, &v)?)),
            None => Ok(None),
        }
    }

    /// Keys in `[start, end)`, at most `limit`.
    pub fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, DbError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let it = self.db.iterator_opt(
            rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward),
            ro,
        );
        let mut out = Vec::new();
        for kv in it {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Calls `f` with every key under `prefix` and its value, in key
    /// order, from one iterator (one consistent view of the database).
    pub fn for_each_prefixed(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), DbError>,
    ) -> Result<(), DbError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(keys::prefix_end(prefix));
        let it = self.db.iterator_opt(
            rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
            ro,
        );
        for kv in it {
            let (k, v) = kv?;
            f(&k, &v)?;
        }
        Ok(())
    }

    /// Position of the next entry of `shard` to apply.
    pub fn applied(&self, shard: ShardId) -> Result<Position, DbError> {
        Ok(self
            .get::<Position>(&keys::applied(shard))?
            .unwrap_or(Position::ZERO))
    }

    /// Writes `txn`'s changes and the new applied position atomically.
    pub fn commit(&self, txn: Txn<'_>, shard: ShardId, applied: Position) -> Result<(), DbError> {
        let mut b = rocksdb::WriteBatch::default();
        for (k, v) in txn.batch {
            match v {
                Some(v) => b.put(k, v),
                None => b.delete(k),
            }
        }
        b.put(keys::applied(shard), encode(&applied));
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(b, &wo)?;
        Ok(())
    }

    /// Makes every committed batch durable.
    pub fn sync(&self) -> Result<(), DbError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Every key/value, in order (for comparing two namespaces).
    pub fn dump(&self) -> Result<Vec<KeyValue>, DbError> {
        let mut out = Vec::new();
        for kv in self.db.iterator(rocksdb::IteratorMode::Start) {
            let (k, v) = kv?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

/// Pending changes of one batch (`batch`) and of the entry being applied
/// (`entry`): an entry that fails is rolled back by dropping `entry`.
///
/// A `Txn` also records what the current entry read (the value it saw
/// before writing the key itself) and which ranges it scanned: the lock
/// check of a shard with open transactions, and a coordinator planning a
/// cross-shard operation ([`crate::tx::plan`]), use that footprint. With an
/// owner shard set, reaching for another shard's key fails with
/// [`DbError::NotOwned`].
pub struct Txn<'a> {
    db: &'a NamespaceDb,
    /// Changes not in the database yet that reads see under `batch`
    /// (the sequencer's overlay of answered, undecided entries).
    overlay: Option<&'a Overlay>,
    batch: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    entry: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    owner: Option<ShardId>,
    foreign: Option<(Vec<u8>, ShardId)>,
    reads: RefCell<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    scans: RefCell<Vec<Scan>>,
    /// Inodes whose records kept entries wrote (for invalidations).
    kept_inodes: Vec<Ino>,
}

/// Keys changed (`Some`) or deleted (`None`) over the database.
pub type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// A scanned range and the live keys the entry saw in it.
pub use cfs_proto::tx::Scan;

/// What one entry (or one plan) read, scanned and wrote.
#[derive(Debug, Default)]
pub struct Footprint {
    pub reads: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub scans: Vec<Scan>,
    pub writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Txn<'a> {
    pub fn new(db: &'a NamespaceDb) -> Self {
        Txn {
            db,
            overlay: None,
            batch: BTreeMap::new(),
            entry: BTreeMap::new(),
            owner: None,
            foreign: None,
            reads: RefCell::default(),
            scans: RefCell::default(),
            kept_inodes: Vec::new(),
        }
    }

    /// A transaction whose reads see `overlay` over the database.
    pub fn over(db: &'a NamespaceDb, overlay: &'a Overlay) -> Self {
        let mut t = Txn::new(db);
        t.overlay = Some(overlay);
        t
    }

    /// The changes the kept entries made (what a commit would write).
    pub fn into_changes(self) -> Overlay {
        self.batch
    }

    /// Restricts the entries applied from now on to `shard`'s keys.
    pub fn set_owner(&mut self, shard: Option<ShardId>) {
        self.owner = shard;
    }

    fn check_owner(&self, key: &[u8]) -> Result<(), DbError> {
        match (self.owner, keys::owner(key)) {
            (Some(o), Some(s)) if s != o => Err(DbError::NotOwned {
                key: key.to_vec(),
                shard: s,
            }),
            _ => Ok(()),
        }
    }

    /// The value before the current entry's own writes.
    fn base(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        if let Some(v) = self.batch.get(key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.overlay.and_then(|o| o.get(key)) {
            return Ok(v.clone());
        }
        self.db.get_raw(key)
    }

    pub fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.check_owner(key)?;
        if let Some(v) = self.entry.get(key) {
            return Ok(v.clone());
        }
        let v = self.base(key)?;
        self.reads
            .borrow_mut()
            .entry(key.to_vec())
            .or_insert_with(|| v.clone());
        Ok(v)
    }

    /// Reads without recording or owner check (bookkeeping keys).
    pub fn peek(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        if let Some(v) = self.entry.get(key) {
            return Ok(v.clone());
        }
        self.base(key)
    }

    pub fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, DbError> {
        match self.get_raw(key)? {
            Some(v) => Ok(Some(decode(key, &v)?)),
            None => Ok(None),
        }
    }

    fn note_write(&mut self, key: &[u8]) {
        if self.foreign.is_none() {
            if let Err(DbError::NotOwned { key, shard }) = self.check_owner(key) {
                self.foreign = Some((key, shard));
            }
        }
    }

    pub fn put<T: Serialize>(&mut self, key: Vec<u8>, v: &T) {
        self.note_write(&key);
        self.entry.insert(key, Some(encode(v)));
    }

    pub fn put_raw(&mut self, key: Vec<u8>, v: Vec<u8>) {
        self.note_write(&key);
        self.entry.insert(key, Some(v));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.note_write(&key);
        self.entry.insert(key, None);
    }

    /// The first key of another shard the current entry wrote, if any.
    pub fn foreign_write(&self) -> Option<DbError> {
        self.foreign.as_ref().map(|(key, shard)| DbError::NotOwned {
            key: key.clone(),
            shard: *shard,
        })
    }

    /// Live keys in `[start, end)`, merging the overlay over the database.
    pub fn scan(&self, start: &[u8], end: &[u8]) -> Result<Vec<KeyValue>, DbError> {
        self.check_owner(start)?;
        let mut m: BTreeMap<Vec<u8>, Option<Vec<u8>>> = self
            .db
            .scan(start, end, usize::MAX)?
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect();
        if let Some(o) = self.overlay {
            for (k, v) in o.range(start.to_vec()..end.to_vec()) {
                m.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in self.batch.range(start.to_vec()..end.to_vec()) {
            m.insert(k.clone(), v.clone());
        }
        let base: Vec<KeyValue> = m
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
            .collect();
        self.scans
            .borrow_mut()
            .push((start.to_vec(), end.to_vec(), base));
        for (k, v) in self.entry.range(start.to_vec()..end.to_vec()) {
            m.insert(k.clone(), v.clone());
        }
        Ok(m.into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }

    /// What the current entry read, scanned and wrote so far.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            reads: self.reads.borrow().clone(),
            scans: self.scans.borrow().clone(),
            writes: self.entry.clone(),
        }
    }

    fn clear_entry(&mut self) {
        self.entry.clear();
        self.reads.borrow_mut().clear();
        self.scans.borrow_mut().clear();
        self.foreign = None;
    }

    /// The entry succeeded: keep its changes, and with them the segment
    /// counts its extent changes move (`crate::segment_use`).
    pub fn keep(&mut self) {
        let e = std::mem::take(&mut self.entry);
        self.count_segment_use(&e);
        self.kept_inodes
            .extend(e.keys().filter_map(|k| keys::inode_of(k)));
        self.batch.extend(e);
        self.clear_entry();
    }

    /// Moves the `u` counts, and the `w` index of which extents name each
    /// segment, by what `changes` (an entry's, not yet in `batch`) do to
    /// extent keys. Bookkeeping: never in a footprint.
    fn count_segment_use(&mut self, changes: &BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
        let mut deltas = BTreeMap::new();
        let mut index = BTreeMap::new();
        for (k, new) in changes.range(b"e".to_vec()..b"f".to_vec()) {
            let old = match self.base(k) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!("reading extent {k:02x?} to count its segment: {e}");
                    None
                }
            };
            crate::segment_use::account(&mut deltas, &mut index, k, old.as_deref(), new.as_deref());
        }
        self.batch.extend(index);
        for ((shard, segment), d) in deltas {
            if d == crate::segment_use::UseDelta::default() {
                continue;
            }
            let key = keys::segment_use(shard, segment);
            let cur: crate::segment_use::SegmentUse = match self.base(&key) {
                Ok(Some(v)) => decode(&key, &v).unwrap_or_default(),
                Ok(None) => Default::default(),
                Err(e) => {
                    tracing::error!("reading {segment}'s use on shard {shard}: {e}");
                    Default::default()
                }
            };
            let next = cur.moved(d).unwrap_or_else(|| {
                tracing::error!(
                    "{segment}'s use on shard {shard} would go below zero ({cur:?} {d:?}): \
                     the counts disagree with the extents (run the fsck)"
                );
                Default::default()
            });
            if next.extents == 0 {
                self.batch.insert(key, None);
            } else {
                self.batch.insert(key, Some(encode(&next)));
            }
        }
    }

    /// The inodes written by the entries kept since the last call.
    pub fn take_kept_inodes(&mut self) -> Vec<Ino> {
        std::mem::take(&mut self.kept_inodes)
    }

    /// The entry failed: forget its changes.
    pub fn rollback(&mut self) {
        self.clear_entry();
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.entry.is_empty()
    }
}
