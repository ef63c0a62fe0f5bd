//! Namespace operations: what a metadata change looks like in the log
//! (`LoggedOp`, applied by the materializer), and the request/response
//! messages between the FUSE client and a node's metadata service.

use serde::{Deserialize, Serialize};

use crate::tx::{Part, TxId};
use crate::types::*;

/// A mutation as it appears in a shard's log: who, when (the proposer's
/// clock, so replay is deterministic) and what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedOp {
    /// The mount that asked (its invalidations skip it; it owns locks).
    pub client: u64,
    /// The client's id for this operation (0: none). A retried operation
    /// (same client and id) returns the recorded outcome instead of
    /// applying twice.
    pub op_id: u64,
    pub creds: Creds,
    pub now: Nanos,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Creates a file, directory, symlink (`target`), fifo, socket or device.
    /// With `excl == false` an existing regular file is returned instead of
    /// EEXIST (open with O_CREAT without O_EXCL).
    ///
    /// `ino` is `None` except when a mount replays a create a leader
    /// answered early but never got decided (D41): the number it was
    /// answered with, which the new term kept free for it. Refused
    /// (EINVAL) unless it is such a number.
    Create {
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
        /// The caller's umask, applied to `mode` unless the directory has
        /// a default ACL (which then decides, as POSIX.1e says).
        umask: u32,
        rdev: u32,
        target: Option<Vec<u8>>,
        excl: bool,
        ino: Option<Ino>,
    },
    Link {
        ino: Ino,
        parent: Ino,
        name: Vec<u8>,
    },
    /// `held_open`: the inodes the unlinking mount holds open. A file
    /// left without links that is not among them is deleted in this same
    /// entry; one that is becomes an orphan for [`Op::Reclaim`] at close.
    Unlink {
        parent: Ino,
        name: Vec<u8>,
        held_open: Vec<Ino>,
    },
    Rmdir {
        parent: Ino,
        name: Vec<u8>,
    },
    /// `held_open` as for [`Op::Unlink`], for a replaced file.
    Rename {
        parent: Ino,
        name: Vec<u8>,
        newparent: Ino,
        newname: Vec<u8>,
        flags: u32,
        held_open: Vec<Ino>,
    },
    SetAttr {
        ino: Ino,
        set: SetAttr,
    },
    SetXattr {
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    /// Maps file ranges to stripes already durable in the segment store.
    /// `then`: attribute changes the mount made after these bytes
    /// (futimens, fchmod, fchown on a file it is writing, as tar does),
    /// applied after the extents in the same entry.
    Write {
        ino: Ino,
        extents: Vec<ExtentRef>,
        then: Option<LateAttrs>,
    },
    Fallocate {
        ino: Ino,
        offset: u64,
        len: u64,
        mode: i32,
    },
    /// Takes (or with `F_UNLCK` releases) a lock; never waits: a conflict
    /// is returned and the client retries for blocking calls.
    Lock {
        ino: Ino,
        lock: LockRange,
    },
    /// Releases every lock of one owner (close) on `ino`.
    ReleaseLocks {
        ino: Ino,
        client: u64,
        owner: u64,
        flock: bool,
    },
    /// Deletes an unlinked inode once no client has it open.
    Reclaim {
        ino: Ino,
    },
    /// Keeps the proposing mount's hold on `shard` (its locks there and
    /// the files it has open after their last unlink) for another
    /// [`crate::hold::HOLD`]. ESTALE when the hold had lapsed and was
    /// broken: the mount's locks on that shard are gone.
    RenewHold {
        shard: ShardId,
    },
    /// Breaks `client`'s hold on `shard` if it lapsed (not renewed for
    /// [`crate::hold::HOLD`] by the entry's time): releases its locks and
    /// deletes its orphans. Only metadata services propose these.
    ExpireHold {
        shard: ShardId,
        client: u64,
    },
    /// Cross-shard transaction, phase 1 on each participant `shard`:
    /// checks `part`'s reads against the shard's state and locks its keys.
    /// Only metadata services propose these (clients cannot).
    TxPrepare {
        tx: TxId,
        shard: ShardId,
        /// The decision shard (the operation's home).
        home: ShardId,
        participants: Vec<ShardId>,
        part: Part,
    },
    /// Phase 2 on the home shard: the first decision for `tx` wins and is
    /// the commit point. It keeps the operation's outcome, which the home
    /// shard's finish records for `(client, op_id)` so that a retry
    /// returns it.
    TxDecide {
        tx: TxId,
        shard: ShardId,
        commit: bool,
        client: u64,
        op_id: u64,
        outcome: ApplyResult,
        participants: Vec<ShardId>,
    },
    /// Phase 3 on each participant: applies (commit) or drops the intent
    /// and releases its locks; on the home shard also forgets the decision.
    TxFinish {
        tx: TxId,
        shard: ShardId,
        commit: bool,
    },
    /// (Last: variants keep their encoding.) Forgets the outcome tables (kept for exactly-once retries) of the
    /// clients whose last operation on `shard` is older than
    /// `idle_before`, at most [`FORGET_CLIENTS_MAX`] per entry; each is
    /// remembered as forgotten with its highest operation id, so that a
    /// retry of one of its old operations gets ESTALE instead of applying
    /// twice. Only metadata services propose these.
    ForgetIdleClients {
        shard: ShardId,
        idle_before: Nanos,
    },
    /// A one-time mount token (`cfs_net::token`) is used: refused with
    /// EEXIST if it was already; the record is kept until it expires
    /// (`expires`, checked against the entry's time), and up to
    /// [`TOKENS_FORGOTTEN_MAX`] expired records are dropped per entry.
    /// Only metadata services propose these.
    ConsumeToken {
        shard: ShardId,
        id: u128,
        expires: Nanos,
    },
    /// Fences `segments` on `shard` so that they can be freed (D48), or
    /// (`fence == false`) lifts their fences. A segment the shard's extents
    /// still reference is left unfenced (the entry succeeds for the
    /// others; the fences it set are in the namespace). Once fenced, a
    /// [`Op::Write`] naming the segment fails with
    /// [`crate::types::Errno::FREED_DATA`] (the writer writes its bytes
    /// again), so no reference to it can appear on this shard any more.
    /// At most [`FENCE_SEGMENTS_MAX`] segments. Only metadata services
    /// propose these, each on the shards it leads.
    FenceSegments {
        shard: ShardId,
        segments: Vec<crate::types::SegmentId>,
        fence: bool,
    },
    /// Compaction (D48): replaces each relocation's `old` extent by its
    /// `new` pieces where the file still maps exactly `old` there; skips
    /// the others (the file changed since the copy). Times and sizes are
    /// unchanged. At most [`RELOCATIONS_MAX`], every inode on `shard`.
    /// Only metadata services propose these.
    RelocateExtents {
        shard: ShardId,
        moves: Vec<Relocation>,
    },
    /// A new generation of `tenant`'s data key (D51), sealed under the
    /// master key: numbered with the shard's next key id; new stripes of
    /// the tenant use it. At most [`TENANT_GENERATIONS_MAX`] per tenant.
    /// Only metadata services propose these, on the first shard.
    ///
    /// [`TENANT_GENERATIONS_MAX`]: crate::tenant::TENANT_GENERATIONS_MAX
    AddTenantKey {
        shard: ShardId,
        tenant: String,
        /// A new generation of an existing key (else the first; EEXIST
        /// if there is one, ENOKEY for a rotation of none).
        rotate: bool,
        wrapped: Box<crate::tenant::WrappedKey>,
    },
    /// How far re-encryption of a tenant's stripes has gone (D51), as the
    /// collector measured it; kept per tenant, shown by `cfs admin keys`
    /// and `cfs admin status`. Only metadata services propose these.
    ReencryptProgress {
        shard: ShardId,
        progress: Box<crate::tenant::Reencryption>,
    },
}

/// Segments one [`Op::FenceSegments`] entry may name.
pub const FENCE_SEGMENTS_MAX: usize = 1024;

/// Relocations one [`Op::RelocateExtents`] entry may carry.
pub const RELOCATIONS_MAX: usize = 256;

/// One extent copied to new stripes by compaction (D48): `new` tiles
/// exactly the file range of `old`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relocation {
    pub ino: Ino,
    pub old: ExtentRef,
    pub new: Vec<ExtentRef>,
}

impl Relocation {
    /// Whether `new` covers `[old.offset, old.offset + old.len)` exactly,
    /// in order, with no inline bytes.
    pub fn tiles(&self) -> bool {
        let mut at = self.old.offset;
        for e in &self.new {
            if e.offset != at || e.len == 0 || !matches!(e.backing, Backing::Stripe(_)) {
                return false;
            }
            at += e.len;
        }
        !self.new.is_empty() && at == self.old.offset + self.old.len
    }
}

/// Expired token records dropped per [`Op::ConsumeToken`] entry.
pub const TOKENS_FORGOTTEN_MAX: usize = 64;

/// Clients forgotten per [`Op::ForgetIdleClients`] entry (bounds the
/// entry's work; the next one takes the rest).
pub const FORGET_CLIENTS_MAX: usize = 256;

impl Op {
    /// Inode whose shard applies this operation.
    pub fn home(&self) -> Ino {
        match self {
            Op::Create { parent, .. }
            | Op::Unlink { parent, .. }
            | Op::Rmdir { parent, .. }
            | Op::Rename { parent, .. }
            | Op::Link { parent, .. } => *parent,
            Op::SetAttr { ino, .. }
            | Op::SetXattr { ino, .. }
            | Op::RemoveXattr { ino, .. }
            | Op::Write { ino, .. }
            | Op::Fallocate { ino, .. }
            | Op::Lock { ino, .. }
            | Op::ReleaseLocks { ino, .. }
            | Op::Reclaim { ino } => *ino,
            Op::TxPrepare { shard, .. }
            | Op::TxDecide { shard, .. }
            | Op::TxFinish { shard, .. }
            | Op::RenewHold { shard }
            | Op::ExpireHold { shard, .. }
            | Op::ForgetIdleClients { shard, .. }
            | Op::ConsumeToken { shard, .. }
            | Op::FenceSegments { shard, .. }
            | Op::RelocateExtents { shard, .. }
            | Op::AddTenantKey { shard, .. }
            | Op::ReencryptProgress { shard, .. } => make_ino(*shard, 1),
        }
    }

    /// The directory entries (parent, name) this operation makes, removes
    /// or replaces.
    pub fn names_changed(&self) -> Vec<(Ino, &[u8])> {
        match self {
            Op::Create { parent, name, .. }
            | Op::Unlink { parent, name, .. }
            | Op::Rmdir { parent, name }
            | Op::Link { parent, name, .. } => vec![(*parent, name.as_slice())],
            Op::Rename {
                parent,
                name,
                newparent,
                newname,
                ..
            } => vec![(*parent, name.as_slice()), (*newparent, newname.as_slice())],
            _ => Vec::new(),
        }
    }

    /// Shard whose log carries this operation.
    pub fn shard(&self) -> ShardId {
        shard_of(self.home())
    }

    /// Whether this is a step of the cross-shard protocol (never accepted
    /// from a client).
    pub fn is_tx_step(&self) -> bool {
        matches!(
            self,
            Op::TxPrepare { .. } | Op::TxDecide { .. } | Op::TxFinish { .. }
        )
    }

    /// Whether only a metadata service may propose this (never a client):
    /// the cross-shard protocol's steps and breaking another mount's hold.
    pub fn is_service_only(&self) -> bool {
        self.is_tx_step()
            || matches!(
                self,
                Op::ExpireHold { .. }
                    | Op::ForgetIdleClients { .. }
                    | Op::ConsumeToken { .. }
                    | Op::FenceSegments { .. }
                    | Op::RelocateExtents { .. }
                    | Op::AddTenantKey { .. }
                    | Op::ReencryptProgress { .. }
            )
    }
}

/// A setattr a mount buffered behind its unflushed bytes ([`Op::Write`]),
/// checked against the credentials of the call that made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateAttrs {
    pub creds: Creds,
    pub set: SetAttr,
}

/// What applying an operation produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    None,
    /// The inode created, changed or (for unlink) left behind.
    Attr(Inode),
    /// A lock request conflicted with this lock.
    Conflict(LockRange),
    /// The decision of a transaction; `outcome` is the operation's
    /// recorded outcome when an earlier attempt already committed it.
    Decision {
        commit: bool,
        outcome: Option<Box<ApplyResult>>,
    },
    /// A committed transaction changed these inodes and entries here.
    Changed {
        inodes: Vec<Ino>,
        entries: Vec<(Ino, Vec<u8>)>,
    },
}

pub type ApplyResult = Result<Applied, Errno>;

/// A client request to a node's metadata service.
// Most requests are mutations, which carry an `Op` (224 bytes): boxing it
// would add an allocation to every mutation to save space only on the
// small requests, which are never held in bulk.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// First message on a connection.
    Hello {
        cluster_id: String,
        client_id: u64,
    },
    /// `early`: the client may be answered once the node leading the
    /// shard has ordered the change, before it is decided; it then keeps
    /// the change until `ServerMsg::Settled` (or replays it with the same
    /// `op_id` to another node) (docs/decisions.md D30).
    Mutate {
        op_id: u64,
        creds: Creds,
        op: Op,
        early: bool,
    },
    Lookup {
        parent: Ino,
        name: Vec<u8>,
    },
    GetAttr {
        ino: Ino,
    },
    ReadDir {
        ino: Ino,
        after: u64,
        max: u32,
    },
    /// Entries with their attributes (one round trip for `ls -l`).
    ReadDirPlus {
        ino: Ino,
        after: u64,
        max: u32,
    },
    ReadLink {
        ino: Ino,
    },
    GetXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    ListXattr {
        ino: Ino,
    },
    Extents {
        ino: Ino,
        offset: u64,
        len: u64,
    },
    GetLock {
        ino: Ino,
        lock: LockRange,
    },
    StatFs,
    /// Stored stripes holding these chunks, if the cluster has them
    /// (inline dedupe, docs/decisions.md D50): at most
    /// [`FIND_CHUNKS_MAX`] ids; answered from the node's decided state.
    FindChunks {
        ids: Vec<ChunkId>,
    },
    /// Asks for (or renews) leases on this session's cached metadata of
    /// the shards this node leads (`crate::lease`).
    Lease,
    /// Invalidations up to `seq` are applied to the client's caches (no
    /// reply).
    InvalAck {
        seq: u64,
    },
    /// The client no longer uses this session's cache: its leases end now
    /// (no reply).
    ReleaseLeases,
    /// The only request of a connection without a client certificate:
    /// trades a one-time mount token for a certificate for the key of
    /// the request `csr_der` (`Reply::Enrolled`).
    Enroll {
        token: String,
        csr_der: Vec<u8>,
    },
    /// A tenant's data keys in the clear (D51): for a mount whose
    /// certificate names the tenant (EACCES otherwise), a node or an
    /// administrator. ENOKEY: the tenant has no key; EKEYREJECTED: this
    /// node's master key does not open them.
    TenantKeys {
        tenant: String,
    },
    /// Makes a tenant's first key or (`rotate`) a new generation of it
    /// (administrators and nodes only): `Reply::Keys` after it applied.
    /// A first key for a tenant that has one is EEXIST; a rotation of a
    /// tenant without one is ENOKEY.
    MakeTenantKey {
        tenant: String,
        rotate: bool,
    },
    /// Every tenant's keys (no key bytes) and the re-encryption progress
    /// (administrators and nodes only).
    ListTenantKeys,
}

impl Request {
    pub fn is_read(&self) -> bool {
        !matches!(
            self,
            Request::Mutate { .. }
                | Request::Hello { .. }
                | Request::InvalAck { .. }
                | Request::ReleaseLeases
                | Request::Enroll { .. }
                | Request::MakeTenantKey { .. }
        )
    }
}

/// A request with its id and read freshness.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    /// Reads: pass a read barrier first (linearizable) instead of reading
    /// what this node has applied.
    pub fresh: bool,
    pub req: Request,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Reply {
    None,
    Welcome {
        node_id: u64,
        /// Segment servers: node id → address.
        segment_servers: Vec<(u64, String)>,
        shards: Vec<ShardId>,
        /// The metadata service of the node leading most shards, when
        /// that is another node: its mutations skip a forwarding hop and
        /// the wait for the decision to reach a follower.
        leader_meta: Option<String>,
    },
    Attr(Inode),
    Entries(Vec<DirEntry>),
    EntriesPlus(ListingPart),
    Data(Vec<u8>),
    Names(Vec<Vec<u8>>),
    Extents(Vec<ExtentRef>),
    Stats(FsStats),
    /// For each id asked, a stripe holding that chunk.
    Chunks(Vec<Option<Extent>>),
    Lock(Option<LockRange>),
    /// Leases granted on these shards for `millis` from when the request
    /// was sent; usable once the client has applied invalidation
    /// `inval_seq` (every one queued before this reply).
    Lease {
        shards: Vec<ShardId>,
        millis: u32,
        inval_seq: u64,
        /// How many shards the answering node leads (none: the session
        /// is better off with the leader).
        leading: u32,
    },
    /// A mount token traded: the mount's certificate, PEM.
    Enrolled {
        cert_pem: String,
    },
    TenantKeys(crate::tenant::TenantKeys),
    Keys(crate::tenant::KeyReport),
}

/// Messages from a node to a client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ServerMsg {
    Reply {
        id: u64,
        result: Result<Reply, Errno>,
        /// The last invalidation sent to this session before the answer
        /// was read (`client::cache` caches it only if no newer
        /// invalidation of the inode arrived).
        stamp: u64,
    },
    /// Another client changed this inode (attributes or data) or this
    /// directory entry: drop cached copies, then acknowledge `seq`
    /// (`Request::InvalAck`): a leased session's acknowledgement is what
    /// other clients' changes wait for (`crate::lease`).
    Invalidate {
        ino: Ino,
        entry: Option<(Ino, Vec<u8>)>,
        seq: u64,
        /// The session's own change: its kernel already knows; only the
        /// mount's own cache drops the inode.
        own: bool,
    },
    /// A change answered early (`Request::Mutate::early`) is decided and
    /// applied: `failed` is `None` when it did what the answer said, or
    /// why it did not (the mount reports it on the next fsync or close of
    /// what the change touched).
    Settled { op_id: u64, failed: Option<Errno> },
    /// The attributes of inodes the session's own change just touched
    /// (sent after its invalidations, before its early answer), current
    /// as of invalidation `stamp`: cached by the same rule as a reply's.
    Current { inodes: Vec<Inode>, stamp: u64 },
}

/// Chunk ids one [`Request::FindChunks`] may carry (a 4 MiB flush cut
/// into chunks of at least 64 KiB is at most 64).
pub const FIND_CHUNKS_MAX: usize = 1024;

/// Largest metadata message (a 4 MiB log entry bounds mutations anyway).
pub const MESSAGE_BYTES_MAX: usize = 8 << 20;
