//! Applies one namespace operation to the state, deterministically: the
//! outcome depends only on the state and the entry (its credentials and
//! timestamp included), so every replica and every replay agrees.

mod attrs;
mod data;
mod entries;
mod holds;
mod locks;
mod names;
mod snapshot;

pub use holds::lapsed as lapsed_holds;
pub use locks::find_conflict;

use crate::keys;
use crate::ops::{Applied, ApplyResult, LoggedOp, Op};
use crate::store::{DbError, Txn};
use crate::types::*;

use attrs::{removexattr, setattr, setxattr};
use data::{fallocate, write};
use entries::{delete_inode, get_inode, Held};
use locks::set_lock;
use names::{create, link, rename, rmdir, unlink};

/// Link count beyond which `link` fails with EMLINK.
pub const LINK_MAX: u32 = 65_000;
/// Longest extent reference: writes are split so that overlap search can
/// look back a bounded distance.
pub const EXTENT_LEN_MAX: u64 = 8 << 20;

/// Why an operation did not apply: a POSIX error (a normal outcome, the
/// same on every replica) or a failure of the local database (fatal).
pub(crate) enum Fail {
    Fs(Errno),
    Db(DbError),
    /// Not applied and not recorded as the operation's outcome: the
    /// proposer retries (EAGAIN: keys held by an open transaction) or
    /// turns to a cross-shard transaction (EXDEV).
    Retry(Errno),
}

impl From<Errno> for Fail {
    fn from(e: Errno) -> Self {
        Fail::Fs(e)
    }
}
impl From<DbError> for Fail {
    fn from(e: DbError) -> Self {
        Fail::Db(e)
    }
}

pub(crate) type R2<T> = Result<T, Fail>;

/// Applies `op` (decided on `shard`) to `txn`. The outer error is a
/// database failure; the inner result is the operation's outcome. A failed
/// operation leaves `txn` unchanged.
///
/// Two outcomes are not recorded for retries of the same operation id,
/// because the operation did not happen and the proposer tries again:
/// EXDEV (it needs another shard's keys: the proposer runs it as a
/// cross-shard transaction, see [`crate::tx`]) and EAGAIN (it touches keys
/// an open transaction holds).
pub fn apply(txn: &mut Txn<'_>, shard: ShardId, lop: &LoggedOp) -> Result<ApplyResult, DbError> {
    txn.set_owner(Some(shard));
    let outcome_key = (lop.op_id != 0).then(|| keys::outcome(shard, lop.client, lop.op_id));
    if let Some(k) = &outcome_key {
        if let Some(r) = txn.get::<ApplyResult>(k)? {
            return Ok(r);
        }
        // A retry of an operation whose outcome was forgotten with its
        // idle client: it may have applied, so it must not apply again.
        let forgotten = txn.get::<u64>(&keys::client_forgotten(shard, lop.client))?;
        if forgotten.is_some_and(|high| lop.op_id <= high) {
            return Ok(Err(Errno::ESTALE));
        }
    }
    let res = match &lop.op {
        Op::TxPrepare { .. } | Op::TxDecide { .. } | Op::TxFinish { .. } => {
            crate::tx::apply(txn, shard, lop)
        }
        _ => apply_inner(txn, shard, lop, None).and_then(|a| {
            if let Some(e) = txn.foreign_write() {
                return Err(Fail::Db(e));
            }
            crate::tx::check_locks(txn, shard)?;
            Ok(a)
        }),
    };
    let r = match res {
        Ok(a) => {
            txn.keep();
            Ok(a)
        }
        Err(Fail::Fs(e)) => {
            txn.rollback();
            Err(e)
        }
        Err(Fail::Retry(e)) => {
            txn.rollback();
            return Ok(Err(e));
        }
        Err(Fail::Db(DbError::NotOwned { .. })) => {
            // What it read here may be held by an open transaction: then
            // wait for that (EAGAIN) rather than plan on half of it.
            let e = match crate::tx::check_locks(txn, shard) {
                Err(Fail::Retry(e)) => e,
                Err(Fail::Db(e)) => return Err(e),
                _ => Errno::EXDEV,
            };
            txn.rollback();
            return Ok(Err(e));
        }
        Err(Fail::Db(e)) => {
            txn.rollback();
            return Err(e);
        }
    };
    if let Some(k) = outcome_key {
        txn.put(k, &r);
        let seen_key = keys::client_seen(shard, lop.client);
        let high = txn
            .get::<ClientSeen>(&seen_key)?
            .map_or(lop.op_id, |s| s.high_op.max(lop.op_id));
        txn.put(
            seen_key,
            &ClientSeen {
                at: lop.now,
                high_op: high,
            },
        );
        if lop.op_id > OUTCOMES_KEPT {
            // Forget this client's outcomes on this shard that are too old
            // to be retried (op ids of a client spread over the shards, so
            // this is a range, usually holding one key or none). The scan
            // starts where the last one ended: from 0 it would step over
            // the tombstones of every outcome forgotten before, a cost
            // growing with the client's age (measured: 25 ms per small
            // file after ~60 000 operations of one mount).
            let low_key = keys::outcomes_low(shard, lop.client);
            let low = txn.get::<u64>(&low_key)?.unwrap_or(0);
            let high = lop.op_id - OUTCOMES_KEPT;
            if high > low {
                let from = keys::outcome(shard, lop.client, low);
                let to = keys::outcome(shard, lop.client, high);
                for (k, _) in txn.scan(&from, &to)? {
                    txn.delete(k);
                }
                txn.put(low_key, &high);
            }
        }
        txn.keep();
    }
    Ok(r)
}

/// Runs `lop` against the whole namespace without the one-shard
/// restriction, leaving its changes in `txn`'s current entry: how a
/// coordinator plans a cross-shard operation. `new_ino` places a created
/// inode (a directory on another shard).
pub fn plan(
    txn: &mut Txn<'_>,
    lop: &LoggedOp,
    new_ino: Option<Ino>,
) -> Result<ApplyResult, DbError> {
    txn.set_owner(None);
    match apply_inner(txn, shard_of(lop.op.home()), lop, new_ino) {
        Ok(a) => Ok(Ok(a)),
        Err(Fail::Fs(e)) | Err(Fail::Retry(e)) => Ok(Err(e)),
        Err(Fail::Db(e)) => Err(e),
    }
}

/// Outcomes remembered per client for retries: a client never has more
/// operations than this outstanding.
pub const OUTCOMES_KEPT: u64 = 16_384;

/// What a shard remembers of a client with outcomes there.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct ClientSeen {
    /// Log time of its last recorded outcome.
    pub at: Nanos,
    /// Its highest operation id recorded here.
    pub high_op: u64,
}

/// The clients of `shard` whose last outcome is older than
/// `idle_before`, at most `limit`: what [`Op::ForgetIdleClients`] would
/// forget (the metadata service proposes one when this is not empty).
pub fn idle_clients(
    db: &crate::store::NamespaceDb,
    shard: ShardId,
    idle_before: Nanos,
    limit: usize,
) -> Result<Vec<u64>, DbError> {
    let p = keys::client_seen_prefix(shard);
    let mut out = Vec::new();
    for (k, v) in db.scan(&p, &keys::prefix_end(&p), usize::MAX)? {
        if out.len() >= limit {
            break;
        }
        let seen: ClientSeen = crate::store::decode(&k, &v)?;
        if let (true, Some(c)) = (seen.at < idle_before, keys::client_seen_of(&k)) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Forgets the outcome tables of the clients idle on `shard` since before
/// `idle_before` (at most [`cfs_proto::ops::FORGET_CLIENTS_MAX`]),
/// remembering each as forgotten with its highest operation id.
fn forget_idle(t: &mut Txn<'_>, shard: ShardId, idle_before: Nanos) -> R2<Applied> {
    let p = keys::client_seen_prefix(shard);
    let mut idle = Vec::new();
    for (k, v) in t.scan(&p, &keys::prefix_end(&p))? {
        if idle.len() >= cfs_proto::ops::FORGET_CLIENTS_MAX {
            break;
        }
        let seen: ClientSeen = crate::store::decode(&k, &v)?;
        if let (true, Some(c)) = (seen.at < idle_before, keys::client_seen_of(&k)) {
            idle.push((k, c, seen.high_op));
        }
    }
    for (seen_key, client, high) in idle {
        let low_key = keys::outcomes_low(shard, client);
        let low = t.get::<u64>(&low_key)?.unwrap_or(0);
        let all = keys::outcomes_of(shard, client);
        for (k, _) in t.scan(&keys::outcome(shard, client, low), &keys::prefix_end(&all))? {
            t.delete(k);
        }
        t.delete(low_key);
        t.delete(seen_key);
        t.put(keys::client_forgotten(shard, client), &high);
    }
    Ok(Applied::None)
}

/// Records mount token `id` as used (EEXIST if it was), and forgets up
/// to [`cfs_proto::ops::TOKENS_FORGOTTEN_MAX`] records of tokens expired
/// at `now` (refused by their expiry from then on).
fn consume_token(
    t: &mut Txn<'_>,
    shard: ShardId,
    now: Nanos,
    id: u128,
    expires: Nanos,
) -> R2<Applied> {
    let at = |n: Nanos| u64::try_from(n).unwrap_or(0);
    let key = keys::token_used(shard, at(expires), id);
    if t.get_raw(&key)?.is_some() {
        return Err(Fail::Fs(Errno::EEXIST));
    }
    let p = keys::token_used_prefix(shard);
    let expired = t.scan(&p, &keys::token_used(shard, at(now), 0))?;
    for (k, _) in expired
        .into_iter()
        .take(cfs_proto::ops::TOKENS_FORGOTTEN_MAX)
    {
        t.delete(k);
    }
    t.put(key, &expires);
    Ok(Applied::None)
}

/// A new empty directory owned by root with permissions `perms`, made
/// at `now`: the file system's root, or a snapshot container (D52).
pub(crate) fn root_owned_dir(
    ino: Ino,
    perms: u32,
    parent: Ino,
    now: Nanos,
    generation: u64,
) -> Inode {
    Inode {
        ino,
        mode: libc::S_IFDIR | perms,
        uid: 0,
        gid: 0,
        size: 0,
        nlink: 2,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        rdev: 0,
        generation,
        allocated: 0,
        stored: 0,
        parent,
        next_cookie: 3,
        entries: 0,
        acl: None,
        compression: None,
        dedupe: None,
        tenant: None,
        snapshot: false,
    }
}

/// Creates the root directory if the shard owning it has none yet.
pub fn ensure_root(txn: &mut Txn<'_>, shard: ShardId) -> Result<(), DbError> {
    if shard != shard_of(ROOT_INO) || txn.get_raw(&keys::inode(ROOT_INO))?.is_some() {
        return Ok(());
    }
    let root = root_owned_dir(ROOT_INO, 0o755, ROOT_INO, 0, 1);
    txn.put(keys::inode(ROOT_INO), &root);
    txn.put(keys::next_ino(shard), &2u64);
    txn.keep();
    Ok(())
}

/// Where a shard's snapshot inodes are numbered from (D52): the upper
/// half of its counter space.
pub const SNAPSHOT_INO_BASE: u64 = 1 << 47;

/// Inode numbers a shard's counter skips when a new leadership term
/// begins: more than any leader may have promised beyond what was decided
/// (one per sequenced change, [`PROMISED_AHEAD_MAX`] of them at most).
pub const TERM_INO_SKIP: u64 = 1 << 16;
/// Changes a leader orders ahead of what its database applied, at most
/// (the sequencer's bound, meta's `PENDING_MAX`, must stay below it).
pub const PROMISED_AHEAD_MAX: u64 = 1 << 14;
const _: () = assert!(PROMISED_AHEAD_MAX < TERM_INO_SKIP);

/// A new leadership term begins on `shard` (the log's barrier entry,
/// docs/decisions.md D41): the inode counter moves past every number an
/// earlier leader may have answered for a create that was never decided,
/// so no inode number ever names two files, even for a moment in a
/// mount's cache.
///
/// The counter moves to a multiple of [`TERM_INO_SKIP`] at least that far
/// on, and the skipped range is recorded under the block it ends at, so a
/// replayed create's number is checked with two point reads
/// ([`promised_in_a_past_term`]).
pub fn new_term(txn: &mut Txn<'_>, shard: ShardId) -> Result<(), DbError> {
    txn.set_owner(Some(shard));
    let next: u64 = txn.get(&keys::next_ino(shard))?.unwrap_or(2);
    let skipped: u64 = txn.get(&keys::ino_skipped(shard))?.unwrap_or(0);
    let end = (next + TERM_INO_SKIP).next_multiple_of(TERM_INO_SKIP);
    txn.put(keys::next_ino(shard), &end);
    txn.put(keys::ino_skipped(shard), &(skipped + (end - next)));
    txn.put(keys::term_skip(shard, end / TERM_INO_SKIP), &next);
    txn.keep();
    Ok(())
}

/// True if `n` (an inode counter value of `shard`) lies in a range a new
/// term skipped: a number an earlier leader may have answered for a create
/// that was never decided, and that nothing else is ever given.
pub(crate) fn promised_in_a_past_term(
    t: &Txn<'_>,
    shard: ShardId,
    n: u64,
) -> Result<bool, DbError> {
    for block in [n / TERM_INO_SKIP + 1, n / TERM_INO_SKIP + 2] {
        if let Some(start) = t.get::<u64>(&keys::term_skip(shard, block))? {
            if start <= n && n < block * TERM_INO_SKIP {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn apply_inner(
    t: &mut Txn<'_>,
    shard: ShardId,
    lop: &LoggedOp,
    new_ino: Option<Ino>,
) -> R2<Applied> {
    let c = &lop.creds;
    let now = lop.now;
    if lop.op.shard() != shard {
        return Err(Errno::EXDEV.into());
    }
    snapshot::refuse_read_only(t, &lop.op)?;
    match &lop.op {
        Op::Create {
            parent,
            name,
            mode,
            umask,
            rdev,
            target,
            excl,
            ino,
        } => create(
            t,
            shard,
            c,
            now,
            *parent,
            name,
            (*mode, *umask),
            *rdev,
            target.as_deref(),
            *excl,
            match (new_ino, ino) {
                (Some(placed), _) => names::NewIno::Placed(placed),
                (None, Some(told)) => names::NewIno::Replayed(*told),
                (None, None) => names::NewIno::Counter,
            },
        ),
        Op::Link { ino, parent, name } => link(t, c, now, *ino, *parent, name),
        Op::Unlink {
            parent,
            name,
            held_open,
        } => unlink(
            t,
            c,
            now,
            *parent,
            name,
            Held {
                client: lop.client,
                open: held_open,
            },
        ),
        Op::Rmdir { parent, name } => rmdir(t, c, now, *parent, name),
        Op::Rename {
            parent,
            name,
            newparent,
            newname,
            flags,
            held_open,
        } => rename(
            t,
            c,
            now,
            *parent,
            name,
            *newparent,
            newname,
            *flags,
            Held {
                client: lop.client,
                open: held_open,
            },
        ),
        Op::SetAttr { ino, set } => setattr(t, c, now, *ino, set),
        Op::SetXattr {
            ino,
            name,
            value,
            flags,
        } => setxattr(t, c, now, *ino, name, value, *flags),
        Op::RemoveXattr { ino, name } => removexattr(t, c, now, *ino, name),
        Op::Write { ino, extents, then } => {
            let written = write(t, c, now, *ino, extents)?;
            match then {
                Some(late) => setattr(t, &late.creds, now, *ino, &late.set),
                None => Ok(written),
            }
        }
        Op::Fallocate {
            ino,
            offset,
            len,
            mode,
        } => fallocate(t, c, now, *ino, *offset, *len, *mode),
        Op::Lock { ino, lock } => set_lock(t, c, now, *ino, lock),
        Op::RenewHold { shard } => holds::renew(t, *shard, lop.client, now),
        Op::ExpireHold { shard, client } => holds::expire(t, *shard, *client, now),
        Op::ForgetIdleClients { shard, idle_before } => forget_idle(t, *shard, *idle_before),
        Op::ConsumeToken { shard, id, expires } => consume_token(t, *shard, now, *id, *expires),
        Op::FenceSegments {
            shard,
            segments,
            fence,
        } => data::fence_segments(t, now, *shard, segments, *fence),
        Op::RelocateExtents { shard, moves } => data::relocate(t, *shard, moves),
        Op::AddTenantKey {
            shard,
            tenant,
            rotate,
            wrapped,
        } => crate::tenant_keys::add(t, *shard, now, tenant, *rotate, wrapped),
        Op::ReencryptProgress { shard, progress } => {
            crate::tenant_keys::progress(t, *shard, progress)
        }
        Op::ReleaseLocks {
            ino,
            client,
            owner,
            flock,
        } => {
            for (k, v) in t.scan(
                &keys::lock_prefix(*ino),
                &keys::prefix_end(&keys::lock_prefix(*ino)),
            )? {
                let l: LockRange = crate::store::decode(&k, &v)?;
                if l.client == *client && l.owner == *owner && l.flock == *flock {
                    t.delete(k);
                }
            }
            Ok(Applied::None)
        }
        Op::Reclaim { ino } => {
            t.delete(keys::held_orphan(shard_of(*ino), lop.client, *ino));
            if let Some(i) = get_inode(t, *ino)? {
                if i.nlink == 0 {
                    delete_inode(t, &i)?;
                }
            }
            Ok(Applied::None)
        }
        Op::TxPrepare { .. } | Op::TxDecide { .. } | Op::TxFinish { .. } => {
            Err(Errno::EINVAL.into())
        }
    }
}

pub fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::EINVAL);
    }
    if name.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(())
}
