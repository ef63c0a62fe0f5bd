//! Directory listings: `readdir` and `readdirplus` (entries with their
//! attributes, which fill the kernel's dentry and attribute caches).
//!
//! A kernel call holds a page or so of entries; the node sends up to
//! [`BATCH`] per round trip. What does not fit stays with the open
//! directory (its file handle) for the next call, and once the node said
//! the listing ended, the kernel's last call (which finds nothing more) is
//! answered without asking: a directory of up to 256 entries is listed in
//! one round trip.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};

use cfs_proto::rpc::{ReadDir, ReadDirPlus};
use cfs_proto::types::{DirEntry, EntryPlus, Ino, Inode};
use fuser::{FileType, ReplyDirectory};

use super::{attr_of, file_type, Shared};

/// Entries asked of the node per round trip.
const BATCH: u32 = 256;
/// Open directories whose fetched entries are kept; past this a listing
/// just asks again.
const STREAMS_MAX: usize = 4096;

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

/// Open directories' streams, by file handle.
#[derive(Default)]
pub(super) struct Streams {
    map: Mutex<HashMap<u64, Stream>>,
}

impl Streams {
    pub(super) fn open(&self, fh: u64) {
        let mut m = self.map.lock().expect("streams lock");
        if m.len() < STREAMS_MAX {
            m.insert(fh, Stream::default());
        }
    }

    pub(super) fn close(&self, fh: u64) {
        self.map.lock().expect("streams lock").remove(&fh);
    }

    /// The stream of `fh` if it continues at cookie `after`.
    fn take(&self, fh: u64, after: u64) -> Option<Stream> {
        let mut m = self.map.lock().expect("streams lock");
        let s = m.get_mut(&fh)?;
        (s.after == after).then(|| std::mem::take(s))
    }

    fn put(&self, fh: u64, s: Stream) {
        if let Some(slot) = self.map.lock().expect("streams lock").get_mut(&fh) {
            *slot = s;
        }
    }
}

/// The directory's parent (for ".."): from the cache under a lease, else
/// from the node.
async fn parent_of(sh: &Shared, ino: Ino) -> Result<Inode, cfs_proto::types::Errno> {
    sh.attrs_leased(ino, false).await.map(|(i, _)| i)
}

pub(super) async fn readdir(
    sh: Arc<Shared>,
    ino: u64,
    fh: u64,
    offset: i64,
    mut reply: ReplyDirectory,
) {
    let mut off = offset.max(0) as u64;
    if off == 0 {
        if reply.add(ino, 1, FileType::Directory, ".") {
            return reply.ok();
        }
        off = 1;
    }
    if off == 1 {
        let parent = match parent_of(&sh, ino).await {
            Ok(i) => i.parent,
            Err(e) => return reply.error(e.0),
        };
        if reply.add(parent, 2, FileType::Directory, "..") {
            return reply.ok();
        }
        off = 2;
    }
    let mut s = sh.dirs.take(fh, off).unwrap_or(Stream {
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
            let ask = ReadDir {
                ino,
                after: s.after,
                max: BATCH,
            };
            match sh.meta.rpc(ask, false).await {
                Ok(e) => {
                    s.end = e.len() < BATCH as usize;
                    s.plain.extend(e);
                }
                Err(e) => return reply.error(e.0),
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
    sh.dirs.put(fh, s);
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
        // "." and "..": the kernel takes neither's attributes from a
        // listing (fuse_direntplus_link skips them), so only the parent's
        // number is needed.
        let dir = match parent_of(&sh, ino).await {
            Ok(i) => i,
            Err(e) => return reply.error(e.0),
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
    let mut s = sh.dirs.take(fh, off).unwrap_or(Stream {
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
            let ask = ReadDirPlus {
                ino,
                after: s.after,
                max: BATCH,
            };
            match sh.meta.rpc(ask, false).await {
                Ok(e) => {
                    s.end = e.len() < BATCH as usize;
                    s.plus.extend(e);
                }
                Err(e) => return reply.error(e.0),
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
    sh.dirs.put(fh, s);
    reply.ok();
}
