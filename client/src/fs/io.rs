//! The data path of the mount: the write-back buffer (with write-behind),
//! flushes to the segment store and the extent commits, reads that merge
//! stripes with bytes not committed yet, read-ahead, and copy_file_range by
//! reference.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cfs_proto::ops::{LateAttrs, Op, FIND_CHUNKS_MAX};
use cfs_proto::rpc::{Extents, FindChunks, Mutated, TenantKeys};
use cfs_proto::types::*;
use tracing::{debug, Instrument};

use super::{FileInner, FlushFor, Shared};
use crate::data::Storing;
use crate::dedupe::KnownCuts;
use crate::tenants::TenantSeal;

/// Reads at most this long that do not follow the previous read fetch
/// only what they cover.
const SMALL_READ_MAX: u64 = 128 << 10;
/// Bytes of file an extent map request covers (a window).
const EXT_WINDOW: u64 = 32 << 20;
/// Windows of extent map kept per open file (2 GiB of file at most).
const EXT_WINDOWS_MAX: usize = 64;

/// Bytes of small files' content this mount keeps after writing them
/// (`ExtWindows::keep_written`), over all files; past this, none more.
pub(super) const KEPT_BYTES_MAX: u64 = 256 << 20;

/// Content bytes counted against [`KEPT_BYTES_MAX`] while held.
pub(super) struct Kept {
    bytes: u64,
    total: Arc<AtomicU64>,
}

impl Kept {
    /// `bytes` more, if the budget has room.
    pub(super) fn take(total: &Arc<AtomicU64>, bytes: u64) -> Option<Kept> {
        total
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                (t + bytes <= KEPT_BYTES_MAX).then_some(t + bytes)
            })
            .ok()?;
        Some(Kept {
            bytes,
            total: total.clone(),
        })
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Extent map windows `[from, to)` fetched from the server, oldest first;
/// dropped whenever the file may have changed (this mount wrote it, or a
/// node pushed an invalidation), except the one [`ExtWindows::keep_written`]
/// puts back after this mount's own write.
#[derive(Default)]
pub(super) struct ExtWindows {
    windows: Vec<(u64, u64, Vec<ExtentRef>)>,
    /// The budget the kept window holds (see `keep_written`).
    kept: Option<Kept>,
}

impl ExtWindows {
    pub(super) fn clear(&mut self) {
        self.windows.clear();
        self.kept = None;
    }

    /// Drops the window `keep_written` put, if it is still here.
    fn drop_kept(&mut self) {
        if self.kept.take().is_some() {
            self.windows.retain(|(f, _, _)| *f != 0);
        }
    }

    /// The file is exactly `refs` (inline bytes this mount just wrote,
    /// `kept` paying for them): one window for the whole of it.
    fn keep_written(&mut self, refs: Vec<ExtentRef>, kept: Kept) {
        self.windows.clear();
        self.windows.push((0, EXT_WINDOW, refs));
        self.kept = Some(kept);
    }

    /// The references overlapping `[off, end)`, if one window covers it.
    fn find(&self, off: u64, end: u64) -> Option<Vec<ExtentRef>> {
        let (_, _, refs) = self
            .windows
            .iter()
            .find(|(from, to, _)| *from <= off && end <= *to)?;
        Some(
            refs.iter()
                .filter(|e| e.offset < end && e.offset + e.len > off)
                .cloned()
                .collect(),
        )
    }

    fn insert(&mut self, from: u64, to: u64, refs: Vec<ExtentRef>) {
        self.windows.retain(|(f, t, _)| !(*f >= from && *t <= to));
        if self.windows.len() >= EXT_WINDOWS_MAX {
            self.windows.remove(0);
        }
        if self.kept.is_some() && !self.windows.iter().any(|(f, _, _)| *f == 0) {
            self.kept = None;
        }
        self.windows.push((from, to, refs));
    }
}

/// Times a flush writes its bytes again when a segment it wrote to is
/// freed before its commit (each time into a new stripe).
pub const REWRITES_MAX: u32 = 3;

fn inline_extent(offset: u64, data: &[u8]) -> ExtentRef {
    ExtentRef {
        offset,
        len: data.len() as u64,
        skip: 0,
        backing: Backing::Inline(data.to_vec()),
    }
}

impl Shared {
    /// Writes `ranges` as stripes and commits their extents, with `late`
    /// (a deferred setattr) in the last commit. A deferred setattr the
    /// server refuses is dropped after the bytes are committed alone: the
    /// error is the flush's.
    ///
    /// A commit refused because a segment it names is being freed (the
    /// stripes landed in a segment sealed and found unreferenced before
    /// this commit, D48) writes the bytes again, into new stripes, up to
    /// [`REWRITES_MAX`] times. Stripes are stored as `how` says (the
    /// file's policy, else the mount's `--compress` and `--dedupe`;
    /// sealed with the file's tenant's key). A range `known` already cut
    /// into chunks is not cut again.
    pub(super) async fn commit_ranges(
        &self,
        ino: Ino,
        writer: &Creds,
        ranges: &[(u64, &[u8])],
        known: &[KnownCuts],
        late: Option<LateAttrs>,
        how: &Storing,
    ) -> Result<Option<Inode>, Errno> {
        let mut tries = 0;
        loop {
            // A rewrite stores the bytes anew: a chunk found stored may be
            // what is being freed.
            let how = Storing {
                dedupe: how.dedupe && tries == 0,
                ..how.clone()
            };
            match self
                .commit_ranges_once(ino, writer, ranges, known, late.clone(), &how)
                .await
            {
                Err(e) if e == Errno::FREED_DATA && tries < REWRITES_MAX => {
                    tries += 1;
                    tracing::info!(
                        ino,
                        tries,
                        "a segment of this flush is being freed: writing it again"
                    );
                }
                Err(e) if e == Errno::FREED_DATA => return Err(Errno::EIO),
                r => return r,
            }
        }
    }

    async fn commit_ranges_once(
        &self,
        ino: Ino,
        writer: &Creds,
        ranges: &[(u64, &[u8])],
        known: &[KnownCuts],
        late: Option<LateAttrs>,
        how: &Storing,
    ) -> Result<Option<Inode>, Errno> {
        let span = tracing::debug_span!("flush", ino, ranges = ranges.len());
        // Bytes below INLINE_BYTES_MAX ride in the commit itself; the rest
        // goes to stripes. A tenant's bytes always go to sealed stripes:
        // the log and the namespace never hold them in the clear (D51).
        let (small, large): (Vec<(u64, &[u8])>, Vec<_>) = ranges
            .iter()
            .copied()
            .filter(|(_, d)| !d.is_empty())
            .partition(|(o, d)| how.seal.is_none() && o + d.len() as u64 <= INLINE_BYTES_MAX);
        let mut refs: Vec<ExtentRef> = small
            .into_iter()
            .map(|(o, d)| inline_extent(o, d))
            .collect();
        if !large.is_empty() {
            let written = if how.dedupe {
                self.write_deduplicated(&large, known, how)
                    .instrument(span)
                    .await?
            } else {
                self.data.write_ranges(&large, how).instrument(span).await?
            };
            refs.extend(written);
        }
        let chunks: Vec<&[ExtentRef]> = refs.chunks(1024).collect();
        let Some((last, first)) = chunks.split_last() else {
            if let Some(l) = late {
                self.mutate(l.creds, Op::SetAttr { ino, set: l.set })
                    .await?;
            }
            return Ok(None);
        };
        for chunk in first {
            let op = Op::Write {
                ino,
                extents: chunk.to_vec(),
                then: None,
            };
            self.mutate(writer.clone(), op).await?;
        }
        let refused = late.is_some();
        let op = Op::Write {
            ino,
            extents: last.to_vec(),
            then: late,
        };
        match self.mutate(writer.clone(), op).await {
            Err(e) if refused && (e == Errno::EPERM || e == Errno::EACCES) => {
                let op = Op::Write {
                    ino,
                    extents: last.to_vec(),
                    then: None,
                };
                self.mutate(writer.clone(), op).await?;
                Err(e)
            }
            Ok(Mutated::Attr(i)) => Ok(Some(i)),
            r => r.map(|_| None),
        }
    }

    /// Writes `ranges` as content-defined chunks, referencing those the
    /// cluster already stores instead of writing them (D50): those this
    /// mount wrote or referenced lately (`RecentChunks`), then those the
    /// cluster's index knows. A failed lookup only costs the dedupe: the
    /// chunks asked are written.
    async fn write_deduplicated(
        &self,
        ranges: &[(u64, &[u8])],
        known: &[KnownCuts],
        how: &Storing,
    ) -> Result<Vec<ExtentRef>, Errno> {
        let plan = self.data.plan_chunks(ranges, known, how);
        // What this mount wrote lately first (the cluster's index may not
        // have applied it yet), then the cluster for the rest.
        let mut found: Vec<Option<_>> =
            plan.iter().map(|c| self.data.recent_chunk(&c.id)).collect();
        let ask: Vec<usize> = (0..plan.len()).filter(|i| found[*i].is_none()).collect();
        for part in ask.chunks(FIND_CHUNKS_MAX) {
            let ids = part.iter().map(|i| plan[*i].id).collect();
            match self.meta.rpc(FindChunks { ids }, false).await {
                Ok(f) if f.len() == part.len() => {
                    for (i, x) in part.iter().zip(f) {
                        found[*i] = x;
                    }
                }
                Ok(f) => {
                    tracing::warn!(
                        asked = part.len(),
                        answered = f.len(),
                        "chunk lookup answered wrongly: writing those chunks"
                    );
                }
                Err(errno) => {
                    tracing::warn!(%errno, "chunk lookup failed: writing those chunks");
                }
            }
        }
        self.data.write_chunks(ranges, &plan, &found, how).await
    }

    /// Waits for the background flush of this inode, if any.
    ///
    /// What it kept buffered (`dedupe::hold_back`) goes back into the
    /// dirty map under any bytes written since. A failed one keeps all its
    /// bytes so (to be retried by the next flush), and the error is kept
    /// for the next fsync and close (`FileInner::bg_error`).
    pub(super) async fn join_inflight(&self, f: &mut FileInner) -> Result<(), Errno> {
        if let Some((ranges, h)) = f.inflight.take() {
            f.ext.clear();
            let r = h.await.unwrap_or(Err(Errno::EIO));
            if let Ok(held) = &r {
                if !held.is_empty() {
                    let newer = std::mem::take(&mut f.dirty);
                    f.dirty_bytes = 0;
                    for (o, d) in held {
                        insert_dirty(f, *o, d.clone());
                    }
                    for (o, d) in newer {
                        insert_dirty(f, o, d);
                    }
                }
            }
            if let Err(errno) = r {
                tracing::warn!(%errno, bytes = ranges.iter().map(|(_, d)| d.len()).sum::<usize>(),
                    "a background flush failed: its bytes are kept and retried");
                let newer = std::mem::take(&mut f.dirty);
                f.dirty_bytes = 0;
                for (o, d) in ranges.iter() {
                    insert_dirty(f, *o, d.clone());
                }
                for (o, d) in newer {
                    insert_dirty(f, o, d);
                }
                if f.bg_error.is_none() {
                    f.bg_error = Some(super::BgError {
                        errno,
                        fsync_told: false,
                    });
                }
                return Err(errno);
            }
        }
        Ok(())
    }

    /// The error of a failed background flush, for `why` (see
    /// `FileInner::bg_error`): once to an fsync, once to a close.
    fn report_bg_error(f: &mut FileInner, why: FlushFor) -> Result<(), Errno> {
        match why {
            FlushFor::Close => f.bg_error.take().map_or(Ok(()), |e| Err(e.errno)),
            FlushFor::Fsync => match f.bg_error.as_mut() {
                Some(e) if !e.fsync_told => {
                    e.fsync_told = true;
                    Err(e.errno)
                }
                _ => Ok(()),
            },
            FlushFor::Other => Ok(()),
        }
    }

    /// Starts writing the full buffer in the background (after the
    /// previous background flush finished). With dedupe, the flush keeps
    /// buffered what does not end or start at a content-defined cut
    /// (`dedupe::hold_back`): its bytes are the next flush's, so the same
    /// bytes are chunked the same way however the kernel batched and
    /// ordered their writes (D50).
    pub(super) async fn flush_behind(
        self: &Arc<Self>,
        ino: Ino,
        f: &mut FileInner,
    ) -> Result<(), Errno> {
        self.join_inflight(f).await?;
        // Keys first: without them nothing is taken from the buffer.
        let how = self.storing(f).await?;
        let ranges: Arc<Vec<(u64, Vec<u8>)>> =
            Arc::new(std::mem::take(&mut f.dirty).into_iter().collect());
        f.dirty_bytes = 0;
        let writer = f.writer.clone().unwrap_or_else(Creds::root);
        let hold_max = self.opts.write_buffer / 2;
        let (sh, r2) = (self.clone(), ranges.clone());
        let h = tokio::spawn(async move {
            let all: Vec<(u64, &[u8])> = r2.iter().map(|(o, d)| (*o, d.as_slice())).collect();
            let (from, known) = if how.dedupe {
                sh.data.hold_back(&all, hold_max)
            } else {
                (all.iter().map(|(_, d)| d.len()).collect(), Vec::new())
            };
            let now: Vec<(u64, &[u8])> = all
                .iter()
                .zip(&from)
                .map(|((o, d), at)| (*o, &d[..*at]))
                .collect();
            let held: Vec<(u64, Vec<u8>)> = all
                .iter()
                .zip(&from)
                .filter(|((_, d), at)| **at < d.len())
                .map(|((o, d), at)| (o + *at as u64, d[*at..].to_vec()))
                .collect();
            let r = sh
                .commit_ranges(ino, &writer, &now, &known, None, &how)
                .await
                .map(|_| held);
            if r.is_err() {
                sh.meta.stats.flush_failure();
            }
            r
        });
        f.inflight = Some((ranges, h));
        Ok(())
    }

    /// Writes this inode's buffered bytes and commits their extents.
    pub(super) async fn flush_locked(&self, ino: Ino, f: &mut FileInner) -> Result<(), Errno> {
        // A failed background flush put its bytes back and kept its error
        // for the next fsync and close (`flush`): retry them now.
        let _ = self.join_inflight(f).await;
        if f.dirty.is_empty() && f.late.is_none() {
            return Ok(());
        }
        let ranges: Vec<(u64, Vec<u8>)> = std::mem::take(&mut f.dirty).into_iter().collect();
        f.dirty_bytes = 0;
        let late = f.late.take();
        let writer = f.writer.clone().unwrap_or_else(Creds::root);
        let committed = match self.storing(f).await {
            Ok(how) => {
                let all: Vec<(u64, &[u8])> =
                    ranges.iter().map(|(o, d)| (*o, d.as_slice())).collect();
                self.commit_ranges(ino, &writer, &all, &[], late.clone(), &how)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            if e == Errno::EPERM || e == Errno::EACCES {
                // The bytes were committed; the deferred setattr was
                // refused and is dropped (its error is this one).
                f.size = None;
                f.ext.clear();
                f.opened = None;
                return Err(e);
            }
            // Keep the bytes: a later flush may succeed (rewriting stripes
            // that were written but not committed is harmless).
            for (o, d) in ranges {
                f.dirty_bytes += d.len();
                f.dirty.insert(o, d);
            }
            f.late = late;
            return Err(e);
        }
        f.size = None;
        f.ext.clear();
        f.opened = None;
        if let (Ok(Some(i)), [(0, data)]) = (&committed, ranges.as_slice()) {
            if i.size == data.len() as u64 && i.size <= INLINE_BYTES_MAX {
                // The whole file is what was just written, inline: a read
                // back (a small file written then read, as by a build or
                // an unpack) needs no extent map from the node.
                let kept = Kept::take(&self.kept_bytes, i.size).or_else(|| {
                    // Full: start over (files held right now keep theirs).
                    self.drop_kept();
                    Kept::take(&self.kept_bytes, i.size)
                });
                if let Some(k) = kept {
                    f.ext.keep_written(vec![inline_extent(0, data)], k);
                }
            }
        }
        Ok(())
    }

    /// Drops the content kept of every file not held right now.
    fn drop_kept(&self) {
        for st in self.all_files() {
            if let Ok(mut f) = st.inner.try_lock() {
                f.ext.drop_kept();
            }
        }
    }

    pub(super) async fn flush(&self, ino: Ino, why: FlushFor) -> Result<(), Errno> {
        let st = self.files.lock().expect("files lock").get(&ino).cloned();
        if let Some(st) = st {
            let mut f = st.lock().await;
            let r = self.flush_locked(ino, &mut f).await;
            // The background failure is this caller's error whatever the
            // retry did (it was kept for it); else the retry's own.
            Self::report_bg_error(&mut f, why)?;
            r?;
        }
        Ok(())
    }

    /// Extent references covering `[off, off + len)` (from the window
    /// cache when it covers the range).
    pub(super) async fn extents(
        &self,
        ino: Ino,
        f: &mut FileInner,
        off: u64,
        len: u64,
    ) -> Result<Vec<ExtentRef>, Errno> {
        let end = off + len;
        if let Some(refs) = f.ext.find(off, end) {
            return Ok(refs);
        }
        // Aligned windows, so that random reads reuse them.
        let from = off - off % EXT_WINDOW;
        let want = (end - from).max(EXT_WINDOW);
        let refs = self
            .meta
            .rpc(
                Extents {
                    ino,
                    offset: from,
                    len: want,
                },
                self.strict(),
            )
            .await?;
        let out = refs
            .iter()
            .filter(|e| e.offset < end && e.offset + e.len > off)
            .cloned()
            .collect();
        f.ext.insert(from, from + want, refs);
        Ok(out)
    }

    pub(super) async fn read(
        self: &Arc<Self>,
        ino: Ino,
        off: u64,
        size: u32,
    ) -> Result<Vec<u8>, Errno> {
        let st = self.file(ino);
        let mut f = st.lock().await;
        let trusted =
            f.size.is_some() && f.opened.as_ref().is_none_or(|(_, t)| Instant::now() < *t);
        let server = if self.strict() || !trusted {
            // Under a lease the cached attributes are current.
            match self.meta.cache.get(ino).filter(|_| !self.strict()) {
                Some(i) => Some(i),
                None => Some(self.getattr(ino, self.strict()).await?),
            }
        } else {
            None
        };
        let fsize = match (f.size, &server) {
            (Some(s), Some(i)) => s.max(i.size),
            (Some(s), None) => s,
            (None, Some(i)) => i.size,
            (None, None) => 0,
        };
        if off >= fsize {
            return Ok(Vec::new());
        }
        let len = (size as u64).min(fsize - off);
        let mut buf = vec![0u8; len as usize];
        let refs = self.extents(ino, &mut f, off, len).await?;
        let tenant = f
            .tenant
            .clone()
            .or_else(|| server.as_ref().and_then(|i| i.tenant.clone()));
        self.keys_for(tenant.as_deref(), &refs).await?;
        let inflight = f.inflight.as_ref().map(|(r, _)| r.clone());
        // A small read that does not continue the last one fetches only
        // the verified groups it covers, not the whole stripe (`proof` in
        // cfs-segments); sequential reads take whole stripes (read-ahead).
        let random = off != f.seq_end && len <= SMALL_READ_MAX;
        for e in &refs {
            let s = e.offset.max(off);
            let t = (e.offset + e.len).min(off + len);
            let src = (e.skip + (s - e.offset)) as usize;
            let n = (t - s) as usize;
            let dst = &mut buf[(s - off) as usize..(s - off) as usize + n];
            match &e.backing {
                Backing::Stripe(x) if random && !self.data.cached(x) => {
                    let part = self.data.read_range(x, src, n).await?;
                    dst.copy_from_slice(&part);
                }
                Backing::Stripe(x) => {
                    let stripe = self.data.stripe(x).await?;
                    let piece = stripe.get(src..src + n).ok_or(Errno::EIO)?;
                    dst.copy_from_slice(piece);
                }
                Backing::Inline(b) => {
                    let piece = b.get(src..src + n).ok_or(Errno::EIO)?;
                    dst.copy_from_slice(piece);
                }
            }
        }
        // Bytes not committed yet: the background flush's, then the
        // buffer's (newer).
        let pending = inflight.iter().flat_map(|r| r.iter().map(|(o, d)| (*o, d)));
        let dirty = f.dirty.range(..off + len).map(|(o, d)| (*o, d));
        for (doff, d) in pending.chain(dirty) {
            let dend = doff + d.len() as u64;
            if dend <= off || doff >= off + len {
                continue;
            }
            let s = doff.max(off);
            let t = dend.min(off + len);
            buf[(s - off) as usize..(t - off) as usize]
                .copy_from_slice(&d[(s - doff) as usize..(t - doff) as usize]);
        }
        // Adaptive read-ahead: grow the window while reads are sequential.
        let max_ra = self.opts.read_ahead as u64;
        if off == f.seq_end && max_ra > 0 {
            f.ra_window = (f.ra_window * 2).clamp(1 << 20, max_ra);
            let ra_from = off + len;
            if ra_from < fsize {
                let ra_len = f.ra_window.min(fsize - ra_from);
                if let Ok(ahead) = self.extents(ino, &mut f, ra_from, ra_len).await {
                    for e in ahead {
                        let Backing::Stripe(x) = e.backing else {
                            continue;
                        };
                        if !self.data.cached(&x) {
                            let sh = self.clone();
                            tokio::spawn(async move {
                                let _ = sh.data.stripe(&x).await;
                            });
                        }
                    }
                }
            }
        } else if off != f.seq_end {
            f.ra_window = 0;
        }
        f.seq_end = off + len;
        Ok(buf)
    }

    pub(super) async fn write(
        self: &Arc<Self>,
        ino: Ino,
        off: u64,
        data: Vec<u8>,
        writer: Creds,
    ) -> Result<u32, Errno> {
        let n = data.len() as u32;
        let end = off.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > FILE_SIZE_MAX {
            return Err(Errno::EFBIG);
        }
        let st = self.file(ino);
        let mut f = st.lock().await;
        if f.late.is_some() {
            // Bytes after a deferred setattr: commit it first (its times
            // and mode precede these bytes).
            self.flush_locked(ino, &mut f).await?;
        }
        if f.size.is_none() {
            let i = self.getattr(ino, false).await?;
            f.size = Some(i.size);
        }
        insert_dirty(&mut f, off, data);
        f.writer = Some(writer);
        f.size = Some(f.size.unwrap_or(0).max(end));
        if f.dirty_bytes >= self.opts.write_buffer {
            self.flush_behind(ino, &mut f).await?;
        }
        Ok(n)
    }
}

/// Puts `data` at `off` into the dirty map, replacing overlapped bytes and
/// merging with adjacent ranges.
pub(super) fn insert_dirty(f: &mut FileInner, off: u64, data: Vec<u8>) {
    let end = off + data.len() as u64;
    // Fast path: appending to the last range.
    if let Some((&lo, last)) = f.dirty.iter_mut().next_back() {
        if lo + last.len() as u64 == off {
            f.dirty_bytes += data.len();
            last.extend_from_slice(&data);
            return;
        }
    }
    let mut start = off;
    let mut merged: Vec<u8> = Vec::new();
    let overlapping: Vec<u64> = f
        .dirty
        .range(..=end)
        .filter(|(&o, d)| o + d.len() as u64 >= off)
        .map(|(&o, _)| o)
        .collect();
    let mut pieces = Vec::new();
    for o in overlapping {
        let d = f.dirty.remove(&o).expect("present");
        f.dirty_bytes -= d.len();
        pieces.push((o, d));
    }
    if let Some((o, _)) = pieces.first() {
        start = start.min(*o);
    }
    let stop = pieces
        .iter()
        .map(|(o, d)| o + d.len() as u64)
        .max()
        .unwrap_or(end)
        .max(end);
    merged.resize((stop - start) as usize, 0);
    for (o, d) in &pieces {
        merged[(o - start) as usize..(o - start) as usize + d.len()].copy_from_slice(d);
    }
    merged[(off - start) as usize..(end - start) as usize].copy_from_slice(&data);
    f.dirty_bytes += merged.len();
    f.dirty.insert(start, merged);
}

impl Shared {
    /// A new file handle opened by `c`.
    pub(super) fn open_handle(&self, c: Creds) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().expect("handles lock").insert(fh, c);
        fh
    }

    /// Who opened handle `fh` (root for a handle this mount does not
    /// know, which the kernel never sends).
    pub(super) fn handle_creds(&self, fh: u64) -> Creds {
        self.handles
            .lock()
            .expect("handles lock")
            .get(&fh)
            .cloned()
            .unwrap_or_else(Creds::root)
    }

    /// The inodes this mount holds open, sent with unlink and rename so a
    /// file losing its last link is deleted in the same log entry unless
    /// it is open here (one commit instead of unlink + reclaim).
    pub(super) fn held_open(&self) -> Vec<Ino> {
        self.files
            .lock()
            .expect("files lock")
            .iter()
            .filter(|(_, st)| st.opens.load(Ordering::SeqCst) > 0)
            .map(|(ino, _)| *ino)
            .collect()
    }

    /// After `i` lost a link through unlink or rename with `held_open`:
    /// a file left without links was deleted by that entry unless it was
    /// held open; then its last close here reclaims it. A close that ran
    /// between `held_open` and now missed the orphan mark: reclaim now.
    pub(super) async fn after_unlink(&self, i: &Inode, held_open: &[Ino]) {
        if i.nlink > 0 || i.is_dir() {
            return;
        }
        if !held_open.contains(&i.ino) {
            self.files.lock().expect("files lock").remove(&i.ino);
            return;
        }
        let open = self
            .files
            .lock()
            .expect("files lock")
            .get(&i.ino)
            .is_some_and(|st| st.opens.load(Ordering::SeqCst) > 0);
        if open {
            // The servers hold the orphan for this mount until it closes
            // it, or until the mount's hold lapses.
            self.holds.keep(cfs_proto::types::shard_of(i.ino));
            self.orphans.lock().expect("orphans lock").insert(i.ino);
        } else {
            let _ = self.mutate(Creds::root(), Op::Reclaim { ino: i.ino }).await;
            self.files.lock().expect("files lock").remove(&i.ino);
        }
    }

    /// How `f`'s bytes are stored: its policy, else the mount's; sealed
    /// with its tenant's newest key (fetched if this mount has none fresh:
    /// ENOKEY if the tenant has none, EACCES if this mount may not have
    /// it, D51).
    pub(super) async fn storing(&self, f: &FileInner) -> Result<Storing, Errno> {
        let seal = match &f.tenant {
            Some(t) => Some(self.tenant_seal(t).await?),
            None => None,
        };
        Ok(Storing {
            packing: f.compression.unwrap_or(self.opts.compression),
            dedupe: f.dedupe.unwrap_or(self.opts.dedupe),
            seal,
        })
    }

    /// `tenant`'s keys: this mount's if fresh, else asked of the cluster.
    pub(super) async fn tenant_seal(&self, tenant: &str) -> Result<Arc<TenantSeal>, Errno> {
        if let Some(s) = self.tenants.fresh(tenant) {
            return Ok(s);
        }
        let keys = self
            .meta
            .rpc(
                TenantKeys {
                    tenant: tenant.to_string(),
                },
                false,
            )
            .await
            .inspect_err(|errno| tracing::warn!(tenant, %errno, "tenant keys refused"))?;
        self.tenants.learn(keys).ok_or(Errno::ENOKEY)
    }

    /// Makes sure this mount holds the key of every sealed stripe in
    /// `refs` (a rotation since it last asked adds one): ENOKEY if the
    /// file's tenant does not give it.
    pub(super) async fn keys_for(
        &self,
        tenant: Option<&str>,
        refs: &[ExtentRef],
    ) -> Result<(), Errno> {
        let missing = refs.iter().find_map(|r| match &r.backing {
            Backing::Stripe(x) => x.seal.filter(|s| !self.tenants.has_key(s.key)),
            Backing::Inline(_) => None,
        });
        let Some(seal) = missing else {
            return Ok(());
        };
        let Some(tenant) = tenant else {
            tracing::warn!(key = %seal.key, "a sealed stripe in a file of no tenant");
            return Err(Errno::ENOKEY);
        };
        self.tenant_seal(tenant).await?;
        if self.tenants.has_key(seal.key) {
            return Ok(());
        }
        // Fetched moments ago but older than the key: ask again.
        let keys = self
            .meta
            .rpc(
                TenantKeys {
                    tenant: tenant.to_string(),
                },
                true,
            )
            .await?;
        self.tenants.learn(keys);
        if self.tenants.has_key(seal.key) {
            Ok(())
        } else {
            Err(Errno::ENOKEY)
        }
    }

    /// copy_file_range by reference: the destination maps the source's
    /// stripes; no data moves.
    pub(super) async fn copy_range(
        &self,
        c: Creds,
        ino_in: Ino,
        off_in: i64,
        ino_out: Ino,
        off_out: i64,
        len: u64,
    ) -> Result<u32, Errno> {
        if off_in < 0 || off_out < 0 {
            return Err(Errno::EINVAL);
        }
        let (off_in, off_out) = (off_in as u64, off_out as u64);
        let len = len.min(u32::MAX as u64 >> 1);
        self.flush(ino_in, FlushFor::Other).await?;
        self.flush(ino_out, FlushFor::Other).await?;
        let src = self.getattr(ino_in, true).await?;
        if !src.is_reg() {
            return Err(Errno::EINVAL);
        }
        // A file's stripes are sealed with its tenant's keys: another
        // tenant's (or no tenant's) file does not map them (the caller
        // copies the bytes instead, D51).
        let dst = self.getattr(ino_out, true).await?;
        if src.tenant != dst.tenant {
            return Err(Errno::EXDEV);
        }
        if off_in >= src.size {
            return Ok(0);
        }
        let n = len.min(src.size - off_in);
        if ino_in == ino_out && off_in < off_out + n && off_out < off_in + n {
            return Err(Errno::EINVAL);
        }
        let refs = self
            .meta
            .rpc(
                Extents {
                    ino: ino_in,
                    offset: off_in,
                    len: n,
                },
                true,
            )
            .await?;
        let mut out = Vec::new();
        for e in refs {
            let mut p = e.part(off_in, off_in + n);
            if p.len == 0 {
                continue;
            }
            p.offset = off_out + (p.offset - off_in);
            if matches!(p.backing, Backing::Inline(_)) && p.offset + p.len > INLINE_BYTES_MAX {
                // Inline bytes copied past the inline limit go to a stripe.
                let Backing::Inline(b) = p.backing else {
                    unreachable!("matched inline")
                };
                let how = Storing {
                    packing: self.opts.compression,
                    dedupe: false,
                    seal: None,
                };
                out.extend(self.data.write_ranges(&[(p.offset, &b)], &how).await?);
                continue;
            }
            out.push(p);
        }
        let st = self.file(ino_out);
        let mut f = st.lock().await;
        // Whatever happens below, the destination's cached map and size
        // may no longer hold.
        f.size = None;
        f.ext.clear();
        f.opened = None;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.mutate(
            c.clone(),
            Op::Fallocate {
                ino: ino_out,
                offset: off_out,
                len: n,
                mode: punch,
            },
        )
        .await?;
        for chunk in out.chunks(1024) {
            self.mutate(
                c.clone(),
                Op::Write {
                    ino: ino_out,
                    extents: chunk.to_vec(),
                    then: None,
                },
            )
            .await
            .map_err(|e| {
                // The source's stripes were freed since they were read
                // (the source changed): the kernel copies the bytes
                // instead (EOPNOTSUPP makes it fall back to splice).
                if e == Errno::FREED_DATA {
                    Errno::EOPNOTSUPP
                } else {
                    e
                }
            })?;
        }
        self.mutate(
            c.clone(),
            Op::Fallocate {
                ino: ino_out,
                offset: off_out,
                len: n,
                mode: 0,
            },
        )
        .await?;
        debug!(ino_in, ino_out, n, "copy_file_range by reference");
        Ok(n as u32)
    }
}

#[cfg(test)]
mod kept_tests {
    use super::*;

    #[test]
    fn kept_content_is_bounded_and_released_with_its_window() {
        let total = Arc::new(AtomicU64::new(0));
        let a = Kept::take(&total, KEPT_BYTES_MAX - 10).expect("room");
        assert!(Kept::take(&total, 11).is_none(), "over the budget");
        let mut w = ExtWindows::default();
        w.keep_written(
            vec![inline_extent(0, b"0123456789")],
            Kept::take(&total, 10).expect("room"),
        );
        assert_eq!(total.load(Ordering::SeqCst), KEPT_BYTES_MAX);
        assert_eq!(w.find(0, 4).map(|v| v.len()), Some(1));
        // Replaced by a window from the node: the budget comes back.
        w.insert(0, EXT_WINDOW, Vec::new());
        assert_eq!(total.load(Ordering::SeqCst), KEPT_BYTES_MAX - 10);
        drop(a);
        w.keep_written(
            vec![inline_extent(0, b"x")],
            Kept::take(&total, 1).expect("room"),
        );
        w.clear();
        assert_eq!(total.load(Ordering::SeqCst), 0);
    }
}
