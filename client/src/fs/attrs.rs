//! Attributes: the kernel's form of them (`FileAttr`, times, file types),
//! how long the kernel may keep them, lookup, getattr and setattr, and the
//! entry replies of calls that make or find a name.

use std::ffi::OsStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cfs_proto::rpc::{GetAttr, Lookup};
use cfs_proto::types::*;
use fuser::{FileAttr, FileType, ReplyAttr, ReplyEntry, Request, TimeOrNow};

use super::{late_attrs, name_of, stale_if_gone, CfsFs, Shared};
use crate::cache::Named;

fn ts(ns: Nanos) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

pub(super) fn now_ns() -> Nanos {
    ns_of(SystemTime::now())
}

fn ns_of(t: SystemTime) -> Nanos {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

pub(super) fn file_type(mode: u32) -> FileType {
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

pub(super) fn attr_of(i: &Inode, size: Option<u64>) -> FileAttr {
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

fn timeset(t: Option<TimeOrNow>) -> Option<TimeSet> {
    t.map(|t| match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(ns_of(s)),
    })
}

impl Shared {
    /// How long the kernel may keep the attributes of `ino` (and, with
    /// `dir`, its entry in that directory): the attribute TTL, or as long
    /// as a lease covers them when the mount's cache holds them current
    /// (their changes are then pushed to the kernel before anyone is told
    /// they happened; the kernel ignores an answer older than a push).
    pub(super) fn kernel_ttl(&self, ino: Ino, dir: Option<Ino>) -> Duration {
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

    pub(super) async fn getattr(&self, ino: Ino, fresh: bool) -> Result<Inode, Errno> {
        self.meta.rpc(GetAttr { ino }, fresh).await
    }

    /// Attributes from the cache under a lease, else from the node (fresh
    /// if asked): current either way.
    pub(super) async fn attrs_leased(&self, ino: Ino, fresh: bool) -> Result<(Inode, bool), Errno> {
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
    pub(super) async fn attr_now(&self, i: &Inode) -> FileAttr {
        let st = self.files.lock().expect("files lock").get(&i.ino).cloned();
        let size = match st {
            Some(st) => {
                let f = st.lock().await;
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
    pub(super) fn entry_reply(
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
            Err(e) => reply.error(sh.errno(e.0)),
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

    pub(super) fn do_lookup(&self, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let (sh, name) = (self.sh.clone(), name_of(name));
        if name.len() > NAME_MAX {
            reply.error(sh.errno(libc::ENAMETOOLONG));
            return;
        }
        self.spawn("lookup", async move {
            // Snapshots come and go by one entry the kernel is not told of
            // (D52): their names are asked of the node every time and not
            // kept by the kernel.
            let in_snapshots = name == cfs_proto::types::SNAPSHOTS_DIR
                || sh.meta.cache.get(parent).is_some_and(|p| p.snapshot);
            let cached = if sh.strict() || in_snapshots {
                None
            } else {
                let c = sh.meta.cache.lookup(parent, &name);
                sh.meta.stats.cache(crate::stats::Cache::Names, c.is_some());
                c
            };
            // Without a lease on the directory's shard the node's own state
            // may lag what another mount already closed (a follower, or
            // the leader behind a change answered through another node):
            // the lookup passes a read barrier, so that close-to-open
            // holds for a name made elsewhere, as for the file's bytes.
            let r = match cached {
                Some(Named::Found(i)) => Ok(i),
                Some(Named::Absent) => Err(Errno::ENOENT),
                None => {
                    let fresh = sh.strict() || sh.meta.cache.lease_left(parent).is_none();
                    sh.meta.rpc(Lookup { parent, name }, fresh).await
                }
            };
            let a = match &r {
                Ok(i) => Some(sh.attr_now(i).await),
                Err(_) => None,
            };
            if in_snapshots {
                match (r, a) {
                    (Ok(i), Some(a)) => {
                        sh.known.lock().expect("known lock").insert(i.ino);
                        reply.entry(&std::time::Duration::ZERO, &a, i.generation);
                    }
                    (Err(e), _) => reply.error(sh.errno(e.0)),
                    (Ok(_), None) => reply.error(sh.errno(libc::EIO)),
                }
                return;
            }
            Self::lookup_reply(&sh, parent, r, reply, a);
        });
    }

    pub(super) fn do_getattr(&self, ino: u64, reply: ReplyAttr) {
        let sh = self.sh.clone();
        self.spawn("getattr", async move {
            match sh.attrs_leased(ino, sh.strict()).await.map(|(i, _)| i) {
                Ok(i) => {
                    let a = sh.attr_now(&i).await;
                    reply.attr(&sh.kernel_ttl(ino, None), &a)
                }
                Err(e) => reply.error(sh.errno(stale_if_gone(e).0)),
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_setattr(
        &self,
        req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        reply: ReplyAttr,
    ) {
        let (sh, c) = (self.sh.clone(), self.sh.groups.creds(req));
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
                Err(e) => reply.error(sh.errno(stale_if_gone(e).0)),
            }
        });
    }
}
