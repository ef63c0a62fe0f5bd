//! Deterministic simulation of one shard's replicated log.
//!
//! Three replicas of one shard run the real [`ShardCore`] (OmniPaxos, the
//! segment WAL, the storage adapter) on in-memory disks ([`CrashDisk`], a
//! [`SimDisk`] that can also lose power during an fsync), wired by an
//! in-memory network and driven by seeded RNGs on one thread, so a seed is a
//! complete, replayable description of a run: `run(seed, steps)` twice gives
//! the same [`Stats`], down to the digest of the decided log.
//!
//! One step: due messages are delivered, clients propose (new requests and
//! retries, at random replicas; `Forward` answers travel to the leader as
//! messages), every replica ticks (and what its ticks make due runs:
//! re-proposals, re-forwarded reads, floor exchange and trimming), then `ready_pipelined` runs on each
//! replica, as in the runtime (its group commit: whatever arrived since the
//! last one is one batch; a leader's `AcceptDecide`s leave before its
//! fsync, so they are out even when that fsync fails).
//!
//! Faults, at per-seed rates from calm to hostile: the network loses,
//! delays, duplicates and reorders messages (FIFO within a link, like the
//! TCP transport; see `Network`) and cuts links (one way, both ways, or
//! isolating a node), healing later with `reconnected` on both ends;
//! replicas crash and restart from their WAL and their materializer's
//! snapshot; an fsync fails (device error) or the power fails during it, so
//! the crash keeps a random, possibly torn, prefix of the unsynced write;
//! the leader trims below what every materializer has persisted, learnt
//! from floors the replicas send each other (small segments, so trimmed
//! segments are deleted); for some seeds the replica
//! set reconfigures into a new epoch (same nodes, `config_id` 2, fresh
//! disks, positions continuing across the boundary).
//!
//! Around each core the simulation keeps what the runtime's shard loop
//! keeps, in the same types (`policy`): who waits for which proposal and
//! when it is proposed again, which forwarded reads are re-sent, the trim
//! floors. Only clients' own retries (a request re-sent with its id after a
//! timeout) are the simulation's.
//!
//! Invariants, checked after every step (and at every delivery):
//! 1. Agreement: no two replicas ever deliver different entries at one
//!    position, across crashes and epochs ([`Checker::decided`]).
//! 2. Delivery: a replica delivers positions contiguously, never skipping or
//!    repeating, and after a restart resumes exactly at its snapshot.
//! 3. Snapshot + suffix == full replay: every materializer state, live or
//!    persisted, equals the digest of the global log up to its position
//!    ([`Checker::materialized`]).
//! 4. Durability: a replica's decided position never goes down within an
//!    incarnation, nor below what it had durably decided (returned from
//!    `ready`) before a crash.
//! 5. Deduplication: no request id is decided at two positions, and a
//!    `Duplicate(Some(p))` answer, like every position a waiter is
//!    answered with, names the position the request holds.
//! 6. Linearizable reads: a read (`ShardCore::read`, ReadIndex: no entry)
//!    issued at a random replica, forwarded to the leader it knows, and
//!    answered with position `p` has every position decided anywhere
//!    before it was issued below `p`. Its probes and acks travel like any
//!    other message (lost, delayed, cut).
//!
//! At the end the network heals, crashed replicas restart, and the run goes
//! on without faults until every replica has delivered every acknowledged
//! entry (else a liveness failure); then every replica's log is read back
//! and compared with the global log.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use omnipaxos::messages::sequence_paxos::{PaxosMessage, PaxosMsg};
use omnipaxos::messages::Message;
use omnipaxos::storage::StopSign;
use omnipaxos::util::NodeId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::disk::{Disk, DiskFile, SimDisk, SimFile};
use crate::entry::{Entry, EntryKind, RequestId};
use crate::policy::{ForwardedReads, Proposals, Refused, Ticks, TrimFloors};
use crate::read_index::{ReadId, ReadMsg, ReadStart};
use crate::shard::{Epoch, Position, Proposed, Ready, ShardCore, ShardId, Timing};
use crate::wal::{NodeWal, StreamId, WalConfig};

mod checker;
mod disk;
mod net;

use checker::mix64;
pub use checker::{Checker, Materialized};
pub use disk::{CrashDisk, CrashFile};
use net::{Network, Packet, Payload, Profile};

/// The replica set of every run (and of its second epoch).
const NODES: [NodeId; 3] = [1, 2, 3];
const SHARD: ShardId = ShardId(1);
/// Small segments, so rotation and deletion of trimmed segments happen often.
const SEGMENT_BYTES: u64 = 4096;
/// Client ids are `1..=CLIENTS`.
const CLIENTS: u64 = 4;
/// Recent requests a client may retry.
const RETRY_WINDOW: usize = 64;
/// Calm steps allowed for every replica to catch up at the end of a run.
const SETTLE_STEPS_MAX: u64 = 5_000;
/// Events kept for the failure report.
const EVENTS_KEPT: usize = 48;

/// What a run does besides its seed.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Steps with faults before the final calm phase.
    pub steps: u64,
    /// A deliberate bug, to prove the checks can fail.
    pub sabotage: Option<Sabotage>,
    /// Print every event, delivered Paxos message and decision to stderr.
    pub trace: bool,
}

/// Deliberate bugs injected into the simulation (never into the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// Node 2 sees one byte of one delivered entry changed.
    CorruptDelivery,
    /// Restarted replicas ask for delivery one position past their snapshot.
    ResumePastSnapshot,
    /// Replicas answer reads from their own delivered position instead of
    /// a round through the leader (what the Jepsen `stale-reads` build does).
    StaleReads,
    /// Replicas report their materializer's floor even past the decided
    /// index a crash can take back (D39 without `reportable_floor`).
    FloorPastDurable,
}

/// What a run exercised. Equal seeds give equal stats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub steps: u64,
    /// Positions decided (every one was acknowledged by some `ready`).
    pub acknowledged: u64,
    pub proposals: u64,
    pub retries: u64,
    pub appended: u64,
    /// `Proposed::Duplicate` answers.
    pub deduplicated: u64,
    pub forwarded: u64,
    /// `NoLeader` and `Stopping` answers.
    pub refused: u64,
    /// Proposals answered to their waiter with a position (each checked to
    /// hold that request), by the same `policy::Proposals` as the runtime.
    pub answered: u64,
    /// Retries not sent because the first copy left the dedupe window.
    pub stale_retries_skipped: u64,
    pub messages: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub delayed: u64,
    pub partitions: u64,
    pub crashes: u64,
    /// Failed `ready`s: device errors and power losses during an fsync.
    pub fsync_failures: u64,
    /// Of those, power losses (the unsynced write may survive, torn).
    pub power_cuts: u64,
    /// Restarts whose WAL recovery cut a torn tail.
    pub torn_tails: u64,
    pub trims: u64,
    pub max_trim: Position,
    /// WAL segments deleted after trims (seen as a drop in segment count).
    pub segments_deleted: u64,
    /// WAL segments started in a recycled (trimmed) file.
    pub segments_recycled: u64,
    pub reconfig_requests: u64,
    /// Epochs opened beyond the first, over all replicas.
    pub epochs_joined: u64,
    pub settle_steps: u64,
    /// Linearizable reads answered, and refused (no leader, lost).
    pub reads: u64,
    pub reads_refused: u64,
    /// Digest of the whole decided log (for determinism checks).
    pub fingerprint: u64,
}

impl Stats {
    /// Adds `o` into `self` (fingerprints are mixed, maxima kept).
    pub fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.acknowledged += o.acknowledged;
        self.proposals += o.proposals;
        self.retries += o.retries;
        self.appended += o.appended;
        self.deduplicated += o.deduplicated;
        self.forwarded += o.forwarded;
        self.refused += o.refused;
        self.answered += o.answered;
        self.stale_retries_skipped += o.stale_retries_skipped;
        self.messages += o.messages;
        self.dropped += o.dropped;
        self.duplicated += o.duplicated;
        self.delayed += o.delayed;
        self.partitions += o.partitions;
        self.crashes += o.crashes;
        self.fsync_failures += o.fsync_failures;
        self.power_cuts += o.power_cuts;
        self.torn_tails += o.torn_tails;
        self.trims += o.trims;
        self.max_trim = self.max_trim.max(o.max_trim);
        self.segments_deleted += o.segments_deleted;
        self.segments_recycled += o.segments_recycled;
        self.reconfig_requests += o.reconfig_requests;
        self.epochs_joined += o.epochs_joined;
        self.settle_steps += o.settle_steps;
        self.reads += o.reads;
        self.reads_refused += o.reads_refused;
        self.fingerprint = mix64(self.fingerprint ^ o.fingerprint);
    }
}

/// Runs `seed` for `steps` faulty steps plus the final calm phase.
///
/// # Errors
/// The first violated invariant (or panic), as a message naming the seed
/// and the step, followed by the last events of the run.
pub fn run(seed: u64, steps: usize) -> Result<Stats, String> {
    run_with(
        seed,
        &Options {
            steps: steps as u64,
            ..Options::default()
        },
    )
}

/// [`run`] with [`Options`].
pub fn run_with(seed: u64, opts: &Options) -> Result<Stats, String> {
    let mut sim = Sim::new(seed, opts.clone());
    let result = panic::catch_unwind(AssertUnwindSafe(|| sim.run_all()));
    let failure = match result {
        Ok(Ok(())) => return Ok(sim.final_stats()),
        Ok(Err(msg)) => msg,
        Err(payload) => format!("panic: {}", panic_message(payload.as_ref())),
    };
    let events: Vec<&str> = sim.events.iter().map(String::as_str).collect();
    Err(format!(
        "seed {seed} step {}: {failure}\nlast events:\n  {}",
        sim.step,
        events.join("\n  ")
    ))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

// ---------------------------------------------------------------------------
// Replicas
// ---------------------------------------------------------------------------

fn wal_config() -> WalConfig {
    WalConfig {
        segment_bytes: SEGMENT_BYTES,
        background_prealloc: false,
        // Small, so resyncs and subscribers read entries back from disk.
        memory_bytes_max: 2048,
    }
}

/// One line about a Paxos message, for traces (heartbeats omitted).
fn describe(m: &Message<Entry>) -> Option<String> {
    let Message::SequencePaxos(PaxosMessage { msg, .. }) = m else {
        return None;
    };
    let b = |n: &omnipaxos::ballot_leader_election::Ballot| format!("{}.{}", n.n, n.pid);
    Some(match msg {
        PaxosMsg::PrepareReq(p) => format!("PrepareReq {}", b(&p.n)),
        PaxosMsg::Prepare(p) => format!(
            "Prepare {} dec {} acc {} na {}",
            b(&p.n),
            p.decided_idx,
            p.accepted_idx,
            b(&p.n_accepted)
        ),
        PaxosMsg::Promise(p) => format!(
            "Promise {} na {} dec {} acc {} sync {:?}",
            b(&p.n),
            b(&p.n_accepted),
            p.decided_idx,
            p.accepted_idx,
            p.log_sync
                .as_ref()
                .map(|s| (s.sync_idx, s.suffix.len(), s.stopsign.is_some()))
        ),
        PaxosMsg::AcceptSync(a) => format!(
            "AcceptSync {} seq {:?} dec {} sync_idx {} suffix {} ss {}",
            b(&a.n),
            (a.seq_num.session, a.seq_num.counter),
            a.decided_idx,
            a.log_sync.sync_idx,
            a.log_sync.suffix.len(),
            a.log_sync.stopsign.is_some()
        ),
        PaxosMsg::AcceptDecide(a) => format!(
            "AcceptDecide {} seq {:?} dec {} entries {:?}",
            b(&a.n),
            (a.seq_num.session, a.seq_num.counter),
            a.decided_idx,
            a.entries
                .iter()
                .map(|e| (e.request.client, e.request.seq))
                .collect::<Vec<_>>()
        ),
        PaxosMsg::Accepted(a) => format!("Accepted {} acc {}", b(&a.n), a.accepted_idx),
        PaxosMsg::NotAccepted(a) => format!("NotAccepted {}", b(&a.n)),
        PaxosMsg::Decide(d) => format!(
            "Decide {} seq {:?} dec {}",
            b(&d.n),
            (d.seq_num.session, d.seq_num.counter),
            d.decided_idx
        ),
        PaxosMsg::ProposalForward(v) => format!("ProposalForward {}", v.len()),
        PaxosMsg::Compaction(c) => format!("Compaction {c:?}"),
        PaxosMsg::AcceptStopSign(a) => format!("AcceptStopSign {}", b(&a.n)),
        PaxosMsg::ForwardStopSign(_) => "ForwardStopSign".to_string(),
    })
}

/// The WAL state of a core, for traces.
fn wal_summary(c: &ShardCore<CrashDisk>) -> String {
    let w = c.wal().lock();
    let s = w.state();
    format!(
        "entries {}..{} trimmed {} compacted {} decided {} stopsign {} segments {} torn {}",
        s.entries_start,
        s.end(),
        s.trimmed,
        s.compacted,
        s.decided,
        s.stopsign.is_some(),
        w.segment_count(),
        w.stats().torn_tail_truncated
    )
}

fn first_epoch() -> Epoch {
    Epoch {
        config_id: 1,
        nodes: NODES.to_vec(),
        base: Position::ZERO,
    }
}

fn index_of(node: NodeId) -> usize {
    NODES
        .iter()
        .position(|n| *n == node)
        .expect("messages only name simulated nodes")
}

/// One epoch a replica has joined. Survives crashes, like the node's record
/// of its memberships and its stream in the node's WAL.
struct Slot {
    epoch: Epoch,
    /// Highest `decided()` seen right after a `ready` (which had synced the
    /// WAL): no restart may come back below it.
    durable_decided: Position,
    /// Base of the next epoch once this one stopped.
    end: Option<Position>,
}

/// A running incarnation of a replica.
struct Live {
    /// The node's WAL: one stream per core.
    wal: NodeWal<CrashDisk>,
    /// One core per slot, oldest epoch first.
    cores: Vec<ShardCore<CrashDisk>>,
    /// `decided()` of each core at its last check in this incarnation.
    seen_decided: Vec<Position>,
    /// `delivered()` of each core when it was opened: its materializer's
    /// position, which may be past the decided index it recovered (the
    /// decided index is written lazily, D39) until it learns it again.
    opened_at: Vec<Position>,
    /// WAL segment count of each core at its last check.
    seen_segments: Vec<usize>,
    /// Per core: segments its WAL started in recycled files, as last seen.
    seen_recycled: Vec<u64>,
    /// The materializer, fed by every core's `ready().decided`.
    mat: Materialized,
    /// The runtime's rules around each core (`policy`), one per core.
    policies: Vec<CorePolicy>,
}

/// What the runtime's shard loop keeps around its core, in the same types:
/// waiters and re-proposals, forwarded reads, trim floors.
struct CorePolicy {
    ticks: Ticks,
    proposals: Proposals<RequestId>,
    forwarded: ForwardedReads,
    floors: TrimFloors,
}

impl CorePolicy {
    fn new() -> CorePolicy {
        CorePolicy {
            ticks: Ticks::default(),
            proposals: Proposals::default(),
            forwarded: ForwardedReads::default(),
            floors: TrimFloors::new(0),
        }
    }
}

struct Replica {
    id: NodeId,
    /// The node's disk: its WAL holds every epoch's stream.
    disk: CrashDisk,
    slots: Vec<Slot>,
    /// The materializer's persisted snapshot: survives crashes.
    snapshot: Materialized,
    /// `None` while crashed.
    live: Option<Live>,
    restart_at: u64,
}

impl Replica {
    fn new(id: NodeId) -> Replica {
        Replica {
            id,
            disk: CrashDisk::default(),
            slots: vec![Slot {
                epoch: first_epoch(),
                durable_decided: Position::ZERO,
                end: None,
            }],
            snapshot: Materialized::EMPTY,
            live: None,
            restart_at: 0,
        }
    }

    /// Where core `k` must have delivered up to, given the materializer:
    /// the materializer position clamped into the epoch's span.
    fn expected_delivered(&self, k: usize, mat: Materialized) -> Position {
        let slot = &self.slots[k];
        mat.next
            .max(slot.epoch.base)
            .min(slot.end.unwrap_or(Position::MAX))
    }
}

// ---------------------------------------------------------------------------
// The simulation
// ---------------------------------------------------------------------------

/// The log only deduplicates a retry while its first copy is still in the
/// leader's log of the same epoch (see `ShardCore::propose`); older retries
/// are the materializers' business, so simulated clients do not send them.
fn retry_in_contract(
    checker: &Checker,
    trim_hi: Position,
    req: RequestId,
    epoch_base: Position,
) -> bool {
    match checker.position_of(req) {
        None => true,
        Some(p) => p >= trim_hi && p >= epoch_base,
    }
}

struct Sim {
    seed: u64,
    step: u64,
    rng: StdRng,
    profile: Profile,
    opts: Options,
    net: Network,
    replicas: Vec<Replica>,
    checker: Checker,
    /// Recently created requests, for retries.
    recent: VecDeque<Entry>,
    /// Last sequence number of each client (index = client id).
    client_seq: Vec<u64>,
    /// Base of every epoch any replica has entered, by configuration id.
    epoch_bases: BTreeMap<u32, Position>,
    /// Highest position any trim was asked for.
    trim_hi: Position,
    sabotaged: bool,
    stats: Stats,
    events: VecDeque<String>,
    /// Reads in flight: the positions decided anywhere when each was
    /// issued (its answer must not be below).
    reads: BTreeMap<ReadId, Position>,
    next_read: u64,
}

impl Sim {
    fn new(seed: u64, opts: Options) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let profile = Profile::draw(&mut rng, opts.steps);
        let mut sim = Sim {
            seed,
            step: 0,
            rng,
            profile,
            opts,
            net: Network::new(seed),
            replicas: NODES.iter().map(|id| Replica::new(*id)).collect(),
            checker: Checker::new(),
            recent: VecDeque::new(),
            client_seq: vec![0; CLIENTS as usize + 1],
            epoch_bases: BTreeMap::from([(1, Position::ZERO)]),
            trim_hi: Position::ZERO,
            sabotaged: false,
            stats: Stats::default(),
            events: VecDeque::new(),
            reads: BTreeMap::new(),
            next_read: 0,
        };
        sim.note(format!(
            "seed {seed}: {:?} {:?}",
            sim.profile, sim.net.profile
        ));
        sim
    }

    /// Records an event for the failure report.
    fn note(&mut self, what: String) {
        if self.opts.trace {
            eprintln!("[{}] {what}", self.step);
        }
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(format!("[{}] {what}", self.step));
    }

    fn run_all(&mut self) -> Result<(), String> {
        for i in 0..NODES.len() {
            self.restart(i)?;
        }
        while self.step < self.opts.steps {
            self.advance(true)?;
        }
        self.settle()?;
        self.final_checks()
    }

    fn final_stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.steps = self.step;
        s.acknowledged = self.checker.len().get();
        s.messages = self.net.messages;
        s.dropped = self.net.dropped;
        s.duplicated = self.net.duplicated;
        s.delayed = self.net.delayed;
        s.fingerprint = mix64(self.checker.digests[self.checker.log.len()] ^ self.seed);
        s
    }

    /// One step: faults, restarts, deliveries, client load, ticks, `ready`
    /// on every replica, snapshots, trims, then the invariant checks.
    fn advance(&mut self, faults: bool) -> Result<(), String> {
        if faults {
            self.inject_faults();
        }
        self.restart_due()?;
        self.heal_due();
        self.deliver_due()?;
        self.clients()?;
        self.maybe_reconfigure();
        self.tick_all()?;
        for i in 0..NODES.len() {
            self.ready_replica(i)?;
        }
        self.persist_snapshots();
        self.check_step()?;
        self.step += 1;
        Ok(())
    }

    // --- faults -----------------------------------------------------------

    fn inject_faults(&mut self) {
        for i in 0..NODES.len() {
            if self.replicas[i].live.is_some() && self.rng.gen_bool(self.profile.crash) {
                self.crash(i, "crash");
            }
        }
        if self.net.cut.is_empty() && self.rng.gen_bool(self.profile.partition) {
            self.partition();
        }
    }

    /// Power loss: the cores and everything in memory go; each disk keeps
    /// its synced bytes plus a random, possibly torn, prefix of the rest.
    fn crash(&mut self, i: usize, why: &str) {
        let r = &mut self.replicas[i];
        if self.opts.trace {
            for c in r.live.iter().flat_map(|l| l.cores.iter()) {
                eprintln!(
                    "[{}] node {} e{} before crash: {}",
                    self.step,
                    r.id,
                    c.epoch().config_id,
                    wal_summary(c)
                );
            }
        }
        r.live = None;
        r.disk.crash(&mut self.rng);
        r.restart_at = self.step + self.rng.gen_range(5..=80);
        let (id, at) = (r.id, r.restart_at);
        self.stats.crashes += 1;
        self.note(format!("{why}: node {id} down until step {at}"));
    }

    fn partition(&mut self) {
        let a = NODES[self.rng.gen_range(0..NODES.len())];
        let others: Vec<NodeId> = NODES.iter().copied().filter(|n| *n != a).collect();
        let b = others[self.rng.gen_range(0..others.len())];
        let kind = self.rng.gen_range(0..3);
        match kind {
            0 => {
                for o in &others {
                    self.net.cut.insert((a, *o));
                    self.net.cut.insert((*o, a));
                }
            }
            1 => {
                self.net.cut.insert((a, b));
            }
            _ => {
                self.net.cut.insert((a, b));
                self.net.cut.insert((b, a));
            }
        }
        self.net.heal_at = self.step + self.rng.gen_range(10..=150);
        self.stats.partitions += 1;
        let cut = format!("{:?}", self.net.cut);
        self.note(format!("partition {cut} until step {}", self.net.heal_at));
    }

    fn heal_due(&mut self) {
        if !self.net.cut.is_empty() && self.step >= self.net.heal_at {
            self.heal();
        }
    }

    /// Restores every link and tells both ends, as a transport that
    /// re-established its connections would.
    fn heal(&mut self) {
        let cut = std::mem::take(&mut self.net.cut);
        if cut.is_empty() {
            return;
        }
        let pairs: BTreeSet<(NodeId, NodeId)> = cut
            .iter()
            .map(|(a, b)| ((*a).min(*b), (*a).max(*b)))
            .collect();
        for (a, b) in pairs {
            self.reconnect_pair(index_of(a), index_of(b));
        }
        self.note("healed".to_string());
    }

    /// Calls `reconnected` on both ends of a working link between two live
    /// replicas, on every core of each.
    fn reconnect_pair(&mut self, i: usize, j: usize) {
        let (a, b) = (self.replicas[i].id, self.replicas[j].id);
        let both_live = self.replicas[i].live.is_some() && self.replicas[j].live.is_some();
        if i == j || !both_live || self.net.is_cut(a, b) || self.net.is_cut(b, a) {
            return;
        }
        for (me, peer) in [(i, b), (j, a)] {
            if let Some(live) = self.replicas[me].live.as_mut() {
                for c in &mut live.cores {
                    c.reconnected(peer);
                }
            }
        }
    }

    fn reconnect_all(&mut self) {
        for i in 0..NODES.len() {
            for j in i + 1..NODES.len() {
                self.reconnect_pair(i, j);
            }
        }
    }

    fn restart_due(&mut self) -> Result<(), String> {
        for i in 0..NODES.len() {
            let r = &self.replicas[i];
            if r.live.is_none() && self.step >= r.restart_at {
                self.restart(i)?;
            }
        }
        Ok(())
    }

    /// Reopens every epoch the replica has joined from its disk, resuming
    /// delivery at the materializer's snapshot.
    ///
    /// # Errors
    /// Recovery failure, a decided position below the durable one
    /// (invariant 4), or a core that would not resume at the snapshot
    /// (invariant 2).
    fn restart(&mut self, i: usize) -> Result<(), String> {
        let skip = u64::from(self.opts.sabotage == Some(Sabotage::ResumePastSnapshot));
        let r = &self.replicas[i];
        let mat = r.snapshot;
        let mut cores = Vec::new();
        let mut seen_decided = Vec::new();
        let mut opened_at = Vec::new();
        let mut seen_segments = Vec::new();
        let mut seen_recycled = Vec::new();
        let wal = NodeWal::open(r.disk.clone(), wal_config())
            .map_err(|e| format!("recovery: node {} cannot reopen its WAL: {e}", r.id))?;
        for (k, s) in r.slots.iter().enumerate() {
            let from = mat.next.min(s.end.unwrap_or(Position::MAX)) + skip;
            let core = wal
                .stream(StreamId::replica(SHARD.get(), s.epoch.config_id))
                .map_err(crate::shard::ShardError::from)
                .and_then(|stream| {
                    ShardCore::open(
                        SHARD,
                        r.id,
                        s.epoch.clone(),
                        stream,
                        &Timing::default(),
                        from,
                    )
                })
                .map_err(|e| {
                    format!(
                        "recovery: node {} cannot reopen epoch {}: {e}",
                        r.id, s.epoch.config_id
                    )
                })?;
            if core.decided() < s.durable_decided {
                return Err(format!(
                    "durability: node {} reopened epoch {} at decided {}, below the {} it had \
                     durably decided",
                    r.id,
                    s.epoch.config_id,
                    core.decided(),
                    s.durable_decided
                ));
            }
            let expect = r.expected_delivered(k, mat);
            if core.delivered() != expect {
                return Err(format!(
                    "delivery: node {} reopened epoch {} delivering from {}, but its snapshot \
                     is at {}",
                    r.id,
                    s.epoch.config_id,
                    core.delivered(),
                    expect
                ));
            }
            if self.opts.trace {
                eprintln!(
                    "[{}] node {} e{} recovered: {}",
                    self.step,
                    r.id,
                    s.epoch.config_id,
                    wal_summary(&core)
                );
            }
            if core.wal().lock().stats().torn_tail_truncated {
                self.stats.torn_tails += 1;
            }
            seen_decided.push(core.decided());
            opened_at.push(core.delivered());
            seen_segments.push(core.wal().lock().segment_count());
            seen_recycled.push(core.wal().lock().stats().segments_recycled);
            cores.push(core);
        }
        let id = r.id;
        let policies = cores.iter().map(|_| CorePolicy::new()).collect();
        self.replicas[i].live = Some(Live {
            wal,
            cores,
            seen_decided,
            opened_at,
            seen_segments,
            seen_recycled,
            mat,
            policies,
        });
        self.note(format!("node {id} started from snapshot at {}", mat.next));
        for j in 0..NODES.len() {
            self.reconnect_pair(i, j);
        }
        Ok(())
    }

    // --- network ----------------------------------------------------------

    fn deliver_due(&mut self) -> Result<(), String> {
        for p in self.net.take_due(self.step) {
            self.deliver(p)?;
        }
        Ok(())
    }

    /// Hands one packet to the receiving core of its epoch, if the receiver
    /// is up, the link is not cut and the receiver has that epoch.
    fn deliver(&mut self, p: Packet) -> Result<(), String> {
        if self.net.is_cut(p.from, p.to) {
            self.net.dropped += 1;
            return Ok(());
        }
        let i = index_of(p.to);
        let core_index = self.replicas[i]
            .live
            .as_ref()
            .and_then(|l| l.cores.iter().position(|c| c.epoch().config_id == p.config));
        let Some(k) = core_index else {
            self.net.dropped += 1;
            return Ok(());
        };
        match p.payload {
            Payload::Paxos(m) => {
                if self.opts.trace {
                    if let Some(d) = describe(&m) {
                        eprintln!("[{}] {} -> {} e{}: {d}", self.step, p.from, p.to, p.config);
                    }
                }
                if let Some(live) = self.replicas[i].live.as_mut() {
                    live.cores[k].handle(m);
                }
                Ok(())
            }
            // As the runtime: a forwarded entry is proposed with nobody
            // waiting here and is not forwarded again (its origin proposes
            // it again until decided).
            Payload::Forward(entry) => self.propose(i, k, entry, None, true),
            Payload::Floor(floor) => {
                if let Some(live) = self.replicas[i].live.as_mut() {
                    live.policies[k].floors.peer(p.from, floor);
                }
                Ok(())
            }
            Payload::Read(m) => {
                if let Some(live) = self.replicas[i].live.as_mut() {
                    live.cores[k].handle_read(p.from, m);
                }
                Ok(())
            }
            Payload::ReadForward(id) => {
                let answer = match self.replicas[i].live.as_mut() {
                    Some(live) => live.cores[k].read(id),
                    None => return Ok(()),
                };
                if answer != ReadStart::Pending && self.reads.remove(&id).is_some() {
                    self.stats.reads_refused += 1;
                    self.read_done(id);
                }
                Ok(())
            }
        }
    }

    /// A client reads at a random live replica's newest core.
    fn issue_read(&mut self) -> Result<(), String> {
        let live: Vec<usize> = (0..NODES.len())
            .filter(|i| self.replicas[*i].live.is_some())
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let i = live[self.rng.gen_range(0..live.len())];
        let floor = self.checker.len();
        self.next_read += 1;
        let Some(live) = self.replicas[i].live.as_mut() else {
            return Ok(());
        };
        let k = live.cores.len() - 1;
        let core = &mut live.cores[k];
        let id = ReadId {
            origin: core.node,
            seq: self.next_read,
        };
        if self.opts.sabotage == Some(Sabotage::StaleReads) {
            let at = core.delivered();
            return self.read_answered(id, floor, Ok(at));
        }
        let config = core.epoch().config_id;
        self.reads.insert(id, floor);
        match core.read(id) {
            ReadStart::Pending => {}
            ReadStart::Forward(leader) => {
                let now = live.policies[k].ticks.now();
                live.policies[k].forwarded.sent(id.seq, now);
                self.net.send(
                    self.step,
                    id.origin,
                    leader,
                    config,
                    Payload::ReadForward(id),
                );
            }
            ReadStart::NoLeader | ReadStart::Busy => {
                self.reads.remove(&id);
                self.stats.reads_refused += 1;
            }
        }
        Ok(())
    }

    /// A read was answered (or refused): its origin stops forwarding it.
    fn read_done(&mut self, id: ReadId) {
        if let Some(live) = self.replicas[index_of(id.origin)].live.as_mut() {
            for p in &mut live.policies {
                p.forwarded.answered(id.seq);
            }
        }
    }

    /// Checks a read's answer against the positions decided before it.
    fn read_answered(
        &mut self,
        id: ReadId,
        floor: Position,
        r: Result<Position, crate::read_index::ReadFailed>,
    ) -> Result<(), String> {
        match r {
            Ok(p) if p < floor => Err(format!(
                "stale read {id:?}: answered {p}, but {floor} positions were decided before it was issued"
            )),
            Ok(_) => {
                self.stats.reads += 1;
                Ok(())
            }
            Err(_) => {
                self.stats.reads_refused += 1;
                Ok(())
            }
        }
    }

    // --- clients ----------------------------------------------------------

    /// New requests and retries of recent ones, at random live replicas.
    fn clients(&mut self) -> Result<(), String> {
        if self.rng.gen_bool(self.profile.propose) {
            let entry = self.new_request();
            let req = entry.request;
            self.submit(entry, Some(req))?;
        }
        if !self.recent.is_empty() && self.rng.gen_bool(self.profile.retry) {
            let entry = self.recent[self.rng.gen_range(0..self.recent.len())].clone();
            self.stats.retries += 1;
            self.submit(entry, None)?;
        }
        if self.rng.gen_bool(self.profile.propose) {
            self.issue_read()?;
        }
        Ok(())
    }

    /// A request with a fresh id; its payload names it, padded randomly.
    fn new_request(&mut self) -> Entry {
        let client = self.rng.gen_range(1..=CLIENTS);
        self.client_seq[client as usize] += 1;
        let seq = self.client_seq[client as usize];
        let mut payload = format!("c{client}s{seq}").into_bytes();
        let pad = self.rng.gen_range(0..48);
        payload.extend((0..pad).map(|_| self.rng.gen::<u8>()));
        let entry = Entry::new(EntryKind::DATA, RequestId { client, seq }, payload);
        if self.recent.len() == RETRY_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(entry.clone());
        self.stats.proposals += 1;
        entry
    }

    /// Proposes at the newest epoch of a random live replica, for `waiter`
    /// (a new request) or for nobody (a client's retry).
    fn submit(&mut self, entry: Entry, waiter: Option<RequestId>) -> Result<(), String> {
        let live: Vec<usize> = (0..NODES.len())
            .filter(|i| self.replicas[*i].live.is_some())
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let i = live[self.rng.gen_range(0..live.len())];
        let k = self.replicas[i].slots.len() - 1;
        self.propose(i, k, entry, waiter, false)
    }

    /// Proposes on core `k` of replica `i` through its `Proposals`, as the
    /// runtime's shard loop does; a `Forward` answer travels to the leader
    /// as a message (which may be lost like any other).
    fn propose(
        &mut self,
        i: usize,
        k: usize,
        entry: Entry,
        waiter: Option<RequestId>,
        redirect: bool,
    ) -> Result<(), String> {
        let Some(live) = self.replicas[i].live.as_mut() else {
            return Ok(());
        };
        let core = &mut live.cores[k];
        let (node, config, base) = (core.node, core.epoch().config_id, core.epoch().base);
        let req = entry.request;
        if !retry_in_contract(&self.checker, self.trim_hi, req, base) {
            self.stats.stale_retries_skipped += 1;
            return Ok(());
        }
        let policy = &mut live.policies[k];
        let now = policy.ticks.now();
        let done = policy
            .proposals
            .submit(core, entry.clone(), waiter, redirect, now);
        if self.opts.trace {
            eprintln!(
                "[{}] node {node} e{config} propose {req:?}: {:?}",
                self.step, done.outcome
            );
        }
        match done.outcome {
            Proposed::Appended => self.stats.appended += 1,
            Proposed::Duplicate(at) => {
                self.stats.deduplicated += 1;
                if let Some(pos) = at {
                    self.checker.claim(node, pos, req)?;
                }
            }
            Proposed::Forward(_) => self.stats.forwarded += 1,
            Proposed::NoLeader | Proposed::Stopping => self.stats.refused += 1,
        }
        if let Some(leader) = done.forward {
            self.net
                .send(self.step, node, leader, config, Payload::Forward(entry));
        }
        if let Some((w, answer)) = done.answer {
            self.answered(node, w, answer)?;
        }
        Ok(())
    }

    /// A waiter got its answer: a position must hold its request.
    fn answered(
        &mut self,
        node: NodeId,
        req: RequestId,
        answer: Result<Position, Refused>,
    ) -> Result<(), String> {
        match answer {
            Ok(pos) => {
                self.stats.answered += 1;
                self.checker.claim(node, pos, req)
            }
            Err(_) => {
                self.stats.refused += 1;
                Ok(())
            }
        }
    }

    /// From `reconfig_at` on, an admin asks a random replica still in the
    /// first epoch to move to a new epoch of the same nodes, until some
    /// replica has entered it.
    fn maybe_reconfigure(&mut self) {
        let Some(at) = self.profile.reconfig_at else {
            return;
        };
        if self.step < at || self.epoch_bases.len() > 1 || !self.rng.gen_bool(0.05) {
            return;
        }
        let i = self.rng.gen_range(0..NODES.len());
        let Some(live) = self.replicas[i].live.as_mut() else {
            return;
        };
        if live.cores.len() == 1 && live.cores[0].reconfigure(NODES.to_vec()).is_ok() {
            self.stats.reconfig_requests += 1;
        }
    }

    /// Ticks every live core (some ticks are skipped: slow clocks) and its
    /// policy, then does what the ticks made due, as the runtime does.
    fn tick_all(&mut self) -> Result<(), String> {
        let mut due = Vec::new();
        for (i, r) in self.replicas.iter_mut().enumerate() {
            if let Some(live) = r.live.as_mut() {
                for (k, c) in live.cores.iter_mut().enumerate() {
                    if !self.rng.gen_bool(self.profile.tick_skip) {
                        c.tick();
                        due.push((i, k, live.policies[k].ticks.tick()));
                    }
                }
            }
        }
        for (i, k, d) in due {
            if d.housekeeping {
                self.housekeeping(i, k)?;
            }
            if d.retry {
                self.retry(i, k)?;
            }
        }
        Ok(())
    }

    /// `Proposals::retry` and `ForwardedReads::due` on core `k` of `i`.
    fn retry(&mut self, i: usize, k: usize) -> Result<(), String> {
        let Some(live) = self.replicas[i].live.as_mut() else {
            return Ok(());
        };
        let core = &mut live.cores[k];
        let policy = &mut live.policies[k];
        let (node, config) = (core.node, core.epoch().config_id);
        let now = policy.ticks.now();
        let done = policy.proposals.retry(core, now);
        let mut reads = Vec::new();
        for seq in policy.forwarded.due(now) {
            let id = ReadId { origin: node, seq };
            if !self.reads.contains_key(&id) {
                policy.forwarded.answered(seq);
                continue;
            }
            match core.read(id) {
                ReadStart::Forward(leader) => reads.push((leader, id)),
                ReadStart::Pending => policy.forwarded.answered(seq),
                ReadStart::NoLeader | ReadStart::Busy => {}
            }
        }
        for (leader, entry) in done.forward {
            self.stats.forwarded += 1;
            self.net
                .send(self.step, node, leader, config, Payload::Forward(entry));
        }
        for (leader, id) in reads {
            self.net
                .send(self.step, node, leader, config, Payload::ReadForward(id));
        }
        for (w, pos) in done.answered {
            self.answered(node, w, Ok(pos))?;
        }
        Ok(())
    }

    /// As the runtime's housekeeping: report this replica's floor (its
    /// persisted snapshot) to the others, and trim if it leads and every
    /// replica has reported.
    fn housekeeping(&mut self, i: usize, k: usize) -> Result<(), String> {
        let r = &mut self.replicas[i];
        let (id, floor) = (r.id, r.snapshot.next);
        let Some(live) = r.live.as_mut() else {
            return Ok(());
        };
        let core = &mut live.cores[k];
        // Never past what a crash cannot take back (D39).
        let floor = if self.opts.sabotage == Some(Sabotage::FloorPastDurable) {
            floor
        } else {
            match core.reportable_floor(floor) {
                Ok(f) => f,
                Err(_) => return Ok(()),
            }
        };
        // What the trim rests on: a reported floor never passes what the
        // reporter keeps across a crash.
        if floor > core.durable_decided() {
            return Err(format!(
                "trim: node {id} reports floor {floor} past its durable decided position {}",
                core.durable_decided()
            ));
        }
        let config = core.epoch().config_id;
        let peers: Vec<NodeId> = core
            .epoch()
            .nodes
            .iter()
            .copied()
            .filter(|n| *n != id)
            .collect();
        let mut trimmed = None;
        if core.is_leader() {
            if let Some(upto) = live.policies[k].floors.due(floor, &peers) {
                let ok = core.trim(upto);
                if ok {
                    live.policies[k].floors.trimmed(upto);
                }
                trimmed = Some((upto, ok));
            }
        }
        for p in &peers {
            self.net
                .send(self.step, id, *p, config, Payload::Floor(floor));
        }
        if let Some((upto, ok)) = trimmed {
            self.trim_hi = self.trim_hi.max(upto);
            if self.opts.trace {
                eprintln!("[{}] node {id} trims to {upto}: {ok}", self.step);
            }
            if ok {
                self.stats.trims += 1;
                self.stats.max_trim = self.stats.max_trim.max(upto);
                self.check_trim(config, upto)?;
            }
        }
        Ok(())
    }

    /// Nothing is trimmed that a replica could need after a crash: a
    /// replica restarts at or above its durable decided position (D39),
    /// and one restarting below a trim point would be sent an empty
    /// suffix for the trimmed range.
    fn check_trim(&self, config: u32, upto: Position) -> Result<(), String> {
        for r in &self.replicas {
            for (k, slot) in r.slots.iter().enumerate() {
                if slot.epoch.config_id != config || slot.end.is_some() {
                    continue;
                }
                let live = r.live.as_ref().and_then(|l| l.cores.get(k));
                let durable = live.map_or(slot.durable_decided, |c| {
                    c.durable_decided().max(slot.durable_decided)
                });
                if upto > durable {
                    return Err(format!(
                        "trim: epoch {config} trimmed below {upto}, past node {}'s durable \
                         decided position {durable}",
                        r.id
                    ));
                }
            }
        }
        Ok(())
    }

    // --- ready ------------------------------------------------------------

    /// `ready` on every core of replica `i`, oldest epoch first (so an
    /// epoch's tail is delivered before the next epoch's head). An injected
    /// fsync failure makes that `ready` fail, and the replica restarts.
    fn ready_replica(&mut self, i: usize) -> Result<(), String> {
        let Some(cores) = self.replicas[i].live.as_ref().map(|l| l.cores.len()) else {
            return Ok(());
        };
        if self.rng.gen_bool(self.profile.ready_skip) {
            return Ok(());
        }
        let failing = self
            .rng
            .gen_bool(self.profile.fsync_fail)
            .then(|| (self.rng.gen_range(0..cores), self.rng.gen_bool(0.5)));
        let mut k = 0;
        loop {
            let r = &mut self.replicas[i];
            let Some(live) = r.live.as_mut() else {
                break;
            };
            if k >= live.cores.len() {
                break;
            }
            let disk = r.disk.clone();
            let fault = failing.filter(|(f, _)| *f == k).map(|(_, power)| power);
            disk.inject(fault);
            // As the runtime does: the leader's leading AcceptDecides leave
            // before its fsync, so they are out even if the fsync fails.
            let mut early = Vec::new();
            let result = live.cores[k].ready_pipelined(|m| early = m);
            disk.inject(None);
            self.send_all(i, k, early);
            match result {
                Ok(ready) => self.absorb(i, k, ready)?,
                Err(e) if fault.is_some() => {
                    self.stats.fsync_failures += 1;
                    self.stats.power_cuts += u64::from(fault == Some(true));
                    self.crash(i, &format!("fsync failure ({e})"));
                }
                Err(e) => {
                    return Err(format!("node {}: ready failed: {e}", self.replicas[i].id));
                }
            }
            k += 1;
        }
        Ok(())
    }

    /// Takes in one `ready` of core `k` of replica `i`: sends its messages,
    /// feeds its decided entries to the checker and the materializer, checks
    /// the core's positions, and enters the next epoch if it stopped.
    fn absorb(&mut self, i: usize, k: usize, ready: Ready) -> Result<(), String> {
        let (id, config) = (
            self.replicas[i].id,
            self.replicas[i].slots[k].epoch.config_id,
        );
        self.send_all(i, k, ready.messages);
        for (to, m) in ready.read_msgs {
            self.net.send(self.step, id, to, config, Payload::Read(m));
        }
        for (rid, r) in ready.reads {
            if let Some(floor) = self.reads.remove(&rid) {
                self.read_done(rid);
                self.read_answered(rid, floor, r)?;
            }
        }
        if self.opts.trace {
            if let (Some(a), Some(b)) = (ready.decided.first(), ready.decided.last()) {
                let (a, b) = (a.0, b.0);
                eprintln!("[{}] node {id} e{config} delivers {a}..={b}", self.step);
            }
        }
        for (pos, entry) in ready.decided {
            let entry = self.maybe_corrupt(i, pos, entry);
            self.checker.decided(id, pos, &entry)?;
            self.materialize(i, pos, &entry)?;
            let waiters = match self.replicas[i].live.as_mut() {
                Some(live) => live.policies[k].proposals.decided(entry.request),
                None => Vec::new(),
            };
            for w in waiters {
                self.answered(id, w, Ok(pos))?;
            }
        }
        self.check_core(i, k)?;
        if let Some((ss, base)) = ready.stopped {
            if let Some(live) = self.replicas[i].live.as_mut() {
                self.stats.refused += live.policies[k].proposals.drain().len() as u64;
            }
            self.on_stopped(i, k, ss, base)?;
        }
        Ok(())
    }

    /// Puts messages from core `k` of replica `i` on the network.
    fn send_all(&mut self, i: usize, k: usize, messages: Vec<Message<Entry>>) {
        let (id, config) = (
            self.replicas[i].id,
            self.replicas[i].slots[k].epoch.config_id,
        );
        for m in messages {
            let to = m.get_receiver();
            self.net.send(self.step, id, to, config, Payload::Paxos(m));
        }
    }

    /// The `CorruptDelivery` sabotage: changes one entry node 2 delivers.
    fn maybe_corrupt(&mut self, i: usize, pos: Position, entry: Entry) -> Entry {
        if self.opts.sabotage != Some(Sabotage::CorruptDelivery) || i != 1 || self.sabotaged {
            return entry;
        }
        self.sabotaged = true;
        self.note(format!("sabotage: node 2 sees a corrupted entry at {pos}"));
        let mut payload = entry.payload.to_vec();
        payload.push(0xa5);
        Entry::new(entry.kind, entry.request, payload)
    }

    /// Feeds the entry at `pos` to replica `i`'s materializer (invariants 2
    /// and 3).
    fn materialize(&mut self, i: usize, pos: Position, entry: &Entry) -> Result<(), String> {
        let r = &mut self.replicas[i];
        let Some(live) = r.live.as_mut() else {
            return Ok(());
        };
        if pos != live.mat.next {
            return Err(format!(
                "delivery: node {} delivered position {pos} but its materializer expects {}",
                r.id, live.mat.next
            ));
        }
        live.mat.apply(entry);
        self.checker.materialized(r.id, "live", live.mat)
    }

    /// After a `ready`: decided never goes down and becomes durable, and the
    /// core delivered exactly up to the materializer (invariants 2 and 4).
    fn check_core(&mut self, i: usize, k: usize) -> Result<(), String> {
        let r = &mut self.replicas[i];
        let Some(live) = r.live.as_mut() else {
            return Ok(());
        };
        let core = &live.cores[k];
        let decided = core.decided();
        if decided < live.seen_decided[k] {
            return Err(format!(
                "durability: node {} epoch {}: decided went from {} down to {decided}",
                r.id,
                core.epoch().config_id,
                live.seen_decided[k]
            ));
        }
        live.seen_decided[k] = decided;
        // Segments are the node WAL's (shared by its cores): counted once.
        let segments = core.wal().lock().segment_count();
        let recycled = core.wal().lock().stats().segments_recycled;
        if k == 0 {
            let deleted = live.seen_segments[k].saturating_sub(segments);
            self.stats.segments_deleted += deleted as u64;
            self.stats.segments_recycled += recycled.saturating_sub(live.seen_recycled[k]);
        }
        live.seen_segments[k] = segments;
        live.seen_recycled[k] = recycled;
        let slot = &mut r.slots[k];
        slot.durable_decided = slot.durable_decided.max(core.durable_decided());
        let (delivered, mat) = (core.delivered(), live.mat);
        let expect = r.expected_delivered(k, mat);
        if delivered != expect {
            return Err(format!(
                "delivery: node {} epoch {}: the core delivered up to {delivered}, its \
                 materializer is at {}",
                r.id, r.slots[k].epoch.config_id, mat.next
            ));
        }
        Ok(())
    }

    /// Core `k` of replica `i` decided its stop sign at `base`: record the
    /// epoch boundary (the same for every replica) and join the next epoch
    /// on a fresh disk, delivering from `base`.
    fn on_stopped(
        &mut self,
        i: usize,
        k: usize,
        ss: StopSign,
        base: Position,
    ) -> Result<(), String> {
        let r = &self.replicas[i];
        let (id, config) = (r.id, r.slots[k].epoch.config_id);
        let next = ss.next_config.configuration_id;
        if next != config + 1 {
            return Err(format!(
                "epochs: node {id} epoch {config} stopped into configuration {next}"
            ));
        }
        let known = *self.epoch_bases.entry(next).or_insert(base);
        let mat_next = r.live.as_ref().map_or(base, |l| l.mat.next);
        // The first time, the materializer has consumed exactly the epoch; a
        // reopened core reports its stop again, maybe behind the snapshot.
        let consistent = match r.slots[k].end {
            None => mat_next == base,
            Some(end) => end == base && mat_next >= base,
        };
        if known != base || !consistent {
            return Err(format!(
                "epochs: node {id} ends epoch {config} at {base}; first seen at {known}, this \
                 replica saw {:?}, its materializer is at {mat_next}",
                r.slots[k].end
            ));
        }
        self.replicas[i].slots[k].end = Some(base);
        if self.replicas[i].slots.len() > k + 1 || !ss.next_config.nodes.contains(&id) {
            return Ok(());
        }
        self.join_epoch(i, next, ss.next_config.nodes, base)
    }

    fn join_epoch(
        &mut self,
        i: usize,
        config_id: u32,
        nodes: Vec<NodeId>,
        base: Position,
    ) -> Result<(), String> {
        let id = self.replicas[i].id;
        let epoch = Epoch {
            config_id,
            nodes,
            base,
        };
        let r = &mut self.replicas[i];
        // A new stream in the node's WAL. A node that is down opens it
        // (empty) when it restarts.
        let Some(live) = r.live.as_mut() else {
            r.slots.push(Slot {
                epoch,
                durable_decided: base,
                end: None,
            });
            self.stats.epochs_joined += 1;
            self.note(format!(
                "node {id} (down) joined epoch {config_id} at base {base}"
            ));
            return Ok(());
        };
        let core = live
            .wal
            .stream(StreamId::replica(SHARD.get(), config_id))
            .map_err(crate::shard::ShardError::from)
            .and_then(|stream| {
                ShardCore::open(SHARD, id, epoch.clone(), stream, &Timing::default(), base)
            })
            .map_err(|e| format!("epochs: node {id} cannot open epoch {config_id}: {e}"))?;
        r.slots.push(Slot {
            epoch,
            durable_decided: core.decided(),
            end: None,
        });
        live.seen_decided.push(core.decided());
        live.opened_at.push(core.delivered());
        live.seen_segments.push(core.wal().lock().segment_count());
        live.seen_recycled
            .push(core.wal().lock().stats().segments_recycled);
        live.cores.push(core);
        live.policies.push(CorePolicy::new());
        self.stats.epochs_joined += 1;
        self.note(format!("node {id} joined epoch {config_id} at base {base}"));
        Ok(())
    }

    // --- snapshots and trimming --------------------------------------------

    /// Now and then a materializer persists its state; the snapshot store
    /// survives crashes.
    fn persist_snapshots(&mut self) {
        for r in &mut self.replicas {
            if let Some(live) = &r.live {
                if self.rng.gen_bool(self.profile.snapshot) {
                    r.snapshot = live.mat;
                }
            }
        }
    }

    // --- checks -----------------------------------------------------------

    /// Invariants that must hold between steps, for every replica.
    fn check_step(&self) -> Result<(), String> {
        for r in &self.replicas {
            self.checker.materialized(r.id, "snapshot", r.snapshot)?;
            let Some(live) = &r.live else {
                continue;
            };
            self.checker.materialized(r.id, "live", live.mat)?;
            for (k, c) in live.cores.iter().enumerate() {
                if c.decided() < live.seen_decided[k] {
                    return Err(format!(
                        "durability: node {} epoch {}: decided went down to {}",
                        r.id,
                        c.epoch().config_id,
                        c.decided()
                    ));
                }
                if c.delivered() > c.decided() && c.delivered() != live.opened_at[k] {
                    return Err(format!(
                        "delivery: node {} epoch {}: delivered {} past decided {}",
                        r.id,
                        c.epoch().config_id,
                        c.delivered(),
                        c.decided()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Ends the faults, restarts every replica, heals the network and runs
    /// until every replica has delivered every acknowledged position and
    /// joined every epoch.
    fn settle(&mut self) -> Result<(), String> {
        self.profile = self.profile.calm();
        self.net.calm();
        self.heal();
        for i in 0..NODES.len() {
            if self.replicas[i].live.is_none() {
                self.restart(i)?;
            }
        }
        self.reconnect_all();
        let target = self.checker.len();
        let start = self.step;
        self.note(format!("settling: every replica must reach {target}"));
        while !self.settled(target) {
            if self.step - start >= SETTLE_STEPS_MAX {
                return Err(format!(
                    "liveness: after {SETTLE_STEPS_MAX} calm steps not every replica has \
                     delivered up to {target}: {}",
                    self.progress()
                ));
            }
            self.advance(false)?;
        }
        self.stats.settle_steps = self.step - start;
        Ok(())
    }

    fn settled(&self, target: Position) -> bool {
        let epochs = self.epoch_bases.len();
        self.replicas.iter().all(|r| {
            r.slots.len() == epochs && r.live.as_ref().is_some_and(|l| l.mat.next >= target)
        })
    }

    fn progress(&self) -> String {
        let parts: Vec<String> = self
            .replicas
            .iter()
            .map(|r| match &r.live {
                Some(l) => format!(
                    "node {} at {} (epochs {}, leader {:?})",
                    r.id,
                    l.mat.next,
                    r.slots.len(),
                    l.cores.last().and_then(|c| c.leader())
                ),
                None => format!("node {} down", r.id),
            })
            .collect();
        parts.join(", ")
    }

    /// Reads back every replica's held, decided log and compares it with
    /// the global log: every acknowledged entry not yet trimmed is at its
    /// position on every replica.
    fn final_checks(&self) -> Result<(), String> {
        for r in &self.replicas {
            let live = r
                .live
                .as_ref()
                .ok_or_else(|| format!("node {} is down after settling", r.id))?;
            for (k, core) in live.cores.iter().enumerate() {
                let slot = &r.slots[k];
                let held_from = slot.epoch.base + core.wal().lock().state().entries_start;
                let hi = core
                    .decided()
                    .min(slot.end.unwrap_or(Position::MAX))
                    .min(self.checker.len());
                if held_from >= hi {
                    continue;
                }
                let entries = core.read_decided(held_from, hi).ok_or_else(|| {
                    format!(
                        "node {} epoch {}: decided entries {held_from}..{hi} are not readable",
                        r.id, slot.epoch.config_id
                    )
                })?;
                for (j, e) in entries.iter().enumerate() {
                    let pos = held_from + j as u64;
                    if self.checker.entry(pos) != Some(e) {
                        return Err(format!(
                            "agreement violated: node {} holds {e:?} at {pos}, the log has {:?}",
                            r.id,
                            self.checker.entry(pos)
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(client: u64, seq: u64, payload: &[u8]) -> Entry {
        Entry::new(EntryKind::DATA, RequestId { client, seq }, payload.to_vec())
    }

    #[test]
    fn checker_accepts_a_consistent_history() {
        let mut c = Checker::new();
        c.decided(1, Position(0), &e(1, 1, b"a")).unwrap();
        c.decided(2, Position(0), &e(1, 1, b"a")).unwrap();
        c.decided(2, Position(1), &e(1, 2, b"b")).unwrap();
        let mut m = Materialized::EMPTY;
        m.apply(&e(1, 1, b"a"));
        c.materialized(3, "live", m).unwrap();
        c.claim(1, Position(1), RequestId { client: 1, seq: 2 })
            .unwrap();
    }

    #[test]
    fn checker_rejects_conflicts_gaps_duplicates_and_bad_replay() {
        let mut c = Checker::new();
        c.decided(1, Position(0), &e(1, 1, b"a")).unwrap();
        let err = c.decided(2, Position(0), &e(1, 1, b"x")).unwrap_err();
        assert!(err.contains("agreement"), "{err}");
        assert!(c
            .decided(2, Position(5), &e(1, 2, b"b"))
            .unwrap_err()
            .contains("gap"));
        assert!(c
            .decided(2, Position(1), &e(1, 1, b"a"))
            .unwrap_err()
            .contains("dedupe"));
        let mut m = Materialized::EMPTY;
        m.apply(&e(1, 1, b"y"));
        assert!(c.materialized(1, "live", m).unwrap_err().contains("replay"));
        let mut c = Checker::new();
        c.claim(1, Position(0), RequestId { client: 9, seq: 9 })
            .unwrap();
        assert!(c
            .decided(1, Position(0), &e(1, 1, b"a"))
            .unwrap_err()
            .contains("dedupe"));
    }
}
