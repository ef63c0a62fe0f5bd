//! Cross-shard operations: a presumed-abort two-phase commit whose every
//! step is an entry in a shard's log.
//!
//! A shard's entries may only read and write that shard's keys (see
//! [`crate::keys::owner`]), so an operation that spans shards (a directory
//! placed on another shard, a rename or link between directories of two
//! shards, removing a name whose inode lives elsewhere) runs in three
//! phases, driven by the metadata service that received it (the
//! *coordinator*):
//!
//! 1. **Plan** (local, no log): the coordinator runs the operation against
//!    its own replica of every shard ([`plan`]) and records what it read,
//!    scanned and wrote, split by shard into [`Part`]s.
//! 2. **Prepare** on each participant: the part's reads are compared with
//!    the shard's state at that log position (compare-and-swap), and its
//!    keys are locked. A mismatch or a key another transaction holds fails
//!    the prepare.
//! 3. **Decide** on the home shard (the operation's parent directory's): the
//!    first decision entry for a transaction wins; it is the commit point
//!    and records the operation's outcome for retries of the same client
//!    operation.
//! 4. **Finish** on each participant (the home shard last, which then
//!    forgets the decision): commit writes the planned values, abort drops
//!    them; both release the locks.
//!
//! While a key is locked, ordinary entries that read or write it fail with
//! EAGAIN (not recorded; the proposer retries), so a transaction is
//! serializable with everything else on its shards.
//!
//! Recovery: any node finds intents older than a timeout ([`recover`]),
//! proposes an abort decision (which loses if a commit got there first) and
//! finishes the transaction the way the winning decision says. A
//! coordinator crash between any two phases therefore ends with every
//! participant committed or every participant aborted.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::apply::{Fail, R2};
use crate::keys;
use crate::ops::{Applied, ApplyResult, LoggedOp, Op};
use crate::store::{decode, DbError, NamespaceDb, Scan, Txn};
use crate::types::*;

pub use cfs_proto::tx::{Part, TxId};

/// A prepared part, waiting for its decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub home: ShardId,
    pub participants: Vec<ShardId>,
    pub part: Part,
    /// The coordinator's clock when it proposed the prepare.
    pub since: Nanos,
}

/// Applies a protocol step (decided on `shard`).
pub(crate) fn apply(t: &mut Txn<'_>, shard: ShardId, lop: &LoggedOp) -> R2<Applied> {
    match &lop.op {
        Op::TxPrepare {
            tx,
            shard: s,
            home,
            participants,
            part,
        } if *s == shard => prepare(t, shard, *tx, *home, participants, part, lop.now),
        Op::TxDecide {
            tx,
            shard: s,
            commit,
            client,
            op_id,
            outcome,
            participants,
        } if *s == shard => {
            let d = Decision {
                commit: *commit,
                client: *client,
                op_id: *op_id,
                outcome: outcome.clone(),
                participants: participants.clone(),
                decided_at: lop.now,
                finished: false,
            };
            decide(t, shard, *tx, d)
        }
        Op::TxFinish {
            tx,
            shard: s,
            commit,
        } if *s == shard => finish(t, shard, *tx, *commit, lop.now),
        _ => Err(Errno::EINVAL.into()),
    }
}

fn open_intents(t: &Txn<'_>, shard: ShardId) -> R2<u64> {
    let k = keys::open_intents(shard);
    Ok(match t.peek(&k)? {
        Some(v) => decode(&k, &v)?,
        None => 0,
    })
}

fn locked(t: &Txn<'_>, key: &[u8]) -> R2<bool> {
    Ok(t.peek(&keys::tx_lock(key))?.is_some())
}

fn range_locked(t: &Txn<'_>, start: &[u8], end: &[u8]) -> R2<bool> {
    Ok(!t
        .scan(&keys::tx_lock(start), &keys::tx_lock(end))?
        .is_empty())
}

/// Fails an ordinary entry (EAGAIN, not recorded) that read, scanned or
/// wrote a key an open transaction on `shard` holds.
pub(crate) fn check_locks(t: &Txn<'_>, shard: ShardId) -> R2<()> {
    if open_intents(t, shard)? == 0 {
        return Ok(());
    }
    let fp = t.footprint();
    for k in fp.reads.keys().chain(fp.writes.keys()) {
        if keys::is_data(k) && locked(t, k)? {
            return Err(Fail::Retry(Errno::EAGAIN));
        }
    }
    for (start, end, _) in &fp.scans {
        if range_locked(t, start, end)? {
            return Err(Fail::Retry(Errno::EAGAIN));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    t: &mut Txn<'_>,
    shard: ShardId,
    tx: TxId,
    home: ShardId,
    participants: &[ShardId],
    part: &Part,
    now: Nanos,
) -> R2<Applied> {
    let own = |k: &[u8]| keys::is_data(k) && keys::owner(k) == Some(shard);
    // A scan stays within one inode's keys of this shard: from a key of
    // it up to the end of that inode's prefix at most (the end bound
    // itself may be shorter: prefix_end of an ino ending in 0xff).
    let scan_ok = |(start, end, _): &Scan| {
        own(start)
            && start < end
            && keys::inode_scope(start).is_some_and(|scope| *end <= keys::prefix_end(scope))
    };
    if !part.keys().into_iter().all(own)
        || !part.scans.iter().all(scan_ok)
        || !participants.contains(&shard)
        || !participants.contains(&home)
    {
        return Err(Errno::EINVAL.into());
    }
    if t.peek(&keys::intent(shard, tx))?.is_some() {
        return Ok(Applied::None);
    }
    // A prepare that arrives after its transaction was decided (a slow
    // coordinator whose transaction recovery already aborted) must not
    // lock anything.
    if shard == home && t.peek(&keys::decision(shard, tx))?.is_some() {
        return Err(Errno::ESTALE.into());
    }
    for k in part.keys() {
        if locked(t, k)? {
            return Err(Errno::EAGAIN.into());
        }
    }
    for (start, end, _) in &part.scans {
        if range_locked(t, start, end)? {
            return Err(Errno::EAGAIN.into());
        }
    }
    for (k, v) in &part.reads {
        if t.get_raw(k)? != *v {
            return Err(Errno::ESTALE.into());
        }
    }
    for (start, end, found) in &part.scans {
        if t.scan(start, end)? != *found {
            return Err(Errno::ESTALE.into());
        }
    }
    for k in part.keys() {
        t.put(keys::tx_lock(k), &tx);
    }
    let intent = Intent {
        home,
        participants: participants.to_vec(),
        part: part.clone(),
        since: now,
    };
    t.put(keys::intent(shard, tx), &intent);
    let n = open_intents(t, shard)?;
    t.put(keys::open_intents(shard), &(n + 1));
    Ok(Applied::None)
}

/// The decision record on the home shard. It stays after the transaction
/// finished ([`DECISION_KEEP`]), so that a late step of a slow coordinator
/// (a commit decision after recovery aborted, a prepare after the finish)
/// finds the decision instead of starting it afresh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub commit: bool,
    pub client: u64,
    pub op_id: u64,
    pub outcome: ApplyResult,
    pub participants: Vec<ShardId>,
    /// The deciding entry's time.
    pub decided_at: Nanos,
    /// The home shard finished (so every participant did).
    pub finished: bool,
}

/// How long a finished decision is kept (by the entries' own clocks).
pub const DECISION_KEEP: Duration = Duration::from_secs(600);

fn decide(t: &mut Txn<'_>, shard: ShardId, tx: TxId, mut d: Decision) -> R2<Applied> {
    let dk = keys::decision(shard, tx);
    if let Some(v) = t.peek(&dk)? {
        let d: Decision = decode(&dk, &v)?;
        return Ok(Applied::Decision {
            commit: d.commit,
            outcome: None,
        });
    }
    let mut recorded = None;
    if d.commit && d.op_id != 0 {
        if let Some(r) = t.get::<ApplyResult>(&keys::outcome(shard, d.client, d.op_id))? {
            // An earlier attempt of the same operation committed.
            recorded = Some(Box::new(r));
            d.commit = false;
        }
    }
    // The home shard is always a participant and prepared before a commit
    // is proposed: without its intent (recovery aborted it) commit is not
    // possible.
    if d.commit && t.peek(&keys::intent(shard, tx))?.is_none() {
        d.commit = false;
    }
    let commit = d.commit;
    if !commit {
        d.op_id = 0;
    }
    t.put(dk, &d);
    Ok(Applied::Decision {
        commit,
        outcome: recorded,
    })
}

fn finish(t: &mut Txn<'_>, shard: ShardId, tx: TxId, commit: bool, now: Nanos) -> R2<Applied> {
    let ik = keys::intent(shard, tx);
    let mut inodes = Vec::new();
    let mut entries = Vec::new();
    if let Some(v) = t.peek(&ik)? {
        let intent: Intent = decode(&ik, &v)?;
        for k in intent.part.keys() {
            t.delete(keys::tx_lock(k));
        }
        if commit {
            for (k, v) in &intent.part.writes {
                match v {
                    Some(v) => t.put_raw(k.clone(), v.clone()),
                    None => t.delete(k.clone()),
                }
                if let Some(i) = keys::inode_of(k) {
                    inodes.push(i);
                } else if let Some((parent, name)) = keys::dentry_of(k) {
                    entries.push((parent, name.to_vec()));
                }
            }
        }
        t.delete(ik);
        let n = open_intents(t, shard)?;
        t.put(keys::open_intents(shard), &n.saturating_sub(1));
    }
    // The home shard finishes last: the operation is now complete
    // everywhere, so a retry of it may get its outcome (recording it at
    // the decision would answer a retry before the changes are visible).
    let dk = keys::decision(shard, tx);
    if let Some(v) = t.peek(&dk)? {
        let mut d: Decision = decode(&dk, &v)?;
        if !d.finished {
            if d.commit && d.op_id != 0 {
                t.put(keys::outcome(shard, d.client, d.op_id), &d.outcome);
            }
            d.finished = true;
            t.put(dk, &d);
            t.put_raw(keys::decision_age(shard, now.max(0) as u64, tx), Vec::new());
        }
        // Forget decisions finished long ago (a few per finish).
        let p = keys::decision_age_prefix(shard);
        let cutoff = (now.max(0) as u64).saturating_sub(DECISION_KEEP.as_nanos() as u64);
        let old = t.scan(&p, &keys::decision_age(shard, cutoff, TxId::new(0, 0)))?;
        for (k, _) in old.into_iter().take(8) {
            if let Some(tx_old) = keys::decision_age_tx(&k) {
                t.delete(keys::decision(shard, tx_old));
            }
            t.delete(k);
        }
    }
    if inodes.is_empty() && entries.is_empty() {
        Ok(Applied::None)
    } else {
        Ok(Applied::Changed { inodes, entries })
    }
}

/// A planned operation: its outcome, and for a success what each shard
/// must check and write.
pub struct Planned {
    pub outcome: ApplyResult,
    pub parts: BTreeMap<ShardId, Part>,
    /// The plan touched keys an open transaction holds: its view may be
    /// half of that transaction; plan again once it finished.
    pub locked: bool,
}

/// Plans `lop` on this node's replica of every shard (see [`crate::apply::plan`]).
pub fn plan(db: &NamespaceDb, lop: &LoggedOp, new_ino: Option<Ino>) -> Result<Planned, DbError> {
    plan_over(db, &crate::store::Overlay::new(), lop, new_ino)
}

/// As [`plan`], over `overlay`: changes this node ordered ahead of the
/// transaction's steps in the shards' logs (a leader's sequenced, not yet
/// decided changes, D37). The prepares compare what the plan read with
/// what their shards hold when they apply, so a change of the overlay
/// that comes out otherwise fails the prepare (ESTALE) instead of being
/// built upon.
pub fn plan_over(
    db: &NamespaceDb,
    overlay: &crate::store::Overlay,
    lop: &LoggedOp,
    new_ino: Option<Ino>,
) -> Result<Planned, DbError> {
    use crate::read::NsRead;
    let view = crate::read::Overlaid { db, overlay };
    let mut t = Txn::over(db, overlay);
    let outcome = crate::apply::plan(&mut t, lop, new_ino)?;
    let fp = t.footprint();
    let mut parts: BTreeMap<ShardId, Part> = BTreeMap::new();
    let owner = |k: &[u8]| {
        keys::owner(k)
            .filter(|_| keys::is_data(k))
            .ok_or_else(|| DbError::Corrupt {
                key: k.to_vec(),
                reason: "a plan reached a key outside the namespace data".into(),
            })
    };
    for (k, v) in fp.reads {
        parts.entry(owner(&k)?).or_default().reads.push((k, v));
    }
    for s in fp.scans {
        parts.entry(owner(&s.0)?).or_default().scans.push(s);
    }
    for (k, v) in fp.writes {
        parts.entry(owner(&k)?).or_default().writes.push((k, v));
    }
    parts.entry(lop.op.shard()).or_default();
    let mut locked = false;
    'parts: for part in parts.values() {
        for k in part.keys() {
            if view.raw(&keys::tx_lock(k))?.is_some() {
                locked = true;
                break 'parts;
            }
        }
        for (start, end, _) in &part.scans {
            let (s, e) = (keys::tx_lock(start), keys::tx_lock(end));
            if !view.range(&s, &e, 1)?.is_empty() {
                locked = true;
                break 'parts;
            }
        }
    }
    Ok(Planned {
        outcome,
        parts,
        locked,
    })
}

/// Every open intent in the database: (shard, transaction, intent).
pub fn intents(db: &NamespaceDb) -> Result<Vec<(ShardId, TxId, Intent)>, DbError> {
    let p = keys::intent_prefix();
    let mut out = Vec::new();
    for (k, v) in db.scan(&p, &keys::prefix_end(&p), usize::MAX)? {
        let Some((shard, tx)) = keys::tx_record_of(&k) else {
            return Err(DbError::Corrupt {
                key: k,
                reason: "malformed intent key".into(),
            });
        };
        out.push((shard, tx, decode(&k, &v)?));
    }
    Ok(out)
}

/// Every decision record in the database: (home shard, transaction,
/// decision).
pub fn decisions(db: &NamespaceDb) -> Result<Vec<(ShardId, TxId, Decision)>, DbError> {
    let p = keys::decision_prefix();
    let mut out = Vec::new();
    for (k, v) in db.scan(&p, &keys::prefix_end(&p), usize::MAX)? {
        let Some((shard, tx)) = keys::tx_record_of(&k) else {
            return Err(DbError::Corrupt {
                key: k,
                reason: "malformed decision key".into(),
            });
        };
        out.push((shard, tx, decode(&k, &v)?));
    }
    Ok(out)
}

pub use cfs_proto::types::DEFAULT_SPREAD_DEPTH;

/// Shard for a new directory named `name` in `parent`, `spread_depth`
/// levels of the tree being spread: a directory that many levels or fewer
/// below the root goes where [`place_dir`] hashes it (so `/home/*`,
/// `/projects/*` spread over the shards), a deeper one stays on its
/// parent's shard, so work inside one subtree (mkdir, rmdir, `tar -x`,
/// `rm -rf`) is single-shard, one log commit per operation. This is
/// Lustre DNE's round-robin directory layout with a bounded inherit depth
/// and CephFS' subtree-per-MDS placement. Depth is read from this node's
/// replica, following parent pointers: a hint, like [`spans_shards`]; any
/// placement is correct.
pub fn dir_shard(
    db: &impl crate::read::NsRead,
    parent: Ino,
    name: &[u8],
    shards: &[ShardId],
    spread_depth: u32,
) -> ShardId {
    if depth_below(db, parent, spread_depth) {
        place_dir(parent, name, shards)
    } else {
        shard_of(parent)
    }
}

/// Whether `dir` is fewer than `levels` levels below the root (the root is
/// at depth 0). An unreadable ancestor counts as deep.
fn depth_below(db: &impl crate::read::NsRead, dir: Ino, levels: u32) -> bool {
    let mut ino = dir;
    for _ in 0..levels {
        if ino == ROOT_INO {
            return true;
        }
        match db.value::<Inode>(&keys::inode(ino)) {
            Ok(Some(i)) if i.is_dir() && i.parent != ino => ino = i.parent,
            _ => return false,
        }
    }
    false
}

/// Shard a new directory named `name` in `parent` is placed on when it is
/// spread: by a hash of both (FNV-1a, stable across builds), as CephFS and
/// Lustre DNE spread directories over metadata servers.
pub fn place_dir(parent: Ino, name: &[u8], shards: &[ShardId]) -> ShardId {
    if shards.is_empty() {
        return shard_of(parent);
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parent.to_be_bytes().iter().chain(name) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    shards[(h % shards.len() as u64) as usize]
}

/// An inode number on `shard` for a directory created by transaction
/// `tx`: drawn from the upper half of the shard's counter space (the local
/// counter never gets there), unique per attempt; the plan checks it is
/// free.
pub fn tx_ino(shard: ShardId, tx: TxId) -> Ino {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tx
        .coordinator
        .to_be_bytes()
        .iter()
        .chain(&tx.seq.to_be_bytes())
    {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    make_ino(shard, (1 << 47) | (h & ((1 << 47) - 1)))
}
