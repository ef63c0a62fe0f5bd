//! The write-ahead log of a node: segment files of checksummed records,
//! shared by every shard replica on the node (each a *stream*), group
//! commit across them, torn-tail recovery.
//!
//! ```text
//! Storage call ─► WalOp ─► record tagged with its stream, queued ─► applied to the stream's LogState
//!                                   │ sync(): one write + one fdatasync for every stream's queued records
//!                                   ▼
//!             seg-<id>.wal: [Start: every stream's Checkpoint][s1 Append][s2 Append][s1 Decided]...000
//! ```
//!
//! * Every record is one frame (`frame`): length, crc32c, payload. A record is
//!   applied on recovery only if its checksum holds, so a multi-op record
//!   (`Atomic`) is all-or-nothing, as OmniPaxos' `write_atomically` needs.
//! * Segment files are written in place, never grown (fdatasync then flushes
//!   data only): a new one is zero-filled (`Disk::create_zeroed`, in the
//!   background), or, once trimming frees one, an old segment file is
//!   recycled as is (renamed to `spare-*.wal`, then to the next segment), so
//!   a loaded log does not write every byte twice.
//! * Every record's payload starts with a [`RecordTag`]: the segment id its
//!   file has now and that segment's random salt. A record of the file's
//!   earlier use, however good its checksum, names another segment or salt:
//!   the end of data, like zeros. A user's entry bytes cannot forge the
//!   tag of a segment that does not exist yet (its salt is drawn when it
//!   starts).
//! * Each segment starts with one record holding every stream's
//!   `Checkpoint`, so whole old segments can be retired once every stream
//!   has trimmed every entry it has in them (see `node`).
//! * Recovery: a bad record in the last segment after which no record of
//!   this segment's tag follows is a torn tail (the last, unacknowledged
//!   write) and is cut off; a bad record elsewhere, or one followed by
//!   records of the same tag, is corruption, reported with file and offset,
//!   and start-up fails.
//!
//! Durability contract: nothing appended is durable until [`Wal::sync`]
//! returns. The shard loop calls `sync` once per batch of inputs, before it
//! sends any message or acknowledges any client (group commit).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use omnipaxos::ballot_leader_election::Ballot;
use omnipaxos::storage::StopSign;

use crate::disk::{Disk, DiskFile};
use crate::entry::{Entry, RequestId};
use crate::frame;

/// Default size of one segment file. Large enough that rotation (one extra
/// fdatasync and a directory sync) is rare; small enough that trimming frees
/// space promptly.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Default bound on the entry bytes a replica's WAL keeps in memory.
pub const MEMORY_BYTES_DEFAULT: usize = 64 << 20;
/// Largest record accepted on recovery. A live record may exceed the
/// segment size only when it is alone in a fresh segment.
pub const RECORD_BYTES_MAX: usize = 1 << 30;
/// Appends are split into records of at most this many payload bytes, so one
/// proposal burst cannot make a record larger than a segment.
pub const APPEND_RECORD_BYTES_MAX: usize = 8 << 20;
const _: () = assert!((APPEND_RECORD_BYTES_MAX as u64) < SEGMENT_BYTES_DEFAULT / 2);
const _: () = assert!(crate::entry::ENTRY_PAYLOAD_BYTES_MAX < APPEND_RECORD_BYTES_MAX);

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("i/o on {file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt log file {file} at offset {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    #[error("log segments missing: {0}")]
    Missing(String),
    #[error("the log failed earlier and refuses further writes: {0}")]
    Poisoned(String),
    #[error("{0}")]
    Format(String),
    #[error("{0}")]
    Stream(String),
}

fn io_err(disk: &impl Disk, name: &str) -> impl FnOnce(std::io::Error) -> WalError {
    let file = disk.describe(name);
    move |source| WalError::Io { file, source }
}

/// Everything a replica's storage holds, as replay of the WAL rebuilds it.
#[derive(Clone, Debug, Default)]
pub struct LogState {
    /// Index of `entries[0]`. Invariant: `entries_start <= end()`.
    pub entries_start: u64,
    /// Held entries: the newest in memory, older ones only on disk (see
    /// [`WalConfig::memory_bytes_max`]). Invariant: the `Disk` slots are a
    /// prefix of length `disk_prefix`.
    entries: VecDeque<Slot>,
    disk_prefix: usize,
    /// Encoded bytes of the `Mem` slots.
    mem_bytes: usize,
    /// Reads `Disk` slots back; `None` only for a state built in memory.
    source: Option<Arc<dyn RecordSource>>,
    /// Entries below this were removed by `Trim`. Invariant after recovery:
    /// `entries_start <= max(trimmed, first segment start)`.
    pub trimmed: u64,
    pub compacted: u64,
    pub decided: u64,
    pub promise: Option<Ballot>,
    pub accepted_round: Option<Ballot>,
    pub stopsign: Option<StopSign>,
    /// Index of every held entry that carries a request, for deduplicating
    /// retried proposals. Derived from `entries`.
    pub by_request: HashMap<RequestId, u64>,
}

/// Where an entry lives in the WAL: the record that holds it, and which of
/// that record's appended entries it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryLoc {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub nth: u32,
}

/// One held entry.
#[derive(Clone, Debug)]
enum Slot {
    Mem(Entry, Option<EntryLoc>),
    Disk(EntryLoc, RequestId),
}

impl Slot {
    fn request(&self) -> RequestId {
        match self {
            Slot::Mem(e, _) => e.request,
            Slot::Disk(_, r) => *r,
        }
    }
}

impl PartialEq for Slot {
    /// Equal if they are the same entry, whether in memory or on disk.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Slot::Mem(a, _), Slot::Mem(b, _)) => a == b,
            (Slot::Mem(_, Some(l)), Slot::Disk(m, _))
            | (Slot::Disk(m, _), Slot::Mem(_, Some(l))) => l == m,
            (Slot::Disk(l, _), Slot::Disk(m, _)) => l == m,
            _ => false,
        }
    }
}

impl PartialEq for LogState {
    fn eq(&self, o: &Self) -> bool {
        self.entries_start == o.entries_start
            && self.entries == o.entries
            && self.trimmed == o.trimmed
            && self.compacted == o.compacted
            && self.decided == o.decided
            && self.promise == o.promise
            && self.accepted_round == o.accepted_round
            && self.stopsign == o.stopsign
            && self.by_request == o.by_request
    }
}

/// Reads the entries a WAL record appended, for entries no longer held in
/// memory.
pub trait RecordSource: Send + Sync + std::fmt::Debug {
    fn appended_entries(
        &self,
        segment: u64,
        offset: u64,
        len: u32,
    ) -> Result<Arc<Vec<Entry>>, String>;
}

/// (segment, offset) of a record and the entries it appended.
type CachedRecord = ((u64, u64), Arc<Vec<Entry>>);

/// A [`RecordSource`] over a WAL directory, caching the last record read
/// (readers go forward through the log).
struct DiskRecords<D: Disk + Clone> {
    disk: D,
    stream: StreamId,
    last: Mutex<Option<CachedRecord>>,
}

impl<D: Disk + Clone> std::fmt::Debug for DiskRecords<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskRecords")
    }
}

impl<D: Disk + Clone> RecordSource for DiskRecords<D> {
    fn appended_entries(
        &self,
        segment: u64,
        offset: u64,
        len: u32,
    ) -> Result<Arc<Vec<Entry>>, String> {
        let mut last = self
            .last
            .lock()
            .map_err(|_| "record cache poisoned".to_string())?;
        if let Some((k, v)) = last.as_ref() {
            if *k == (segment, offset) {
                return Ok(v.clone());
            }
        }
        let name = segment_name(segment);
        let bytes = self
            .disk
            .read_range(&name, offset, len as usize)
            .map_err(|e| format!("reading {} at {offset}: {e}", self.disk.describe(&name)))?;
        let (payload, _) = frame::decode(&bytes, RECORD_BYTES_MAX)
            .map_err(|e| format!("{} at {offset}: {e}", self.disk.describe(&name)))?
            .ok_or_else(|| format!("{} at {offset}: short record", self.disk.describe(&name)))?;
        let body = match RecordTag::split(payload) {
            Some((tag, body)) if tag.segment == segment => body,
            _ => {
                return Err(format!(
                    "{} at {offset}: not a record of this segment",
                    self.disk.describe(&name)
                ))
            }
        };
        let op = match decode_record(body) {
            Ok(Record::Op(s, op)) if s == self.stream => op,
            Ok(_) => {
                return Err(format!(
                    "{} at {offset}: not a record of {}",
                    self.disk.describe(&name),
                    self.stream
                ))
            }
            Err(e) => return Err(format!("{} at {offset}: {e}", self.disk.describe(&name))),
        };
        let mut out = Vec::new();
        collect_appended(&op, &mut out);
        let out = Arc::new(out);
        *last = Some(((segment, offset), out.clone()));
        Ok(out)
    }
}

fn collect_appended(op: &WalOp, out: &mut Vec<Entry>) {
    match op {
        WalOp::Append { entries, .. } => out.extend(entries.iter().cloned()),
        WalOp::Atomic(ops) => ops.iter().for_each(|o| collect_appended(o, out)),
        _ => {}
    }
}

/// The record an op is being applied from, if it is on disk.
#[derive(Clone, Copy, Debug)]
struct RecordPos {
    segment: u64,
    offset: u64,
    len: u32,
}

impl LogState {
    /// Number of entries held (in memory or on disk).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Encoded bytes of the entries held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.mem_bytes
    }

    /// Moves the oldest in-memory entries to disk-only until at most
    /// `max` bytes stay in memory. Only entries whose record is written
    /// may move: callers evict right after a sync.
    fn evict(&mut self, max: usize) {
        while self.mem_bytes > max && self.disk_prefix < self.entries.len() {
            let slot = &mut self.entries[self.disk_prefix];
            let Slot::Mem(e, Some(loc)) = slot else {
                break;
            };
            self.mem_bytes -= e.encoded_len();
            *slot = Slot::Disk(*loc, e.request);
            self.disk_prefix += 1;
        }
    }

    fn drop_front(&mut self, n: usize) {
        for s in self.entries.drain(..n) {
            if let Slot::Mem(e, _) = s {
                self.mem_bytes -= e.encoded_len();
            }
        }
        self.disk_prefix = self.disk_prefix.saturating_sub(n);
    }

    fn truncate_to(&mut self, n: usize) {
        while self.entries.len() > n {
            if let Some(Slot::Mem(e, _)) = self.entries.pop_back() {
                self.mem_bytes -= e.encoded_len();
            }
        }
        self.disk_prefix = self.disk_prefix.min(n);
    }

    /// Index one past the last entry.
    pub fn end(&self) -> u64 {
        self.entries_start + self.entries.len() as u64
    }

    /// Entries `[from, to)`, or `None` if not all are held.
    pub fn get(&self, from: u64, to: u64) -> Option<Vec<Entry>> {
        if from < self.entries_start || to > self.end() || from > to {
            return None;
        }
        let a = (from - self.entries_start) as usize;
        let b = (to - self.entries_start) as usize;
        let mut out = Vec::with_capacity(b - a);
        for slot in self.entries.range(a..b) {
            match slot {
                Slot::Mem(e, _) => out.push(e.clone()),
                Slot::Disk(loc, _) => {
                    let source = self.source.as_ref()?;
                    match source.appended_entries(loc.segment, loc.offset, loc.len) {
                        Ok(v) => out.push(v.get(loc.nth as usize)?.clone()),
                        Err(e) => {
                            tracing::error!("cannot read a log entry back from disk: {e}");
                            return None;
                        }
                    }
                }
            }
        }
        Some(out)
    }

    fn unindex(&mut self, from: u64, to: u64) {
        let from = from.max(self.entries_start);
        let to = to.min(self.end());
        for i in from..to {
            let r = self.entries[(i - self.entries_start) as usize].request();
            if self.by_request.get(&r) == Some(&i) {
                self.by_request.remove(&r);
            }
        }
    }

    fn apply(&mut self, op: &WalOp) -> Result<(), String> {
        self.apply_at(op, None, &mut 0)
    }

    /// Applies `op`, read from (or about to be written as) the record at
    /// `pos`; `nth` counts the record's appended entries so far.
    fn apply_at(
        &mut self,
        op: &WalOp,
        pos: Option<RecordPos>,
        nth: &mut u32,
    ) -> Result<(), String> {
        match op {
            WalOp::Append { first_idx, entries } => {
                if *first_idx != self.end() {
                    return Err(format!(
                        "append at index {first_idx} but the log ends at {}",
                        self.end()
                    ));
                }
                for (i, e) in entries.iter().enumerate() {
                    if !e.request.is_none() {
                        self.by_request.insert(e.request, first_idx + i as u64);
                    }
                }
                for e in entries {
                    let loc = pos.map(|p| EntryLoc {
                        segment: p.segment,
                        offset: p.offset,
                        len: p.len,
                        nth: *nth,
                    });
                    *nth += 1;
                    self.mem_bytes += e.encoded_len();
                    self.entries.push_back(Slot::Mem(e.clone(), loc));
                }
            }
            WalOp::Truncate(from) => {
                self.unindex(*from, self.end());
                if *from <= self.entries_start {
                    self.truncate_to(0);
                    self.entries_start = *from;
                } else if *from < self.end() {
                    self.truncate_to((*from - self.entries_start) as usize);
                }
            }
            WalOp::Promise(b) => self.promise = Some(*b),
            WalOp::AcceptedRound(b) => self.accepted_round = Some(*b),
            WalOp::Decided(d) => self.decided = *d,
            WalOp::Compacted(c) => self.compacted = *c,
            WalOp::Trim(idx) => {
                self.trimmed = self.trimmed.max(*idx);
                self.unindex(self.entries_start, *idx);
                if *idx >= self.end() {
                    self.truncate_to(0);
                    self.entries_start = *idx;
                } else if *idx > self.entries_start {
                    let n = (*idx - self.entries_start) as usize;
                    self.drop_front(n);
                    self.entries_start = *idx;
                }
            }
            WalOp::StopSign(s) => self.stopsign = s.clone(),
            WalOp::Checkpoint(c) => {
                // Replay of an older segment reached the next one: its
                // checkpoint must agree with what replay built.
                if c.log_end != self.end() {
                    return Err(format!(
                        "checkpoint says the log ends at {} but replay reached {}",
                        c.log_end,
                        self.end()
                    ));
                }
                self.trimmed = c.trimmed;
                self.compacted = c.compacted;
                self.decided = c.decided;
                self.promise = c.promise;
                self.accepted_round = c.accepted_round;
                self.stopsign = c.stopsign.clone();
            }
            WalOp::Atomic(ops) => {
                for o in ops {
                    self.apply_at(o, pos, nth)?;
                }
            }
        }
        Ok(())
    }
}

/// Metadata at the start of each segment.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub log_end: u64,
    pub trimmed: u64,
    pub compacted: u64,
    pub decided: u64,
    pub promise: Option<Ballot>,
    pub accepted_round: Option<Ballot>,
    pub stopsign: Option<StopSign>,
}

/// One logical change to [`LogState`]; one record on disk.
#[derive(Clone, Debug, PartialEq)]
pub enum WalOp {
    Append { first_idx: u64, entries: Vec<Entry> },
    Truncate(u64),
    Promise(Ballot),
    AcceptedRound(Ballot),
    Decided(u64),
    Compacted(u64),
    Trim(u64),
    StopSign(Option<StopSign>),
    Checkpoint(Checkpoint),
    Atomic(Vec<WalOp>),
}

mod tag {
    pub const CHECKPOINT: u8 = 1;
    pub const APPEND: u8 = 2;
    pub const TRUNCATE: u8 = 3;
    pub const PROMISE: u8 = 4;
    pub const ACCEPTED: u8 = 5;
    pub const DECIDED: u8 = 6;
    pub const COMPACTED: u8 = 7;
    pub const TRIM: u8 = 8;
    pub const STOPSIGN: u8 = 9;
    pub const ATOMIC: u8 = 10;
}

fn put_ballot(out: &mut Vec<u8>, b: &Ballot) {
    out.extend_from_slice(&b.config_id.to_le_bytes());
    out.extend_from_slice(&b.n.to_le_bytes());
    out.extend_from_slice(&b.priority.to_le_bytes());
    out.extend_from_slice(&b.pid.to_le_bytes());
}

fn put_opt_ballot(out: &mut Vec<u8>, b: &Option<Ballot>) {
    match b {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            put_ballot(out, b);
        }
    }
}

fn put_stopsign(out: &mut Vec<u8>, s: &Option<StopSign>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            let b = bincode::serialize(s).expect("stopsign serializes");
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(&b);
        }
    }
}

impl WalOp {
    /// Stable encoding of one op (the payload of one record).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            WalOp::Checkpoint(c) => {
                out.push(tag::CHECKPOINT);
                for v in [c.log_end, c.trimmed, c.compacted, c.decided] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                put_opt_ballot(out, &c.promise);
                put_opt_ballot(out, &c.accepted_round);
                put_stopsign(out, &c.stopsign);
            }
            WalOp::Append { first_idx, entries } => {
                out.push(tag::APPEND);
                out.extend_from_slice(&first_idx.to_le_bytes());
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for e in entries {
                    e.encode_into(out);
                }
            }
            WalOp::Truncate(i) => {
                out.push(tag::TRUNCATE);
                out.extend_from_slice(&i.to_le_bytes());
            }
            WalOp::Promise(b) => {
                out.push(tag::PROMISE);
                put_ballot(out, b);
            }
            WalOp::AcceptedRound(b) => {
                out.push(tag::ACCEPTED);
                put_ballot(out, b);
            }
            WalOp::Decided(i) => {
                out.push(tag::DECIDED);
                out.extend_from_slice(&i.to_le_bytes());
            }
            WalOp::Compacted(i) => {
                out.push(tag::COMPACTED);
                out.extend_from_slice(&i.to_le_bytes());
            }
            WalOp::Trim(i) => {
                out.push(tag::TRIM);
                out.extend_from_slice(&i.to_le_bytes());
            }
            WalOp::StopSign(s) => {
                out.push(tag::STOPSIGN);
                put_stopsign(out, s);
            }
            WalOp::Atomic(ops) => {
                out.push(tag::ATOMIC);
                out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
                for o in ops {
                    let at = out.len();
                    out.extend_from_slice(&[0u8; 4]);
                    o.encode_into(out);
                    let n = (out.len() - at - 4) as u32;
                    out[at..at + 4].copy_from_slice(&n.to_le_bytes());
                }
            }
        }
    }

    /// Decodes one op; every length is checked against the buffer.
    pub fn decode(buf: &[u8]) -> Result<WalOp, String> {
        let mut r = Reader { buf, pos: 0 };
        let op = r.op()?;
        if r.pos != buf.len() {
            return Err(format!("{} trailing bytes in record", buf.len() - r.pos));
        }
        Ok(op)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() - self.pos < n {
            return Err(format!(
                "record truncated: need {n} bytes at {}, have {}",
                self.pos,
                self.buf.len() - self.pos
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn ballot(&mut self) -> Result<Ballot, String> {
        Ok(Ballot {
            config_id: self.u32()?,
            n: self.u32()?,
            priority: self.u32()?,
            pid: self.u64()?,
        })
    }
    fn opt_ballot(&mut self) -> Result<Option<Ballot>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.ballot()?)),
            t => Err(format!("bad option tag {t}")),
        }
    }
    fn stopsign(&mut self) -> Result<Option<StopSign>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => {
                let n = self.u32()? as usize;
                let b = self.take(n)?;
                bincode::deserialize(b)
                    .map(Some)
                    .map_err(|e| format!("bad stopsign: {e}"))
            }
            t => Err(format!("bad option tag {t}")),
        }
    }
    fn op(&mut self) -> Result<WalOp, String> {
        Ok(match self.u8()? {
            tag::CHECKPOINT => WalOp::Checkpoint(Checkpoint {
                log_end: self.u64()?,
                trimmed: self.u64()?,
                compacted: self.u64()?,
                decided: self.u64()?,
                promise: self.opt_ballot()?,
                accepted_round: self.opt_ballot()?,
                stopsign: self.stopsign()?,
            }),
            tag::APPEND => {
                let first_idx = self.u64()?;
                let n = self.u32()? as usize;
                let mut entries = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    let (e, used) = Entry::decode_prefix(&self.buf[self.pos..])
                        .map_err(|e| format!("bad entry: {e}"))?;
                    self.pos += used;
                    entries.push(e);
                }
                WalOp::Append { first_idx, entries }
            }
            tag::TRUNCATE => WalOp::Truncate(self.u64()?),
            tag::PROMISE => WalOp::Promise(self.ballot()?),
            tag::ACCEPTED => WalOp::AcceptedRound(self.ballot()?),
            tag::DECIDED => WalOp::Decided(self.u64()?),
            tag::COMPACTED => WalOp::Compacted(self.u64()?),
            tag::TRIM => WalOp::Trim(self.u64()?),
            tag::STOPSIGN => WalOp::StopSign(self.stopsign()?),
            tag::ATOMIC => {
                let n = self.u32()? as usize;
                let mut ops = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    let len = self.u32()? as usize;
                    let body = self.take(len)?;
                    ops.push(WalOp::decode(body)?);
                }
                WalOp::Atomic(ops)
            }
            t => return Err(format!("unknown record tag {t}")),
        })
    }
}

/// Tunables of one WAL.
#[derive(Clone, Debug)]
pub struct WalConfig {
    pub segment_bytes: u64,
    /// Zero-fill the next segment on a helper thread (production) rather
    /// than inline at rotation (simulation, where determinism matters).
    pub background_prealloc: bool,
    /// Entries beyond this many encoded bytes are kept only on disk (the
    /// oldest first) and read back on demand: memory per replica is
    /// bounded, whatever the trim lag.
    pub memory_bytes_max: usize,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            background_prealloc: true,
            memory_bytes_max: MEMORY_BYTES_DEFAULT,
        }
    }
}

fn segment_name(id: u64) -> String {
    format!("seg-{id:016x}.wal")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?.strip_suffix(".wal")?;
    u64::from_str_radix(hex, 16).ok()
}

const PREALLOC_NAME: &str = "prealloc.tmp";

/// Names the record format of a WAL directory: written before its first
/// segment, checked before reading any. Format 2: records tagged with
/// their segment (recycled segment files).
const FORMAT_NAME: &str = "FORMAT";
const FORMAT_STAMP: &[u8] = b"cfs-wal 3\n";

/// Refuses a directory whose segments another record format wrote, and
/// stamps a new one.
fn check_format<D: Disk>(disk: &D, names: &[String]) -> Result<(), WalError> {
    let has_segments = names.iter().any(|n| parse_segment_name(n).is_some());
    if names.iter().any(|n| n == FORMAT_NAME) {
        let stamp = disk
            .read_all(FORMAT_NAME)
            .map_err(io_err(disk, FORMAT_NAME))?;
        if stamp.len() == FORMAT_STAMP.len() && stamp.iter().all(|b| *b == 0) {
            // Created by this version (only it writes the file) but its
            // stamp lost to a power cut on a disk whose fsync lied: stamp
            // it again.
            return disk
                .open(FORMAT_NAME)
                .and_then(|mut f| {
                    f.write_at(0, FORMAT_STAMP)?;
                    f.sync_data()
                })
                .map_err(io_err(disk, FORMAT_NAME));
        }
        if stamp != FORMAT_STAMP {
            return Err(WalError::Format(format!(
                "{} says {:?}; this version reads {:?}",
                disk.describe(FORMAT_NAME),
                String::from_utf8_lossy(&stamp).trim(),
                String::from_utf8_lossy(FORMAT_STAMP).trim()
            )));
        }
        return Ok(());
    }
    if has_segments {
        return Err(WalError::Format(format!(
            "{} holds log segments but no {FORMAT_NAME} stamp: written by a version \
             before WAL format 2 (records without segment tags), which this version \
             cannot read; start this replica from an empty directory and let it catch up",
            disk.describe(".")
        )));
    }
    disk.create_zeroed(FORMAT_NAME, FORMAT_STAMP.len() as u64)
        .and_then(|_| disk.open(FORMAT_NAME))
        .and_then(|mut f| {
            f.write_at(0, FORMAT_STAMP)?;
            f.sync_data()
        })
        .and_then(|_| disk.sync_dir())
        .map_err(io_err(disk, FORMAT_NAME))
}

/// Trimmed segment files kept for reuse, beyond which they are deleted.
pub const RECYCLED_SPARES_MAX: usize = 2;

fn spare_name(id: u64) -> String {
    format!("spare-{id:016x}.wal")
}

fn is_spare_name(name: &str) -> bool {
    name.starts_with("spare-") && name.ends_with(".wal")
}

/// What starts every record's payload: which use of a file the record
/// belongs to. See the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RecordTag {
    segment: u64,
    salt: u64,
}

impl RecordTag {
    const BYTES: usize = 16;

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.segment.to_le_bytes());
        out.extend_from_slice(&self.salt.to_le_bytes());
    }

    /// The tag and the op bytes after it.
    fn split(payload: &[u8]) -> Option<(RecordTag, &[u8])> {
        if payload.len() < Self::BYTES {
            return None;
        }
        let segment = u64::from_le_bytes(payload[..8].try_into().ok()?);
        let salt = u64::from_le_bytes(payload[8..16].try_into().ok()?);
        Some((RecordTag { segment, salt }, &payload[Self::BYTES..]))
    }
}

/// The offset of the first good record at or after `from` tagged with
/// `tag`: proof that data of this use of the file lies beyond a bad spot,
/// which is then corruption, not a torn tail.
fn find_tagged_record(bytes: &[u8], from: usize, tag: RecordTag) -> Option<usize> {
    let id = tag.segment.to_le_bytes();
    let h = frame::FRAME_HEADER_BYTES;
    let last = bytes.len().checked_sub(h + RecordTag::BYTES)?;
    // Candidates: where the segment id stands as a tag would (a SIMD
    // search: the rest of a zero-filled 64 MiB file costs milliseconds).
    // Overlapping hits count (an id of zeros next to a zero byte).
    let finder = memchr::memmem::Finder::new(&id);
    let mut at = from;
    while at <= last {
        if tag.segment == 0 {
            // The id is eight zeros, found all over zero-filled space: a
            // record's length (its first four bytes) is not zero, so skip
            // to just before the next non-zero byte.
            let nz = bytes[at..].iter().position(|b| *b != 0)?;
            at += nz.saturating_sub(3);
            if at > last {
                return None;
            }
        }
        let hit = at + finder.find(&bytes[at + h..last + h + 8])?;
        let is_record = match frame::decode(&bytes[hit..], RECORD_BYTES_MAX) {
            Ok(Some((payload, _))) => RecordTag::split(payload).is_some_and(|(t, _)| t == tag),
            _ => false,
        };
        if is_record {
            return Some(hit);
        }
        at = hit + 1;
    }
    None
}

/// Statistics for metrics and tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct WalStats {
    pub syncs: u64,
    pub bytes_written: u64,
    pub records: u64,
    /// A torn tail was cut off at start-up.
    pub torn_tail_truncated: bool,
    /// Segments started in a recycled file / in a zero-filled one.
    pub segments_recycled: u64,
    pub segments_zero_filled: u64,
    /// At start-up the last segment was closed (a rotation cut short
    /// before the next segment was durable): a new one was started.
    pub resumed_after_end: bool,
}

struct ScanResult {
    /// Each good record's op, offset and length.
    ops: Vec<(Record, u64, u32)>,
    /// Offset just past the last good record.
    end: u64,
    torn: bool,
    /// Offset just past the last non-zero byte of a torn tail (`end` if
    /// none): the bytes to zero so the next scan sees a clean end.
    torn_end: u64,
    /// The salt of the segment's records (none if it has none).
    salt: Option<u64>,
    /// The segment's end record was found: no record may be added to it.
    ended: bool,
}

/// Bytes of the record that closes a segment (a tag and no op): written
/// before rotating, so a segment that is not the last must end with one,
/// and whatever follows it is the file's earlier use.
const END_RECORD_BYTES: u64 = (frame::FRAME_HEADER_BYTES + RecordTag::BYTES) as u64;

/// Why a scan stopped before the end of a segment file.
enum Stop {
    /// The segment's end record.
    Ended,
    /// A zero length: never-written (zero-filled) space.
    Zeros,
    /// A good record of the file's earlier use (another tag).
    Stale,
    /// A record whose checksum or length fails.
    Bad,
}

/// Reads the records of segment `segment` from its file's bytes: every
/// record tagged with this segment up to the first thing that is not one.
fn scan_segment(
    bytes: &[u8],
    segment: u64,
    file: &str,
    is_last: bool,
) -> Result<ScanResult, WalError> {
    let mut ops = Vec::new();
    let mut salt: Option<u64> = None;
    let mut pos = 0usize;
    let corrupt = |offset: usize, reason: String| WalError::Corrupt {
        file: file.to_string(),
        offset: offset as u64,
        reason,
    };
    let stop = loop {
        let rest = &bytes[pos..];
        if rest.len() < frame::FRAME_HEADER_BYTES || rest[..4] == [0, 0, 0, 0] {
            break Stop::Zeros;
        }
        match frame::decode(rest, RECORD_BYTES_MAX) {
            Ok(Some((payload, used))) => match RecordTag::split(payload) {
                Some((tag, body))
                    if tag.segment == segment
                        && salt.is_none_or(|s| s == tag.salt)
                        && body.is_empty() =>
                {
                    pos += used;
                    break Stop::Ended;
                }
                Some((tag, body))
                    if tag.segment == segment && salt.is_none_or(|s| s == tag.salt) =>
                {
                    // Checksum and tag held but the content is not a record:
                    // never torn.
                    let op = decode_record(body).map_err(|r| corrupt(pos, r))?;
                    salt = Some(tag.salt);
                    ops.push((op, pos as u64, used as u32));
                    pos += used;
                }
                _ => break Stop::Stale,
            },
            Ok(None) | Err(_) => break Stop::Bad,
        }
    };
    let what = match stop {
        Stop::Ended => "the segment's end record",
        Stop::Zeros => "end of records (zeros)",
        Stop::Stale => "end of records (an earlier use of the file)",
        Stop::Bad => "bad or incomplete record",
    };
    // Past the end record, or past the thing that is not a record here.
    let after = if matches!(stop, Stop::Ended) {
        pos
    } else {
        pos + 1
    };
    // Without a good first record (no salt), nothing of this segment was
    // ever synced: its first write was cut short.
    let found = salt.and_then(|salt| find_tagged_record(bytes, after, RecordTag { segment, salt }));
    if let Some(at) = found {
        return Err(corrupt(
            pos,
            format!(
                "{what}, yet a record of this segment follows at offset {at} (not a torn tail)"
            ),
        ));
    }
    let clean = ScanResult {
        ops,
        end: pos as u64,
        torn: false,
        torn_end: pos as u64,
        salt,
        ended: matches!(stop, Stop::Ended),
    };
    match stop {
        Stop::Ended => Ok(clean),
        Stop::Zeros | Stop::Stale if is_last => Ok(clean),
        Stop::Zeros | Stop::Stale => Err(corrupt(
            pos,
            format!("{what} before the segment's end record (a segment that is not the last)"),
        )),
        Stop::Bad if is_last => {
            // A torn tail: zero the span its header claims (bounded by the
            // file), so the next records written here leave no remnant.
            let rest = &bytes[pos..];
            let claimed = match rest.get(..4) {
                Some(b) => u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize,
                None => 0,
            };
            let span_end = pos
                .saturating_add(frame::FRAME_HEADER_BYTES)
                .saturating_add(claimed.min(APPEND_RECORD_BYTES_MAX * 2))
                .min(bytes.len());
            let dirty = bytes[pos..span_end].iter().rposition(|b| *b != 0);
            Ok(ScanResult {
                torn: true,
                torn_end: dirty.map_or(pos, |d| pos + d + 1) as u64,
                ..clean
            })
        }
        Stop::Bad => Err(corrupt(
            pos,
            "bad record in a segment that is not the last".into(),
        )),
    }
}

mod node;

use node::{decode_record, Record};
pub use node::{NodeWal, StreamId, Wal};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::SimDisk;
    use crate::entry::{EntryKind, RequestId};
    use rand::SeedableRng;

    fn cfg(seg: u64) -> WalConfig {
        WalConfig {
            segment_bytes: seg,
            background_prealloc: false,
            // Tiny: most reads in these tests come back from disk.
            memory_bytes_max: 100,
        }
    }

    fn e(i: u64) -> Entry {
        Entry::new(
            EntryKind::DATA,
            RequestId { client: 1, seq: i },
            i.to_le_bytes().to_vec(),
        )
    }

    fn append(w: &mut Wal<SimDisk>, n: u64) {
        let first = w.state().end();
        let entries = (first..first + n).map(e).collect();
        w.append(WalOp::Append {
            first_idx: first,
            entries,
        })
        .unwrap();
    }

    #[test]
    fn reopen_equals_live_state() {
        let d = SimDisk::new();
        let mut w = Wal::open(d.clone(), cfg(1024)).unwrap();
        for _ in 0..50 {
            append(&mut w, 3);
            w.append(WalOp::Decided(w.state().end() - 1)).unwrap();
            w.sync().unwrap();
        }
        w.append(WalOp::Atomic(vec![
            WalOp::Truncate(100),
            WalOp::Promise(Ballot::with(1, 2, 0, 3)),
        ]))
        .unwrap();
        w.sync().unwrap();
        assert!(w.segment_count() > 3, "rotation happened");
        let live = w.state().clone();
        drop(w);
        let w2 = Wal::open(d, cfg(1024)).unwrap();
        assert_eq!(w2.state(), &live);
    }

    #[test]
    fn trimmed_segments_are_deleted_and_recovery_resumes() {
        let d = SimDisk::new();
        let mut w = Wal::open(d.clone(), cfg(2048)).unwrap();
        for _ in 0..100 {
            append(&mut w, 4);
            w.sync().unwrap();
        }
        let before = w.segment_count();
        w.append(WalOp::Atomic(vec![WalOp::Trim(300), WalOp::Compacted(300)]))
            .unwrap();
        w.sync().unwrap();
        assert!(w.segment_count() < before);
        let live = w.state().clone();
        drop(w);
        let w2 = Wal::open(d.clone(), cfg(2048)).unwrap();
        assert_eq!(w2.state().entries_start, 300);
        assert_eq!(w2.state(), &live);
    }

    /// For 200 seeds: `prepare` a WAL, then 20 rounds of appends (two in
    /// three synced), a crash, and a restart that must keep every synced
    /// entry and nothing past the appended ones.
    fn crash_keeps_synced_entries(prepare: fn(&mut Wal<SimDisk>)) {
        for seed in 0..200 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let d = SimDisk::new();
            let mut w = Wal::open(d.clone(), cfg(1024)).unwrap();
            prepare(&mut w);
            let mut synced_end = w.state().end();
            for round in 0..20 {
                append(&mut w, 2);
                if round % 3 != 2 {
                    w.sync().unwrap();
                    synced_end = w.state().end();
                }
            }
            let unsynced_end = w.state().end();
            drop(w);
            d.crash(&mut rng);
            let w2 = Wal::open(d.clone(), cfg(1024)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let end = w2.state().end();
            assert!(end >= synced_end && end <= unsynced_end, "seed {seed}");
            for i in w2.state().entries_start..end {
                assert_eq!(w2.state().get(i, i + 1).unwrap()[0], e(i), "seed {seed}");
            }
        }
    }

    #[test]
    fn crash_loses_only_unsynced_and_torn_tail_is_cut() {
        crash_keeps_synced_entries(|_| {});
    }

    /// Trims as the log grows, so most new segments start in a recycled
    /// file full of good records of its earlier use.
    fn append_trimming(w: &mut Wal<SimDisk>, rounds: u64) {
        for _ in 0..rounds {
            append(w, 4);
            let keep_from = w.state().end().saturating_sub(40);
            if keep_from > w.state().trimmed {
                w.append(WalOp::Atomic(vec![
                    WalOp::Trim(keep_from),
                    WalOp::Compacted(keep_from),
                ]))
                .unwrap();
            }
            w.sync().unwrap();
        }
    }

    #[test]
    fn trimmed_segments_are_recycled_and_their_old_records_never_replayed() {
        let d = SimDisk::new();
        let mut w = Wal::open(d.clone(), cfg(2048)).unwrap();
        append_trimming(&mut w, 300);
        let st = w.stats();
        assert!(st.segments_recycled > 10, "{st:?}");
        assert!(st.segments_recycled > 5 * st.segments_zero_filled, "{st:?}");
        let files = d.list().unwrap();
        assert!(files.iter().filter(|n| is_spare_name(n)).count() <= RECYCLED_SPARES_MAX);
        let live = w.state().clone();
        drop(w);
        let w2 = Wal::open(d.clone(), cfg(2048)).unwrap();
        assert_eq!(w2.state(), &live);
        let end = live.end();
        for i in live.entries_start..end {
            assert_eq!(w2.state().get(i, i + 1).unwrap()[0], e(i));
        }
    }

    #[test]
    fn crash_in_recycled_segments_loses_only_unsynced() {
        crash_keeps_synced_entries(|w| {
            append_trimming(w, 60);
            assert!(w.stats().segments_recycled > 0);
        });
    }

    fn record(tag: RecordTag, op: &WalOp, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        tag.put(&mut body);
        body.extend_from_slice(&0u64.to_le_bytes());
        op.encode_into(&mut body);
        frame::encode_into(out, &body);
    }

    #[test]
    fn a_good_record_with_another_salt_ends_the_segment() {
        // What a recycled file may hold right after the last record: a
        // well-formed record of an earlier use, or one a client forged into
        // an entry's bytes naming the segment id the file will get. Either
        // way its salt is not the one drawn when the segment started.
        let mine = RecordTag {
            segment: 5,
            salt: 0x5eed,
        };
        let mut bytes = Vec::new();
        record(mine, &WalOp::Decided(3), &mut bytes);
        let end = bytes.len();
        let forged = RecordTag { salt: 999, ..mine };
        record(forged, &WalOp::Decided(1_000_000), &mut bytes);
        record(
            RecordTag { segment: 4, ..mine },
            &WalOp::Decided(7),
            &mut bytes,
        );
        bytes.resize(4096, 0xa5);
        let scan = scan_segment(&bytes, 5, "seg", true).unwrap();
        assert_eq!(scan.ops.len(), 1);
        assert_eq!(scan.end, end as u64);
        assert!(!scan.torn && !scan.ended);
        // A segment that is not the last must have been closed by its end
        // record; with it, what follows is the file's earlier use.
        let err = scan_segment(&bytes, 5, "seg", false)
            .err()
            .expect("not closed");
        assert!(err.to_string().contains("end record"), "{err}");
        let mut closed = Vec::new();
        record(mine, &WalOp::Decided(3), &mut closed);
        let mut end_record = Vec::new();
        mine.put(&mut end_record);
        frame::encode_into(&mut closed, &end_record);
        let closed_end = closed.len();
        let mut reopened = closed.clone();
        closed.extend_from_slice(&bytes[end..]);
        let scan = scan_segment(&closed, 5, "seg", false).unwrap();
        assert_eq!(scan.ops.len(), 1);
        assert_eq!(scan.end, closed_end as u64);
        assert!(scan.ended);
        // A record of the segment after its end record is corruption.
        record(mine, &WalOp::Decided(4), &mut reopened);
        assert!(scan_segment(&reopened, 5, "seg", false).is_err());
        // A record of this segment after a bad one is corruption, wherever
        // the bad one is.
        let mut hole = Vec::new();
        record(mine, &WalOp::Decided(3), &mut hole);
        let bad_at = hole.len();
        record(mine, &WalOp::Decided(4), &mut hole);
        hole[bad_at + 9] ^= 1;
        record(mine, &WalOp::Decided(5), &mut hole);
        hole.resize(4096, 0);
        let err = scan_segment(&hole, 5, "seg", true).err().expect("corrupt");
        assert!(err.to_string().contains("follows at offset"), "{err}");
    }

    #[test]
    fn a_rotation_cut_short_resumes_in_a_new_segment() {
        let mut resumed = 0;
        for seed in 0..100 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let d = SimDisk::new();
            let mut w = Wal::open(d.clone(), cfg(1024)).unwrap();
            append_trimming(&mut w, 20);
            let synced_end = w.state().end();
            // Appends until one rotates, then a crash in the flush: after
            // the closed segment is durable, before the next file exists
            // or before its start record is durable.
            let active = w.active_segment();
            while w.active_segment() == active {
                append(&mut w, 1);
            }
            let unsynced_end = w.state().end();
            w.cut_next_rotation(1 + (seed % 2) as u8);
            assert!(w.sync().is_err());
            drop(w);
            d.crash(&mut rng);
            let mut w2 =
                Wal::open(d.clone(), cfg(1024)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let end = w2.state().end();
            assert!(end >= synced_end && end <= unsynced_end, "seed {seed}");
            resumed += w2.stats().resumed_after_end as u32;
            // It goes on: more records, another restart.
            append(&mut w2, 3);
            w2.sync().unwrap();
            let live = w2.state().clone();
            drop(w2);
            let w3 = Wal::open(d, cfg(1024)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(w3.state(), &live, "seed {seed}");
        }
        assert_eq!(
            resumed, 100,
            "every cut rotation resumes after its end record"
        );
    }

    #[test]
    fn a_directory_of_another_format_is_refused() {
        let d = SimDisk::new();
        let mut w = Wal::open(d.clone(), cfg(4096)).unwrap();
        append(&mut w, 2);
        w.sync().unwrap();
        drop(w);
        d.remove(FORMAT_NAME).unwrap();
        let err = Wal::open(d.clone(), cfg(4096)).err().expect("refused");
        assert!(err.to_string().contains("no FORMAT stamp"), "{err}");
        // A stamp lost to a power cut (the file zero-filled, the write
        // gone) is written again.
        d.create_zeroed(FORMAT_NAME, FORMAT_STAMP.len() as u64)
            .unwrap();
        Wal::open(d.clone(), cfg(4096)).unwrap();
        assert_eq!(d.read_all(FORMAT_NAME).unwrap(), FORMAT_STAMP);
        // A stamp of another format.
        d.remove(FORMAT_NAME).unwrap();
        d.create_zeroed(FORMAT_NAME, 10).unwrap();
        let mut f = d.open(FORMAT_NAME).unwrap();
        f.write_at(0, b"cfs-wal 1\n").unwrap();
        let err = Wal::open(d, cfg(4096)).err().expect("refused");
        assert!(err.to_string().contains("cfs-wal 1"), "{err}");
    }

    #[test]
    fn a_record_after_a_bad_one_in_segment_zero_is_found() {
        // Segment 0's id is eight zero bytes: the search must not let a
        // match one byte early (a zero byte before the tag) hide the real
        // one. Find a salt whose record's checksum ends in a zero.
        let salt = (1u64..)
            .find(|salt| {
                let mut b = Vec::new();
                let tag = RecordTag {
                    segment: 0,
                    salt: *salt,
                };
                record(tag, &WalOp::Decided(4), &mut b);
                b[7] == 0
            })
            .unwrap();
        let mine = RecordTag { segment: 0, salt };
        let mut bytes = Vec::new();
        record(mine, &WalOp::Decided(3), &mut bytes);
        let bad_at = bytes.len();
        record(mine, &WalOp::Decided(9), &mut bytes);
        bytes[bad_at + 20] ^= 1;
        record(mine, &WalOp::Decided(4), &mut bytes);
        bytes.resize(8192, 0);
        let err = scan_segment(&bytes, 0, "seg", true).err().expect("corrupt");
        assert!(err.to_string().contains("follows at offset"), "{err}");
    }

    #[test]
    fn corruption_in_the_middle_is_reported_with_file_and_offset() {
        let d = SimDisk::new();
        let mut w = Wal::open(d.clone(), cfg(1 << 20)).unwrap();
        for _ in 0..10 {
            append(&mut w, 2);
            w.sync().unwrap();
        }
        drop(w);
        d.flip_bit("seg-0000000000000000.wal", 100, 3);
        let err = Wal::open(d, cfg(1 << 20))
            .err()
            .expect("corruption detected");
        let msg = err.to_string();
        assert!(
            msg.contains("seg-0000000000000000.wal") && msg.contains("offset"),
            "{msg}"
        );
    }

    #[test]
    fn memory_is_bounded_and_evicted_entries_read_back() {
        let d = SimDisk::new();
        let mut w = Wal::open(d.clone(), cfg(1 << 20)).unwrap();
        for _ in 0..200 {
            append(&mut w, 3);
            w.sync().unwrap();
            // At most the cap plus the entries of the last batch.
            assert!(w.state().memory_bytes() <= 100 + 3 * e(0).encoded_len());
        }
        let all = w.state().get(0, 600).unwrap();
        assert_eq!(all, (0..600).map(e).collect::<Vec<_>>());
        // Truncating into the on-disk prefix and trimming keep it consistent.
        w.append(WalOp::Atomic(vec![
            WalOp::Truncate(10),
            WalOp::Append {
                first_idx: 10,
                entries: vec![e(99)],
            },
        ]))
        .unwrap();
        w.append(WalOp::Trim(5)).unwrap();
        w.sync().unwrap();
        assert_eq!(
            w.state().get(5, 11).unwrap(),
            vec![e(5), e(6), e(7), e(8), e(9), e(99)]
        );
    }

    fn append_to(w: &mut Wal<SimDisk>, n: u64) {
        let first = w.state().end();
        let tag = w.id().0 << 32;
        let entries = (first..first + n).map(|i| e(tag | i)).collect();
        w.append(WalOp::Append {
            first_idx: first,
            entries,
        })
        .unwrap();
    }

    fn entry_of(w: &Wal<SimDisk>, i: u64) -> Entry {
        e((w.id().0 << 32) | i)
    }

    #[test]
    fn streams_share_one_fdatasync_and_replay_apart() {
        let d = SimDisk::new();
        let node = NodeWal::open(d.clone(), cfg(1 << 20)).unwrap();
        let mut ws: Vec<Wal<SimDisk>> = (1..=3)
            .map(|s| node.stream(StreamId::replica(s, 1)).unwrap())
            .collect();
        assert!(
            node.stream(StreamId::replica(1, 1)).is_err(),
            "opened twice"
        );
        let before = d.sync_count();
        for w in &mut ws {
            append_to(w, 5);
            w.append(WalOp::Decided(3)).unwrap();
        }
        ws[1].sync().unwrap();
        assert_eq!(d.sync_count() - before, 1, "one fdatasync for every stream");
        assert!(ws.iter().all(|w| !w.needs_sync()));
        for w in &mut ws {
            w.sync().unwrap();
        }
        assert_eq!(d.sync_count() - before, 1, "already covered");
        let live: Vec<LogState> = ws.iter().map(|w| w.state().clone()).collect();
        drop(ws);
        drop(node);
        let node = NodeWal::open(d.clone(), cfg(1 << 20)).unwrap();
        assert_eq!(node.unopened().len(), 3);
        for (k, s) in (1..=3).enumerate() {
            let w = node.stream(StreamId::replica(s, 1)).unwrap();
            assert_eq!(w.state(), &live[k], "stream {s}");
            assert_eq!(w.state().get(4, 5).unwrap()[0], entry_of(&w, 4));
        }
        assert!(node.unopened().is_empty());
    }

    #[test]
    fn a_segment_is_retired_only_once_every_stream_trimmed_past_it() {
        let d = SimDisk::new();
        let node = NodeWal::open(d.clone(), cfg(2048)).unwrap();
        let mut busy = node.stream(StreamId::replica(1, 1)).unwrap();
        let mut idle = node.stream(StreamId::replica(2, 1)).unwrap();
        append_to(&mut idle, 3);
        idle.sync().unwrap();
        append_trimming(&mut busy, 100);
        let held = busy.segment_count();
        assert!(
            held > 5,
            "the idle stream's untrimmed entries hold segments: {held}"
        );
        idle.append(WalOp::Trim(3)).unwrap();
        idle.sync().unwrap();
        append_trimming(&mut busy, 2);
        assert!(busy.segment_count() < 4, "{}", busy.segment_count());
        let live = (busy.state().clone(), idle.state().clone());
        drop((busy, idle, node));
        let node = NodeWal::open(d, cfg(2048)).unwrap();
        let busy = node.stream(StreamId::replica(1, 1)).unwrap();
        let idle = node.stream(StreamId::replica(2, 1)).unwrap();
        assert_eq!((busy.state(), idle.state()), (&live.0, &live.1));
    }

    /// For 200 seeds: three streams append, trim and sync in a random
    /// order over small segments, then a crash: every stream keeps what
    /// any sync covered and nothing past what it appended.
    #[test]
    fn a_crash_keeps_every_streams_synced_entries() {
        use rand::Rng;
        for seed in 0..200 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let d = SimDisk::new();
            let node = NodeWal::open(d.clone(), cfg(1024)).unwrap();
            let mut ws: Vec<Wal<SimDisk>> = (1..=3)
                .map(|s| node.stream(StreamId::replica(s, 1)).unwrap())
                .collect();
            let mut synced = [0u64; 3];
            for _ in 0..60 {
                let k = rng.gen_range(0..3);
                append_to(&mut ws[k], rng.gen_range(1..4));
                if rng.gen_bool(0.2) {
                    let keep_from = ws[k].state().end().saturating_sub(10);
                    if keep_from > ws[k].state().trimmed {
                        ws[k].append(WalOp::Trim(keep_from)).unwrap();
                    }
                }
                if rng.gen_bool(0.6) {
                    let j = rng.gen_range(0..3);
                    ws[j].sync().unwrap();
                    // One flush covers every stream's queued records.
                    for (i, w) in ws.iter().enumerate() {
                        if !w.needs_sync() {
                            synced[i] = w.state().end();
                        }
                    }
                }
            }
            let unsynced: Vec<u64> = ws.iter().map(|w| w.state().end()).collect();
            drop(ws);
            drop(node);
            d.crash(&mut rng);
            let node =
                NodeWal::open(d.clone(), cfg(1024)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            for (i, s) in (1..=3).enumerate() {
                let w = node.stream(StreamId::replica(s, 1)).unwrap();
                let end = w.state().end();
                assert!(
                    end >= synced[i] && end <= unsynced[i],
                    "seed {seed} stream {s}: {end} not in {}..={}",
                    synced[i],
                    unsynced[i]
                );
                for j in w.state().entries_start..end {
                    assert_eq!(
                        w.state().get(j, j + 1).unwrap()[0],
                        entry_of(&w, j),
                        "seed {seed}"
                    );
                }
            }
        }
    }

    /// Shard threads appending and syncing at once over small segments:
    /// every stream replays as it was.
    #[test]
    fn concurrent_streams_replay_as_written() {
        let d = SimDisk::new();
        let node = NodeWal::open(d.clone(), cfg(64 << 10)).unwrap();
        let threads: Vec<_> = (1..=4)
            .map(|s| {
                let mut w = node.stream(StreamId::replica(s, 1)).unwrap();
                std::thread::spawn(move || {
                    for _ in 0..300 {
                        append_to(&mut w, 2);
                        w.sync().unwrap();
                    }
                    w
                })
            })
            .collect();
        let ws: Vec<Wal<SimDisk>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let live: Vec<LogState> = ws.iter().map(|w| w.state().clone()).collect();
        drop((ws, node));
        let node = NodeWal::open(d, cfg(64 << 10)).unwrap();
        for (k, s) in (1..=4).enumerate() {
            let w = node.stream(StreamId::replica(s, 1)).unwrap();
            assert_eq!(w.state(), &live[k]);
            assert_eq!(w.state().end(), 600);
        }
    }

    #[test]
    fn the_decided_index_is_written_lazily() {
        let d = SimDisk::new();
        let mut w = Wal::open(d.clone(), cfg(1 << 20)).unwrap();
        append(&mut w, 5);
        w.sync().unwrap();
        let before = d.sync_count();
        w.append_lazy(WalOp::Decided(3)).unwrap();
        assert!(!w.needs_sync());
        w.sync().unwrap();
        assert_eq!(d.sync_count(), before, "not waited for");
        assert_eq!((w.state().decided, w.durable_decided()), (3, 0));
        drop(w);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        d.crash(&mut rng);
        let mut w = Wal::open(d.clone(), cfg(1 << 20)).unwrap();
        assert_eq!(
            (w.state().end(), w.state().decided),
            (5, 0),
            "lost in the crash"
        );
        // The next strict record carries it.
        w.append_lazy(WalOp::Decided(4)).unwrap();
        append(&mut w, 1);
        assert!(w.needs_sync());
        w.sync().unwrap();
        assert_eq!(w.durable_decided(), 4);
        drop(w);
        d.crash(&mut rng);
        let mut w = Wal::open(d.clone(), cfg(1 << 20)).unwrap();
        assert_eq!(w.state().decided, 4);
        // A clean shutdown flushes it.
        w.append_lazy(WalOp::Decided(6)).unwrap();
        w.flush().unwrap();
        drop(w);
        d.crash(&mut rng);
        assert_eq!(Wal::open(d, cfg(1 << 20)).unwrap().state().decided, 6);
    }

    #[test]
    fn group_commit_one_sync_per_batch() {
        let d = SimDisk::new();
        let mut w = Wal::open(d.clone(), cfg(1 << 20)).unwrap();
        let before = d.sync_count();
        for _ in 0..100 {
            append(&mut w, 1);
        }
        w.sync().unwrap();
        assert_eq!(d.sync_count() - before, 1);
    }

    #[test]
    fn failed_device_poisons() {
        let d = SimDisk::new();
        let mut w = Wal::open(d.clone(), cfg(1 << 20)).unwrap();
        append(&mut w, 1);
        d.set_failed(true);
        assert!(w.sync().is_err());
        d.set_failed(false);
        assert!(matches!(w.sync(), Err(WalError::Poisoned(_))));
    }
}
