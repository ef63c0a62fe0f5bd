//! Directory listings: `readdir` and `readdirplus` (entries with their
//! attributes, which fill the kernel's dentry and attribute caches).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use cfs_proto::rpc::{ReadDir, ReadDirPlus};
use fuser::{FileType, ReplyDirectory};

use super::{attr_of, file_type, Shared};

pub(super) async fn readdir(sh: Arc<Shared>, ino: u64, offset: i64, mut reply: ReplyDirectory) {
    let mut off = offset.max(0) as u64;
    if off == 0 {
        if reply.add(ino, 1, FileType::Directory, ".") {
            reply.ok();
            return;
        }
        off = 1;
    }
    if off == 1 {
        let parent = match sh.getattr(ino, false).await {
            Ok(i) => i.parent,
            Err(e) => {
                reply.error(e.0);
                return;
            }
        };
        if reply.add(parent, 2, FileType::Directory, "..") {
            reply.ok();
            return;
        }
        off = 2;
    }
    loop {
        let entries = match sh
            .meta
            .rpc(
                ReadDir {
                    ino,
                    after: off,
                    max: 256,
                },
                false,
            )
            .await
        {
            Ok(e) => e,
            Err(e) => {
                reply.error(e.0);
                return;
            }
        };
        if entries.is_empty() {
            break;
        }
        for e in entries {
            off = e.cookie;
            if reply.add(
                e.ino,
                e.cookie as i64,
                file_type(e.kind),
                OsStr::from_bytes(&e.name),
            ) {
                reply.ok();
                return;
            }
        }
    }
    reply.ok();
}

pub(super) async fn readdirplus(
    sh: Arc<Shared>,
    ino: u64,
    offset: i64,
    mut reply: fuser::ReplyDirectoryPlus,
) {
    let ttl = sh.opts.ttl();
    let mut off = offset.max(0) as u64;
    if off < 2 {
        // "." and "..": the kernel takes neither's attributes
        // from a listing (fuse_direntplus_link skips them), so
        // only the parent's number is needed.
        let dir = match sh.getattr(ino, false).await {
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
    loop {
        let entries = match sh
            .meta
            .rpc(
                ReadDirPlus {
                    ino,
                    after: off,
                    max: 256,
                },
                false,
            )
            .await
        {
            Ok(e) => e,
            Err(e) => return reply.error(e.0),
        };
        if entries.is_empty() {
            break;
        }
        for (e, i) in entries {
            off = e.cookie;
            let a = sh.attr_now(&i).await;
            if reply.add(
                e.ino,
                e.cookie as i64,
                OsStr::from_bytes(&e.name),
                &sh.kernel_ttl(i.ino, Some(ino)),
                &a,
                i.generation,
            ) {
                return reply.ok();
            }
            sh.known.lock().expect("known lock").insert(e.ino);
        }
    }
    reply.ok();
}
