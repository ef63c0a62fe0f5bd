//! Extended attributes: get, list, set, remove (the capability probe is
//! answered locally for files known to have none, `caps`).

use std::sync::Arc;

use cfs_proto::ops::Op;
use cfs_proto::rpc::{GetXattr, ListXattr};
use cfs_proto::types::{Creds, Errno};
use fuser::{ReplyEmpty, ReplyXattr};

use super::{caps, reply_empty, Shared};

pub(super) async fn setxattr(
    sh: Arc<Shared>,
    c: Creds,
    ino: u64,
    name: Vec<u8>,
    value: Vec<u8>,
    flags: i32,
    reply: ReplyEmpty,
) {
    sh.no_caps.forget(ino);
    if let Err(e) = sh.flush_late(ino).await {
        reply.error(sh.errno(e.0));
        return;
    }
    if name == cfs_proto::tenant::TENANT_XATTR {
        // A subtree is given only a tenant with a key this mount may use
        // (D51): its files could not be written otherwise.
        let tenant = String::from_utf8_lossy(&value).trim().to_string();
        if cfs_proto::tenant::valid_tenant(&tenant) {
            if let Err(e) = sh.tenant_seal(&tenant).await {
                reply.error(sh.errno(e.0));
                return;
            }
        }
    }
    let r = sh
        .mutate(
            c,
            Op::SetXattr {
                ino,
                name,
                value,
                flags,
            },
        )
        .await;
    reply_empty(&sh, r.map(|_| ()), reply);
}

pub(super) async fn getxattr(
    sh: Arc<Shared>,
    ino: u64,
    name: Vec<u8>,
    size: u32,
    reply: ReplyXattr,
) {
    let caps = name == caps::CAPS;
    if caps && !sh.strict() {
        let hit = sh.no_caps.known(ino);
        sh.meta.stats.cache(crate::stats::Cache::NoCaps, hit);
        if hit {
            reply.error(sh.errno(libc::ENODATA));
            return;
        }
    }
    // Under a lease, an attribute the inode does not have (what `ls -l`
    // probes: ACLs, SELinux labels) is answered from the names listed
    // with the directory.
    if !sh.strict() {
        let names = sh.meta.cache.xattr_names(ino);
        let absent = names.as_ref().is_some_and(|n| !n.contains(&name));
        sh.meta.stats.cache(crate::stats::Cache::XattrNames, absent);
        if absent {
            reply.error(sh.errno(libc::ENODATA));
            return;
        }
    }
    let r = sh.meta.rpc(GetXattr { ino, name }, sh.strict()).await;
    if caps && r.as_ref().is_err_and(|e| *e == Errno::ENODATA) {
        sh.no_caps.record(ino, sh.opts.ttl());
    }
    match r {
        Ok(d) => {
            if size == 0 {
                reply.size(d.len() as u32)
            } else if d.len() > size as usize {
                reply.error(sh.errno(libc::ERANGE))
            } else {
                reply.data(&d)
            }
        }
        Err(e) => reply.error(sh.errno(super::stale_if_gone(e).0)),
    }
}

pub(super) async fn listxattr(sh: Arc<Shared>, ino: u64, size: u32, reply: ReplyXattr) {
    let cached = if sh.strict() {
        None
    } else {
        sh.meta.cache.xattr_names(ino)
    };
    sh.meta
        .stats
        .cache(crate::stats::Cache::XattrNames, cached.is_some());
    let r = match cached {
        Some(names) => Ok(names),
        None => sh.meta.rpc(ListXattr { ino }, sh.strict()).await,
    };
    match r {
        Ok(names) => {
            let mut d = Vec::new();
            for n in names {
                d.extend_from_slice(&n);
                d.push(0);
            }
            if size == 0 {
                reply.size(d.len() as u32)
            } else if d.len() > size as usize {
                reply.error(sh.errno(libc::ERANGE))
            } else {
                reply.data(&d)
            }
        }
        Err(e) => reply.error(sh.errno(super::stale_if_gone(e).0)),
    }
}

pub(super) async fn removexattr(
    sh: Arc<Shared>,
    c: Creds,
    ino: u64,
    name: Vec<u8>,
    reply: ReplyEmpty,
) {
    sh.no_caps.forget(ino);
    if let Err(e) = sh.flush_late(ino).await {
        reply.error(sh.errno(e.0));
        return;
    }
    let r = sh.mutate(c, Op::RemoveXattr { ino, name }).await;
    reply_empty(&sh, r.map(|_| ()), reply);
}
