//! The FUSE file system: every kernel request is answered from a tokio
//! task, so slow requests (a flush, a fetch) do not hold up others. The
//! data path is in [`io`].

mod attrs;
mod caps;
mod creds;
mod dir;
mod files;
mod holds;
mod io;
mod late_attrs;
mod locks;
mod names;
mod session;
mod xattr;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cfs_proto::ops::Op;
use cfs_proto::rpc::{Mutate, Mutated, ReadLink};
use cfs_proto::types::*;
use fuser::{
    Filesystem, KernelConfig, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};
use tokio::sync::Mutex as AsyncMutex;
use tracing::Instrument;

use crate::conn::MetaClient;
use crate::data::DataPath;
use crate::options::{CacheMode, MountOptions};

// Attribute conversions the sibling modules share (they import them from here).
use attrs::{attr_of, file_type, now_ns};

/// Buffered file ranges (offset, bytes) handed to a background flush.
type Ranges = Arc<Vec<(u64, Vec<u8>)>>;
/// A background flush: what it kept buffered, or why it failed.
type Flushing = tokio::task::JoinHandle<Result<Vec<(u64, Vec<u8>)>, Errno>>;

/// Per-inode client state: write-back buffer and read state.
#[derive(Default)]
struct FileInner {
    /// Dirty, not yet flushed bytes by file offset; ranges never overlap.
    dirty: BTreeMap<u64, Vec<u8>>,
    dirty_bytes: usize,
    /// Size including dirty bytes (None: the server's size).
    size: Option<u64>,
    /// The attributes read at open or create (the size they hold is
    /// `size`'s start), and until when they may be used instead of asking
    /// the server again (the attribute TTL): the first read, write or
    /// deferred setattr needs no getattr of its own.
    opened: Option<(Inode, Instant)>,
    /// Extent map windows fetched from the server.
    ext: io::ExtWindows,
    /// End of the last read (sequential detection) and read-ahead window.
    seq_end: u64,
    ra_window: u64,
    /// A setattr made after the dirty bytes, committed with them
    /// (late_attrs.rs).
    late: Option<cfs_proto::ops::LateAttrs>,
    /// Who wrote the dirty bytes (the opener of the handle of the last
    /// write): their commit runs as them.
    writer: Option<Creds>,
    /// A full buffer being written in the background (at most one per
    /// inode, so commits stay in write order): its bytes, still visible to
    /// reads, and the task, which answers with the bytes it kept buffered
    /// (`dedupe::hold_back`). Joined (and its error reported) by the next
    /// flush, fsync or close.
    inflight: Option<(Ranges, Flushing)>,
    /// A background flush failed: its bytes went back into `dirty` (to be
    /// retried) and its error is reported by the next fsync and by the
    /// next close, even if the retry succeeds.
    bg_error: Option<BgError>,
    /// The file's compression policy as last seen (its inode's, from a
    /// subtree policy); `None`: the mount's `--compress`.
    compression: Option<cfs_proto::types::Compression>,
    /// The file's dedupe policy as last seen (likewise).
    dedupe: Option<bool>,
    /// The file's tenant (D51): its stripes are sealed with the tenant's
    /// key. Never changes once the file exists.
    tenant: Option<String>,
}

#[derive(Clone, Copy, Debug)]
struct BgError {
    errno: Errno,
    /// An fsync reported it already (a close still will).
    fsync_told: bool,
}

/// Why dirty bytes are flushed: which caller a failed background flush
/// is reported to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FlushFor {
    Fsync,
    Close,
    /// Another operation that needs the bytes committed first.
    Other,
}

impl FileInner {
    /// Drops what another mount's change made stale: the extent map, and
    /// the size unless this mount has bytes of its own pending.
    fn forget(&mut self) {
        self.ext.clear();
        if self.dirty.is_empty() && self.inflight.is_none() {
            self.size = None;
        }
    }

    /// Just opened or created with attributes `i`: unless bytes or a
    /// setattr of this mount are still pending, `i` serves the first read,
    /// write and deferred setattr for `ttl`.
    fn opened_as(&mut self, i: &Inode, ttl: Duration) {
        self.compression = i.compression;
        self.dedupe = i.dedupe;
        self.tenant = i.tenant.clone();
        if self.dirty.is_empty() && self.inflight.is_none() && self.late.is_none() {
            self.size = Some(i.size);
            self.opened = Some((i.clone(), Instant::now() + ttl));
        }
    }
}

#[derive(Default)]
struct FileState {
    inner: AsyncMutex<FileInner>,
    opens: AtomicU64,
    /// Another mount changed the file while `inner` was held: the next
    /// holder drops what is cached (`FileState::lock`).
    stale: AtomicBool,
}

impl FileState {
    /// Locks the file's state, first dropping what an invalidation could
    /// not drop while the lock was held.
    async fn lock(&self) -> tokio::sync::MutexGuard<'_, FileInner> {
        let mut f = self.inner.lock().await;
        if self.stale.swap(false, Ordering::SeqCst) {
            f.forget();
        }
        f
    }

    /// Another mount changed the file: drop its cached extents and size
    /// now, or at the next lock if it is held.
    fn forget(&self) {
        match self.inner.try_lock() {
            Ok(mut f) => f.forget(),
            Err(_) => self.stale.store(true, Ordering::SeqCst),
        }
    }
}

struct Shared {
    meta: Arc<MetaClient>,
    data: Arc<DataPath>,
    /// The tenants' keys this mount holds (D51; its readers share the
    /// ring).
    tenants: Arc<crate::tenants::Tenants>,
    opts: MountOptions,
    files: Mutex<HashMap<Ino, Arc<FileState>>>,
    /// Unlinked inodes whose last close must reclaim them.
    orphans: Mutex<HashSet<Ino>>,
    /// Inodes with POSIX locks taken through this mount.
    locked: Mutex<HashSet<Ino>>,
    /// Shards where this mount holds locks or orphans (holds.rs).
    holds: holds::Holds,
    /// Inodes the kernel knows (for invalidate-all).
    known: Mutex<HashSet<Ino>>,
    /// Inodes known to have no file capabilities (caps.rs).
    no_caps: caps::NoCaps,
    /// Listings in progress (dir.rs).
    dirs: dir::Streams,
    /// The kernel agreed to send no opendir (`FUSE_NO_OPENDIR_SUPPORT`).
    no_opendir: AtomicBool,
    next_fh: AtomicU64,
    /// Who opened each file handle: the writes through it commit as that
    /// caller (the server checks them, D42), also when the kernel sends
    /// them from its own thread (a shared mapping's pages).
    handles: Mutex<HashMap<u64, Creds>>,
    /// Bytes of written small files kept as their content (io.rs).
    kept_bytes: Arc<AtomicU64>,
    /// The kernel's side of the session, once mounted (`session.rs`).
    kernel: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// Callers' supplementary groups (creds.rs).
    groups: creds::Groups,
}

pub struct CfsFs {
    rt: tokio::runtime::Handle,
    sh: Arc<Shared>,
}

/// The answer to a call on an inode (not a name) that no longer exists:
/// ESTALE, not ENOENT. The kernel may still map a name to an inode another
/// mount deleted (a rename over it, an unlink); on ESTALE it looks the
/// name up again and retries the call on what the name now holds, so that
/// a rename over a file is atomic for readers on every mount.
fn stale_if_gone(e: Errno) -> Errno {
    if e == Errno::ENOENT {
        Errno::ESTALE
    } else {
        e
    }
}

fn name_of(n: &OsStr) -> Vec<u8> {
    n.as_bytes().to_vec()
}

impl Shared {
    fn file(&self, ino: Ino) -> Arc<FileState> {
        self.files
            .lock()
            .expect("files lock")
            .entry(ino)
            .or_default()
            .clone()
    }

    /// Every file's state this mount holds (a snapshot of the map).
    fn all_files(&self) -> Vec<Arc<FileState>> {
        self.files
            .lock()
            .expect("files lock")
            .values()
            .cloned()
            .collect()
    }

    fn strict(&self) -> bool {
        self.opts.cache_mode == CacheMode::Strict
    }

    async fn mutate(&self, creds: Creds, op: Op) -> Result<Mutated, Errno> {
        // Locks are granted or refused by the log's order itself: their
        // answer cannot come early.
        let early = !self.opts.sync_namespace
            && !matches!(
                op,
                Op::Lock { .. } | Op::ReleaseLocks { .. } | Op::RenewHold { .. }
            );
        // What to tell the kernel if the outcome stays unknown (copied
        // before the op moves; small: a name or two).
        let mut dirs = vec![op.home()];
        if let Op::Rename { newparent, .. } = &op {
            dirs.push(*newparent);
        }
        let names: Vec<(Ino, Vec<u8>)> = op
            .names_changed()
            .into_iter()
            .map(|(p, n)| (p, n.to_vec()))
            .collect();
        let m = Mutate {
            op_id: 0,
            creds,
            op,
            early,
        };
        let r = self.meta.rpc(m, false).await;
        // EIO and ENOTCONN are what a change whose attempts all failed
        // ends with (`MetaClient::call`): it may have applied.
        if matches!(r, Err(e) if e == Errno::EIO || e.0 == libc::ENOTCONN) {
            let names: Vec<(Ino, &[u8])> = names.iter().map(|(p, n)| (*p, n.as_slice())).collect();
            self.meta.outcome_unknown(&dirs, &names);
        }
        r
    }

    /// Waits until every change this mount sent so far is settled in the
    /// log (early answers, D30), then reports a failed one that touched
    /// `ino`: what fsync promises.
    async fn durable(&self, ino: Ino) -> Result<(), Errno> {
        self.meta.unsettled.settle_all(self.opts.timeout).await?;
        self.failed(ino)
    }

    /// EIO, once, if a change answered early that touched `ino` did not
    /// apply as answered (close and fsync report it).
    fn failed(&self, ino: Ino) -> Result<(), Errno> {
        match self.meta.unsettled.take_failure(ino) {
            Some(_) => Err(Errno::EIO),
            None => Ok(()),
        }
    }

    /// A mutation whose reply is the inode it made or changed.
    async fn mutate_attr(&self, creds: Creds, op: Op) -> Result<Inode, Errno> {
        match self.mutate(creds, op).await? {
            Mutated::Attr(i) => Ok(i),
            other => {
                tracing::warn!(?other, "a mutation returned no attributes");
                Err(Errno::EIO)
            }
        }
    }
}

impl CfsFs {
    pub fn new(
        rt: tokio::runtime::Handle,
        meta: Arc<MetaClient>,
        data: Arc<DataPath>,
        tenants: Arc<crate::tenants::Tenants>,
        opts: MountOptions,
    ) -> Self {
        let sh = Arc::new(Shared {
            meta,
            data,
            opts,
            files: Mutex::default(),
            orphans: Mutex::default(),
            locked: Mutex::default(),
            holds: holds::Holds::default(),
            known: Mutex::default(),
            no_caps: caps::NoCaps::default(),
            groups: creds::Groups::default(),
            dirs: dir::Streams::default(),
            no_opendir: AtomicBool::new(false),
            next_fh: AtomicU64::new(1),
            handles: Mutex::default(),
            kept_bytes: Arc::default(),
            tenants,
            kernel: Arc::default(),
        });
        rt.spawn(holds::renew_forever(Arc::downgrade(&sh)));
        CfsFs { rt, sh }
    }

    fn spawn<F>(&self, name: &'static str, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let stats = self.sh.meta.stats.clone();
        stats.request(name);
        let arrived = std::time::Instant::now();
        self.rt.spawn(
            async move {
                fut.await;
                stats.answered(name, arrived.elapsed());
            }
            .instrument(tracing::debug_span!("fuse", op = name)),
        );
    }
}

fn reply_empty(sh: &Shared, r: Result<(), Errno>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(sh.errno(e.0)),
    }
}

impl Shared {
    /// Counts an error reply by its errno (`claudefs_fuse_errors_total`)
    /// and returns it for the reply.
    fn errno(&self, code: libc::c_int) -> libc::c_int {
        self.meta.stats.error(code);
        code
    }
}

impl Filesystem for CfsFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        self.do_init(config)
    }

    fn destroy(&mut self) {
        self.do_destroy();
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        self.do_lookup(parent, name, reply);
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, _nlookup: u64) {
        self.sh.meta.stats.request("forget");
        self.sh.known.lock().expect("known lock").remove(&ino);
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        self.do_getattr(ino, reply);
    }

    fn setattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        self.do_setattr(req, ino, mode, uid, gid, size, atime, mtime, ctime, reply);
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let sh = self.sh.clone();
        self.spawn("readlink", async move {
            match sh.meta.rpc(ReadLink { ino }, sh.strict()).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(sh.errno(stale_if_gone(e).0)),
            }
        });
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.create_node(req, parent, name, (mode, umask), rdev, None, reply);
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.do_mkdir(req, parent, name, (mode, umask), reply);
    }

    fn unlink(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.do_unlink(req, parent, name, reply);
    }

    fn rmdir(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.do_rmdir(req, parent, name, reply);
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        self.do_symlink(req, parent, link_name, target, reply);
    }

    fn rename(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        self.do_rename(req, parent, name, newparent, newname, flags, reply);
    }

    fn link(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.do_link(req, ino, newparent, newname, reply);
    }

    fn open(&mut self, req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let c = self.sh.groups.creds(req);
        self.do_open(c, ino, flags, reply);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        self.do_read(ino, offset, size, reply);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _wf: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        self.do_write(ino, fh, offset, data, reply);
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        self.do_flush(ino, lock_owner, reply);
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        _flags: i32,
        lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.do_release(ino, fh, lock_owner, reply);
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.do_fsync(ino, reply);
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if self.sh.no_opendir.load(Ordering::Relaxed) {
            // The kernel takes ENOSYS as "no opendir needed" and stops
            // sending them (FUSE_NO_OPENDIR_SUPPORT); listings check
            // freshness themselves (dir.rs).
            self.sh.meta.stats.request("opendir");
            return reply.error(self.sh.errno(libc::ENOSYS));
        }
        let sh = self.sh.clone();
        self.spawn("opendir", async move {
            match sh
                .attrs_leased(ino, sh.opts.cache_mode != CacheMode::Session)
                .await
                .map(|(i, _)| i)
            {
                Ok(i) if !i.is_dir() => reply.error(sh.errno(libc::ENOTDIR)),
                Ok(_) => reply.opened(sh.next_fh.fetch_add(1, Ordering::Relaxed), 0),
                Err(e) => reply.error(sh.errno(stale_if_gone(e).0)),
            }
        });
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        reply: ReplyDirectory,
    ) {
        let sh = self.sh.clone();
        self.spawn("readdir", dir::readdir(sh, ino, fh, offset, reply));
    }

    fn readdirplus(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        reply: fuser::ReplyDirectoryPlus,
    ) {
        let sh = self.sh.clone();
        self.spawn("readdirplus", dir::readdirplus(sh, ino, fh, offset, reply));
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        self.sh.meta.stats.request("releasedir");
        reply.ok();
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Changes answered early are durable once settled.
        let sh = self.sh.clone();
        self.spawn("fsyncdir", async move {
            reply_empty(&sh, sh.durable(ino).await, reply);
        });
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        self.do_statfs(reply);
    }

    fn setxattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (sh, c, name, value) = (
            self.sh.clone(),
            self.sh.groups.creds(req),
            name_of(name),
            value.to_vec(),
        );
        self.spawn(
            "setxattr",
            xattr::setxattr(sh, c, ino, name, value, flags, reply),
        );
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let (sh, name) = (self.sh.clone(), name_of(name));
        self.spawn("getxattr", xattr::getxattr(sh, ino, name, size, reply));
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let sh = self.sh.clone();
        self.spawn("listxattr", xattr::listxattr(sh, ino, size, reply));
    }

    fn removexattr(&mut self, req: &Request<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        let (sh, c, name) = (self.sh.clone(), self.sh.groups.creds(req), name_of(name));
        self.spawn("removexattr", xattr::removexattr(sh, c, ino, name, reply));
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        self.sh.meta.stats.request("access");
        reply.ok();
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.do_create(req, parent, name, (mode, umask), flags, reply);
    }

    fn getlk(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        lock_owner: u64,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        self.do_getlk(ino, lock_owner, start, end, typ, pid, reply);
    }

    fn setlk(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        lock_owner: u64,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        // As the descriptor's opener (checked on the node).
        let c = self.sh.handle_creds(fh);
        self.do_setlk(c, ino, lock_owner, start, end, typ, pid, sleep, reply);
    }

    fn fallocate(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let c = self.sh.groups.creds(req);
        self.do_fallocate(c, ino, offset, length, mode, reply);
    }

    fn copy_file_range(
        &mut self,
        req: &Request<'_>,
        ino_in: u64,
        _fh_in: u64,
        offset_in: i64,
        ino_out: u64,
        _fh_out: u64,
        offset_out: i64,
        len: u64,
        _flags: u32,
        reply: ReplyWrite,
    ) {
        let c = self.sh.groups.creds(req);
        self.do_copy_file_range(c, ino_in, offset_in, ino_out, offset_out, len, reply);
    }
}
