//! A node's segment store: the fragment files in one directory, their
//! in-memory index, group-committed appends and verified reads.
//!
//! Synchronous; the server runs it on a dedicated thread. Appends in one
//! [`Store::append_batch`] share one `fdatasync` per file touched.
//!
//! Lifecycle of a segment on a node: open (appendable) → sealed (a seal
//! record; immutable) → freed (files removed). `dead_bytes` counts data the
//! layers above no longer reference, so compaction can pick segments by
//! their live fraction.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::format::{self, FileHeader, RecordHeader, RecordKind, SegmentId, HEADER_BYTES};
use crate::io::{AlignedBuf, IoEngine, IoMode};
use crate::layout::{Layout, ALIGN_BYTES};
use crate::proof::{self, GROUP_BYTES};

/// Largest fragment one append may carry.
pub const FRAGMENT_BYTES_MAX: usize = 16 << 20;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FragmentKey {
    pub segment: SegmentId,
    pub fragment: u8,
}

impl std::fmt::Display for FragmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "segment {} fragment {}", self.segment, self.fragment)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StoreError {
    #[error("no {0} on this node")]
    NoSuchFragment(FragmentKey),
    #[error("{key}: no stripe {stripe} on this node")]
    NoSuchStripe { key: FragmentKey, stripe: u32 },
    #[error("{key} stripe {stripe}: checksum mismatch ({detail})")]
    Checksum {
        key: FragmentKey,
        stripe: u32,
        detail: String,
    },
    #[error("{0} is sealed")]
    Sealed(FragmentKey),
    #[error("{key}: stripe {stripe} already written with other content")]
    Conflict { key: FragmentKey, stripe: u32 },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("no space left on device: {0}")]
    NoSpace(String),
    #[error("i/o error: {0}")]
    Io(String),
    #[error("permission denied: {0}")]
    Denied(String),
}

fn io_error(what: String, e: std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == std::io::ErrorKind::StorageFull {
        StoreError::NoSpace(format!("{what}: {e}"))
    } else {
        StoreError::Io(format!("{what}: {e}"))
    }
}

/// What a node holds of one segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FragmentInfo {
    pub key: FragmentKey,
    pub layout: Layout,
    pub nodes: Vec<u64>,
    /// Stripe numbers held, sorted.
    pub stripes: Vec<u32>,
    pub bytes: u64,
    pub sealed: bool,
    pub dead_bytes: u64,
}

#[derive(Clone, Debug)]
struct Record {
    /// Offset of the fragment data (after its header block).
    offset: u64,
    len: u32,
    checksum: [u8; 32],
}

struct FragFile {
    file: File,
    header: FileHeader,
    end: u64,
    stripes: BTreeMap<u32, Record>,
    sealed: bool,
    dead_bytes: u64,
}

impl FragFile {
    fn data_bytes(&self) -> u64 {
        self.stripes.values().map(|r| r.len as u64).sum()
    }
}

/// A fragment's data and blake3, or why it could not be read.
pub type FragmentRead = Result<(Vec<u8>, [u8; 32]), StoreError>;

/// One append of a batch.
pub struct AppendReq {
    pub key: FragmentKey,
    pub layout: Layout,
    pub nodes: Vec<u64>,
    pub stripe: u32,
    pub data: Vec<u8>,
}

/// Chaining values of a fragment's groups (see `proof`).
pub type GroupCvs = Arc<Vec<[u8; 32]>>;

/// A partial read: whole groups from `first_group` on, and every group's
/// chaining value (empty for a fragment of one group, sent whole).
#[derive(Clone, Debug)]
pub struct RangeRead {
    pub first_group: u32,
    pub data: Vec<u8>,
    pub cvs: GroupCvs,
}

/// Fragments whose chaining values are kept (32 bytes per 16 KiB group:
/// at most 512 bytes per 256 KiB fragment, 64 MiB in all).
pub const CV_CACHE_ENTRIES_MAX: usize = 128 * 1024;

/// Chaining values of recently written or read fragments, so a small read
/// reads only its groups. Filled on append and on the first partial read
/// of a fragment (which reads and verifies it whole); bounded, oldest out.
#[derive(Default)]
struct CvCache {
    map: HashMap<(FragmentKey, u32), GroupCvs>,
    order: std::collections::VecDeque<(FragmentKey, u32)>,
}

impl CvCache {
    fn get(&self, key: FragmentKey, stripe: u32) -> Option<GroupCvs> {
        self.map.get(&(key, stripe)).cloned()
    }

    fn put(&mut self, key: FragmentKey, stripe: u32, cvs: GroupCvs) {
        if self.map.insert((key, stripe), cvs).is_none() {
            self.order.push_back((key, stripe));
        }
        while self.order.len() > CV_CACHE_ENTRIES_MAX {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    fn forget_segment(&mut self, segment: SegmentId) {
        self.map.retain(|(k, _), _| k.segment != segment);
        self.order.retain(|(k, _)| k.segment != segment);
    }
}

/// Counters for metrics and /health.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreStats {
    pub appends: u64,
    pub bytes_written: u64,
    pub reads: u64,
    pub bytes_read: u64,
    pub syncs: u64,
    pub checksum_failures: u64,
    pub write_errors: u64,
    pub no_space_errors: u64,
    /// The last write error, cleared by the next successful write.
    pub last_write_error: Option<String>,
}

pub struct Store {
    dir: PathBuf,
    io: IoEngine,
    files: HashMap<FragmentKey, FragFile>,
    stats: StoreStats,
    /// Checksum failures found here or by readers of `read_batch_raw`.
    checksum_failures: Arc<AtomicU64>,
    cvs: CvCache,
    /// Fragment files opened without O_DIRECT for partial reads, so hot
    /// ranges are served from the page cache (fragments never change
    /// once written); at most `BUFFERED_FILES_MAX` open.
    buffered: HashMap<FragmentKey, File>,
}

/// Fragment files kept open for buffered partial reads.
const BUFFERED_FILES_MAX: usize = 1024;

impl Store {
    /// Opens the store in `dir`, scanning every fragment file. A torn last
    /// record (a crash mid-append, never acknowledged) is cut off.
    pub fn open(dir: &Path, allow_uring: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir.display().to_string(), e))?;
        let io = IoEngine::probe(dir, allow_uring);
        info!(dir = %dir.display(), io_mode = %io.mode(), "segment store opened");
        let mut s = Store {
            dir: dir.to_path_buf(),
            io,
            files: HashMap::new(),
            stats: StoreStats::default(),
            checksum_failures: Arc::new(AtomicU64::new(0)),
            cvs: CvCache::default(),
            buffered: HashMap::new(),
        };
        let rd = std::fs::read_dir(dir).map_err(|e| io_error(dir.display().to_string(), e))?;
        for e in rd {
            let e = e.map_err(|e| io_error(dir.display().to_string(), e))?;
            let name = e.file_name().to_string_lossy().to_string();
            let Some((segment, fragment)) = format::parse_file_name(&name) else {
                continue;
            };
            let key = FragmentKey { segment, fragment };
            match s.scan(&e.path(), key) {
                Ok(f) => {
                    s.files.insert(key, f);
                }
                Err(err) => {
                    warn!(file = %e.path().display(), "skipping unreadable fragment file: {err}")
                }
            }
        }
        Ok(s)
    }

    pub fn io_mode(&self) -> IoMode {
        self.io.mode()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stats(&self) -> StoreStats {
        let mut s = self.stats.clone();
        s.checksum_failures = self.checksum_failures.load(Ordering::Relaxed);
        s
    }

    /// The counter that callers verifying `read_batch_raw` results bump.
    pub fn checksum_failure_counter(&self) -> Arc<AtomicU64> {
        self.checksum_failures.clone()
    }

    fn path(&self, key: FragmentKey) -> PathBuf {
        self.dir.join(format::file_name(key.segment, key.fragment))
    }

    fn scan(&mut self, path: &Path, key: FragmentKey) -> Result<FragFile, String> {
        let file = self.io.open(path, false).map_err(|e| e.to_string())?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        let hb = self
            .io
            .read(&file, 0, HEADER_BYTES)
            .map_err(|e| e.to_string())?;
        let header = FileHeader::decode(hb.as_slice())?;
        if header.segment != key.segment || header.fragment != key.fragment {
            return Err("file header names another fragment".into());
        }
        let mut f = FragFile {
            file,
            header,
            end: HEADER_BYTES as u64,
            stripes: BTreeMap::new(),
            sealed: false,
            dead_bytes: 0,
        };
        let mut last: Option<(u32, u64)> = None;
        let mut incomplete = false;
        while f.end + HEADER_BYTES as u64 <= size {
            let b = self
                .io
                .read(&f.file, f.end, HEADER_BYTES)
                .map_err(|e| e.to_string())?;
            let Some(h) = RecordHeader::decode(b.as_slice()) else {
                break;
            };
            let data_off = f.end + HEADER_BYTES as u64;
            if data_off + h.data_len as u64 > size {
                // A record cut short by a crash: the torn tail.
                warn!(file = %path.display(), stripe = h.stripe, "incomplete last record cut off");
                incomplete = true;
                break;
            }
            match h.kind {
                RecordKind::Fragment => {
                    f.stripes.insert(
                        h.stripe,
                        Record {
                            offset: data_off,
                            len: h.data_len,
                            checksum: h.checksum,
                        },
                    );
                    last = Some((h.stripe, f.end));
                }
                RecordKind::Seal => f.sealed = true,
            }
            f.end = data_off + h.data_len as u64;
        }
        // If the file ended cleanly, the last fragment may still be torn
        // (its blocks partly written): verify it, drop it if bad.
        if let (Some((stripe, header_off)), false) = (last, incomplete) {
            let r = f.stripes[&stripe].clone();
            let ok = self
                .io
                .read(&f.file, r.offset, r.len as usize)
                .map(|d| format::checksum(d.as_slice()) == r.checksum)
                .unwrap_or(false);
            if !ok {
                warn!(file = %path.display(), stripe, "torn last fragment cut off");
                f.stripes.remove(&stripe);
                f.end = header_off;
            }
        }
        if size > f.end {
            f.file.set_len(f.end).map_err(|e| e.to_string())?;
        }
        Ok(f)
    }

    fn create(
        &mut self,
        key: FragmentKey,
        layout: Layout,
        nodes: &[u64],
    ) -> Result<(), StoreError> {
        let path = self.path(key);
        let file = self
            .io
            .open(&path, true)
            .map_err(|e| io_error(path.display().to_string(), e))?;
        let header = FileHeader {
            segment: key.segment,
            fragment: key.fragment,
            layout,
            nodes: nodes.to_vec(),
        };
        let buf = AlignedBuf::from_parts(&[&header.encode()]);
        let r = self
            .io
            .write_batch(&[(file.as_raw_fd(), 0, &buf)])
            .remove(0);
        if let Err(e) = r {
            let _ = std::fs::remove_file(&path);
            return Err(io_error(path.display().to_string(), e));
        }
        // The directory entry must survive a crash once data is acknowledged.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(self.dir.display().to_string(), e))?;
        self.files.insert(
            key,
            FragFile {
                file,
                header,
                end: HEADER_BYTES as u64,
                stripes: BTreeMap::new(),
                sealed: false,
                dead_bytes: 0,
            },
        );
        Ok(())
    }

    fn validate(req: &AppendReq) -> Result<(), StoreError> {
        let bad = |s: String| Err(StoreError::BadRequest(s));
        if req.data.is_empty()
            || !req.data.len().is_multiple_of(ALIGN_BYTES)
            || req.data.len() > FRAGMENT_BYTES_MAX
        {
            return bad(format!(
                "fragment of {} bytes (must be a non-zero multiple of {ALIGN_BYTES}, at most {FRAGMENT_BYTES_MAX})",
                req.data.len()
            ));
        }
        if req.key.fragment as usize >= req.layout.width() || req.nodes.len() != req.layout.width()
        {
            return bad(format!(
                "fragment {} with {} nodes for layout {}",
                req.key.fragment,
                req.nodes.len(),
                req.layout
            ));
        }
        Ok(())
    }

    /// Appends fragments; one `fdatasync` per file touched. Each result is
    /// the fragment's blake3. An `Ok` is durable; an `Err` left nothing
    /// behind that a later scan would treat as data.
    pub fn append_batch(&mut self, reqs: Vec<AppendReq>) -> Vec<Result<[u8; 32], StoreError>> {
        let mut results: Vec<Option<Result<[u8; 32], StoreError>>> =
            (0..reqs.len()).map(|_| None).collect();
        // (request index, key, offset of the record header, buffer)
        let mut planned: Vec<(usize, FragmentKey, u64, AlignedBuf, u32, [u8; 32])> = Vec::new();
        // Group chaining values by request index; the checksum is built
        // from them (the same hashing as a plain blake3).
        let mut group_cvs: HashMap<usize, Vec<[u8; 32]>> = HashMap::new();
        for (i, req) in reqs.iter().enumerate() {
            if let Err(e) = Self::validate(req) {
                results[i] = Some(Err(e));
                continue;
            }
            if !self.files.contains_key(&req.key) {
                if let Err(e) = self.create(req.key, req.layout, &req.nodes) {
                    self.note_write_error(&e);
                    results[i] = Some(Err(e));
                    continue;
                }
            }
            let cvs = proof::cvs(&req.data);
            let checksum = proof::checksum_from_cvs(&cvs, req.data.len())
                .unwrap_or_else(|| format::checksum(&req.data));
            group_cvs.insert(i, cvs);
            let f = self.files.get_mut(&req.key).expect("created above");
            if f.sealed {
                results[i] = Some(Err(StoreError::Sealed(req.key)));
                continue;
            }
            if let Some(r) = f.stripes.get(&req.stripe) {
                // A retried append of the same stripe is idempotent.
                results[i] = Some(if r.checksum == checksum {
                    Ok(checksum)
                } else {
                    Err(StoreError::Conflict {
                        key: req.key,
                        stripe: req.stripe,
                    })
                });
                continue;
            }
            let header = RecordHeader {
                kind: RecordKind::Fragment,
                stripe: req.stripe,
                data_len: req.data.len() as u32,
                checksum,
            };
            let buf = AlignedBuf::from_parts(&[&header.encode(), &req.data]);
            let at = f.end;
            f.end += buf.len() as u64;
            planned.push((i, req.key, at, buf, req.stripe, checksum));
        }
        let writes: Vec<_> = planned
            .iter()
            .map(|(_, key, at, buf, _, _)| (self.files[key].file.as_raw_fd(), *at, buf))
            .collect();
        let outcomes = self.io.write_batch(&writes);
        // A failed write makes every later write to that file fail too, and
        // the file is cut back to before the first failure.
        let mut failed: HashMap<FragmentKey, (u64, StoreError)> = HashMap::new();
        for ((_, key, at, _, _, _), r) in planned.iter().zip(&outcomes) {
            if let Err(e) = r {
                failed.entry(*key).or_insert_with(|| {
                    (
                        *at,
                        io_error(
                            format!("writing {key}"),
                            std::io::Error::new(e.kind(), e.to_string()),
                        ),
                    )
                });
            }
        }
        let mut touched: Vec<FragmentKey> = planned.iter().map(|p| p.1).collect();
        touched.sort();
        touched.dedup();
        touched.retain(|k| !failed.contains_key(k));
        let fds: Vec<_> = touched
            .iter()
            .map(|k| self.files[k].file.as_raw_fd())
            .collect();
        let syncs = self.io.sync_batch(&fds);
        self.stats.syncs += fds.len() as u64;
        for (k, r) in touched.iter().zip(syncs) {
            if let Err(e) = r {
                let at = planned.iter().find(|p| p.1 == *k).map(|p| p.2).unwrap_or(0);
                failed.insert(*k, (at, io_error(format!("syncing {k}"), e)));
            }
        }
        for (key, (at, _)) in &failed {
            if let Some(f) = self.files.get_mut(key) {
                let _ = f.file.set_len(*at);
                f.end = *at;
            }
        }
        for (i, key, at, buf, stripe, checksum) in planned {
            match failed.get(&key) {
                Some((cut, e)) if at >= *cut => {
                    results[i] = Some(Err(e.clone()));
                }
                _ => {
                    let f = self.files.get_mut(&key).expect("file exists");
                    let len = (buf.len() - HEADER_BYTES) as u32;
                    f.stripes.insert(
                        stripe,
                        Record {
                            offset: at + HEADER_BYTES as u64,
                            len,
                            checksum,
                        },
                    );
                    self.stats.appends += 1;
                    self.stats.bytes_written += len as u64;
                    if let Some(c) = group_cvs.remove(&i).filter(|c| !c.is_empty()) {
                        self.cvs.put(key, stripe, Arc::new(c));
                    }
                    results[i] = Some(Ok(checksum));
                }
            }
        }
        let errors: Vec<StoreError> = failed.into_values().map(|(_, e)| e).collect();
        for e in &errors {
            self.note_write_error(e);
        }
        if errors.is_empty() && !fds.is_empty() {
            self.stats.last_write_error = None;
        }
        results
            .into_iter()
            .map(|r| r.expect("every request answered"))
            .collect()
    }

    fn note_write_error(&mut self, e: &StoreError) {
        self.stats.write_errors += 1;
        if matches!(e, StoreError::NoSpace(_)) {
            self.stats.no_space_errors += 1;
        }
        warn!("segment write failed: {e}");
        self.stats.last_write_error = Some(e.to_string());
    }

    /// Reads one stripe's fragment and verifies its blake3.
    pub fn read(
        &mut self,
        key: FragmentKey,
        stripe: u32,
    ) -> Result<(Vec<u8>, [u8; 32]), StoreError> {
        self.read_batch(&[(key, stripe)]).remove(0)
    }

    /// Reads several fragments with one submission; each is verified.
    pub fn read_batch(&mut self, wanted: &[(FragmentKey, u32)]) -> Vec<FragmentRead> {
        let raw = self.read_batch_raw(wanted);
        raw.into_iter()
            .zip(wanted)
            .map(|(r, (key, stripe))| {
                let (data, checksum) = r?;
                verify(*key, *stripe, &data, &checksum, &self.checksum_failures)?;
                Ok((data, checksum))
            })
            .collect()
    }

    /// Reads several fragments with one submission, returning each with
    /// its stored blake3 *unverified*: the caller must check it with
    /// [`verify`] (the server does so off the store thread, in parallel).
    pub fn read_batch_raw(&mut self, wanted: &[(FragmentKey, u32)]) -> Vec<FragmentRead> {
        let mut results: Vec<Option<FragmentRead>> = (0..wanted.len()).map(|_| None).collect();
        let mut plan = Vec::new();
        for (i, (key, stripe)) in wanted.iter().enumerate() {
            match self.files.get(key).map(|f| f.stripes.get(stripe)) {
                None => results[i] = Some(Err(StoreError::NoSuchFragment(*key))),
                Some(None) => {
                    results[i] = Some(Err(StoreError::NoSuchStripe {
                        key: *key,
                        stripe: *stripe,
                    }))
                }
                Some(Some(r)) => plan.push((i, *key, *stripe, r.clone())),
            }
        }
        let reads: Vec<(&File, u64, usize)> = plan
            .iter()
            .map(|(_, key, _, r)| (&self.files[key].file, r.offset, r.len as usize))
            .collect();
        let datas = self.io.read_batch(&reads);
        for ((i, key, stripe, r), d) in plan.into_iter().zip(datas) {
            results[i] = Some(match d {
                Err(e) => Err(io_error(format!("reading {key} stripe {stripe}"), e)),
                Ok(data) => {
                    self.stats.reads += 1;
                    self.stats.bytes_read += r.len as u64;
                    Ok((data.as_slice().to_vec(), r.checksum))
                }
            });
        }
        results
            .into_iter()
            .map(|r| r.expect("every read answered"))
            .collect()
    }

    /// Reads bytes `[offset, offset + len)` of one stripe's fragment as
    /// the whole groups covering them, verified against the fragment's
    /// group chaining values (computed from a full, verified read the
    /// first time). See `proof`.
    pub fn read_range(
        &mut self,
        key: FragmentKey,
        stripe: u32,
        offset: u32,
        len: u32,
    ) -> Result<RangeRead, StoreError> {
        let rec = self
            .files
            .get(&key)
            .ok_or(StoreError::NoSuchFragment(key))?
            .stripes
            .get(&stripe)
            .ok_or(StoreError::NoSuchStripe { key, stripe })?
            .clone();
        let end = offset as u64 + len as u64;
        if len == 0 || end > rec.len as u64 {
            return Err(StoreError::BadRequest(format!(
                "range {offset}+{len} outside the {}-byte fragment",
                rec.len
            )));
        }
        let cvs = match self.cvs.get(key, stripe) {
            Some(c) => c,
            None => {
                let (data, stored) = self.read_batch_raw(&[(key, stripe)]).remove(0)?;
                verify(key, stripe, &data, &stored, &self.checksum_failures)?;
                let c = Arc::new(proof::cvs(&data));
                if !c.is_empty() {
                    self.cvs.put(key, stripe, c.clone());
                }
                let first = offset as usize / GROUP_BYTES;
                let from = if c.is_empty() { 0 } else { first * GROUP_BYTES };
                let to = if c.is_empty() {
                    data.len()
                } else {
                    ((end as usize).div_ceil(GROUP_BYTES) * GROUP_BYTES).min(data.len())
                };
                return Ok(RangeRead {
                    first_group: (from / GROUP_BYTES) as u32,
                    data: data[from..to].to_vec(),
                    cvs: c,
                });
            }
        };
        let first = offset as usize / GROUP_BYTES;
        let from = first * GROUP_BYTES;
        let to = ((end as usize).div_ceil(GROUP_BYTES) * GROUP_BYTES).min(rec.len as usize);
        let data = self
            .read_buffered(key, rec.offset + from as u64, to - from)
            .map_err(|e| io_error(format!("reading {key} stripe {stripe}"), e))?;
        self.stats.reads += 1;
        self.stats.bytes_read += data.len() as u64;
        for (i, g) in data.chunks(GROUP_BYTES).enumerate() {
            if proof::group_cv(first + i, g) != cvs[first + i] {
                self.checksum_failures.fetch_add(1, Ordering::Relaxed);
                warn!(%key, stripe, group = first + i, "fragment group checksum mismatch on read");
                return Err(StoreError::Checksum {
                    key,
                    stripe,
                    detail: format!("group {} does not match its chaining value", first + i),
                });
            }
        }
        Ok(RangeRead {
            first_group: first as u32,
            data,
            cvs,
        })
    }

    /// `len` bytes at `offset` of a fragment file through the page cache.
    fn read_buffered(
        &mut self,
        key: FragmentKey,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        if !self.buffered.contains_key(&key) {
            if self.buffered.len() >= BUFFERED_FILES_MAX {
                self.buffered.clear();
            }
            let f = File::open(self.path(key))?;
            self.buffered.insert(key, f);
        }
        let mut buf = vec![0u8; len];
        self.buffered[&key].read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Makes a fragment immutable (a seal record, synced).
    pub fn seal(&mut self, key: FragmentKey) -> Result<(), StoreError> {
        let f = self
            .files
            .get_mut(&key)
            .ok_or(StoreError::NoSuchFragment(key))?;
        if f.sealed {
            return Ok(());
        }
        let h = RecordHeader {
            kind: RecordKind::Seal,
            stripe: f.stripes.len() as u32,
            data_len: 0,
            checksum: [0; 32],
        };
        let buf = AlignedBuf::from_parts(&[&h.encode()]);
        let fd = f.file.as_raw_fd();
        let at = f.end;
        let r = self.io.write_batch(&[(fd, at, &buf)]).remove(0);
        let r = r.and_then(|_| self.io.sync_batch(&[fd]).remove(0));
        let f = self.files.get_mut(&key).expect("present");
        match r {
            Ok(()) => {
                f.end += HEADER_BYTES as u64;
                f.sealed = true;
                Ok(())
            }
            Err(e) => {
                let _ = f.file.set_len(at);
                Err(io_error(format!("sealing {key}"), e))
            }
        }
    }

    /// Removes every fragment of `segment` held here; returns how many.
    pub fn free(&mut self, segment: SegmentId) -> Result<usize, StoreError> {
        let keys: Vec<FragmentKey> = self
            .files
            .keys()
            .filter(|k| k.segment == segment)
            .copied()
            .collect();
        for k in &keys {
            let p = self.path(*k);
            std::fs::remove_file(&p).map_err(|e| io_error(p.display().to_string(), e))?;
            self.files.remove(k);
            self.buffered.remove(k);
        }
        self.cvs.forget_segment(segment);
        if !keys.is_empty() {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error(self.dir.display().to_string(), e))?;
        }
        Ok(keys.len())
    }

    /// Records that `bytes` of the segment's fragments here are no longer
    /// referenced (for compaction by live fraction).
    pub fn mark_dead(&mut self, key: FragmentKey, bytes: u64) -> Result<(), StoreError> {
        let f = self
            .files
            .get_mut(&key)
            .ok_or(StoreError::NoSuchFragment(key))?;
        f.dead_bytes = (f.dead_bytes + bytes).min(f.data_bytes());
        Ok(())
    }

    /// Number of fragment files held.
    pub fn fragment_count(&self) -> usize {
        self.files.len()
    }

    pub fn list(&self) -> Vec<FragmentInfo> {
        let mut v: Vec<FragmentInfo> = self
            .files
            .iter()
            .map(|(k, f)| FragmentInfo {
                key: *k,
                layout: f.header.layout,
                nodes: f.header.nodes.clone(),
                stripes: f.stripes.keys().copied().collect(),
                bytes: f.data_bytes(),
                sealed: f.sealed,
                dead_bytes: f.dead_bytes,
            })
            .collect();
        v.sort_by_key(|i| i.key);
        v
    }

    /// (free, total) bytes of the file system under the store.
    pub fn space(&self) -> (u64, u64) {
        let Ok(c) = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()) else {
            return (0, 0);
        };
        // SAFETY: statvfs fills the zeroed struct; the path is NUL-terminated.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(c.as_ptr(), &mut st) != 0 {
                return (0, 0);
            }
            (
                st.f_bavail as u64 * st.f_frsize as u64,
                st.f_blocks as u64 * st.f_frsize as u64,
            )
        }
    }
}

/// Checks `data` against the blake3 stored with it; counts and logs a
/// mismatch (bit rot, a torn write, a bad device).
pub fn verify(
    key: FragmentKey,
    stripe: u32,
    data: &[u8],
    stored: &[u8; 32],
    failures: &AtomicU64,
) -> Result<(), StoreError> {
    let got = format::checksum(data);
    if got == *stored {
        return Ok(());
    }
    failures.fetch_add(1, Ordering::Relaxed);
    warn!(%key, stripe, "fragment checksum mismatch on read");
    Err(StoreError::Checksum {
        key,
        stripe,
        detail: format!(
            "stored {}, data hashes to {}",
            blake3::Hash::from(*stored).to_hex(),
            blake3::Hash::from(got).to_hex()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cfs-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn req(seg: u128, stripe: u32, byte: u8, len: usize) -> AppendReq {
        AppendReq {
            key: FragmentKey {
                segment: SegmentId(seg),
                fragment: 0,
            },
            layout: Layout::new(2, 1).unwrap(),
            nodes: vec![1, 2, 3],
            stripe,
            data: vec![byte; len],
        }
    }

    #[test]
    fn partial_reads_verify_against_the_fragment_checksum() {
        let d = tmp("range");
        let mut s = Store::open(&d, true).unwrap();
        let key = FragmentKey {
            segment: SegmentId(3),
            fragment: 0,
        };
        let data: Vec<u8> = (0..256 << 10)
            .map(|i: usize| (i * 7 + i / 4096) as u8)
            .collect();
        let sum = s
            .append_batch(vec![AppendReq {
                data: data.clone(),
                ..req(3, 0, 0, 0)
            }])
            .remove(0)
            .unwrap();
        assert_eq!(sum, *blake3::hash(&data).as_bytes());
        // A record after it: a bad last record is cut off at open as a
        // torn tail rather than reported.
        let second = s.append_batch(vec![req(3, 1, 9, 4096)]).remove(0);
        assert!(second.is_ok(), "{second:?}");
        // From the chaining values kept at append, and after a restart
        // (computed from a full read).
        for restart in [false, true] {
            if restart {
                drop(s);
                s = Store::open(&d, true).unwrap();
            }
            let r = s.read_range(key, 0, 40_000, 4096).unwrap();
            let from = r.first_group as usize * proof::GROUP_BYTES;
            assert_eq!(r.data, data[from..from + r.data.len()]);
            assert!(from <= 40_000 && from + r.data.len() >= 44_096);
            proof::verify_groups(&sum, data.len(), r.first_group as usize, &r.data, &r.cvs)
                .unwrap();
        }
        assert!(matches!(
            s.read_range(key, 0, (256 << 10) - 10, 100),
            Err(StoreError::BadRequest(_))
        ));
        // A flipped bit in the range is caught by the server.
        drop(s);
        {
            use std::os::unix::fs::FileExt;
            let path = d.join(format::file_name(SegmentId(3), 0));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let off = (HEADER_BYTES * 2 + 40_000) as u64;
            let mut b = [0u8];
            f.read_exact_at(&mut b, off).unwrap();
            f.write_all_at(&[b[0] ^ 1], off).unwrap();
        }
        let mut s = Store::open(&d, true).unwrap();
        let r = s.read_range(key, 0, 40_000, 4096);
        assert!(matches!(r, Err(StoreError::Checksum { .. })), "{r:?}");
    }

    #[test]
    fn append_read_reopen_seal_free() {
        let d = tmp("basic");
        let mut s = Store::open(&d, true).unwrap();
        let r = s.append_batch(vec![
            req(1, 0, 1, 8192),
            req(1, 1, 2, 4096),
            req(2, 0, 3, 4096),
        ]);
        assert!(r.iter().all(|r| r.is_ok()));
        // Idempotent retry, conflicting rewrite, bad sizes.
        let r = s.append_batch(vec![
            req(1, 0, 1, 8192),
            req(1, 0, 9, 8192),
            req(1, 5, 0, 100),
        ]);
        assert!(r[0].is_ok());
        assert!(matches!(r[1], Err(StoreError::Conflict { .. })));
        assert!(matches!(r[2], Err(StoreError::BadRequest(_))));
        drop(s);
        let mut s = Store::open(&d, true).unwrap();
        let key = FragmentKey {
            segment: SegmentId(1),
            fragment: 0,
        };
        assert_eq!(s.read(key, 1).unwrap().0, vec![2u8; 4096]);
        assert_eq!(s.list().len(), 2);
        s.seal(key).unwrap();
        assert!(matches!(
            s.append_batch(vec![req(1, 7, 1, 4096)]).remove(0),
            Err(StoreError::Sealed(_))
        ));
        drop(s);
        let mut s = Store::open(&d, false).unwrap();
        assert!(s.list().iter().find(|i| i.key == key).unwrap().sealed);
        assert_eq!(s.free(SegmentId(1)).unwrap(), 1);
        assert!(matches!(s.read(key, 0), Err(StoreError::NoSuchFragment(_))));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bit_rot_is_detected_and_torn_tail_cut() {
        let d = tmp("rot");
        let mut s = Store::open(&d, true).unwrap();
        s.append_batch(vec![req(7, 0, 1, 8192), req(7, 1, 2, 8192)]);
        drop(s);
        let path = d.join(format::file_name(SegmentId(7), 0));
        // Flip a bit in stripe 0's data; truncate into stripe 1 (torn).
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let off = (HEADER_BYTES * 2 + 100) as u64;
            let mut b = [0u8];
            f.read_exact_at(&mut b, off).unwrap();
            f.write_all_at(&[b[0] ^ 4], off).unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len - 4096).unwrap();
        }
        let mut s = Store::open(&d, true).unwrap();
        let key = FragmentKey {
            segment: SegmentId(7),
            fragment: 0,
        };
        assert!(matches!(s.read(key, 0), Err(StoreError::Checksum { .. })));
        assert_eq!(s.stats().checksum_failures, 1);
        assert!(matches!(
            s.read(key, 1),
            Err(StoreError::NoSuchStripe { .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
