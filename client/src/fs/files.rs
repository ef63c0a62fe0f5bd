//! Calls on open files: open and release (the open count, the reclaim of
//! an unlinked file at its last close, the POSIX locks a close drops),
//! read, write, flush, fsync, fallocate and copy_file_range, handed to the
//! data path (io.rs).

use std::sync::atomic::Ordering;

use cfs_proto::ops::Op;
use cfs_proto::types::Creds;
use fuser::{ReplyData, ReplyEmpty, ReplyOpen, ReplyWrite};

use crate::options::CacheMode;

use super::{reply_empty, stale_if_gone, CfsFs, FlushFor};

impl CfsFs {
    pub(super) fn do_open(&self, c: Creds, ino: u64, flags: i32, reply: ReplyOpen) {
        let sh = self.sh.clone();
        self.spawn("open", async move {
            // Close-to-open: see what the last close anywhere wrote. Under
            // a lease the cache is current (every change elsewhere was
            // applied to it before that change was acknowledged): no
            // round trip, and the kernel keeps the file's pages.
            let fresh = sh.opts.cache_mode != CacheMode::Session;
            match sh.attrs_leased(ino, fresh).await {
                Ok((i, _)) if i.is_dir() && flags & libc::O_ACCMODE != libc::O_RDONLY => {
                    reply.error(sh.errno(libc::EISDIR))
                }
                // A snapshot is read-only (D52).
                Ok((i, _))
                    if i.snapshot
                        && (flags & libc::O_ACCMODE != libc::O_RDONLY
                            || flags & libc::O_TRUNC != 0) =>
                {
                    reply.error(sh.errno(libc::EROFS))
                }
                Ok((i, leased)) => {
                    if fresh && !leased {
                        // The kernel's attributes came from a lookup that
                        // may predate the last close elsewhere (a node's
                        // own state, read without a barrier); the ones
                        // just read are current. Dropped before the open
                        // returns, so the size a read stops at, and
                        // fstat, come from them (NFS revalidates at open
                        // the same way).
                        if let Some(k) = sh.kernel.get() {
                            let _ = k.inval_inode(ino, -1, 0);
                        }
                    }
                    // A tenant's file opens only with its keys (D51):
                    // EACCES if this mount may not have them, ENOKEY if
                    // the tenant has none.
                    if let Some(t) = i.tenant.as_deref().filter(|_| i.is_reg()) {
                        if let Err(e) = sh.tenant_seal(t).await {
                            reply.error(sh.errno(e.0));
                            return;
                        }
                    }
                    let st = sh.file(ino);
                    st.opens.fetch_add(1, Ordering::SeqCst);
                    {
                        let mut f = st.lock().await;
                        if !leased {
                            f.ext.clear();
                        }
                        f.opened_as(&i, sh.opts.ttl());
                    }
                    let fh = sh.open_handle(c);
                    let keep = if leased || sh.opts.cache_mode == CacheMode::Session {
                        fuser::consts::FOPEN_KEEP_CACHE
                    } else {
                        0
                    };
                    reply.opened(fh, keep);
                }
                Err(e) => reply.error(sh.errno(stale_if_gone(e).0)),
            }
        });
    }

    pub(super) fn do_read(&self, ino: u64, offset: i64, size: u32, reply: ReplyData) {
        let sh = self.sh.clone();
        self.spawn("read", async move {
            if offset < 0 {
                reply.error(sh.errno(libc::EINVAL));
                return;
            }
            match sh.read(ino, offset as u64, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(sh.errno(e.0)),
            }
        });
    }

    pub(super) fn do_write(&self, ino: u64, fh: u64, offset: i64, data: &[u8], reply: ReplyWrite) {
        let sh = self.sh.clone();
        let data = data.to_vec();
        self.spawn("write", async move {
            if offset < 0 {
                reply.error(sh.errno(libc::EINVAL));
                return;
            }
            let c = sh.handle_creds(fh);
            match sh.write(ino, offset as u64, data, c).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(sh.errno(e.0)),
            }
        });
    }

    pub(super) fn do_flush(&self, ino: u64, lock_owner: u64, reply: ReplyEmpty) {
        let sh = self.sh.clone();
        self.spawn("flush", async move {
            let r = sh
                .flush(ino, FlushFor::Close)
                .await
                .and_then(|_| sh.failed(ino));
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
            reply_empty(&sh, r, reply);
        });
    }

    pub(super) fn do_release(&self, ino: u64, fh: u64, lock_owner: Option<u64>, reply: ReplyEmpty) {
        let sh = self.sh.clone();
        self.spawn("release", async move {
            let r = sh.flush(ino, FlushFor::Other).await;
            sh.handles.lock().expect("handles lock").remove(&fh);
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
                // Its POSIX locks went with the flushes and this release
                // (an OFD lock left by a closed description is unreachable
                // anyway): nothing to hold for it any more.
                sh.locked.lock().expect("locked lock").remove(&ino);
                let orphan = sh.orphans.lock().expect("orphans lock").remove(&ino);
                if orphan {
                    let _ = sh.mutate(Creds::root(), Op::Reclaim { ino }).await;
                }
            }
            reply_empty(&sh, r, reply);
        });
    }

    pub(super) fn do_fsync(&self, ino: u64, reply: ReplyEmpty) {
        let sh = self.sh.clone();
        self.spawn("fsync", async move {
            let r = match sh.flush(ino, FlushFor::Fsync).await {
                Ok(()) => sh.durable(ino).await,
                Err(e) => Err(e),
            };
            reply_empty(&sh, r, reply);
        });
    }

    pub(super) fn do_fallocate(
        &self,
        c: Creds,
        ino: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let sh = self.sh.clone();
        self.spawn("fallocate", async move {
            if offset < 0 || length <= 0 {
                reply.error(sh.errno(libc::EINVAL));
                return;
            }
            let r = async {
                let st = sh.file(ino);
                let mut f = st.lock().await;
                sh.flush_locked(ino, &mut f).await?;
                sh.mutate_attr(
                    c,
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
            reply_empty(&sh, r, reply);
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_copy_file_range(
        &self,
        c: Creds,
        ino_in: u64,
        offset_in: i64,
        ino_out: u64,
        offset_out: i64,
        len: u64,
        reply: ReplyWrite,
    ) {
        let sh = self.sh.clone();
        self.spawn("copy_file_range", async move {
            match sh
                .copy_range(c, ino_in, offset_in, ino_out, offset_out, len)
                .await
            {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(sh.errno(e.0)),
            }
        });
    }
}
