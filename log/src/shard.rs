//! One shard replica with no I/O of its own: the OmniPaxos instance, its
//! WAL, and the mapping from OmniPaxos indices to virtual log positions.
//!
//! The caller (the threaded runtime in `runtime`, or the simulation) feeds
//! inputs — [`ShardCore::handle`], [`ShardCore::propose`],
//! [`ShardCore::tick`] — and then calls [`ShardCore::ready`], which makes
//! every storage write durable with one fdatasync *before* it returns the
//! messages to send and the newly decided entries to deliver.
//!
//! Contract (as raft-rs' `Ready`): everything returned by `ready` may leave
//! the node; nothing else may. Between two `ready` calls, any number of
//! inputs may be applied: that is the group commit.
//!
//! Positions: OmniPaxos numbers entries from 0 in every configuration
//! (epoch). A [`Position`] is `epoch.base + index`, where `base` is the
//! number of entries decided in all earlier epochs, so positions keep
//! counting across reconfiguration. Invariant: `delivered <= decided`.

use omnipaxos::ballot_leader_election::Ballot;
use omnipaxos::messages::sequence_paxos::{Accepted, PaxosMessage, PaxosMsg};
use omnipaxos::messages::Message;
use omnipaxos::storage::StopSign;
use omnipaxos::util::{LogEntry, LogSync, NodeId};
use omnipaxos::{ClusterConfig, OmniPaxos, OmniPaxosConfig, ServerConfig};

use crate::disk::Disk;
use crate::entry::Entry;
use crate::read_index::{ReadFailed, ReadId, ReadIndex, ReadMsg, ReadStart};
use crate::storage::SharedWal;
use crate::wal::{Wal, WalError};

pub use cfs_ids::{Position, ShardId};

/// One configuration of a shard's replica set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Epoch {
    /// OmniPaxos configuration id (>= 1), increasing across reconfigurations.
    pub config_id: u32,
    pub nodes: Vec<NodeId>,
    /// Position of this epoch's index 0.
    pub base: Position,
}

/// Timing of a replica, in ticks of the caller's clock.
#[derive(Clone, Debug)]
pub struct Timing {
    pub election_ticks: u64,
    pub resend_ticks: u64,
}

impl Default for Timing {
    fn default() -> Self {
        // With a 10 ms tick: a leader is suspected after 100 ms without
        // heartbeats and replaced after at most ~200 ms.
        Timing {
            election_ticks: 10,
            resend_ticks: 20,
        }
    }
}

/// What `propose` did with an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proposed {
    /// Appended by this leader; it will appear in a later `ready().decided`.
    Appended,
    /// The same request is already in this replica's log: decided at the
    /// given position, or still in flight (`None`) and will be decided or
    /// lost like the first attempt.
    Duplicate(Option<Position>),
    /// This replica is not the leader: send the entry to this node.
    Forward(NodeId),
    /// No leader is known (election in progress): retry shortly.
    NoLeader,
    /// The epoch is ending (a reconfiguration is pending): retry in the next.
    Stopping,
}

/// Output of one `ready` call.
#[derive(Debug, Default)]
pub struct Ready {
    /// OmniPaxos messages to send, in order.
    pub messages: Vec<Message<Entry>>,
    /// Entries decided since the last `ready`, in position order.
    pub decided: Vec<(Position, Entry)>,
    /// The epoch ended: the stop sign and the base position of the next.
    pub stopped: Option<(StopSign, Position)>,
    /// Read-index probes and acks to send (see `read_index`).
    pub read_msgs: Vec<(NodeId, ReadMsg)>,
    /// Finished reads: every position below the one returned is decided,
    /// and everything decided before the read started is below it.
    pub reads: Vec<(ReadId, Result<Position, ReadFailed>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("invalid replica configuration: {0}")]
    Config(String),
}

/// A shard replica in one epoch.
pub struct ShardCore<D: Disk + Clone> {
    pub shard: ShardId,
    pub node: NodeId,
    epoch: Epoch,
    paxos: OmniPaxos<Entry, SharedWal<D>>,
    wal: SharedWal<D>,
    /// OmniPaxos index up to which decided entries were returned by `ready`.
    delivered_idx: u64,
    stopped: bool,
    /// Messages taken out of OmniPaxos before `ready` (see `handle`); they
    /// leave first, in order, with the next `ready`.
    early_out: Vec<Message<Entry>>,
    /// Linearizable reads without log entries.
    reads: ReadIndex,
    resend_ticks: u64,
    /// The ballot this replica leads with and the position of the barrier
    /// it appended as that term's first entry (see [`ShardCore::term_start`]).
    term: Option<(Ballot, Position)>,
}

impl<D: Disk + Clone> ShardCore<D> {
    /// Opens (recovering) the replica whose log is `wal` (its stream of
    /// the node's WAL).
    ///
    /// `deliver_from` is the position of the first decided entry the caller
    /// wants from `ready` (e.g. 0 on a fresh start, or where subscribers
    /// resume); older decided entries are not redelivered.
    pub fn open(
        shard: ShardId,
        node: NodeId,
        epoch: Epoch,
        wal: Wal<D>,
        timing: &Timing,
        deliver_from: Position,
    ) -> Result<Self, ShardError> {
        let start = wal.state().compacted;
        let shared = SharedWal::new(wal);
        let config = OmniPaxosConfig {
            cluster_config: ClusterConfig {
                configuration_id: epoch.config_id,
                nodes: epoch.nodes.clone(),
                flexible_quorum: None,
            },
            server_config: ServerConfig {
                pid: node,
                election_tick_timeout: timing.election_ticks,
                resend_message_tick_timeout: timing.resend_ticks,
                // Outgoing buffer; ready() drains it every batch.
                buffer_size: 1 << 16,
                batch_size: 1,
                ..Default::default()
            },
        };
        let paxos = config
            .build(shared.clone())
            .map_err(|e| ShardError::Config(e.to_string()))?;
        let delivered_idx = deliver_from.since(epoch.base).max(start);
        Ok(ShardCore {
            shard,
            node,
            epoch,
            paxos,
            wal: shared,
            delivered_idx,
            stopped: false,
            early_out: Vec::new(),
            reads: ReadIndex::default(),
            resend_ticks: timing.resend_ticks,
            term: None,
        })
    }

    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    pub fn wal(&self) -> &SharedWal<D> {
        &self.wal
    }

    /// The leader this replica believes in, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.paxos.get_current_leader().map(|(l, _)| l)
    }

    /// True if this replica is the leader and in the accept phase.
    pub fn is_leader(&self) -> bool {
        matches!(self.paxos.get_current_leader(), Some((l, true)) if l == self.node)
    }

    /// Starts an election with a ballot above every one promised, unless
    /// this replica leads already (OmniPaxos' manual leader change; safety
    /// never depends on who leads).
    pub fn campaign(&mut self) {
        if !self.is_leader() {
            self.paxos.try_become_leader();
        }
    }

    /// Where this replica's current leadership term begins: the position
    /// of the barrier entry it appended before anything else it appends as
    /// leader (`None` while it does not lead). Every entry a previous
    /// leader got into the log lies below it, so a layer above can tell
    /// "decided before this term" from "ordered by this leader" (the
    /// namespace moves its inode counter past anything an earlier leader
    /// may have promised but not decided, docs/decisions.md D41).
    pub fn term_start(&self) -> Option<Position> {
        let (ballot, at) = self.term?;
        (self.is_leader() && self.paxos.get_promise() == ballot).then_some(at)
    }

    /// Appends this term's barrier if this replica leads and has not yet
    /// (a no-op otherwise). Called before every append and every `ready`.
    fn open_term(&mut self) {
        if !self.is_leader() {
            return;
        }
        let ballot = self.paxos.get_promise();
        if self.term.is_some_and(|(b, _)| b == ballot) {
            return;
        }
        let at = self.epoch.base + self.wal.lock().state().end();
        if self.paxos.append(Entry::barrier()).is_ok() {
            self.term = Some((ballot, at));
        }
    }

    /// Round of the ballot this replica promised.
    pub fn ballot(&self) -> u32 {
        self.paxos.get_promise().n
    }

    /// Position one past the last decided entry.
    pub fn decided(&self) -> Position {
        self.epoch.base + self.paxos.get_decided_idx() as u64
    }

    /// The decided position no crash can bring back below: the decided
    /// index is written lazily (D39), so after a crash a replica may
    /// restart below `decided()` and learn the rest from the leader.
    pub fn durable_decided(&self) -> Position {
        self.epoch.base + self.wal.lock().durable_decided()
    }

    /// The trim floor this replica may report to the leader: its
    /// materializer's `floor`, never past the decided position a crash
    /// cannot take back. A replica that restarted below another's trim
    /// point would be sent an empty suffix for the trimmed range and
    /// truncate chosen entries (found by review of D39). So when the
    /// floor is past it, the lazily written decided index is flushed
    /// first (at most one fdatasync per housekeeping round).
    ///
    /// # Errors
    /// A failed flush (the WAL is then poisoned).
    pub fn reportable_floor(&mut self, floor: Position) -> Result<Position, ShardError> {
        if floor > self.durable_decided() {
            self.wal.lock().flush()?;
        }
        Ok(floor.min(self.durable_decided()))
    }

    /// Position one past the last entry `ready` has returned.
    pub fn delivered(&self) -> Position {
        self.epoch.base + self.delivered_idx
    }

    pub fn handle(&mut self, mut msg: Message<Entry>) {
        let mut outbid = false;
        if let Message::SequencePaxos(pm) = &mut msg {
            match &mut pm.msg {
                PaxosMsg::PrepareReq(r) => {
                    // A replica can recover a promise above the leader's
                    // ballot (it tried to lead; its Prepare never left, but
                    // the unsynced promise survived the crash). It rejects
                    // the leader's Prepare, and OmniPaxos' leader ignores
                    // its PrepareReq as coming from a higher round, so it
                    // stays out until the next election, which a healthy
                    // majority never holds (found by the simulation). The
                    // leader takes a ballot above it instead.
                    outbid = self.leader() == Some(self.node) && r.n > self.paxos.get_promise();
                }
                PaxosMsg::Promise(p) => {
                    // OmniPaxos 0.2.4 keeps adding new entries to the last
                    // AcceptDecide it queued for a follower until its
                    // outgoing buffer is taken. If a Promise makes the
                    // leader resync that follower in between (the
                    // AcceptSync opens a new sequence session), later
                    // entries go only into the stale-session message, which
                    // the follower discards, and its next entries land one
                    // index off: divergent decided logs (found by the
                    // simulation). Taking the buffer first closes the
                    // cached message; the order of messages is unchanged.
                    self.paxos.take_outgoing_messages(&mut self.early_out);
                    if let Some(sync) = p.log_sync.as_mut() {
                        if self.normalize_sync(sync) {
                            p.log_sync = None;
                        }
                    }
                }
                PaxosMsg::AcceptSync(a) => {
                    let no_op = self.normalize_sync(&mut a.log_sync);
                    if no_op {
                        self.accept_stop_sign_resync(a.n);
                        return;
                    }
                }
                _ => {}
            }
        }
        self.paxos.handle_incoming(msg);
        if outbid {
            self.paxos.try_become_leader();
        }
    }

    /// Rewrites an incoming log sync (in a Promise or an AcceptSync) into
    /// the equivalent one OmniPaxos 0.2.4 handles correctly; returns true if
    /// nothing is left to apply to this replica, whose stop sign is decided.
    /// Each case was found by the simulation:
    ///
    /// * OmniPaxos counts a stop sign as the index after the last entry, so
    ///   a replica holding one is resynced from `end + 1` with nothing to
    ///   append; OmniPaxos then counts the stop sign again: its log becomes
    ///   one index longer than the storage (a phantom index that gets
    ///   decided) and storage is asked to append past its end. Such a sync
    ///   starts at `end`.
    /// * A sync computed from an older Promise (answered late) can start
    ///   below this replica's decided index. The overlap must hold the same
    ///   decided entries (checked; otherwise the sync is left alone), so it
    ///   is skipped: OmniPaxos asserts in debug builds that no sync starts
    ///   below the decided index, and in release builds would truncate and
    ///   rewrite decided entries in the WAL.
    fn normalize_sync(&self, sync: &mut LogSync<Entry>) -> bool {
        let w = self.wal.lock();
        let state = w.state();
        let end = state.end() as usize;
        if sync.stopsign.is_some() && sync.suffix.is_empty() && sync.sync_idx == end + 1 {
            sync.sync_idx = end;
        }
        let decided = self.paxos.get_decided_idx().min(end);
        if sync.sync_idx < decided && decided - sync.sync_idx <= sync.suffix.len() {
            // Entries below `entries_start` are trimmed, so decided: only
            // the held ones can be compared.
            let from = sync.sync_idx.max(state.entries_start as usize);
            let skip = decided - sync.sync_idx;
            let held = state.get(from as u64, decided as u64);
            if held.as_deref() == Some(&sync.suffix[from - sync.sync_idx..skip]) {
                sync.suffix.drain(..skip);
                sync.sync_idx = decided;
            }
        }
        self.paxos.is_reconfigured().is_some()
            && sync.stopsign.is_some()
            && sync.suffix.is_empty()
            && sync.sync_idx == end
    }

    /// Answers an AcceptSync that brings nothing new to this replica, whose
    /// stop sign is decided (OmniPaxos would reject the sync as starting
    /// below the decided index), as OmniPaxos would: everything up to and
    /// including the stop sign is accepted in round `n`.
    fn accept_stop_sign_resync(&mut self, n: Ballot) {
        if self.paxos.get_promise() != n {
            return;
        }
        let accepted_idx = self.wal.lock().state().end() as usize + 1;
        // After what OmniPaxos queued so far, to keep per-link order.
        self.paxos.take_outgoing_messages(&mut self.early_out);
        self.early_out.push(Message::SequencePaxos(PaxosMessage {
            from: self.node,
            to: n.pid,
            msg: PaxosMsg::Accepted(Accepted { n, accepted_idx }),
        }));
    }

    pub fn tick(&mut self) {
        self.paxos.tick();
        self.reads.tick(self.resend_ticks);
    }

    /// Starts a linearizable read (see `read_index`): at the leader it is
    /// answered by a later `ready`; elsewhere the caller forwards it.
    pub fn read(&mut self, id: ReadId) -> ReadStart {
        if self.stopped {
            return ReadStart::NoLeader;
        }
        match self.paxos.get_current_leader() {
            Some((l, true)) if l == self.node => {
                let end = self.wal.lock().state().end();
                self.reads.register(id, end)
            }
            Some((l, _)) if l != self.node => ReadStart::Forward(l),
            _ => ReadStart::NoLeader,
        }
    }

    /// A read-index message from `from`.
    pub fn handle_read(&mut self, from: NodeId, msg: ReadMsg) {
        match msg {
            ReadMsg::Probe { round, ballot } => {
                let promise = self.paxos.get_promise();
                self.reads.probe(from, round, ballot, promise)
            }
            ReadMsg::Ack { round, ok } => self.reads.ack(from, round, ok),
        }
    }

    /// The link to `peer` came back after a disconnect.
    pub fn reconnected(&mut self, peer: NodeId) {
        self.paxos.reconnected(peer);
    }

    /// Proposes `entry`. Entries carrying a request already in this
    /// replica's log are not appended twice (see [`Proposed::Duplicate`]).
    pub fn propose(&mut self, entry: Entry) -> Proposed {
        if self.stopped {
            return Proposed::Stopping;
        }
        if !entry.request.is_none() {
            let w = self.wal.lock();
            if let Some(idx) = w.state().by_request.get(&entry.request) {
                let decided = (*idx as usize) < self.paxos.get_decided_idx();
                return Proposed::Duplicate(decided.then_some(self.epoch.base + *idx));
            }
        }
        self.open_term();
        match self.paxos.get_current_leader() {
            Some((l, true)) if l == self.node => match self.paxos.append(entry) {
                Ok(()) => Proposed::Appended,
                Err(_) => Proposed::Stopping,
            },
            Some((l, _)) if l != self.node => Proposed::Forward(l),
            _ => Proposed::NoLeader,
        }
    }

    /// Asks the replica set to move to `nodes` (a new epoch).
    pub fn reconfigure(&mut self, nodes: Vec<NodeId>) -> Result<(), ShardError> {
        let cfg = ClusterConfig {
            configuration_id: self.epoch.config_id + 1,
            nodes,
            flexible_quorum: None,
        };
        self.paxos
            .reconfigure(cfg, None)
            .map_err(|e| ShardError::Config(format!("{e:?}")))
    }

    /// Trims the log below `upto` on all replicas. Only the leader can trim,
    /// and only below what every replica has accepted; otherwise a no-op
    /// that the caller retries later.
    pub fn trim(&mut self, upto: Position) -> bool {
        let idx = upto.since(self.epoch.base) as usize;
        if idx == 0 || !self.is_leader() {
            return false;
        }
        self.paxos.trim(Some(idx)).is_ok()
    }

    /// Makes every queued write durable, then returns what may leave the node.
    ///
    /// # Errors
    /// A WAL error is fatal for this replica: the caller must stop it and
    /// restart from disk.
    pub fn ready(&mut self) -> Result<Ready, ShardError> {
        let mut early = Vec::new();
        let mut r = self.ready_pipelined(|m| early.extend(m))?;
        early.append(&mut r.messages);
        r.messages = early;
        Ok(r)
    }

    /// As [`ShardCore::ready`], but hands the leader's leading run of
    /// `AcceptDecide` messages to `send_early` *before* the fsync, so the
    /// followers' fsyncs overlap the leader's (as Raft leaders do).
    ///
    /// Safe because nothing is revealed as decided before a majority has
    /// it durable: a follower acknowledges (`Accepted`) only after its own
    /// fsync, and every replica fsyncs before it acknowledges a client or
    /// delivers a decided entry to subscribers. Only the prefix of
    /// `AcceptDecide`s goes early, so per-link message order is kept.
    pub fn ready_pipelined(
        &mut self,
        send_early: impl FnOnce(Vec<Message<Entry>>),
    ) -> Result<Ready, ShardError> {
        self.open_term();
        let mut msgs = std::mem::take(&mut self.early_out);
        self.paxos.take_outgoing_messages(&mut msgs);
        let split = msgs
            .iter()
            .position(|m| {
                !matches!(
                    m,
                    Message::SequencePaxos(PaxosMessage {
                        msg: PaxosMsg::AcceptDecide(_),
                        ..
                    })
                )
            })
            .unwrap_or(msgs.len());
        let late = msgs.split_off(split);
        if !msgs.is_empty() {
            send_early(msgs);
        }
        self.wal.lock().sync()?;
        let mut r = Ready {
            messages: late,
            ..Ready::default()
        };
        self.paxos.take_outgoing_messages(&mut r.messages);
        if let Some(entries) = self.paxos.read_decided_suffix(self.delivered_idx as usize) {
            for e in entries {
                match e {
                    LogEntry::Decided(e) => {
                        r.decided.push((self.epoch.base + self.delivered_idx, e));
                        self.delivered_idx += 1;
                    }
                    LogEntry::StopSign(ss, true) => {
                        if !self.stopped {
                            self.stopped = true;
                            r.stopped = Some((ss, self.epoch.base + self.delivered_idx));
                        }
                    }
                    LogEntry::Trimmed(idx) => {
                        self.delivered_idx = self.delivered_idx.max(idx as u64);
                    }
                    LogEntry::Snapshotted(s) => {
                        self.delivered_idx = self.delivered_idx.max(s.trimmed_idx as u64);
                    }
                    LogEntry::StopSign(_, false) | LogEntry::Undecided(_) => break,
                }
            }
        }
        let peers: Vec<NodeId> = self
            .epoch
            .nodes
            .iter()
            .copied()
            .filter(|n| *n != self.node)
            .collect();
        let majority = self.epoch.nodes.len() / 2 + 1;
        if self.stopped {
            self.reads.abandon(ReadFailed::NotLeader);
        }
        self.reads.step(
            self.is_leader(),
            self.paxos.get_promise(),
            &peers,
            majority,
            self.paxos.get_decided_idx() as u64,
        );
        r.read_msgs = self.reads.take_outbox();
        let base = self.epoch.base;
        r.reads = self
            .reads
            .take_done()
            .into_iter()
            .map(|(id, res)| (id, res.map(|i| base + i)))
            .collect();
        Ok(r)
    }

    /// Decided entries `[from, to)` held by this replica, or `None` if some
    /// were trimmed or are not decided yet.
    pub fn read_decided(&self, from: Position, to: Position) -> Option<Vec<Entry>> {
        if from < self.epoch.base || to > self.decided() {
            return None;
        }
        let w = self.wal.lock();
        w.state().get(from - self.epoch.base, to - self.epoch.base)
    }
}
