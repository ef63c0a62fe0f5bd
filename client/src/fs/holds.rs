//! This mount's holds (`cfs_proto::hold`): the shards where it has a lock
//! taken through an open file, or keeps an unlinked file open, renewed
//! every [`cfs_proto::hold::RENEW_EVERY`] so that the servers break them
//! only when the mount is gone (or cut off for longer than the hold). A
//! shard where nothing is held any more is not renewed: its hold lapses
//! harmlessly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use cfs_proto::ops::Op;
use cfs_proto::types::{shard_of, Creds, Errno, ShardId};
use tracing::warn;

use super::Shared;

/// Longest wait for one renewal: a later round must still come before
/// the hold lapses.
const RENEW_WAIT: Duration = Duration::from_secs(8);
const _: () = assert!(
    RENEW_WAIT.as_secs() + 2 * cfs_proto::hold::RENEW_EVERY.as_secs()
        < cfs_proto::hold::HOLD.as_secs()
);

/// How many times each shard's hold was (re)made by this mount: a
/// renewal refused because the hold lapsed forgets what it held only if
/// no new lock or orphan made a new hold meanwhile.
#[derive(Default)]
pub(super) struct Holds {
    made: Mutex<BTreeMap<ShardId, u64>>,
}

impl Holds {
    /// The servers recorded a hold for this mount on `shard`.
    pub(super) fn keep(&self, shard: ShardId) {
        *self
            .made
            .lock()
            .expect("holds lock")
            .entry(shard)
            .or_default() += 1;
    }

    fn made(&self, shard: ShardId) -> u64 {
        self.made
            .lock()
            .expect("holds lock")
            .get(&shard)
            .copied()
            .unwrap_or(0)
    }
}

/// Renews the mount's holds until the mount's state is dropped.
pub(super) async fn renew_forever(sh: Weak<Shared>) {
    let mut tick = tokio::time::interval(cfs_proto::hold::RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(sh) = sh.upgrade() else { return };
        // Every shard at once: one unreachable leader does not delay the
        // others' renewals.
        for shard in sh.held_shards() {
            let sh = sh.clone();
            tokio::spawn(async move { renew(&sh, shard).await });
        }
    }
}

async fn renew(sh: &Arc<Shared>, shard: ShardId) {
    let made = sh.holds.made(shard);
    let r = tokio::time::timeout(
        RENEW_WAIT,
        sh.mutate(Creds::root(), Op::RenewHold { shard }),
    )
    .await;
    match r {
        Ok(Ok(_)) => {}
        Ok(Err(Errno::ESTALE)) if sh.holds.made(shard) == made => {
            warn!(
                shard = %shard,
                "this mount was unreachable for longer than its hold: its locks and \
                 unlinked open files on this shard were released by the cluster"
            );
            sh.forget_held(shard);
        }
        // A new hold was made meanwhile: renewed at the next round.
        Ok(Err(Errno::ESTALE)) => {}
        // Unreachable now: tried again at the next round.
        Ok(Err(e)) => warn!(shard = %shard, "renewing this mount's hold: {e}"),
        Err(_) => warn!(shard = %shard, "renewing this mount's hold: no answer in {RENEW_WAIT:?}"),
    }
}

impl Shared {
    /// Shards where this mount holds a lock (on a file it has open) or an
    /// orphan.
    fn held_shards(&self) -> BTreeSet<ShardId> {
        let locked = self.locked.lock().expect("locked lock").clone();
        let orphans = self.orphans.lock().expect("orphans lock").clone();
        locked.into_iter().chain(orphans).map(shard_of).collect()
    }

    /// The cluster broke this mount's hold on `shard`: nothing there is
    /// held any more (no unlock or reclaim will be sent for it).
    fn forget_held(&self, shard: ShardId) {
        self.locked
            .lock()
            .expect("locked lock")
            .retain(|i| shard_of(*i) != shard);
        self.orphans
            .lock()
            .expect("orphans lock")
            .retain(|i| shard_of(*i) != shard);
    }
}
