//! One WAL per node: every shard replica's records in one sequence of
//! segment files, made durable by shared `fdatasync`s (group commit across
//! shards).
//!
//! ```text
//! shard thread ─ Wal::append ─► Queue: records tagged with their stream, in order
//!              └ Wal::sync ───► Flusher: whoever holds it writes everything
//!                               queued by every stream and fdatasyncs once;
//!                               a stream that waited for it finds its records
//!                               already covered, or flushes the next group
//! ```
//!
//! A *stream* is one replica's log (a shard in one epoch). Each [`Wal`]
//! keeps its own [`LogState`]; only the bytes and their order are shared.
//! Locks: a stream's own (its `SharedWal`), then the flusher, then the
//! queue; appends take only the queue, so they go on during an fdatasync.
//!
//! Every segment starts with one record holding every stream's
//! [`Checkpoint`], so a segment is retired once *every* stream has trimmed
//! past what it holds (the trim floor is the minimum over streams).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use super::*;

/// Which log a record belongs to: one shard replica in one epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl StreamId {
    /// The stream of shard `shard`'s replica in epoch `config_id`.
    pub fn replica(shard: u32, config_id: u32) -> StreamId {
        StreamId((u64::from(shard) << 32) | u64::from(config_id))
    }

    /// Reserved: the record that starts a segment.
    pub(super) const SEGMENT_START: StreamId = StreamId(u64::MAX);
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shard {} epoch {}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// A record's content (after its tag).
pub(super) enum Record {
    /// Every stream's metadata, first in each segment.
    Start(Vec<(StreamId, Checkpoint)>),
    Op(StreamId, WalOp),
}

/// `stream u64 | op`, or for [`StreamId::SEGMENT_START`]
/// `u32 n | n × (u64 stream | u32 len | Checkpoint op)`.
pub(super) fn decode_record(body: &[u8]) -> Result<Record, String> {
    let mut r = Reader { buf: body, pos: 0 };
    let stream = StreamId(r.u64()?);
    if stream != StreamId::SEGMENT_START {
        return Ok(Record::Op(stream, WalOp::decode(&body[r.pos..])?));
    }
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let id = StreamId(r.u64()?);
        let len = r.u32()? as usize;
        match WalOp::decode(r.take(len)?)? {
            WalOp::Checkpoint(c) => out.push((id, c)),
            other => return Err(format!("segment start holds {other:?}, not a checkpoint")),
        }
    }
    if r.pos != body.len() {
        return Err(format!("{} trailing bytes in record", body.len() - r.pos));
    }
    Ok(Record::Start(out))
}

fn encode_start(streams: &BTreeMap<StreamId, StreamMeta>, out: &mut Vec<u8>) {
    out.extend_from_slice(&(streams.len() as u32).to_le_bytes());
    for (id, m) in streams {
        out.extend_from_slice(&id.0.to_le_bytes());
        let at = out.len();
        out.extend_from_slice(&[0u8; 4]);
        WalOp::Checkpoint(m.checkpoint.clone()).encode_into(out);
        let n = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&n.to_le_bytes());
    }
}

pub(super) fn checkpoint_of(s: &LogState) -> Checkpoint {
    Checkpoint {
        log_end: s.end(),
        trimmed: s.trimmed,
        compacted: s.compacted,
        decided: s.decided,
        promise: s.promise,
        accepted_round: s.accepted_round,
        stopsign: s.stopsign.clone(),
    }
}

fn empty_state<D: Disk + Clone>(disk: &D, stream: StreamId) -> LogState {
    LogState {
        source: Some(Arc::new(DiskRecords {
            disk: disk.clone(),
            stream,
            last: Mutex::new(None),
        })),
        ..LogState::default()
    }
}

pub(super) struct SegmentMeta {
    pub(super) id: u64,
    /// Per stream, its largest log end while this segment was active:
    /// every entry of that stream here has an index below it.
    max_end: HashMap<StreamId, u64>,
}

/// What rotation and retirement need of a stream without its lock.
struct StreamMeta {
    /// The stream's metadata after its last queued record.
    checkpoint: Checkpoint,
    entries_start: u64,
    opened: bool,
}

/// Records queued in order, not yet written.
struct Queue {
    /// Segments holding records, the active (last) one included; it may
    /// not exist on disk yet (rotated here, created by the next flush).
    segments: Vec<SegmentMeta>,
    /// Salt of the active segment's records.
    salt: u64,
    /// Bytes of the active segment written or queued: the next record's
    /// offset.
    offset: u64,
    /// Bytes of the active segment's start record.
    start_len: u64,
    /// Queued bytes per segment, oldest first.
    chunks: Vec<(u64, Vec<u8>)>,
    /// Records queued since open: a stream's sync waits until a flush
    /// covered its last one.
    pushed: u64,
    streams: BTreeMap<StreamId, StreamMeta>,
    poisoned: Option<String>,
}

impl Queue {
    fn active(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.id)
    }

    fn tag(&self) -> RecordTag {
        RecordTag {
            segment: self.active(),
            salt: self.salt,
        }
    }

    fn chunk(&mut self) -> &mut Vec<u8> {
        let id = self.active();
        if self.chunks.last().is_none_or(|(s, _)| *s != id) {
            self.chunks.push((id, Vec::with_capacity(4096)));
        }
        &mut self.chunks.last_mut().expect("just pushed").1
    }

    /// Queues one record; returns its offset and length.
    fn push_record(&mut self, stream: StreamId, body: &[u8]) -> (u64, u32) {
        let mut payload = Vec::with_capacity(RecordTag::BYTES + 8 + body.len());
        self.tag().put(&mut payload);
        payload.extend_from_slice(&stream.0.to_le_bytes());
        payload.extend_from_slice(body);
        let at = self.offset;
        let chunk = self.chunk();
        let before = chunk.len();
        frame::encode_into(chunk, &payload);
        let len = (chunk.len() - before) as u64;
        self.offset += len;
        self.pushed += 1;
        (at, len as u32)
    }

    fn push_start(&mut self) {
        let mut body = Vec::with_capacity(64 * (self.streams.len() + 1));
        encode_start(&self.streams, &mut body);
        let (_, len) = self.push_record(StreamId::SEGMENT_START, &body);
        self.start_len = u64::from(len);
    }

    /// Closes the active segment with its end record and starts the next
    /// one (in memory: the next flush makes the end record durable before
    /// it creates the file).
    fn rotate(&mut self) {
        let mut end = Vec::with_capacity(RecordTag::BYTES);
        self.tag().put(&mut end);
        let chunk = self.chunk();
        let before = chunk.len();
        frame::encode_into(chunk, &end);
        self.offset += (chunk.len() - before) as u64;
        self.pushed += 1;
        let id = self.active() + 1;
        let max_end = self
            .streams
            .iter()
            .map(|(s, m)| (*s, m.checkpoint.log_end))
            .collect();
        self.segments.push(SegmentMeta { id, max_end });
        self.salt = rand::random();
        self.offset = 0;
        self.push_start();
    }
}

/// The file being written; held while writing and syncing.
struct Flusher<D: Disk + Clone> {
    active: D::File,
    active_id: u64,
    /// Bytes of the active segment written to its file.
    written: u64,
    /// Trimmed segment files waiting to be reused (at most
    /// [`RECYCLED_SPARES_MAX`]).
    spares: Vec<String>,
    prealloc: Option<mpsc::Receiver<Result<(), std::io::Error>>>,
}

struct Shared<D: Disk + Clone> {
    disk: D,
    config: WalConfig,
    queue: Mutex<Queue>,
    flusher: Mutex<Flusher<D>>,
    /// `Queue::pushed` as of the last successful fdatasync.
    synced: AtomicU64,
    stats: Mutex<WalStats>,
    /// Seconds per flush (writes and the fdatasync), for
    /// `claudefs_log_wal_fsync_duration_seconds`; registered by the runtime.
    flush_seconds: cfs_metrics::Histogram,
    /// Recovered streams not opened yet.
    recovered: Mutex<BTreeMap<StreamId, LogState>>,
    /// Tests: stop the next rotation's flush after the closed segment is
    /// durable (1) or after the next file exists (2), as a crash would.
    #[cfg(test)]
    cut_rotation: std::sync::atomic::AtomicU8,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Holders panic only on programming errors (an impossible storage
    // operation): fatal.
    m.lock().expect("wal lock poisoned")
}

impl<D: Disk + Clone> Shared<D> {
    fn poison(&self, e: &WalError) {
        let mut q = lock(&self.queue);
        if q.poisoned.is_none() {
            q.poisoned = Some(e.to_string());
        }
    }

    /// Makes every record queued up to `target` (a `Queue::pushed` count)
    /// durable: one write per segment and one fdatasync for all that is
    /// queued when this caller gets the flusher.
    fn flush_through(&self, target: u64) -> Result<(), WalError> {
        let mut f = lock(&self.flusher);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let (chunks, upto, starts) = {
            let mut q = lock(&self.queue);
            if let Some(p) = &q.poisoned {
                return Err(WalError::Poisoned(p.clone()));
            }
            let starts: HashMap<StreamId, u64> = q
                .streams
                .iter()
                .map(|(s, m)| (*s, m.entries_start))
                .collect();
            (std::mem::take(&mut q.chunks), q.pushed, starts)
        };
        let started = std::time::Instant::now();
        let written = self.write_and_sync(&mut f, chunks);
        self.flush_seconds.observe(started.elapsed().as_secs_f64());
        if let Err(e) = written {
            // The kernel may have dropped the dirty pages (or a rotation
            // stopped after its end record): only a restart that replays
            // what is on disk may go on.
            self.poison(&e);
            return Err(e);
        }
        self.synced.store(upto, Ordering::Release);
        self.retire(&mut f, &starts)
    }

    fn write_and_sync(
        &self,
        f: &mut Flusher<D>,
        chunks: Vec<(u64, Vec<u8>)>,
    ) -> Result<(), WalError> {
        let mut bytes = 0u64;
        for (segment, data) in chunks {
            if segment != f.active_id {
                // The closed segment's end record must be durable before
                // the next segment exists: replay reads them in order.
                self.sync_active(f)?;
                #[cfg(test)]
                self.cut_rotation_at(1)?;
                self.start_segment(f, segment)?;
                #[cfg(test)]
                self.cut_rotation_at(2)?;
            }
            f.active
                .write_at(f.written, &data)
                .map_err(io_err(&self.disk, &segment_name(segment)))?;
            f.written += data.len() as u64;
            bytes += data.len() as u64;
        }
        self.sync_active(f)?;
        lock(&self.stats).bytes_written += bytes;
        Ok(())
    }

    #[cfg(test)]
    fn cut_rotation_at(&self, step: u8) -> Result<(), WalError> {
        if self.cut_rotation.load(Ordering::SeqCst) == step {
            return Err(WalError::Poisoned("test: rotation cut short".into()));
        }
        Ok(())
    }

    fn sync_active(&self, f: &mut Flusher<D>) -> Result<(), WalError> {
        f.active
            .sync_data()
            .map_err(io_err(&self.disk, &segment_name(f.active_id)))?;
        lock(&self.stats).syncs += 1;
        Ok(())
    }

    /// Creates segment `id`'s file: a recycled one first (no zero-filling
    /// at all), then the one zero-filled in the background, then
    /// zero-filling here.
    fn start_segment(&self, f: &mut Flusher<D>, id: u64) -> Result<(), WalError> {
        let name = segment_name(id);
        let r = if let Some(spare) = f.spares.pop() {
            lock(&self.stats).segments_recycled += 1;
            self.disk.rename(&spare, &name)
        } else {
            lock(&self.stats).segments_zero_filled += 1;
            let ready = match f.prealloc.take() {
                Some(rx) => matches!(rx.recv(), Ok(Ok(()))),
                None => false,
            };
            if ready {
                self.disk.rename(PREALLOC_NAME, &name)
            } else {
                self.disk.create_zeroed(&name, self.config.segment_bytes)
            }
        };
        r.and_then(|_| self.disk.sync_dir())
            .map_err(io_err(&self.disk, &name))?;
        f.active = self.disk.open(&name).map_err(io_err(&self.disk, &name))?;
        f.active_id = id;
        f.written = 0;
        if f.spares.is_empty() {
            self.start_prealloc(f);
        }
        Ok(())
    }

    fn start_prealloc(&self, f: &mut Flusher<D>) {
        if !self.config.background_prealloc || f.prealloc.is_some() {
            return;
        }
        let (tx, rx) = mpsc::channel();
        let disk = self.disk.clone();
        let len = self.config.segment_bytes;
        std::thread::Builder::new()
            .name("wal-prealloc".into())
            .spawn(move || {
                let _ = tx.send(disk.create_zeroed(PREALLOC_NAME, len));
            })
            .map(|_| ())
            .unwrap_or_else(|e| tracing::warn!("cannot start preallocation thread: {e}"));
        f.prealloc = Some(rx);
    }

    /// Retires the oldest segments whose entries every stream has trimmed
    /// (`starts`: each stream's first held entry as of the flush that just
    /// made it durable): kept as spares to recycle, or deleted.
    fn retire(&self, f: &mut Flusher<D>, starts: &HashMap<StreamId, u64>) -> Result<(), WalError> {
        let retired: Vec<u64> = {
            let mut q = lock(&self.queue);
            let mut out = Vec::new();
            while q.segments.len() > 1
                // The next segment, with its start record, is on disk.
                && q.segments[1].id <= f.active_id
                && q.segments[0]
                    .max_end
                    .iter()
                    .all(|(s, end)| starts.get(s).is_some_and(|start| end <= start))
            {
                out.push(q.segments.remove(0).id);
            }
            out
        };
        for id in &retired {
            let name = segment_name(*id);
            if f.spares.len() < RECYCLED_SPARES_MAX {
                let spare = spare_name(*id);
                self.disk
                    .rename(&name, &spare)
                    .map_err(io_err(&self.disk, &name))?;
                f.spares.insert(0, spare);
            } else {
                self.disk.remove(&name).map_err(io_err(&self.disk, &name))?;
            }
        }
        if !retired.is_empty() {
            self.disk.sync_dir().map_err(io_err(&self.disk, "."))?;
        }
        Ok(())
    }
}

/// The node's write-ahead log: one directory of segments shared by every
/// stream (shard replica) of the node.
pub struct NodeWal<D: Disk + Clone> {
    shared: Arc<Shared<D>>,
}

impl<D: Disk + Clone> Clone for NodeWal<D> {
    fn clone(&self) -> Self {
        NodeWal {
            shared: self.shared.clone(),
        }
    }
}

impl<D: Disk + Clone> NodeWal<D> {
    /// Opens the WAL in `disk`, replaying and verifying every segment and
    /// rebuilding every stream's state, or creates an empty one.
    ///
    /// # Errors
    /// [`WalError::Corrupt`] names the file and offset of a bad record that
    /// is not a torn tail; [`WalError::Missing`] reports a gap in segments.
    pub fn open(disk: D, config: WalConfig) -> Result<Self, WalError> {
        let names = disk.list().map_err(io_err(&disk, "."))?;
        check_format(&disk, &names)?;
        if names.iter().any(|n| n == PREALLOC_NAME) {
            disk.remove(PREALLOC_NAME)
                .map_err(io_err(&disk, PREALLOC_NAME))?;
        }
        let mut spares: Vec<String> = names.iter().filter(|n| is_spare_name(n)).cloned().collect();
        spares.sort();
        for extra in spares.split_off(spares.len().min(RECYCLED_SPARES_MAX)) {
            disk.remove(&extra).map_err(io_err(&disk, &extra))?;
        }
        let mut ids: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
        ids.sort_unstable();
        for w in ids.windows(2) {
            if w[1] != w[0] + 1 {
                return Err(WalError::Missing(format!(
                    "segment {} is followed by {} in {}",
                    segment_name(w[0]),
                    segment_name(w[1]),
                    disk.describe(".")
                )));
            }
        }
        let mut states: BTreeMap<StreamId, LogState> = BTreeMap::new();
        let mut segments = Vec::new();
        let mut stats = WalStats::default();
        let mut last_end = 0u64;
        let mut last_torn_end = 0u64;
        let mut last_salt = None;
        let mut last_ended = false;
        let mut last_start_len = 0u64;
        for (i, id) in ids.iter().enumerate() {
            let name = segment_name(*id);
            let bytes = disk.read_all(&name).map_err(io_err(&disk, &name))?;
            let is_last = i + 1 == ids.len();
            let scan = scan_segment(&bytes, *id, &disk.describe(&name), is_last)?;
            if scan.torn {
                tracing::warn!(file = %disk.describe(&name), offset = scan.end,
                    "torn tail record cut off (an unacknowledged write interrupted by a crash)");
                stats.torn_tail_truncated = true;
            }
            let corrupt = |offset: u64, reason: String| WalError::Corrupt {
                file: disk.describe(&name),
                offset,
                reason,
            };
            let mut records = scan.ops.into_iter();
            let mut max_end = HashMap::new();
            let start_len = match records.next() {
                Some((Record::Start(checkpoints), _, len)) => {
                    let listed: HashSet<StreamId> = checkpoints.iter().map(|(s, _)| *s).collect();
                    if let Some(s) = states.keys().find(|s| !listed.contains(s)) {
                        return Err(corrupt(
                            0,
                            format!("{s} has records before this segment but no checkpoint in it"),
                        ));
                    }
                    for (s, c) in checkpoints {
                        let st = states.entry(s).or_insert_with(|| empty_state(&disk, s));
                        if i == 0 {
                            // Older segments were retired after trimming:
                            // the stream resumes where this one began.
                            st.entries_start = c.log_end;
                        }
                        max_end.insert(s, c.log_end);
                        st.apply(&WalOp::Checkpoint(c))
                            .map_err(|r| corrupt(0, format!("{s}: {r}")))?;
                    }
                    u64::from(len)
                }
                Some(_) => {
                    return Err(corrupt(
                        0,
                        "segment does not start with a checkpoint".into(),
                    ))
                }
                None if is_last => {
                    // Rotation crashed before the start record hit the
                    // disk: recreate the segment below. The removal must be
                    // durable before the previous segment is written again,
                    // or a crash brings this one back behind it and that
                    // segment's torn tail reads as corruption (found by the
                    // simulation).
                    disk.remove(&name).map_err(io_err(&disk, &name))?;
                    disk.sync_dir().map_err(io_err(&disk, "."))?;
                    break;
                }
                None => return Err(corrupt(0, "empty segment in the middle of the log".into())),
            };
            for (record, offset, len) in records {
                let Record::Op(s, op) = record else {
                    return Err(corrupt(
                        offset,
                        "a segment start record in the middle of a segment".into(),
                    ));
                };
                let pos = RecordPos {
                    segment: *id,
                    offset,
                    len,
                };
                let st = states.entry(s).or_insert_with(|| empty_state(&disk, s));
                st.apply_at(&op, Some(pos), &mut 0)
                    .map_err(|r| corrupt(offset, format!("{s}: {r}")))?;
                let end = st.end();
                let m = max_end.entry(s).or_insert(end);
                *m = (*m).max(end);
            }
            segments.push(SegmentMeta { id: *id, max_end });
            last_end = scan.end;
            last_torn_end = scan.torn_end;
            last_salt = scan.salt;
            last_ended = scan.ended;
            last_start_len = start_len;
        }
        for (s, st) in &states {
            if st.entries_start > st.trimmed && st.entries_start > 0 {
                return Err(WalError::Missing(format!(
                    "{s}: entries from {} to {} are neither present nor trimmed in {}",
                    st.trimmed,
                    st.entries_start,
                    disk.describe(".")
                )));
            }
        }
        let (active, active_id, active_written, fresh) = match segments.last() {
            Some(s) if !last_ended => {
                let name = segment_name(s.id);
                let file = disk.open(&name).map_err(io_err(&disk, &name))?;
                (file, s.id, last_end, false)
            }
            // No segment, or the last one was closed by a rotation that
            // crashed before the next one was durable: start the next.
            last => {
                stats.resumed_after_end = last.is_some();
                let id = match last {
                    Some(s) => s.id + 1,
                    None => ids.last().copied().unwrap_or(0),
                };
                let name = segment_name(id);
                // Zero-filled, never a spare: with no segment left to
                // compare, a spare that once had this id would offer its
                // old records as this segment's.
                disk.create_zeroed(&name, config.segment_bytes)
                    .map_err(io_err(&disk, &name))?;
                disk.sync_dir().map_err(io_err(&disk, "."))?;
                segments.push(SegmentMeta {
                    id,
                    max_end: states.iter().map(|(s, st)| (*s, st.end())).collect(),
                });
                let file = disk.open(&name).map_err(io_err(&disk, &name))?;
                (file, id, 0, true)
            }
        };
        let mut flusher = Flusher {
            active,
            active_id,
            written: active_written,
            spares,
            prealloc: None,
        };
        if !fresh && stats.torn_tail_truncated && last_torn_end > active_written {
            // Zero all the torn bytes, not just the header: a later scan must
            // find only zeros after the last good record even if the records
            // written next are shorter than the torn one (found by the
            // simulation: a second crash made the segment "corrupt").
            let zeros = vec![0u8; (last_torn_end - active_written) as usize];
            let file: &mut D::File = &mut flusher.active;
            file.write_at(active_written, &zeros)
                .and_then(|_| file.sync_data())
                .map_err(io_err(&disk, &segment_name(active_id)))?;
        }
        let streams = states
            .iter()
            .map(|(s, st)| {
                let meta = StreamMeta {
                    checkpoint: checkpoint_of(st),
                    entries_start: st.entries_start,
                    opened: false,
                };
                (*s, meta)
            })
            .collect();
        for st in states.values_mut() {
            st.evict(config.memory_bytes_max);
        }
        let queue = Queue {
            segments,
            salt: match (fresh, last_salt) {
                (false, Some(s)) => s,
                _ => rand::random(),
            },
            offset: active_written,
            start_len: last_start_len,
            chunks: Vec::new(),
            pushed: 0,
            streams,
            poisoned: None,
        };
        let shared = Arc::new(Shared {
            disk,
            config,
            queue: Mutex::new(queue),
            flusher: Mutex::new(flusher),
            synced: AtomicU64::new(0),
            stats: Mutex::new(stats),
            flush_seconds: wal_flush_histogram(),
            recovered: Mutex::new(states),
            #[cfg(test)]
            cut_rotation: std::sync::atomic::AtomicU8::new(0),
        });
        if fresh {
            let target = {
                let mut q = lock(&shared.queue);
                q.push_start();
                q.pushed
            };
            shared.flush_through(target)?;
        }
        {
            let mut f = lock(&shared.flusher);
            if f.spares.is_empty() {
                shared.start_prealloc(&mut f);
            }
        }
        Ok(NodeWal { shared })
    }

    /// The log of stream `id`: its recovered state, or an empty one.
    ///
    /// # Errors
    /// [`WalError::Stream`] if it is open already or the id is reserved.
    pub fn stream(&self, id: StreamId) -> Result<Wal<D>, WalError> {
        if id == StreamId::SEGMENT_START {
            return Err(WalError::Stream(format!(
                "stream id {:#x} is reserved",
                id.0
            )));
        }
        let mut q = lock(&self.shared.queue);
        let state = match q.streams.get_mut(&id) {
            Some(m) if m.opened => {
                return Err(WalError::Stream(format!("{id} is open already")));
            }
            Some(m) => {
                m.opened = true;
                lock(&self.shared.recovered).remove(&id)
            }
            None => {
                let meta = StreamMeta {
                    checkpoint: checkpoint_of(&LogState::default()),
                    entries_start: 0,
                    opened: true,
                };
                q.streams.insert(id, meta);
                None
            }
        };
        Ok(Wal {
            id,
            shared: self.shared.clone(),
            state: state.unwrap_or_else(|| empty_state(&self.shared.disk, id)),
            last_pushed: 0,
            last_strict: 0,
            durable_decided: 0,
        })
        .map(|mut w| {
            w.durable_decided = w.state.decided;
            w
        })
    }

    /// Streams found on disk that no caller opened: they hold back the
    /// retirement of every segment they have records in.
    pub fn unopened(&self) -> Vec<StreamId> {
        lock(&self.shared.recovered).keys().copied().collect()
    }

    pub fn stats(&self) -> WalStats {
        *lock(&self.shared.stats)
    }

    /// The flush latency histogram, for a registry to export.
    pub fn flush_histogram(&self) -> cfs_metrics::Histogram {
        self.shared.flush_seconds.clone()
    }
}

fn wal_flush_histogram() -> cfs_metrics::Histogram {
    cfs_metrics::Histogram::with_opts(
        cfs_metrics::HistogramOpts::new(
            "claudefs_log_wal_fsync_duration_seconds",
            "One flush of the node's WAL: the writes every stream queued and one fdatasync.",
        )
        .buckets(cfs_metrics::LATENCY_BUCKETS.to_vec()),
    )
    .expect("valid histogram")
}

/// One stream's log (a shard replica in one epoch) in the node's WAL.
pub struct Wal<D: Disk + Clone> {
    id: StreamId,
    shared: Arc<Shared<D>>,
    state: LogState,
    /// `Queue::pushed` after this stream's last record.
    last_pushed: u64,
    /// `Queue::pushed` after its last record that `sync` must wait for
    /// (all but [`Wal::append_lazy`]'s).
    last_strict: u64,
    /// The decided index as of this stream's last record known durable:
    /// no crash brings it back below this.
    durable_decided: u64,
}

impl<D: Disk + Clone> Wal<D> {
    /// A WAL of one stream in `disk` (tests, tools): [`NodeWal::open`]
    /// then [`NodeWal::stream`].
    ///
    /// # Errors
    /// As [`NodeWal::open`].
    pub fn open(disk: D, config: WalConfig) -> Result<Self, WalError> {
        NodeWal::open(disk, config)?.stream(StreamId(0))
    }

    pub fn id(&self) -> StreamId {
        self.id
    }

    pub fn state(&self) -> &LogState {
        &self.state
    }

    /// The node WAL's statistics (shared by its streams).
    pub fn stats(&self) -> WalStats {
        *lock(&self.shared.stats)
    }

    /// Applies `op` to the in-memory state and queues its record. Durable
    /// only after [`Wal::sync`].
    pub fn append(&mut self, op: WalOp) -> Result<(), WalError> {
        self.append_split(op)?;
        self.last_strict = self.last_pushed;
        Ok(())
    }

    fn append_split(&mut self, op: WalOp) -> Result<(), WalError> {
        match op {
            WalOp::Append { first_idx, entries } if entries.len() > 1 => {
                // Split large appends into bounded records.
                let mut chunk = Vec::new();
                let mut bytes = 0usize;
                let mut idx = first_idx;
                for e in entries {
                    let n = e.encoded_len();
                    if !chunk.is_empty() && bytes + n > APPEND_RECORD_BYTES_MAX {
                        let c = std::mem::take(&mut chunk);
                        let len = c.len() as u64;
                        self.append_one(WalOp::Append {
                            first_idx: idx,
                            entries: c,
                        })?;
                        idx += len;
                        bytes = 0;
                    }
                    bytes += n;
                    chunk.push(e);
                }
                self.append_one(WalOp::Append {
                    first_idx: idx,
                    entries: chunk,
                })
            }
            op => self.append_one(op),
        }
    }

    /// Queues `op` like [`Wal::append`], but [`Wal::sync`] does not wait
    /// for it: it becomes durable with the next flush of any stream, and
    /// a crash before that loses it. For the decided index only (D39):
    /// OmniPaxos learns it again from the leader, and everything it
    /// covers was accepted durably by a majority.
    pub fn append_lazy(&mut self, op: WalOp) -> Result<(), WalError> {
        debug_assert!(
            matches!(op, WalOp::Decided(_)),
            "only the decided index is lazy"
        );
        self.append_one(op)
    }

    fn append_one(&mut self, op: WalOp) -> Result<(), WalError> {
        let mut body = Vec::with_capacity(64);
        op.encode_into(&mut body);
        let record_len = (frame::FRAME_HEADER_BYTES + RecordTag::BYTES + 8 + body.len()) as u64;
        let mut q = lock(&self.shared.queue);
        if let Some(p) = &q.poisoned {
            return Err(WalError::Poisoned(p.clone()));
        }
        if q.offset + record_len + END_RECORD_BYTES > self.shared.config.segment_bytes
            && q.offset > q.start_len
        {
            q.rotate();
        }
        let pos = RecordPos {
            segment: q.active(),
            offset: q.offset,
            len: record_len as u32,
        };
        // Programming error if OmniPaxos asks for an impossible change.
        if let Err(e) = self.state.apply_at(&op, Some(pos), &mut 0) {
            panic!("invalid storage operation {op:?}: {e}");
        }
        let (at, len) = q.push_record(self.id, &body);
        debug_assert_eq!((at, len), (pos.offset, pos.len));
        self.last_pushed = q.pushed;
        let end = self.state.end();
        if let Some(seg) = q.segments.last_mut() {
            let m = seg.max_end.entry(self.id).or_insert(end);
            *m = (*m).max(end);
        }
        let checkpoint = checkpoint_of(&self.state);
        let entries_start = self.state.entries_start;
        if let Some(m) = q.streams.get_mut(&self.id) {
            m.checkpoint = checkpoint;
            m.entries_start = entries_start;
        }
        drop(q);
        lock(&self.shared.stats).records += 1;
        Ok(())
    }

    /// Makes every op this stream appended durable: one write and one
    /// fdatasync, shared with every other stream that appended meanwhile.
    ///
    /// # Errors
    /// An I/O error poisons the node's WAL: after a failed fsync the kernel
    /// may have dropped the dirty pages, so the only safe continuation is a
    /// restart that replays what is really on disk.
    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.needs_sync() {
            self.shared.flush_through(self.last_pushed)?;
        } else if let Some(p) = &lock(&self.shared.queue).poisoned {
            return Err(WalError::Poisoned(p.clone()));
        }
        self.synced();
        Ok(())
    }

    /// Makes every record of this stream durable, lazy ones included
    /// (a clean shutdown).
    ///
    /// # Errors
    /// As [`Wal::sync`].
    pub fn flush(&mut self) -> Result<(), WalError> {
        self.shared.flush_through(self.last_pushed)?;
        self.synced();
        Ok(())
    }

    fn synced(&mut self) {
        if self.last_pushed <= self.shared.synced.load(Ordering::Acquire) {
            self.durable_decided = self.state.decided;
        }
        // Every strict record is written now: old entries may leave
        // memory (lazy records hold none).
        self.state.evict(self.shared.config.memory_bytes_max);
    }

    /// True if appended ops that [`Wal::sync`] waits for are not yet
    /// durable.
    pub fn needs_sync(&self) -> bool {
        self.last_strict > self.shared.synced.load(Ordering::Acquire)
    }

    /// The decided index no crash can bring back below (see
    /// [`Wal::append_lazy`]).
    pub fn durable_decided(&self) -> u64 {
        self.durable_decided
    }

    /// Number of segment files in use (by every stream).
    pub fn segment_count(&self) -> usize {
        lock(&self.shared.queue).segments.len()
    }

    /// Tests: the next rotation's flush stops after step `step` (see
    /// `Shared::cut_rotation`).
    #[cfg(test)]
    pub(super) fn cut_next_rotation(&self, step: u8) {
        self.shared.cut_rotation.store(step, Ordering::SeqCst);
    }

    /// The active segment's id (tests).
    #[cfg(test)]
    pub(super) fn active_segment(&self) -> u64 {
        lock(&self.shared.queue).active()
    }
}
