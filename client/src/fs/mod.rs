//! The FUSE file system: every kernel request is answered from a tokio
//! task, so slow requests (a flush, a fetch) do not hold up others. The
//! data path is in [`io`].

mod caps;
mod dir;
mod io;
mod late_attrs;
mod xattr;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cfs_proto::ops::Op;
use cfs_proto::rpc::{GetAttr, GetLock, Lookup, Mutate, Mutated, ReadLink, StatFs};
use cfs_proto::types::*;
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow,
};
use tokio::sync::Mutex as AsyncMutex;
use tracing::Instrument;

use crate::conn::MetaClient;
use crate::data::DataPath;
use crate::options::{CacheMode, MountOptions};

/// Buffered file ranges (offset, bytes) handed to a background flush.
type Ranges = Arc<Vec<(u64, Vec<u8>)>>;

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
    /// A full buffer being written in the background (at most one per
    /// inode, so commits stay in write order): its bytes, still visible to
    /// reads, and the task. Joined (and its error reported) by the next
    /// flush, fsync or close.
    inflight: Option<(Ranges, tokio::task::JoinHandle<Result<(), Errno>>)>,
}

impl FileInner {
    /// Just opened or created with attributes `i`: unless bytes or a
    /// setattr of this mount are still pending, `i` serves the first read,
    /// write and deferred setattr for `ttl`.
    fn opened_as(&mut self, i: &Inode, ttl: Duration) {
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
}

struct Shared {
    meta: Arc<MetaClient>,
    data: Arc<DataPath>,
    opts: MountOptions,
    files: Mutex<HashMap<Ino, Arc<FileState>>>,
    /// Unlinked inodes whose last close must reclaim them.
    orphans: Mutex<HashSet<Ino>>,
    /// Inodes with POSIX locks taken through this mount.
    locked: Mutex<HashSet<Ino>>,
    /// Inodes the kernel knows (for invalidate-all).
    known: Mutex<HashSet<Ino>>,
    /// Inodes known to have no file capabilities (caps.rs).
    no_caps: caps::NoCaps,
    /// Listings in progress (dir.rs).
    dirs: dir::Streams,
    /// The kernel agreed to send no opendir (`FUSE_NO_OPENDIR_SUPPORT`).
    no_opendir: AtomicBool,
    next_fh: AtomicU64,
}

pub struct CfsFs {
    rt: tokio::runtime::Handle,
    sh: Arc<Shared>,
}

fn ts(ns: Nanos) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn now_ns() -> Nanos {
    ns_of(SystemTime::now())
}

fn ns_of(t: SystemTime) -> Nanos {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn attr_of(i: &Inode, size: Option<u64>) -> FileAttr {
    let size = size.unwrap_or(i.size);
    FileAttr {
        ino: i.ino,
        size,
        blocks: i
            .allocated
            .max(if size > 0 { size.min(i.allocated) } else { 0 })
            .div_ceil(512),
        atime: ts(i.atime),
        mtime: ts(i.mtime),
        ctime: ts(i.ctime),
        crtime: ts(i.crtime),
        kind: file_type(i.mode),
        perm: (i.mode & 0o7777) as u16,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: 128 << 10,
        flags: 0,
    }
}

/// The caller's credentials: ids from the request, supplementary groups
/// from `/proc` (FUSE does not pass them).
fn creds(req: &Request<'_>) -> Creds {
    let mut groups = Vec::new();
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{}/status", req.pid())) {
        if let Some(line) = s.lines().find(|l| l.starts_with("Groups:")) {
            groups = line[7..]
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect();
        }
    }
    Creds {
        uid: req.uid(),
        gid: req.gid(),
        groups,
    }
}

fn name_of(n: &OsStr) -> Vec<u8> {
    n.as_bytes().to_vec()
}

fn timeset(t: Option<TimeOrNow>) -> Option<TimeSet> {
    t.map(|t| match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(ns_of(s)),
    })
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

    /// A lock request of this mount from FUSE's inclusive range.
    fn lock_range(&self, owner: u64, start: u64, end: u64, typ: i32, pid: u32) -> LockRange {
        LockRange {
            start,
            end: end.saturating_add(1),
            typ,
            client: self.meta.client_id,
            owner,
            pid,
            flock: false,
        }
    }

    fn strict(&self) -> bool {
        self.opts.cache_mode == CacheMode::Strict
    }

    /// How long the kernel may keep the attributes of `ino` (and, with
    /// `dir`, its entry in that directory): the attribute TTL, or as long
    /// as a lease covers them when the mount's cache holds them current
    /// (their changes are then pushed to the kernel before anyone is told
    /// they happened; the kernel ignores an answer older than a push).
    fn kernel_ttl(&self, ino: Ino, dir: Option<Ino>) -> Duration {
        let base = self.opts.ttl();
        if base.is_zero() || self.meta.cache.get(ino).is_none() {
            return base;
        }
        let left = [Some(ino), dir]
            .into_iter()
            .flatten()
            .map(|i| self.meta.cache.lease_left(i))
            .try_fold(Duration::MAX, |m, l| l.map(|l| m.min(l)));
        left.map_or(base, |l| l.max(base))
    }

    async fn mutate(&self, creds: Creds, op: Op) -> Result<Mutated, Errno> {
        let m = Mutate {
            op_id: 0,
            creds,
            op,
        };
        self.meta.rpc(m, false).await
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

    async fn getattr(&self, ino: Ino, fresh: bool) -> Result<Inode, Errno> {
        self.meta.rpc(GetAttr { ino }, fresh).await
    }

    /// Attributes from the cache under a lease, else from the node (fresh
    /// if asked): current either way.
    async fn attrs_leased(&self, ino: Ino, fresh: bool) -> Result<(Inode, bool), Errno> {
        if !self.strict() {
            let hit = self.meta.cache.get(ino);
            self.meta
                .stats
                .cache(crate::stats::Cache::Attrs, hit.is_some());
            if let Some(i) = hit {
                return Ok((i, true));
            }
        }
        Ok((self.getattr(ino, fresh).await?, false))
    }

    /// Attributes as this mount sees them: the server's, with the size
    /// grown by buffered writes.
    async fn attr_now(&self, i: &Inode) -> FileAttr {
        let st = self.files.lock().expect("files lock").get(&i.ino).cloned();
        let size = match st {
            Some(st) => {
                let f = st.inner.lock().await;
                let size = f.size.map(|s| s.max(i.size));
                if let Some(set) = late_attrs::pending(&f) {
                    return attr_of(&late_attrs::overlay(i, set), size);
                }
                size
            }
            None => None,
        };
        attr_of(i, size)
    }
}

impl CfsFs {
    pub fn new(
        rt: tokio::runtime::Handle,
        meta: Arc<MetaClient>,
        data: Arc<DataPath>,
        opts: MountOptions,
    ) -> Self {
        CfsFs {
            rt,
            sh: Arc::new(Shared {
                meta,
                data,
                opts,
                files: Mutex::default(),
                orphans: Mutex::default(),
                locked: Mutex::default(),
                known: Mutex::default(),
                no_caps: caps::NoCaps::default(),
                dirs: dir::Streams::default(),
                no_opendir: AtomicBool::new(false),
                next_fh: AtomicU64::new(1),
            }),
        }
    }

    /// Inodes the kernel may have cached (for invalidate-all).
    pub fn known(&self) -> Arc<dyn Fn() -> Vec<Ino> + Send + Sync> {
        let sh = self.sh.clone();
        Arc::new(move || {
            sh.known
                .lock()
                .expect("known lock")
                .iter()
                .copied()
                .collect()
        })
    }

    /// Drops this mount's cached state of `ino` (another client changed it).
    pub fn forget_cached(&self) -> Arc<dyn Fn(Ino) + Send + Sync> {
        let sh = self.sh.clone();
        Arc::new(move |ino| {
            sh.dirs.forget(ino);
            let st = sh.files.lock().expect("files lock").get(&ino).cloned();
            if let Some(st) = st {
                if let Ok(mut f) = st.inner.try_lock() {
                    f.ext.clear();
                    if f.dirty.is_empty() && f.inflight.is_none() {
                        f.size = None;
                    }
                }
            }
        })
    }

    fn spawn<F>(&self, name: &'static str, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.sh.meta.stats.request(name);
        self.rt
            .spawn(fut.instrument(tracing::debug_span!("fuse", op = name)));
    }

    fn entry_reply(
        sh: &Shared,
        r: Result<Inode, Errno>,
        reply: ReplyEntry,
        attr: Option<FileAttr>,
    ) {
        Self::entry_reply_in(sh, None, r, reply, attr)
    }

    fn entry_reply_in(
        sh: &Shared,
        dir: Option<Ino>,
        r: Result<Inode, Errno>,
        reply: ReplyEntry,
        attr: Option<FileAttr>,
    ) {
        match r {
            Ok(i) => {
                sh.known.lock().expect("known lock").insert(i.ino);
                let a = attr.unwrap_or_else(|| attr_of(&i, None));
                let ttl = match dir {
                    Some(d) => sh.kernel_ttl(i.ino, Some(d)),
                    None => sh.opts.ttl(),
                };
                reply.entry(&ttl, &a, i.generation);
            }
            Err(e) => reply.error(e.0),
        }
    }

    /// A lookup's answer. An absent name is cached by the kernel as a
    /// negative entry for the attribute TTL (node 0), so that a build's
    /// repeated probes of missing files (`stat` of every include path)
    /// cost nothing; another mount's create of the name invalidates it.
    fn lookup_reply(
        sh: &Shared,
        parent: Ino,
        r: Result<Inode, Errno>,
        reply: ReplyEntry,
        attr: Option<FileAttr>,
    ) {
        let ttl = sh.opts.ttl();
        if r.as_ref().is_err_and(|e| *e == Errno::ENOENT) && !ttl.is_zero() {
            sh.meta.stats.negative_entry();
            let a = FileAttr {
                ino: 0,
                size: 0,
                blocks: 0,
                atime: UNIX_EPOCH,
                mtime: UNIX_EPOCH,
                ctime: UNIX_EPOCH,
                crtime: UNIX_EPOCH,
                kind: FileType::RegularFile,
                perm: 0,
                nlink: 0,
                uid: 0,
                gid: 0,
                rdev: 0,
                blksize: 0,
                flags: 0,
            };
            reply.entry(&ttl, &a, 0);
            return;
        }
        Self::entry_reply_in(sh, Some(parent), r, reply, attr)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        target: Option<Vec<u8>>,
        reply: ReplyEntry,
    ) {
        let (sh, c, name) = (self.sh.clone(), creds(req), name_of(name));
        self.spawn("create_node", async move {
            let r = sh
                .mutate_attr(
                    c,
                    Op::Create {
                        parent,
                        name,
                        mode,
                        rdev,
                        target,
                        excl: true,
                    },
                )
                .await;
            Self::entry_reply(&sh, r, reply, None);
        });
    }
}

fn reply_empty(r: Result<(), Errno>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e.0),
    }
}

impl Filesystem for CfsFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        use fuser::consts::*;
        let _ = config.add_capabilities(
            FUSE_POSIX_LOCKS
                | FUSE_FLOCK_LOCKS
                | FUSE_BIG_WRITES
                | FUSE_PARALLEL_DIROPS
                | FUSE_MAX_PAGES,
        );
        // Each on its own: one the kernel lacks must not drop the others.
        // Directory listings carry attributes (one round trip fills the
        // kernel's dentry and attribute caches for `ls -l`, `find`, `du`);
        // symlink targets are cached like pages.
        for flag in [
            FUSE_DO_READDIRPLUS,
            FUSE_READDIRPLUS_AUTO,
            FUSE_CACHE_SYMLINKS,
        ] {
            let _ = config.add_capabilities(flag);
        }
        // No opendir/releasedir round trips: a listing checks freshness
        // itself (dir.rs). Not in strict mode, whose opendir is a barrier.
        if !self.sh.strict() && config.add_capabilities(FUSE_NO_OPENDIR_SUPPORT).is_ok() {
            self.sh.no_opendir.store(true, Ordering::Relaxed);
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        // Other mounts' changes need not wait for this mount's leases to
        // run out.
        let sh = self.sh.clone();
        let release = tokio::time::timeout(Duration::from_secs(1), async move {
            sh.meta.release_leases().await;
            // Let the writer send it before the runtime goes.
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        let _ = self.rt.block_on(release);
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let (sh, name) = (self.sh.clone(), name_of(name));
        if name.len() > NAME_MAX {
            reply.error(libc::ENAMETOOLONG);
            return;
        }
        self.spawn("lookup", async move {
            let r = sh.meta.rpc(Lookup { parent, name }, sh.strict()).await;
            let a = match &r {
                Ok(i) => Some(sh.attr_now(i).await),
                Err(_) => None,
            };
            Self::lookup_reply(&sh, parent, r, reply, a);
        });
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, _nlookup: u64) {
        self.sh.meta.stats.request("forget");
        self.sh.known.lock().expect("known lock").remove(&ino);
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let sh = self.sh.clone();
        self.spawn("getattr", async move {
            match sh.attrs_leased(ino, sh.strict()).await.map(|(i, _)| i) {
                Ok(i) => {
                    let a = sh.attr_now(&i).await;
                    reply.attr(&sh.kernel_ttl(ino, None), &a)
                }
                Err(e) => reply.error(e.0),
            }
        });
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
        let (sh, c) = (self.sh.clone(), creds(req));
        self.spawn("setattr", async move {
            let set = SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: timeset(atime),
                mtime: timeset(mtime),
                ctime: ctime.map(ns_of),
            };
            match sh.setattr(c, ino, set).await {
                Ok(a) => reply.attr(&sh.opts.ttl(), &a),
                Err(e) => reply.error(e.0),
            }
        });
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let sh = self.sh.clone();
        self.spawn("readlink", async move {
            match sh.meta.rpc(ReadLink { ino }, sh.strict()).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(e.0),
            }
        });
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.create_node(req, parent, name, mode, rdev, None, reply);
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.create_node(
            req,
            parent,
            name,
            libc::S_IFDIR | (mode & 0o7777),
            0,
            None,
            reply,
        );
    }

    fn unlink(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let (sh, c, name) = (self.sh.clone(), creds(req), name_of(name));
        self.spawn("unlink", async move {
            let held_open = sh.held_open();
            let op = Op::Unlink {
                parent,
                name,
                held_open: held_open.clone(),
            };
            let r = sh.mutate_attr(c, op).await;
            reply_empty(r.as_ref().map(|_| ()).map_err(|e| *e), reply);
            if let Ok(i) = r {
                sh.after_unlink(&i, &held_open).await;
            }
        });
    }

    fn rmdir(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let (sh, c, name) = (self.sh.clone(), creds(req), name_of(name));
        self.spawn("rmdir", async move {
            let r = sh.mutate(c, Op::Rmdir { parent, name }).await;
            reply_empty(r.map(|_| ()), reply);
        });
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let t = target.as_os_str().as_bytes().to_vec();
        self.create_node(
            req,
            parent,
            link_name,
            libc::S_IFLNK | 0o777,
            0,
            Some(t),
            reply,
        );
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
        let (sh, c) = (self.sh.clone(), creds(req));
        let (name, newname) = (name_of(name), name_of(newname));
        self.spawn("rename", async move {
            // A replaced file that loses its last link is deleted by the
            // rename itself unless held open here: only then find it first
            // (its last close must reclaim it).
            let held_open = sh.held_open();
            let victim = if held_open.is_empty() {
                None
            } else {
                let target = Lookup {
                    parent: newparent,
                    name: newname.clone(),
                };
                match sh.meta.rpc(target, false).await {
                    Ok(i) if !i.is_dir() => Some(i.ino),
                    _ => None,
                }
            };
            let r = sh
                .mutate(
                    c,
                    Op::Rename {
                        parent,
                        name,
                        newparent,
                        newname,
                        flags,
                        held_open: held_open.clone(),
                    },
                )
                .await;
            let ok = r.is_ok();
            reply_empty(r.map(|_| ()), reply);
            if ok && flags & libc::RENAME_EXCHANGE == 0 {
                if let Some(v) = victim {
                    if let Ok(i) = sh.getattr(v, false).await {
                        sh.after_unlink(&i, &held_open).await;
                    }
                }
            }
        });
    }

    fn link(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (sh, c, name) = (self.sh.clone(), creds(req), name_of(newname));
        self.spawn("link", async move {
            let r = sh
                .mutate_attr(
                    c,
                    Op::Link {
                        ino,
                        parent: newparent,
                        name,
                    },
                )
                .await;
            let a = match &r {
                Ok(i) => Some(sh.attr_now(i).await),
                Err(_) => None,
            };
            Self::entry_reply(&sh, r, reply, a);
        });
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let sh = self.sh.clone();
        self.spawn("open", async move {
            // Close-to-open: see what the last close anywhere wrote. Under
            // a lease the cache is current (every change elsewhere was
            // applied to it before that change was acknowledged): no
            // round trip, and the kernel keeps the file's pages.
            let fresh = sh.opts.cache_mode != CacheMode::Session;
            match sh.attrs_leased(ino, fresh).await {
                Ok((i, _)) if i.is_dir() && flags & libc::O_ACCMODE != libc::O_RDONLY => {
                    reply.error(libc::EISDIR)
                }
                Ok((i, leased)) => {
                    let st = sh.file(ino);
                    st.opens.fetch_add(1, Ordering::SeqCst);
                    {
                        let mut f = st.inner.lock().await;
                        if !leased {
                            f.ext.clear();
                        }
                        f.opened_as(&i, sh.opts.ttl());
                    }
                    let fh = sh.next_fh.fetch_add(1, Ordering::Relaxed);
                    let keep = if leased || sh.opts.cache_mode == CacheMode::Session {
                        fuser::consts::FOPEN_KEEP_CACHE
                    } else {
                        0
                    };
                    reply.opened(fh, keep);
                }
                Err(e) => reply.error(e.0),
            }
        });
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
        let sh = self.sh.clone();
        self.spawn("read", async move {
            if offset < 0 {
                reply.error(libc::EINVAL);
                return;
            }
            match sh.read(ino, offset as u64, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(e.0),
            }
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _wf: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        let sh = self.sh.clone();
        let data = data.to_vec();
        self.spawn("write", async move {
            if offset < 0 {
                reply.error(libc::EINVAL);
                return;
            }
            match sh.write(ino, offset as u64, data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e.0),
            }
        });
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        let sh = self.sh.clone();
        self.spawn("flush", async move {
            let r = sh.flush(ino).await;
            // POSIX: closing any descriptor drops the process' locks.
            if sh.locked.lock().expect("locked lock").contains(&ino) {
                let client = sh.meta.client_id;
                let _ = sh
                    .mutate(
                        Creds::root(),
                        Op::ReleaseLocks {
                            ino,
                            client,
                            owner: lock_owner,
                            flock: false,
                        },
                    )
                    .await;
            }
            reply_empty(r, reply);
        });
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _flags: i32,
        lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let sh = self.sh.clone();
        self.spawn("release", async move {
            let r = sh.flush(ino).await;
            if let Some(owner) = lock_owner {
                if sh.locked.lock().expect("locked lock").contains(&ino) {
                    let client = sh.meta.client_id;
                    let _ = sh
                        .mutate(
                            Creds::root(),
                            Op::ReleaseLocks {
                                ino,
                                client,
                                owner,
                                flock: false,
                            },
                        )
                        .await;
                }
            }
            let st = sh.file(ino);
            if st.opens.fetch_sub(1, Ordering::SeqCst) <= 1 {
                st.opens.store(0, Ordering::SeqCst);
                let orphan = sh.orphans.lock().expect("orphans lock").remove(&ino);
                if orphan {
                    let _ = sh.mutate(Creds::root(), Op::Reclaim { ino }).await;
                }
            }
            reply_empty(r, reply);
        });
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let sh = self.sh.clone();
        self.spawn("fsync", async move {
            reply_empty(sh.flush(ino).await, reply);
        });
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if self.sh.no_opendir.load(Ordering::Relaxed) {
            // The kernel takes ENOSYS as "no opendir needed" and stops
            // sending them (FUSE_NO_OPENDIR_SUPPORT); listings check
            // freshness themselves (dir.rs).
            self.sh.meta.stats.request("opendir");
            return reply.error(libc::ENOSYS);
        }
        let sh = self.sh.clone();
        self.spawn("opendir", async move {
            match sh
                .attrs_leased(ino, sh.opts.cache_mode != CacheMode::Session)
                .await
                .map(|(i, _)| i)
            {
                Ok(i) if !i.is_dir() => reply.error(libc::ENOTDIR),
                Ok(_) => reply.opened(sh.next_fh.fetch_add(1, Ordering::Relaxed), 0),
                Err(e) => reply.error(e.0),
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
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Namespace changes are durable in the log when acknowledged.
        self.sh.meta.stats.request("fsyncdir");
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let sh = self.sh.clone();
        self.spawn("statfs", async move {
            match sh.meta.rpc(StatFs, false).await {
                Ok(s) => {
                    let bs = 4096u64;
                    reply.statfs(
                        s.total_bytes / bs,
                        s.free_bytes / bs,
                        s.free_bytes / bs,
                        s.files + 1_000_000,
                        1_000_000,
                        bs as u32,
                        NAME_MAX as u32,
                        bs as u32,
                    )
                }
                Err(e) => reply.error(e.0),
            }
        });
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
        let (sh, c, name, value) = (self.sh.clone(), creds(req), name_of(name), value.to_vec());
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
        let (sh, c, name) = (self.sh.clone(), creds(req), name_of(name));
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
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (sh, c, name) = (self.sh.clone(), creds(req), name_of(name));
        self.spawn("create", async move {
            let r = sh
                .mutate_attr(
                    c,
                    Op::Create {
                        parent,
                        name,
                        mode: libc::S_IFREG | (mode & 0o7777),
                        rdev: 0,
                        target: None,
                        excl: flags & libc::O_EXCL != 0,
                    },
                )
                .await;
            match r {
                Ok(i) => {
                    sh.known.lock().expect("known lock").insert(i.ino);
                    if i.crtime == i.ctime {
                        // New (not an existing file O_CREAT opened): no
                        // attributes yet.
                        sh.no_caps.record(i.ino, sh.opts.ttl());
                    }
                    let st = sh.file(i.ino);
                    st.opens.fetch_add(1, Ordering::SeqCst);
                    st.inner.lock().await.opened_as(&i, sh.opts.ttl());
                    let fh = sh.next_fh.fetch_add(1, Ordering::Relaxed);
                    let a = sh.attr_now(&i).await;
                    reply.created(&sh.opts.ttl(), &a, i.generation, fh, 0)
                }
                Err(e) => reply.error(e.0),
            }
        });
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
        let sh = self.sh.clone();
        self.spawn("getlk", async move {
            let lock = sh.lock_range(lock_owner, start, end, typ, pid);
            match sh.meta.rpc(GetLock { ino, lock }, true).await {
                Ok(Some(l)) => reply.locked(l.start, l.end.saturating_sub(1), l.typ, l.pid),
                Ok(None) => reply.locked(0, 0, libc::F_UNLCK, 0),
                Err(e) => reply.error(e.0),
            }
        });
    }

    fn setlk(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        lock_owner: u64,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let sh = self.sh.clone();
        self.spawn("setlk", async move {
            sh.locked.lock().expect("locked lock").insert(ino);
            let lock = sh.lock_range(lock_owner, start, end, typ, pid);
            let mut delay = Duration::from_millis(10);
            loop {
                match sh
                    .mutate(
                        Creds::root(),
                        Op::Lock {
                            ino,
                            lock: lock.clone(),
                        },
                    )
                    .await
                {
                    Ok(Mutated::Conflict(_)) if sleep => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_millis(200));
                    }
                    Ok(Mutated::Conflict(_)) => return reply.error(libc::EAGAIN),
                    Ok(_) => return reply.ok(),
                    Err(e) => return reply.error(e.0),
                }
            }
        });
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let sh = self.sh.clone();
        self.spawn("fallocate", async move {
            if offset < 0 || length <= 0 {
                reply.error(libc::EINVAL);
                return;
            }
            let r = async {
                let st = sh.file(ino);
                let mut f = st.inner.lock().await;
                sh.flush_locked(ino, &mut f).await?;
                sh.mutate_attr(
                    Creds::root(),
                    Op::Fallocate {
                        ino,
                        offset: offset as u64,
                        len: length as u64,
                        mode,
                    },
                )
                .await?;
                f.size = None;
                f.ext.clear();
                f.opened = None;
                Ok(())
            }
            .await;
            reply_empty(r, reply);
        });
    }

    fn copy_file_range(
        &mut self,
        _req: &Request<'_>,
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
        let sh = self.sh.clone();
        self.spawn("copy_file_range", async move {
            match sh
                .copy_range(ino_in, offset_in, ino_out, offset_out, len)
                .await
            {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e.0),
            }
        });
    }
}
