//! The namespace materializer: one task per shard reads decided entries in
//! order, applies them to RocksDB in batches (state and applied position in
//! one atomic write), tells waiting proposers the outcome and publishes
//! what changed so clients can drop their caches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cfs_log::{Entry, LogError, RequestId, Subscription};
use tokio::sync::{broadcast, oneshot, watch};
use tracing::{error, info, warn};

use crate::apply::{apply, ensure_root};
use crate::ops::{Applied, ApplyResult, LoggedOp, Op, KIND_NAMESPACE};
use crate::store::{DbError, NamespaceDb, Txn};
use crate::types::*;

/// Entries applied per RocksDB batch at most.
pub const BATCH_ENTRIES_MAX: usize = 512;
/// How often applied state is synced and reported to the log as persisted.
pub const PERSIST_INTERVAL: Duration = Duration::from_millis(500);
/// Subscriber name holding back log trimming.
pub const SUBSCRIBER: &str = "namespace";

/// Something a client may have cached changed; published after each
/// applied batch (one with nothing changed, `origin` 0, marks progress).
#[derive(Clone, Debug)]
pub struct Change {
    /// Client whose operation it was (it updates its own cache).
    pub origin: u64,
    /// The cross-shard transaction whose step made the change (`origin`
    /// is then its coordinator; the metadata service knows which client
    /// asked for it).
    pub tx: Option<cfs_proto::tx::TxId>,
    /// The client's operation id (0: none), so the node can tell a change
    /// it answered early, whose invalidations went out with the answer.
    pub op_id: u64,
    pub inodes: Vec<Ino>,
    pub entries: Vec<(Ino, Vec<u8>)>,
    pub shard: ShardId,
    /// The applied position after the batch that made this change.
    pub upto: Position,
}

/// Proposers waiting for the outcome of their entries.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<RequestId, oneshot::Sender<ApplyResult>>>,
    /// Applied entries nobody here waited for, per shard: proposed through
    /// another node, or given up on (the sequencer rebuilds its overlay
    /// when this moves on a shard it has changes pending on, since such
    /// an entry changed state it did not foresee).
    unclaimed: Mutex<HashMap<ShardId, u64>>,
}

impl Waiters {
    pub fn register(&self, id: RequestId) -> oneshot::Receiver<ApplyResult> {
        let (tx, rx) = oneshot::channel();
        self.map.lock().expect("waiters lock").insert(id, tx);
        rx
    }
    pub fn forget(&self, id: RequestId) {
        self.map.lock().expect("waiters lock").remove(&id);
    }
    fn complete(&self, shard: ShardId, id: RequestId, r: ApplyResult) {
        match self.map.lock().expect("waiters lock").remove(&id) {
            Some(tx) => {
                let _ = tx.send(r);
            }
            None => {
                *self
                    .unclaimed
                    .lock()
                    .expect("unclaimed lock")
                    .entry(shard)
                    .or_default() += 1;
            }
        }
    }

    /// How many applied entries of `shard` had no waiter here so far.
    pub fn unclaimed(&self, shard: ShardId) -> u64 {
        self.unclaimed
            .lock()
            .expect("unclaimed lock")
            .get(&shard)
            .copied()
            .unwrap_or(0)
    }
}

/// Per-shard applied positions, observable.
pub struct Progress {
    pub applied: watch::Receiver<Position>,
}

#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("log: {0}")]
    Log(#[from] LogError),
}

/// Encodes `op` as a namespace log entry.
pub fn entry(request: RequestId, op: &LoggedOp) -> Entry {
    Entry {
        kind: cfs_log::EntryKind(KIND_NAMESPACE),
        request,
        payload: bytes::Bytes::from(bincode::serialize(op).expect("ops serialize")),
    }
}

/// What applying `op` with result `r` changed that a client may cache
/// (besides the inodes the entry rewrote, which the caller adds).
pub fn changes(op: &LoggedOp, r: &Applied) -> Change {
    let tx = match &op.op {
        Op::TxPrepare { tx, .. } | Op::TxDecide { tx, .. } | Op::TxFinish { tx, .. } => Some(*tx),
        _ => None,
    };
    let mut ch = Change {
        origin: op.client,
        tx,
        op_id: op.op_id,
        inodes: Vec::new(),
        entries: Vec::new(),
        shard: ShardId(0),
        upto: Position::ZERO,
    };
    let touched = match r {
        Applied::Attr(i) => Some(i.ino),
        _ => None,
    };
    match &op.op {
        Op::Create { parent, name, .. } | Op::Link { parent, name, .. } => {
            ch.inodes.push(*parent);
            ch.entries.push((*parent, name.clone()));
        }
        Op::Unlink { parent, name, .. } | Op::Rmdir { parent, name } => {
            ch.inodes.push(*parent);
            ch.entries.push((*parent, name.clone()));
        }
        Op::Rename {
            parent,
            name,
            newparent,
            newname,
            ..
        } => {
            ch.inodes.push(*parent);
            ch.inodes.push(*newparent);
            ch.entries.push((*parent, name.clone()));
            ch.entries.push((*newparent, newname.clone()));
        }
        // A snapshot's entries (D52) are those of `DIR/.snapshots`.
        Op::SetXattr { ino, .. } => {
            ch.inodes.push(*ino);
            if let Applied::Changed { inodes, entries } = r {
                ch.inodes.extend(inodes);
                ch.entries.extend(entries.iter().cloned());
            }
        }
        Op::SetAttr { ino, .. }
        | Op::RemoveXattr { ino, .. }
        | Op::Write { ino, .. }
        | Op::Fallocate { ino, .. } => ch.inodes.push(*ino),
        Op::Lock { .. }
        | Op::ReleaseLocks { .. }
        | Op::Reclaim { .. }
        | Op::RenewHold { .. }
        | Op::ForgetIdleClients { .. }
        | Op::ConsumeToken { .. }
        | Op::FenceSegments { .. }
        | Op::AddTenantKey { .. }
        | Op::ReencryptProgress { .. } => {}
        Op::ExpireHold { .. }
        | Op::RelocateExtents { .. }
        | Op::TxPrepare { .. }
        | Op::TxDecide { .. }
        | Op::TxFinish { .. } => {
            if let Applied::Changed { inodes, entries } = r {
                ch.inodes.extend(inodes);
                ch.entries.extend(entries.iter().cloned());
            }
            return ch;
        }
    }
    if let Some(i) = touched {
        if !ch.inodes.contains(&i) {
            ch.inodes.push(i);
        }
    }
    ch
}

/// The outcome of one entry, for whoever proposed it.
pub type Outcome = (RequestId, ApplyResult);

/// Applies `entries` (starting at the database's applied position) in one
/// batch. Returns each entry's request id and outcome (namespace entries
/// only) and the changes.
pub fn apply_batch(
    db: &NamespaceDb,
    shard: ShardId,
    entries: &[(Position, Entry)],
) -> Result<(Vec<Outcome>, Vec<Change>), DbError> {
    let mut txn = Txn::new(db);
    ensure_root(&mut txn, shard)?;
    let mut results = Vec::new();
    let mut chs = Vec::new();
    let Some(last) = entries.last().map(|(p, _)| *p) else {
        return Ok((results, chs));
    };
    for (pos, e) in entries {
        if e.kind == cfs_log::EntryKind::BARRIER {
            crate::apply::new_term(&mut txn, shard)?;
            // Unforeseen by any sequencer: one with changes pending
            // rebuilds its overlay (`Waiters::unclaimed`).
            results.push((e.request, Ok(Applied::None)));
            continue;
        }
        if e.kind.0 != KIND_NAMESPACE {
            continue;
        }
        let r = match cfs_frame::decode_body::<LoggedOp>(&e.payload, crate::ops::MESSAGE_BYTES_MAX)
        {
            Ok(op) => {
                let r = apply(&mut txn, shard, &op)?;
                // Every inode the entry rewrote (a rename's replaced
                // file, a link's target), besides what the op names.
                let written = txn.take_kept_inodes();
                if let Ok(a) = &r {
                    let mut ch = changes(&op, a);
                    for i in written {
                        if !ch.inodes.contains(&i) {
                            ch.inodes.push(i);
                        }
                    }
                    chs.push(ch);
                }
                r
            }
            Err(reason) => {
                warn!(shard = %shard, pos = %pos, "undecodable namespace entry: {reason}");
                Err(Errno::EINVAL)
            }
        };
        results.push((e.request, r));
    }
    db.commit(txn, shard, last + 1)?;
    Ok((results, chs))
}

/// Prepares `shard`'s initial state (the root directory lives on shard 0)
/// if the database has none yet.
pub fn init_shard(db: &NamespaceDb, shard: ShardId) -> Result<(), DbError> {
    let mut txn = Txn::new(db);
    ensure_root(&mut txn, shard)?;
    if !txn.is_empty() {
        let at = db.applied(shard)?;
        db.commit(txn, shard, at)?;
    }
    Ok(())
}

/// Runs shard `shard`'s materializer until the log shuts down.
pub async fn run_shard(
    db: Arc<NamespaceDb>,
    shard: ShardId,
    mut sub: Subscription,
    waiters: Arc<Waiters>,
    applied: watch::Sender<Position>,
    changes_tx: broadcast::Sender<Change>,
    apply_seconds: cfs_metrics::Histogram,
) -> Result<(), MaterializeError> {
    let mut last_sync = Instant::now();
    let mut unsynced = false;
    info!(
        shard = %shard,
        from = %sub.position(),
        "namespace materializer started"
    );
    loop {
        let batch = tokio::select! {
            b = sub.next_batch(BATCH_ENTRIES_MAX) => b,
            _ = tokio::time::sleep(PERSIST_INTERVAL), if unsynced => Ok(Vec::new()),
        };
        let batch = match batch {
            Ok(b) => b,
            Err(LogError::ShuttingDown) => return Ok(()),
            Err(e) => {
                error!(shard = %shard, "namespace materializer stopped: {e}");
                return Err(e.into());
            }
        };
        if let Some((last, _)) = batch.last() {
            let last = *last;
            let (results, chs) = {
                let _s = tracing::debug_span!("apply_batch", shard = %shard, entries = batch.len())
                    .entered();
                let started = Instant::now();
                let r = apply_batch(&db, shard, &batch)?;
                apply_seconds.observe(started.elapsed().as_secs_f64());
                r
            };
            applied.send_replace(last + 1);
            for (id, r) in results {
                waiters.complete(shard, id, r);
            }
            if chs.is_empty() {
                let _ = changes_tx.send(Change {
                    origin: 0,
                    tx: None,
                    op_id: 0,
                    inodes: Vec::new(),
                    entries: Vec::new(),
                    shard,
                    upto: last + 1,
                });
            }
            for mut c in chs {
                c.shard = shard;
                c.upto = last + 1;
                let _ = changes_tx.send(c);
            }
            unsynced = true;
        }
        if unsynced && last_sync.elapsed() >= PERSIST_INTERVAL {
            db.sync()?;
            sub.persisted(*applied.borrow());
            last_sync = Instant::now();
            unsynced = false;
        }
    }
}
