//! Directory listings: `readdir` and `readdirplus` (entries with their
//! attributes, which fill the kernel's dentry and attribute caches).
//!
//! A kernel call holds a page or so of entries; the node sends up to
//! [`BATCH`] per round trip. What does not fit stays with the open
//! directory (its file handle) for the next call, and once the node said
//! the listing ended, the kernel's last call (which finds nothing more) is
//! answered without asking: a directory of up to 256 entries is listed in
//! one round trip.
//!
//! A complete listing (one batch) is also kept in the mount's cache
//! (`MetaCache::store_listing`): under a lease, listing the directory again
//! sends nothing to a node while neither it nor any listed child changed.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};

use cfs_proto::rpc::{ReadDir, ReadDirPlus};
use cfs_proto::types::{DirEntry, EntryPlus, Ino, Inode};
use fuser::{FileType, ReplyDirectory};

use super::{attr_of, file_type, Shared};
use crate::stats::Cache;

/// Entries asked of the node per round trip.
const BATCH: u32 = 256;
/// Open directories whose fetched entries are kept; past this a listing
/// just asks again.
const STREAMS_MAX: usize = 4096;
/// The cookie entries follow at the start of a listing (after "." and "..").
const FIRST_COOKIE: u64 = 2;

/// `dir`'s listing from the mount's cache, if leases make it current.
fn cached_listing(sh: &Shared, dir: Ino) -> Option<Vec<(DirEntry, Inode)>> {
    if sh.strict() {
        return None;
    }
    let v = sh.meta.cache.listing(dir);
    sh.meta.stats.cache(Cache::Listings, v.is_some());
    v
}

/// What one open directory fetched and has not handed to the kernel.
#[derive(Default)]
pub(super) struct Stream {
    /// The buffered entries follow this cookie.
    after: u64,
    plain: VecDeque<DirEntry>,
    plus: VecDeque<EntryPlus>,
    /// Nothing follows the buffered entries.
    end: bool,
}

/// Listings in progress, by directory and file handle (the kernel sends
/// no opendir, so the handle is 0 and a directory listed by two processes
/// at once shares one stream: a call at another cookie just asks again).
#[derive(Default)]
pub(super) struct Streams {
    map: Mutex<HashMap<(Ino, u64), Stream>>,
}

impl Streams {
    /// A listing starts (offset 0 or 1): nothing an earlier listing of the
    /// directory fetched may serve it.
    fn start(&self, key: (Ino, u64)) {
        self.map.lock().expect("streams lock").remove(&key);
    }

    /// Drops every stream.
    pub(super) fn forget_all(&self) {
        self.map.lock().expect("streams lock").clear();
    }

    /// Another mount changed the directory: drop what was fetched.
    pub(super) fn forget(&self, ino: Ino) {
        self.map
            .lock()
            .expect("streams lock")
            .retain(|(i, _), _| *i != ino);
    }

    /// The stream of `key` if it continues at cookie `after`.
    fn take(&self, key: (Ino, u64), after: u64) -> Option<Stream> {
        let mut m = self.map.lock().expect("streams lock");
        let s = m.remove(&key)?;
        (s.after == after).then_some(s)
    }

    fn put(&self, key: (Ino, u64), s: Stream) {
        let mut m = self.map.lock().expect("streams lock");
        if s.end && s.plain.is_empty() && s.plus.is_empty() {
            // Finished: the kernel's next call (at this cookie) ends the
            // listing; keep only that.
            if m.len() >= STREAMS_MAX {
                m.clear();
            }
            m.insert(key, s);
            return;
        }
        if m.len() >= STREAMS_MAX {
            m.clear();
        }
        m.insert(key, s);
    }
}

/// The directory's own attributes at the start of a listing: from the
/// cache under a lease, else from the node, through a read barrier in
/// close-to-open mode (a listing then shows every change acknowledged
/// before it began; the kernel sends no opendir, `FUSE_NO_OPENDIR_SUPPORT`).
async fn dir_at_start(sh: &Shared, ino: Ino) -> Result<Inode, cfs_proto::types::Errno> {
    let fresh = sh.opts.cache_mode != super::CacheMode::Session;
    sh.attrs_leased(ino, fresh).await.map(|(i, _)| i)
}

pub(super) async fn readdir(
    sh: Arc<Shared>,
    ino: u64,
    fh: u64,
    offset: i64,
    mut reply: ReplyDirectory,
) {
    let mut off = offset.max(0) as u64;
    if off < 2 {
        sh.dirs.start((ino, fh));
    }
    if off == 0 {
        if reply.add(ino, 1, FileType::Directory, ".") {
            return reply.ok();
        }
        off = 1;
    }
    if off == 1 {
        let parent = match dir_at_start(&sh, ino).await {
            Ok(i) => i.parent,
            Err(e) => return reply.error(sh.errno(e.0)),
        };
        if reply.add(parent, 2, FileType::Directory, "..") {
            return reply.ok();
        }
        off = 2;
    }
    let mut s = sh.dirs.take((ino, fh), off).unwrap_or(Stream {
        after: off,
        ..Stream::default()
    });
    // The kernel switches to plain listings after the first call
    // (READDIRPLUS_AUTO): what was fetched with attributes serves too.
    let plus = std::mem::take(&mut s.plus);
    s.plain.extend(plus.into_iter().map(|(e, _, _)| e));
    loop {
        if s.plain.is_empty() {
            if s.end {
                break;
            }
            if s.after == FIRST_COOKIE {
                if let Some(v) = cached_listing(&sh, ino) {
                    s.end = true;
                    s.plain.extend(v.into_iter().map(|(e, _)| e));
                    continue;
                }
            }
            let ask = ReadDir {
                ino,
                after: s.after,
                max: BATCH,
            };
            let mark = sh.meta.cache.mark();
            match sh.meta.rpc(ask, false).await {
                Ok(e) => {
                    s.end = e.len() < BATCH as usize;
                    if s.end && s.after == FIRST_COOKIE {
                        sh.meta.cache.store_listing(mark, ino, e.clone());
                    }
                    s.plain.extend(e);
                }
                Err(e) => return reply.error(sh.errno(e.0)),
            }
            if s.plain.is_empty() {
                break;
            }
        }
        let Some(e) = s.plain.pop_front() else { break };
        if reply.add(
            e.ino,
            e.cookie as i64,
            file_type(e.kind),
            OsStr::from_bytes(&e.name),
        ) {
            s.plain.push_front(e);
            break;
        }
        s.after = e.cookie;
    }
    sh.dirs.put((ino, fh), s);
    reply.ok();
}

pub(super) async fn readdirplus(
    sh: Arc<Shared>,
    ino: u64,
    fh: u64,
    offset: i64,
    mut reply: fuser::ReplyDirectoryPlus,
) {
    let ttl = sh.opts.ttl();
    let mut off = offset.max(0) as u64;
    if off < 2 {
        sh.dirs.start((ino, fh));
        // "." and "..": the kernel takes neither's attributes from a
        // listing (fuse_direntplus_link skips them), so only the parent's
        // number is needed.
        let dir = match dir_at_start(&sh, ino).await {
            Ok(i) => i,
            Err(e) => return reply.error(sh.errno(e.0)),
        };
        let a = attr_of(&dir, None);
        if off == 0 && reply.add(ino, 1, ".", &ttl, &a, dir.generation) {
            return reply.ok();
        }
        let mut pa = a;
        pa.ino = dir.parent;
        if reply.add(dir.parent, 2, "..", &ttl, &pa, 0) {
            return reply.ok();
        }
        off = 2;
    }
    let mut s = sh.dirs.take((ino, fh), off).unwrap_or(Stream {
        after: off,
        ..Stream::default()
    });
    if !s.plain.is_empty() {
        // Fetched without attributes: ask again.
        s.plain.clear();
        s.end = false;
    }
    loop {
        if s.plus.is_empty() {
            if s.end {
                break;
            }
            if s.after == FIRST_COOKIE {
                if let Some(v) = cached_listing(&sh, ino) {
                    s.end = true;
                    s.plus
                        .extend(v.into_iter().map(|(e, i)| (e, i, Vec::new())));
                    continue;
                }
            }
            let ask = ReadDirPlus {
                ino,
                after: s.after,
                max: BATCH,
            };
            let mark = sh.meta.cache.mark();
            match sh.meta.rpc(ask, false).await {
                Ok(part) => {
                    // The node says where the directory ends (entries it
                    // left out make a part shorter than asked for).
                    s.end = part.end;
                    if part.end && !part.skipped && s.after == FIRST_COOKIE {
                        let entries = part.entries.iter().map(|(d, _, _)| d.clone()).collect();
                        sh.meta.cache.store_listing(mark, ino, entries);
                    }
                    s.plus.extend(part.entries);
                }
                Err(e) => return reply.error(sh.errno(e.0)),
            }
            if s.plus.is_empty() {
                break;
            }
        }
        let Some((e, i, names)) = s.plus.pop_front() else {
            break;
        };
        let a = sh.attr_now(&i).await;
        if reply.add(
            e.ino,
            e.cookie as i64,
            OsStr::from_bytes(&e.name),
            &sh.kernel_ttl(i.ino, Some(ino)),
            &a,
            i.generation,
        ) {
            s.plus.push_front((e, i, names));
            break;
        }
        sh.known.lock().expect("known lock").insert(e.ino);
        s.after = e.cookie;
    }
    sh.dirs.put((ino, fh), s);
    reply.ok();
}
