//! The mount as a whole: what init negotiates with the kernel, the leases
//! destroy gives back, statfs, and the hooks through which other clients'
//! changes reach this mount (the inodes the kernel knows, dropping cached
//! state).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cfs_proto::rpc::StatFs;
use cfs_proto::types::{Ino, NAME_MAX};
use fuser::{KernelConfig, ReplyStatfs};

use super::CfsFs;

impl CfsFs {
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

    /// Where the mount puts the kernel's side of the FUSE session once
    /// mounted, for the attribute invalidations an open needs (`files.rs`).
    pub fn kernel_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.sh.kernel.clone()
    }

    /// Drops this mount's cached state of `ino` (another client changed it;
    /// 0: everything).
    pub fn forget_cached(&self) -> Arc<dyn Fn(Ino) + Send + Sync> {
        let sh = self.sh.clone();
        Arc::new(move |ino| {
            if ino == 0 {
                // Everything (a new session, or changes missed).
                sh.dirs.forget_all();
                for st in sh.all_files() {
                    st.forget();
                }
                return;
            }
            sh.dirs.forget(ino);
            let st = sh.files.lock().expect("files lock").get(&ino).cloned();
            if let Some(st) = st {
                st.forget();
            }
        })
    }

    pub(super) fn do_init(&self, config: &mut KernelConfig) -> Result<(), libc::c_int> {
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
        // The nodes drop set-user-ID on a write, truncate or chown by
        // anyone but root (D42): the kernel's own attempt is a chmod by
        // the writer, which the nodes refuse to a non-owner.
        for flag in [
            FUSE_DO_READDIRPLUS,
            FUSE_READDIRPLUS_AUTO,
            FUSE_CACHE_SYMLINKS,
            FUSE_HANDLE_KILLPRIV,
            // POSIX ACLs: the kernel checks them (from getxattr, cached)
            // as the nodes do, and leaves the umask to the node, which
            // applies it unless the directory has a default ACL.
            FUSE_POSIX_ACL,
            FUSE_DONT_MASK,
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

    pub(super) fn do_destroy(&self) {
        // Other mounts' changes need not wait for this mount's leases to
        // run out.
        // (The timer is made inside the runtime: outside, tokio panics.)
        let sh = self.sh.clone();
        let release = async move {
            // Changes answered early settle before the mount goes (a
            // mount that is killed instead replays nothing: what was not
            // settled may be lost, as unsynced changes of a local disk).
            if let Err(e) = sh.meta.unsettled.settle_all(sh.opts.timeout).await {
                tracing::warn!(
                    pending = sh.meta.unsettled.len(),
                    "unmount: changes not settled: {e}"
                );
            }
            let send = async move {
                sh.meta.release_leases().await;
                // Let the writer send it before the runtime goes.
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
        };
        self.rt.block_on(release);
    }

    pub(super) fn do_statfs(&self, reply: ReplyStatfs) {
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
                Err(e) => reply.error(sh.errno(e.0)),
            }
        });
    }
}
