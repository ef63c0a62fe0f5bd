//! Linearizable reads that append nothing (Raft's ReadIndex, §6.4 of
//! Ongaro's thesis), as a sans-IO part of [`crate::shard::ShardCore`].
//!
//! A read registered at the leader records the end of the leader's log
//! (`index`: every entry decided before the read started is below it,
//! because a leader in the accept phase holds every chosen entry). The
//! leader then asks every follower whether it still promises the leader's
//! ballot ([`ReadMsg::Probe`]); once a majority (the leader included)
//! says yes *after* the read was registered, no other leader can have
//! decided anything before the read started (its majority would intersect
//! ours in a replica that promised it first, yet answered us later with
//! our ballot). The read is answered once the leader's decided index
//! reaches `index`: the caller waits until its state machine applied every
//! position below the returned one. No entry, no fsync.
//!
//! Reads arriving while a round is in flight wait for the next round, so
//! one heartbeat round serves every read that queued behind it.

use std::collections::BTreeSet;

use omnipaxos::ballot_leader_election::Ballot;
use omnipaxos::util::NodeId;
use serde::{Deserialize, Serialize};

/// Reads waiting at one leader before new ones are refused.
pub const READS_PENDING_MAX: usize = 64 * 1024;

/// Identifies a read: the node whose caller waits, and its number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReadId {
    pub origin: NodeId,
    pub seq: u64,
}

/// Leader ↔ follower messages of a confirmation round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadMsg {
    /// Do you still promise `ballot`?
    Probe { round: u64, ballot: Ballot },
    /// Answer to a probe: `ok` if the follower's promise is that ballot.
    Ack { round: u64, ok: bool },
}

/// Why a read was not answered; the caller retries (at the new leader).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFailed {
    /// This replica is not (or no longer) the leader.
    NotLeader,
    /// Too many reads pending.
    Busy,
}

/// Result of registering a read.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStart {
    /// Registered; its answer comes out of a later `ready`.
    Pending,
    /// Another replica leads: send the read there.
    Forward(NodeId),
    NoLeader,
    Busy,
}

struct Round {
    id: u64,
    ballot: Ballot,
    acks: BTreeSet<NodeId>,
    reads: Vec<(ReadId, u64)>,
    /// Ticks since the probes left.
    age: u64,
}

/// The read-index state of one replica in one epoch.
#[derive(Default)]
pub struct ReadIndex {
    next_round: u64,
    /// Registered, waiting for the next round.
    queued: Vec<(ReadId, u64)>,
    round: Option<Round>,
    /// Leadership confirmed; waiting until decided reaches the index.
    confirmed: Vec<(ReadId, u64)>,
    /// Probes and acks to send: (to, message).
    outbox: Vec<(NodeId, ReadMsg)>,
    /// Finished reads: (id, index or why not).
    done: Vec<(ReadId, Result<u64, ReadFailed>)>,
}

impl ReadIndex {
    /// Reads in any state (for the pending limit).
    fn pending(&self) -> usize {
        self.queued.len() + self.confirmed.len() + self.round.as_ref().map_or(0, |r| r.reads.len())
    }

    /// Registers a read at a leader whose log ends at `index`.
    pub fn register(&mut self, id: ReadId, index: u64) -> ReadStart {
        if self.pending() >= READS_PENDING_MAX {
            return ReadStart::Busy;
        }
        self.queued.push((id, index));
        ReadStart::Pending
    }

    /// A follower answers a probe with its current promise.
    pub fn probe(&mut self, from: NodeId, round: u64, ballot: Ballot, promise: Ballot) {
        self.outbox.push((
            from,
            ReadMsg::Ack {
                round,
                ok: promise == ballot,
            },
        ));
    }

    /// The leader counts an answer.
    pub fn ack(&mut self, from: NodeId, round: u64, ok: bool) {
        let Some(r) = self.round.as_mut().filter(|r| r.id == round) else {
            return;
        };
        if ok {
            r.acks.insert(from);
        } else if let Some(r) = self.round.take() {
            // Someone promised a higher ballot: we may no longer lead.
            self.fail(r.reads, ReadFailed::NotLeader);
        }
    }

    /// Advances rounds: `leader` is whether this replica leads with
    /// `ballot` now; `peers` the other replicas; `majority` the quorum
    /// size (leader included); `decided` the decided index.
    pub fn step(
        &mut self,
        leader: bool,
        ballot: Ballot,
        peers: &[NodeId],
        majority: usize,
        decided: u64,
    ) {
        if !leader || self.round.as_ref().is_some_and(|r| r.ballot != ballot) {
            self.abandon(ReadFailed::NotLeader);
            return;
        }
        if let Some(r) = &self.round {
            if r.acks.len() + 1 >= majority {
                let r = self.round.take().expect("checked above");
                self.confirmed.extend(r.reads);
            }
        }
        if self.round.is_none() && !self.queued.is_empty() {
            let reads = std::mem::take(&mut self.queued);
            if peers.len() < majority {
                // Alone is a majority (a one-replica shard).
                self.confirmed.extend(reads);
            } else {
                self.next_round += 1;
                let id = self.next_round;
                for p in peers {
                    self.outbox.push((*p, ReadMsg::Probe { round: id, ballot }));
                }
                self.round = Some(Round {
                    id,
                    ballot,
                    acks: BTreeSet::new(),
                    reads,
                    age: 0,
                });
            }
        }
        let (ready, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.confirmed)
            .into_iter()
            .partition(|(_, index)| *index <= decided);
        self.confirmed = wait;
        self.done
            .extend(ready.into_iter().map(|(id, index)| (id, Ok(index))));
    }

    /// A tick: a round unanswered for `resend_ticks` is sent again with a
    /// new number (a probe or ack lost with a dropped link).
    pub fn tick(&mut self, resend_ticks: u64) {
        if let Some(r) = self.round.as_mut() {
            r.age += 1;
            if r.age >= resend_ticks {
                let r = self.round.take().expect("checked above");
                // Re-queued: the next `step` starts a fresh round. The
                // indices stay: they were taken when the reads started.
                self.queued.splice(0..0, r.reads);
            }
        }
    }

    /// Fails every read in flight (leadership lost, epoch ended).
    pub fn abandon(&mut self, why: ReadFailed) {
        let mut all = std::mem::take(&mut self.queued);
        all.append(&mut self.confirmed);
        if let Some(r) = self.round.take() {
            all.extend(r.reads);
        }
        self.fail(all, why);
    }

    fn fail(&mut self, reads: Vec<(ReadId, u64)>, why: ReadFailed) {
        self.done
            .extend(reads.into_iter().map(|(id, _)| (id, Err(why))));
    }

    pub fn take_outbox(&mut self) -> Vec<(NodeId, ReadMsg)> {
        std::mem::take(&mut self.outbox)
    }

    pub fn take_done(&mut self) -> Vec<(ReadId, Result<u64, ReadFailed>)> {
        std::mem::take(&mut self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ballot(n: u32, pid: NodeId) -> Ballot {
        Ballot {
            config_id: 1,
            n,
            priority: 0,
            pid,
        }
    }

    fn id(seq: u64) -> ReadId {
        ReadId { origin: 1, seq }
    }

    #[test]
    fn a_read_waits_for_a_majority_then_for_decided() {
        let b = ballot(2, 1);
        let mut r = ReadIndex::default();
        assert_eq!(r.register(id(1), 5), ReadStart::Pending);
        r.step(true, b, &[2, 3], 2, 3);
        let probes = r.take_outbox();
        assert_eq!(probes.len(), 2);
        assert!(r.take_done().is_empty());
        // A read arriving now waits for the next round.
        r.register(id(2), 6);
        r.ack(2, 1, true);
        r.step(true, b, &[2, 3], 2, 3);
        assert!(
            r.take_done().is_empty(),
            "confirmed but index 5 > decided 3"
        );
        r.step(true, b, &[2, 3], 2, 5);
        assert_eq!(r.take_done(), vec![(id(1), Ok(5))]);
        // The second round started after the first completed.
        assert_eq!(r.take_outbox().len(), 2);
        r.ack(3, 2, true);
        r.step(true, b, &[2, 3], 2, 9);
        assert_eq!(r.take_done(), vec![(id(2), Ok(6))]);
    }

    #[test]
    fn an_ack_for_an_old_round_or_a_nack_confirms_nothing() {
        let b = ballot(2, 1);
        let mut r = ReadIndex::default();
        r.register(id(1), 0);
        r.step(true, b, &[2, 3], 2, 0);
        r.ack(2, 99, true);
        r.step(true, b, &[2, 3], 2, 0);
        assert!(r.take_done().is_empty());
        r.ack(3, 1, false);
        assert_eq!(r.take_done(), vec![(id(1), Err(ReadFailed::NotLeader))]);
    }

    #[test]
    fn losing_leadership_fails_every_pending_read() {
        let b = ballot(2, 1);
        let mut r = ReadIndex::default();
        r.register(id(1), 0);
        r.step(true, b, &[2, 3], 2, 0);
        r.register(id(2), 0);
        r.step(false, b, &[2, 3], 2, 0);
        let mut done = r.take_done();
        done.sort_by_key(|(i, _)| *i);
        assert_eq!(
            done,
            vec![
                (id(1), Err(ReadFailed::NotLeader)),
                (id(2), Err(ReadFailed::NotLeader))
            ]
        );
    }

    #[test]
    fn a_round_with_a_higher_ballot_now_is_abandoned() {
        let mut r = ReadIndex::default();
        r.register(id(1), 0);
        r.step(true, ballot(2, 1), &[2, 3], 2, 0);
        r.ack(2, 1, true);
        r.step(true, ballot(3, 1), &[2, 3], 2, 0);
        assert_eq!(r.take_done(), vec![(id(1), Err(ReadFailed::NotLeader))]);
    }

    #[test]
    fn an_unanswered_round_is_sent_again() {
        let b = ballot(2, 1);
        let mut r = ReadIndex::default();
        r.register(id(1), 4);
        r.step(true, b, &[2, 3], 2, 9);
        r.take_outbox();
        for _ in 0..5 {
            r.tick(5);
        }
        r.step(true, b, &[2, 3], 2, 9);
        let again = r.take_outbox();
        assert!(matches!(again[0].1, ReadMsg::Probe { round: 2, .. }));
        r.ack(2, 1, true); // the first round's late answer counts for nothing
        r.step(true, b, &[2, 3], 2, 9);
        assert!(r.take_done().is_empty());
        r.ack(2, 2, true);
        r.step(true, b, &[2, 3], 2, 9);
        assert_eq!(r.take_done(), vec![(id(1), Ok(4))]);
    }

    #[test]
    fn a_follower_acks_only_the_ballot_it_promised() {
        let mut r = ReadIndex::default();
        r.probe(1, 7, ballot(2, 1), ballot(2, 1));
        r.probe(1, 8, ballot(2, 1), ballot(3, 2));
        assert_eq!(
            r.take_outbox(),
            vec![
                (1, ReadMsg::Ack { round: 7, ok: true }),
                (
                    1,
                    ReadMsg::Ack {
                        round: 8,
                        ok: false
                    }
                )
            ]
        );
    }
}
