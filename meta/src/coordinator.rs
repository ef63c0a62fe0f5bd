//! The cross-shard coordinator: drives the plan → prepare → decide →
//! finish steps of `cfs_materializers::tx` through the log, and recovers
//! transactions whose coordinator died. Generic over [`Cluster`], which the
//! metadata service implements and the tests simulate.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use cfs_materializers::keys;
use cfs_materializers::ops::{Applied, ApplyResult, LoggedOp, Op};
use cfs_materializers::read::Overlaid;
use cfs_materializers::store::{DbError, NamespaceDb, Overlay};
use cfs_materializers::tx::*;
use cfs_materializers::types::*;
use tracing::Instrument;

/// What a coordinator needs from the node it runs on.
pub trait Cluster: Sync {
    /// Proposes `lop` on `shard` and returns the outcome this node's
    /// materializer computed when it applied it.
    fn propose(
        &self,
        shard: ShardId,
        lop: LoggedOp,
    ) -> impl Future<Output = Result<ApplyResult, Errno>> + Send;
    /// Waits until this node applied everything decided on `shard` so far.
    fn barrier(&self, shard: ShardId) -> impl Future<Output = Result<(), Errno>> + Send;
    fn db(&self) -> &NamespaceDb;
    /// Runs `f` over the namespace as this node answers it: the database
    /// and the changes it ordered ahead of anything proposed from now on
    /// (D37). By default the database alone.
    fn view<T>(&self, f: impl FnOnce(&NamespaceDb, &Overlay) -> T) -> T {
        f(self.db(), &Overlay::new())
    }
    /// Waits until no change this node ordered is undecided, before a
    /// proposal that writes namespace keys without being ordered with
    /// them (which the view would otherwise hide). By default nothing.
    fn quiesce(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// The shards of the cluster.
    fn shards(&self) -> &[ShardId];
    /// Levels below the root whose new directories spread over the shards
    /// ([`dir_shard`]).
    fn spread_depth(&self) -> u32 {
        DEFAULT_SPREAD_DEPTH
    }
    /// A fresh (coordinator, sequence) pair: transaction ids and the
    /// operation ids of protocol steps (deduplicated like client ones).
    fn next_id(&self) -> (u64, u64);
    fn now(&self) -> Nanos;
    /// A named point of the protocol, for fault injection in tests.
    fn failpoint(&self, _name: &str) {}
    /// `tx` runs on behalf of `client` (`None`: it ended): the changes its
    /// steps make are that client's own, as a single-shard change's are.
    fn on_behalf(&self, _tx: TxId, _client: Option<u64>) {}
    /// Proposes a finish step of a transaction whose commit decision is
    /// decided. For a `requester` that takes answers before they are
    /// decided (D30), a node may instead order the step and return the
    /// outcome it will have (D37): the decision and every prepare are in
    /// the log already, so nothing can make the step come out otherwise,
    /// and the requester is told once it is decided. By default it waits
    /// for the decision, as [`Cluster::propose`].
    /// `by`: who finishes it (a recovery runs outside the sequencer).
    fn propose_finish(
        &self,
        shard: ShardId,
        lop: LoggedOp,
        by: Finisher,
    ) -> impl Future<Output = Result<ApplyResult, Errno>> + Send {
        let _ = by;
        self.propose(shard, lop)
    }
}

/// Who finishes a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finisher {
    /// Its coordinator, for a client that takes answers given before its
    /// changes are decided (`Some`) or not.
    Coordinator(Option<Requester>),
    /// Recovery of a transaction its coordinator left open.
    Recovery,
}

/// The client operation a transaction runs for, when that client takes
/// answers given before its changes are decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Requester {
    pub client: u64,
    pub op_id: u64,
}

/// How long an operation keeps retrying conflicts before giving up.
pub const EXECUTE_WAIT: Duration = Duration::from_secs(30);

/// Runs a client's operation: on its home shard when it stays there, as a
/// cross-shard transaction otherwise. Retries conflicts with open
/// transactions (with backoff) for up to [`EXECUTE_WAIT`]. `early`: the
/// client takes answers before its changes are decided (a committed
/// transaction's finish steps may then be answered once ordered, D37).
pub async fn execute<C: Cluster>(
    c: &C,
    client: u64,
    op_id: u64,
    creds: Creds,
    op: Op,
    early: bool,
) -> Result<ApplyResult, Errno> {
    let home = op.shard();
    let placement = match &op {
        Op::Create {
            parent, name, mode, ..
        } if mode & libc::S_IFMT == libc::S_IFDIR => Some(c.view(|db, overlay| {
            dir_shard(
                &Overlaid { db, overlay },
                *parent,
                name,
                c.shards(),
                c.spread_depth(),
            )
        }))
        .filter(|s| *s != home),
        _ => None,
    };
    let deadline = Instant::now() + EXECUTE_WAIT;
    let mut cross = placement.is_some() || spans_shards(c, client, &creds, &op, home);
    let mut backoff = Duration::from_millis(1);
    loop {
        let lop = LoggedOp {
            client,
            op_id,
            creds: creds.clone(),
            now: c.now(),
            op: op.clone(),
        };
        if cross {
            let span = tracing::debug_span!("cross_shard", home = %home);
            if let Some(r) = run_cross(c, lop, placement, early).instrument(span).await? {
                return Ok(r);
            }
        } else {
            // Written without the sequencer: after what it ordered.
            c.quiesce().await;
            match c.propose(home, lop).await? {
                Err(Errno::EXDEV) => {
                    cross = true;
                    continue;
                }
                Err(Errno::EAGAIN) => {}
                r => return Ok(r),
            }
        }
        if Instant::now() >= deadline {
            return Err(Errno::EAGAIN);
        }
        let jitter = c.now().unsigned_abs() % (backoff.as_micros() as u64 + 1);
        tokio::time::sleep(backoff / 2 + Duration::from_micros(jitter / 2)).await;
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

/// Whether `op`, planned on this node's replica, reaches another shard
/// than `home` (an unlink or rmdir of a name whose inode lives elsewhere,
/// a rename or link between shards): such an operation goes straight to
/// the cross-shard path instead of first failing on its home shard with
/// EXDEV (one log commit less). Only a hint: a lagging replica's wrong
/// guess costs that commit, never correctness.
fn spans_shards(c: &impl Cluster, client: u64, creds: &Creds, op: &Op, home: ShardId) -> bool {
    if !matches!(
        op,
        Op::Unlink { .. } | Op::Rmdir { .. } | Op::Rename { .. } | Op::Link { .. }
    ) {
        return false;
    }
    let lop = LoggedOp {
        client,
        op_id: 0,
        creds: creds.clone(),
        now: 0,
        op: op.clone(),
    };
    c.view(|db, overlay| plan_over(db, overlay, &lop, None))
        .is_ok_and(|p| p.parts.keys().any(|s| *s != home))
}

/// One attempt of a cross-shard operation: `None` if it lost a conflict
/// (retry).
async fn run_cross<C: Cluster>(
    c: &C,
    lop: LoggedOp,
    placement: Option<ShardId>,
    early: bool,
) -> Result<Option<ApplyResult>, Errno> {
    let (coordinator, seq) = c.next_id();
    let tx = TxId::new(coordinator, seq);
    c.on_behalf(tx, Some(lop.client));
    let r = run_cross_as(c, tx, lop, placement, early).await;
    c.on_behalf(tx, None);
    r
}

/// [`run_cross`] as transaction `tx`.
async fn run_cross_as<C: Cluster>(
    c: &C,
    tx: TxId,
    lop: LoggedOp,
    placement: Option<ShardId>,
    early: bool,
) -> Result<Option<ApplyResult>, Errno> {
    let home = lop.op.shard();
    let new_ino = placement.map(|s| tx_ino(s, tx));
    let db_err = |e: DbError| {
        tracing::error!("planning a cross-shard operation: {e}");
        Errno::EIO
    };
    let planned = c
        .view(|db, overlay| plan_over(db, overlay, &lop, new_ino))
        .map_err(db_err)?;
    if planned.locked {
        return Ok(None);
    }
    let applied = match planned.outcome {
        Ok(a) => a,
        Err(e) => {
            // Decide on fresh state: an earlier attempt of this very
            // operation may have committed (its outcome is recorded on
            // the home shard), or this replica may lag. Not over changes
            // answered early and still undecided: an error is answered
            // only from decided state (D30).
            c.quiesce().await;
            for s in planned.parts.keys() {
                c.barrier(*s).await?;
            }
            let k = keys::outcome(home, lop.client, lop.op_id);
            if lop.op_id != 0 {
                let recorded = c.view(|db, overlay| {
                    cfs_materializers::read::NsRead::value::<ApplyResult>(
                        &Overlaid { db, overlay },
                        &k,
                    )
                });
                if let Some(r) = recorded.map_err(db_err)? {
                    return Ok(Some(r));
                }
            }
            let again = c
                .view(|db, overlay| plan_over(db, overlay, &lop, new_ino))
                .map_err(db_err)?;
            match again.outcome {
                Err(e2) if e2 == e && !again.locked => return Ok(Some(Err(e))),
                _ => return Ok(None),
            }
        }
    };
    if planned.parts.values().all(|p| p.writes.is_empty()) {
        // Nothing to commit, so nothing validates the plan's reads: answer
        // only from state that is current on every shard it read, and
        // decided.
        c.quiesce().await;
        for s in planned.parts.keys() {
            c.barrier(*s).await?;
        }
        let again = c
            .view(|db, overlay| plan_over(db, overlay, &lop, new_ino))
            .map_err(db_err)?;
        let same = !again.locked
            && again.outcome == Ok(applied.clone())
            && again.parts.values().all(|p| p.writes.is_empty());
        return Ok(same.then_some(Ok(applied)));
    }
    let requester = (early && lop.op_id != 0).then_some(Requester {
        client: lop.client,
        op_id: lop.op_id,
    });
    let end = run_tx(
        c,
        tx,
        home,
        planned.parts,
        &lop,
        Ok(applied.clone()),
        requester,
    )
    .await?;
    match end {
        TxEnd::Committed => Ok(Some(Ok(applied))),
        TxEnd::Recorded(r) => Ok(Some(r)),
        TxEnd::Aborted(participants) => {
            for s in participants {
                c.barrier(s).await?;
            }
            Ok(None)
        }
    }
}

/// How a transaction ended.
pub enum TxEnd {
    Committed,
    /// An earlier attempt of the same operation had committed: its outcome.
    Recorded(ApplyResult),
    /// Aborted (a prepare failed); the participants.
    Aborted(Vec<ShardId>),
}

/// A protocol step as a log entry of the coordinator (deduplicated by its
/// own operation id, like a client's).
fn step(c: &impl Cluster, now: Nanos, op: Op) -> LoggedOp {
    let (coordinator, op_id) = c.next_id();
    LoggedOp {
        client: coordinator,
        op_id,
        creds: Creds {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        },
        now,
        op,
    }
}

/// Prepare, decide and finish transaction `tx` of operation `lop`. A
/// failed proposal returns the error and leaves the rest to [`recover`].
/// The caller waits for two commit rounds (the prepares, in parallel; the
/// decision); a committed transaction's finishes may be answered once
/// ordered, for a `requester` that takes such answers (D37).
pub async fn run_tx<C: Cluster>(
    c: &C,
    tx: TxId,
    home: ShardId,
    parts: BTreeMap<ShardId, Part>,
    lop: &LoggedOp,
    outcome: ApplyResult,
    requester: Option<Requester>,
) -> Result<TxEnd, Errno> {
    let participants: Vec<ShardId> = parts.keys().copied().collect();
    let now = c.now();
    let prepares = parts.into_iter().map(|(shard, part)| {
        let op = Op::TxPrepare {
            tx,
            shard,
            home,
            participants: participants.clone(),
            part,
        };
        c.propose(shard, step(c, now, op))
    });
    let mut ok = true;
    let mut invalid = None;
    for r in futures::future::join_all(prepares).await {
        match r? {
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(?tx, "prepare refused: {e}");
                ok = false;
                // Conflicts (EAGAIN: locked, ESTALE: the plan's reads
                // changed) are retried; anything else is a bug that a
                // retry would only repeat.
                if e != Errno::EAGAIN && e != Errno::ESTALE {
                    invalid = Some(e);
                }
            }
        }
    }
    c.failpoint("tx-after-prepare");
    let decide = Op::TxDecide {
        tx,
        shard: home,
        commit: ok,
        client: lop.client,
        op_id: lop.op_id,
        outcome,
        participants: participants.clone(),
    };
    let (commit, recorded) = match c.propose(home, step(c, now, decide)).await? {
        Ok(Applied::Decision { commit, outcome }) => (commit, outcome),
        other => {
            tracing::error!(?tx, "unexpected decision outcome: {other:?}");
            return Err(Errno::EIO);
        }
    };
    c.failpoint("tx-after-decide");
    // An abort is finished before the retry plans again (it reads the
    // database, where the locks must be gone).
    let requester = requester.filter(|_| commit);
    finish_all(
        c,
        tx,
        home,
        &participants,
        commit,
        Finisher::Coordinator(requester),
    )
    .await?;
    if let (Some(e), false) = (invalid, commit) {
        tracing::error!(?tx, ?lop, "a participant refused the plan as invalid: {e}");
        return Err(Errno::EIO);
    }
    Ok(match recorded {
        Some(r) => TxEnd::Recorded(*r),
        None if commit => TxEnd::Committed,
        None => TxEnd::Aborted(participants),
    })
}

/// Finishes `tx` on every participant, the home shard (which holds the
/// decision) last.
pub async fn finish_all<C: Cluster>(
    c: &C,
    tx: TxId,
    home: ShardId,
    participants: &[ShardId],
    commit: bool,
    by: Finisher,
) -> Result<(), Errno> {
    let now = c.now();
    let others = participants.iter().filter(|s| **s != home).map(|s| {
        let op = Op::TxFinish {
            tx,
            shard: *s,
            commit,
        };
        c.propose_finish(*s, step(c, now, op), by)
    });
    for r in futures::future::join_all(others).await {
        if let Err(e) = r? {
            tracing::error!(?tx, "finish refused: {e}");
            return Err(Errno::EIO);
        }
    }
    c.failpoint("tx-after-finish-others");
    let op = Op::TxFinish {
        tx,
        shard: home,
        commit,
    };
    if let Err(e) = c.propose_finish(home, step(c, now, op), by).await? {
        tracing::error!(?tx, "finish refused: {e}");
        return Err(Errno::EIO);
    }
    Ok(())
}

/// Completes every transaction left open longer than `older_than`: one
/// with an intent here gets an abort decision unless a decision exists,
/// and is finished the way the decision says; one decided but never
/// finished is finished. A transaction whose shards do not answer is
/// skipped (tried again next time). Returns how many it completed.
pub async fn recover<C: Cluster>(c: &C, older_than: Duration) -> Result<usize, Errno> {
    let now = c.now();
    let old = |t: Nanos| now.saturating_sub(t) >= older_than.as_nanos() as i64;
    let db_err = |e: DbError| {
        tracing::error!("reading open transactions: {e}");
        Errno::EIO
    };
    let mut todo: BTreeMap<TxId, (ShardId, Vec<ShardId>, Option<bool>)> = BTreeMap::new();
    for (_, tx, intent) in intents(c.db()).map_err(db_err)? {
        if old(intent.since) {
            todo.entry(tx)
                .or_insert((intent.home, intent.participants, None));
        }
    }
    for (home, tx, d) in decisions(c.db()).map_err(db_err)? {
        if !d.finished && old(d.decided_at) {
            todo.insert(tx, (home, d.participants, Some(d.commit)));
        }
    }
    let mut done = 0;
    for (tx, (home, participants, decided)) in todo {
        let r = async {
            let commit = match decided {
                Some(c) => c,
                None => {
                    let decide = Op::TxDecide {
                        tx,
                        shard: home,
                        commit: false,
                        client: 0,
                        op_id: 0,
                        outcome: Err(Errno::EIO),
                        participants: participants.clone(),
                    };
                    match c.propose(home, step(c, now, decide)).await? {
                        Ok(Applied::Decision { commit, .. }) => commit,
                        other => {
                            tracing::error!(?tx, "unexpected decision outcome: {other:?}");
                            return Err(Errno::EIO);
                        }
                    }
                }
            };
            tracing::info!(
                ?tx,
                commit,
                "recovering a transaction its coordinator left open"
            );
            finish_all(c, tx, home, &participants, commit, Finisher::Recovery).await
        }
        .await;
        match r {
            Ok(()) => done += 1,
            Err(e) => tracing::warn!(?tx, "recovering a transaction: {e} (will retry)"),
        }
    }
    Ok(done)
}
