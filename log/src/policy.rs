//! The rules a shard replica follows around its [`ShardCore`], with no I/O:
//! who waits for which proposal and when an undecided one is proposed
//! again ([`Proposals`]), when a forwarded read is sent again
//! ([`ForwardedReads`]), and when the leader may trim the log
//! ([`TrimFloors`]). The threaded runtime (`runtime::shard_loop`) and the
//! simulation (`sim`) both drive a core through these same types, so the
//! simulation checks the production rules rather than copies of them.
//!
//! Time is counted in the caller's ticks ([`Ticks`]); nothing here reads a
//! clock, sends a message or touches a disk: methods return what to send
//! and whom to answer.

use std::collections::HashMap;

use omnipaxos::util::NodeId;

use crate::disk::Disk;
use crate::entry::{Entry, RequestId};
use crate::shard::{Position, Proposed, ShardCore};

/// Ticks after which an undecided proposal with a waiter is proposed again,
/// and an unanswered forwarded read is forwarded again.
pub const REPROPOSE_TICKS: u64 = 10;
/// Ticks between trim-floor exchanges and sweeps of abandoned waiters.
pub const HOUSEKEEPING_TICKS: u64 = 50;

/// A replica's tick counter and what each tick makes due.
#[derive(Debug, Default)]
pub struct Ticks {
    now: u64,
}

/// What one tick made due.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Propose undecided entries and forward unanswered reads again.
    pub retry: bool,
    /// Exchange trim floors, trim, and sweep abandoned waiters.
    pub housekeeping: bool,
}

impl Ticks {
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Counts one tick (call it with every `ShardCore::tick`).
    pub fn tick(&mut self) -> Due {
        self.now += 1;
        Due {
            retry: self.now.is_multiple_of(REPROPOSE_TICKS),
            housekeeping: self.now.is_multiple_of(HOUSEKEEPING_TICKS),
        }
    }
}

/// Why a proposal was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Another replica leads: a client that asked not to be forwarded is
    /// told where to go.
    NotLeader(NodeId),
    /// No leader is known, or the epoch is ending: retry shortly.
    NoLeader,
}

/// What [`Proposals::submit`] decided.
#[derive(Debug)]
pub struct Submitted<W> {
    /// What the core said.
    pub outcome: Proposed,
    /// Send the entry to this node (the leader this replica knows).
    pub forward: Option<NodeId>,
    /// Answer the waiter now (it is not kept).
    pub answer: Option<(W, Result<Position, Refused>)>,
}

/// What [`Proposals::retry`] decided.
#[derive(Debug)]
pub struct Retried<W> {
    /// Entries to send to the leader this replica knows.
    pub forward: Vec<(NodeId, Entry)>,
    /// Waiters whose entry turned out to be decided already.
    pub answered: Vec<(W, Position)>,
}

/// Proposals made through this replica and who waits for them.
///
/// Invariant: every entry in `inflight` has at least one waiter once a
/// sweep has run, and a waiter is answered at most once: with the position
/// its entry was decided at, or with a refusal at submission.
#[derive(Debug)]
pub struct Proposals<W> {
    waiters: HashMap<RequestId, Vec<W>>,
    /// Undecided entries with waiters, and the tick they were last proposed:
    /// an entry can be lost before it is decided (a leader replaced before
    /// replicating it, a forward sent to a leader still preparing), so it is
    /// proposed again until decided; the log deduplicates by request id.
    inflight: HashMap<RequestId, (Entry, u64)>,
}

impl<W> Default for Proposals<W> {
    fn default() -> Self {
        Proposals {
            waiters: HashMap::new(),
            inflight: HashMap::new(),
        }
    }
}

impl<W> Proposals<W> {
    /// Entries waited for and not yet decided here.
    pub fn pending(&self) -> usize {
        self.waiters.len()
    }

    /// Proposes `entry` on `core` for `waiter` (none: nobody waits here, as
    /// for an entry a peer forwarded). `redirect`: a waiter that must not be
    /// forwarded (a remote client) is told the leader instead.
    pub fn submit<D: Disk + Clone>(
        &mut self,
        core: &mut ShardCore<D>,
        entry: Entry,
        waiter: Option<W>,
        redirect: bool,
        now: u64,
    ) -> Submitted<W> {
        let req = entry.request;
        let outcome = core.propose(entry.clone());
        tracing::debug!(?req, ?outcome, local = waiter.is_some(), "propose");
        let mut done = Submitted {
            outcome,
            forward: None,
            answer: None,
        };
        match outcome {
            Proposed::Appended | Proposed::Duplicate(None) => self.wait(entry, waiter, now),
            Proposed::Duplicate(Some(p)) => done.answer = waiter.map(|w| (w, Ok(p))),
            Proposed::Forward(leader) if redirect => {
                done.answer = waiter.map(|w| (w, Err(Refused::NotLeader(leader))));
            }
            Proposed::Forward(leader) => {
                self.wait(entry, waiter, now);
                done.forward = Some(leader);
            }
            Proposed::NoLeader | Proposed::Stopping => {
                done.answer = waiter.map(|w| (w, Err(Refused::NoLeader)));
            }
        }
        done
    }

    fn wait(&mut self, entry: Entry, waiter: Option<W>, now: u64) {
        if let Some(w) = waiter {
            let req = entry.request;
            self.inflight.insert(req, (entry, now));
            self.waiters.entry(req).or_default().push(w);
        }
    }

    /// An entry was delivered at `pos`: its waiters, to answer with `pos`.
    pub fn decided(&mut self, req: RequestId) -> Vec<W> {
        self.inflight.remove(&req);
        self.waiters.remove(&req).unwrap_or_default()
    }

    /// Proposes again every entry still undecided [`REPROPOSE_TICKS`] after
    /// it was last proposed, to whoever leads now.
    pub fn retry<D: Disk + Clone>(&mut self, core: &mut ShardCore<D>, now: u64) -> Retried<W> {
        let mut done = Retried {
            forward: Vec::new(),
            answered: Vec::new(),
        };
        let mut stale: Vec<RequestId> = self
            .inflight
            .iter()
            .filter(|(_, (_, sent))| now.saturating_sub(*sent) >= REPROPOSE_TICKS)
            .map(|(r, _)| *r)
            .collect();
        // In request order, not the map's (random) order: a run is
        // deterministic under the simulation.
        stale.sort_unstable_by_key(|r| (r.client, r.seq));
        for req in stale {
            let Some((entry, _)) = self.inflight.remove(&req) else {
                continue;
            };
            if !self.waiters.contains_key(&req) {
                continue;
            }
            match core.propose(entry.clone()) {
                Proposed::Forward(leader) => {
                    done.forward.push((leader, entry.clone()));
                    self.inflight.insert(req, (entry, now));
                }
                Proposed::Duplicate(Some(p)) => {
                    for w in self.waiters.remove(&req).unwrap_or_default() {
                        done.answered.push((w, p));
                    }
                }
                Proposed::Appended
                | Proposed::Duplicate(None)
                | Proposed::NoLeader
                | Proposed::Stopping => {
                    self.inflight.insert(req, (entry, now));
                }
            }
        }
        done
    }

    /// Forgets waiters that gave up (`gone`) and entries nobody waits for.
    pub fn sweep(&mut self, gone: impl Fn(&W) -> bool) {
        self.waiters.retain(|_, ws| {
            ws.retain(|w| !gone(w));
            !ws.is_empty()
        });
        let waiters = &self.waiters;
        self.inflight.retain(|r, _| waiters.contains_key(r));
    }

    /// Every waiter, for a replica that stops serving (its epoch ended).
    pub fn drain(&mut self) -> Vec<W> {
        self.inflight.clear();
        self.waiters.drain().flat_map(|(_, ws)| ws).collect()
    }
}

/// Reads this replica forwarded to a leader, by their number, with the tick
/// they were last sent: a forward can be lost (a link not up yet, a leader
/// replaced), so it is sent again until answered, like proposals.
#[derive(Debug, Default)]
pub struct ForwardedReads {
    sent: HashMap<u64, u64>,
}

impl ForwardedReads {
    pub fn sent(&mut self, seq: u64, now: u64) {
        self.sent.insert(seq, now);
    }

    pub fn answered(&mut self, seq: u64) {
        self.sent.remove(&seq);
    }

    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// Reads unanswered [`REPROPOSE_TICKS`] after they were last sent,
    /// marked as sent now: the caller starts each again (`ShardCore::read`
    /// forwards it to whoever leads now, or registers it at this replica
    /// if it leads; then call [`ForwardedReads::answered`]: it is local).
    pub fn due(&mut self, now: u64) -> Vec<u64> {
        let mut due: Vec<u64> = self
            .sent
            .iter()
            .filter(|(_, sent)| now.saturating_sub(**sent) >= REPROPOSE_TICKS)
            .map(|(s, _)| *s)
            .collect();
        due.sort_unstable();
        for s in &due {
            self.sent.insert(*s, now);
        }
        due
    }

    /// Forgets reads whose caller gave up.
    pub fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        self.sent.retain(|s, _| keep(*s));
    }
}

/// What every replica has persisted, as each reported it, and where the
/// log was trimmed. Only the leader trims, and only below the lowest floor
/// of all replicas (its own included), less `retain` entries kept for
/// replicas that fall behind: an entry is dropped only once every
/// replica's materializers have persisted state past it.
#[derive(Debug)]
pub struct TrimFloors {
    peers: HashMap<NodeId, Position>,
    trimmed_to: Position,
    retain: u64,
}

impl TrimFloors {
    pub fn new(retain: u64) -> TrimFloors {
        TrimFloors {
            peers: HashMap::new(),
            trimmed_to: Position::ZERO,
            retain,
        }
    }

    /// A peer reported its floor. The latest report wins even when lower
    /// (a replica rebuilt from scratch needs the log again): trimming less
    /// than possible is safe, trimming more is not.
    pub fn peer(&mut self, node: NodeId, floor: Position) {
        self.peers.insert(node, floor);
    }

    /// Where a leader with floor `own` may trim now, if higher than before:
    /// `None` until every one of the `peers` other replicas has reported.
    pub fn due(&self, own: Position, peers: &[NodeId]) -> Option<Position> {
        let mut min = own;
        for p in peers {
            min = min.min(*self.peers.get(p)?);
        }
        let upto = min.saturating_sub(self.retain);
        (upto > self.trimmed_to).then_some(upto)
    }

    /// The log was trimmed below `upto`.
    pub fn trimmed(&mut self, upto: Position) {
        self.trimmed_to = self.trimmed_to.max(upto);
    }

    pub fn trimmed_to(&self) -> Position {
        self.trimmed_to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_wait_for_every_peer_and_keep_the_retained_tail() {
        let mut f = TrimFloors::new(10);
        assert_eq!(f.due(Position(100), &[2, 3]), None);
        f.peer(2, Position(50));
        assert_eq!(f.due(Position(100), &[2, 3]), None);
        f.peer(3, Position(80));
        assert_eq!(f.due(Position(100), &[2, 3]), Some(Position(40)));
        f.trimmed(Position(40));
        assert_eq!(f.due(Position(100), &[2, 3]), None);
        f.peer(2, Position(30));
        assert_eq!(
            f.due(Position(100), &[2, 3]),
            None,
            "a lower report holds trimming back"
        );
        f.peer(2, Position(90));
        assert_eq!(f.due(Position(100), &[2, 3]), Some(Position(70)));
    }

    #[test]
    fn ticks_make_retries_and_housekeeping_due() {
        let mut t = Ticks::default();
        let dues: Vec<Due> = (0..HOUSEKEEPING_TICKS).map(|_| t.tick()).collect();
        assert_eq!(
            dues.iter().filter(|d| d.retry).count() as u64,
            HOUSEKEEPING_TICKS / REPROPOSE_TICKS
        );
        assert!(dues.last().is_some_and(|d| d.housekeeping));
        assert_eq!(dues.iter().filter(|d| d.housekeeping).count(), 1);
    }

    #[test]
    fn forwarded_reads_are_due_again_until_answered() {
        let mut r = ForwardedReads::default();
        r.sent(1, 0);
        r.sent(2, 5);
        assert!(r.due(REPROPOSE_TICKS - 1).is_empty());
        assert_eq!(r.due(REPROPOSE_TICKS), vec![1]);
        r.answered(2);
        assert!(r.due(REPROPOSE_TICKS + 5).is_empty(), "1 was just re-sent");
        assert_eq!(r.due(2 * REPROPOSE_TICKS), vec![1]);
    }
}
