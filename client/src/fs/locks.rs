//! POSIX record locks: a lock request in the server's form, getlk and
//! setlk (a blocking setlk retries with backoff while it conflicts).

use std::time::Duration;

use cfs_proto::ops::Op;
use cfs_proto::rpc::{GetLock, Mutated};
use cfs_proto::types::{Creds, LockRange};
use fuser::{ReplyEmpty, ReplyLock};

use super::{CfsFs, Shared};

impl Shared {
    /// A lock request of this mount from FUSE's inclusive range.
    pub(super) fn lock_range(
        &self,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
    ) -> LockRange {
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
}

impl CfsFs {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_getlk(
        &self,
        ino: u64,
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
                Err(e) => reply.error(sh.errno(e.0)),
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_setlk(
        &self,
        c: Creds,
        ino: u64,
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
                        c.clone(),
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
                    Ok(Mutated::Conflict(_)) => return reply.error(sh.errno(libc::EAGAIN)),
                    Ok(_) => {
                        if typ != libc::F_UNLCK {
                            sh.holds.keep(cfs_proto::types::shard_of(ino));
                        }
                        return reply.ok();
                    }
                    Err(e) => return reply.error(sh.errno(e.0)),
                }
            }
        });
    }
}
