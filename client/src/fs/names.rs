//! Calls that change names: create, mknod, mkdir and symlink (one
//! `Create` operation), link, unlink, rmdir and rename.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;

use cfs_proto::ops::Op;
use cfs_proto::rpc::Lookup;
use fuser::{ReplyCreate, ReplyEmpty, ReplyEntry, Request};

use super::{name_of, reply_empty, CfsFs};

impl CfsFs {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_node(
        &self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        (mode, umask): (u32, u32),
        rdev: u32,
        target: Option<Vec<u8>>,
        reply: ReplyEntry,
    ) {
        let (sh, c, name) = (self.sh.clone(), self.sh.groups.creds(req), name_of(name));
        self.spawn("create_node", async move {
            let r = sh
                .mutate_attr(
                    c,
                    Op::Create {
                        parent,
                        name,
                        mode,
                        umask,
                        rdev,
                        target,
                        excl: true,
                        ino: None,
                    },
                )
                .await;
            Self::entry_reply(&sh, r, reply, None);
        });
    }

    pub(super) fn do_mkdir(
        &self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        (mode, umask): (u32, u32),
        reply: ReplyEntry,
    ) {
        self.create_node(
            req,
            parent,
            name,
            (libc::S_IFDIR | (mode & 0o7777), umask),
            0,
            None,
            reply,
        );
    }

    pub(super) fn do_symlink(
        &self,
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
            (libc::S_IFLNK | 0o777, 0),
            0,
            Some(t),
            reply,
        );
    }

    pub(super) fn do_unlink(
        &self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        reply: ReplyEmpty,
    ) {
        let (sh, c, name) = (self.sh.clone(), self.sh.groups.creds(req), name_of(name));
        self.spawn("unlink", async move {
            let held_open = sh.held_open();
            let op = Op::Unlink {
                parent,
                name,
                held_open: held_open.clone(),
            };
            let r = sh.mutate_attr(c, op).await;
            reply_empty(&sh, r.as_ref().map(|_| ()).map_err(|e| *e), reply);
            if let Ok(i) = r {
                sh.after_unlink(&i, &held_open).await;
            }
        });
    }

    pub(super) fn do_rmdir(&self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let (sh, c, name) = (self.sh.clone(), self.sh.groups.creds(req), name_of(name));
        self.spawn("rmdir", async move {
            let r = sh.mutate(c, Op::Rmdir { parent, name }).await;
            reply_empty(&sh, r.map(|_| ()), reply);
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_rename(
        &self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let (sh, c) = (self.sh.clone(), self.sh.groups.creds(req));
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
            reply_empty(&sh, r.map(|_| ()), reply);
            if ok && flags & libc::RENAME_EXCHANGE == 0 {
                if let Some(v) = victim {
                    if let Ok(i) = sh.getattr(v, false).await {
                        sh.after_unlink(&i, &held_open).await;
                    }
                }
            }
        });
    }

    pub(super) fn do_link(
        &self,
        req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (sh, c, name) = (self.sh.clone(), self.sh.groups.creds(req), name_of(newname));
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

    pub(super) fn do_create(
        &self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        (mode, umask): (u32, u32),
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (sh, c, name) = (self.sh.clone(), self.sh.groups.creds(req), name_of(name));
        self.spawn("create", async move {
            // A tenant's directory (as cached): nothing is made in it
            // without the tenant's keys (D51).
            if let Some(t) = sh.meta.cache.get(parent).and_then(|p| p.tenant) {
                if let Err(e) = sh.tenant_seal(&t).await {
                    reply.error(sh.errno(e.0));
                    return;
                }
            }
            let r = sh
                .mutate_attr(
                    c.clone(),
                    Op::Create {
                        parent,
                        name,
                        mode: libc::S_IFREG | (mode & 0o7777),
                        umask,
                        rdev: 0,
                        target: None,
                        excl: flags & libc::O_EXCL != 0,
                        ino: None,
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
                    if let Some(t) = i.tenant.as_deref() {
                        if let Err(e) = sh.tenant_seal(t).await {
                            reply.error(sh.errno(e.0));
                            return;
                        }
                    }
                    let st = sh.file(i.ino);
                    st.opens.fetch_add(1, Ordering::SeqCst);
                    st.lock().await.opened_as(&i, sh.opts.ttl());
                    let fh = sh.open_handle(c.clone());
                    let a = sh.attr_now(&i).await;
                    reply.created(&sh.opts.ttl(), &a, i.generation, fh, 0)
                }
                Err(e) => reply.error(sh.errno(e.0)),
            }
        });
    }
}
