//! This mount's holds (`cfs_proto::hold`): the shards where it has taken a
//! lock or keeps an unlinked file open, renewed every
//! [`cfs_proto::hold::RENEW_EVERY`] so that the servers break them only
//! when the mount is gone (or cut off for longer than the hold).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, Weak};

use cfs_proto::ops::Op;
use cfs_proto::types::{Creds, Errno, ShardId};
use tracing::warn;

use super::Shared;

/// Shards this mount renews a hold on.
#[derive(Default)]
pub(super) struct Holds {
    shards: Mutex<BTreeSet<ShardId>>,
}

impl Holds {
    /// The servers recorded a hold for this mount on `shard`.
    pub(super) fn keep(&self, shard: ShardId) {
        self.shards.lock().expect("holds lock").insert(shard);
    }

    fn list(&self) -> Vec<ShardId> {
        self.shards
            .lock()
            .expect("holds lock")
            .iter()
            .copied()
            .collect()
    }

    fn drop_shard(&self, shard: ShardId) {
        self.shards.lock().expect("holds lock").remove(&shard);
    }
}

/// Renews the mount's holds until the mount's state is dropped.
pub(super) async fn renew_forever(sh: Weak<Shared>) {
    loop {
        tokio::time::sleep(cfs_proto::hold::RENEW_EVERY).await;
        let Some(sh) = sh.upgrade() else { return };
        renew(&sh).await;
    }
}

async fn renew(sh: &Arc<Shared>) {
    for shard in sh.holds.list() {
        match sh.mutate(Creds::root(), Op::RenewHold { shard }).await {
            Ok(_) => {}
            Err(Errno::ESTALE) => {
                warn!(
                    shard = %shard,
                    "this mount was unreachable for longer than its hold: its locks and \
                     unlinked open files on this shard were released by the cluster"
                );
                sh.holds.drop_shard(shard);
            }
            // Unreachable now: tried again at the next round.
            Err(e) => warn!(shard = %shard, "renewing this mount's hold: {e}"),
        }
    }
}
