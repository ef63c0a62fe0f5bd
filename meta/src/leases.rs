//! Leases on client caches and their recall (`cfs_proto::lease` states
//! the protocol). This module keeps, per client session, which shards it
//! holds leases on and which invalidations it has acknowledged, and per
//! shard the *clean* position: every change below it has been applied by
//! every session holding a lease on the shard (or its lease ran out), and
//! this node has led the shard for at least a lease's hold. The leader
//! publishes its clean position through the log (`LogNode::set_watermark`)
//! so that a change acknowledged by any node first waits for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cfs_log::{Position, ShardId};
use cfs_proto::lease;
use tokio::sync::{watch, Notify};

/// Unacknowledged invalidations of a session past which its leases are
/// not renewed: they run out within a hold, and with them the need to
/// keep these (so the queue is bounded by the change rate times a hold).
pub const PENDING_MAX: usize = 64 * 1024;
/// An invalidation unacknowledged for this long stops renewals (see
/// [`Session::congested`]).
pub const ACK_LAG_MAX: Duration = Duration::from_millis(500);

/// What a session has been sent and has acknowledged.
#[derive(Default)]
struct Tracker {
    /// Last invalidation sequence number sent.
    sent: u64,
    acked: u64,
    /// Invalidations not acknowledged yet: (seq, shard, upto), and when
    /// the oldest of them was sent.
    pending: VecDeque<(u64, ShardId, Position)>,
    oldest_pending: Option<Instant>,
    /// Per shard: every change below this position was forwarded to the
    /// session (as an invalidation, or skipped as its own).
    forwarded: HashMap<ShardId, Position>,
    /// Per shard: every invalidation of changes below this position is
    /// acknowledged.
    through: HashMap<ShardId, Position>,
}

impl Tracker {
    fn through(&self, shard: ShardId) -> Position {
        if self.pending.iter().any(|(_, s, _)| *s == shard) {
            self.through.get(&shard).copied().unwrap_or(Position::ZERO)
        } else {
            self.forwarded
                .get(&shard)
                .copied()
                .unwrap_or(Position::ZERO)
        }
    }
}

/// One client session's lease state.
pub struct Session {
    pub client: u64,
    tracker: Mutex<Tracker>,
    /// Shards leased, with when this node stops honouring the lease.
    leases: Mutex<HashMap<ShardId, Instant>>,
    /// Bumped on every change of `tracker`, for waiters.
    progress: watch::Sender<u64>,
    /// Shared with [`Leases`]: something may have moved a clean position.
    dirty: Arc<Notify>,
    /// Operations answered early to this session, whose invalidations went
    /// out before the answer: their apply needs none again (at most
    /// [`EARLY_OPS_MAX`]; past that they are sent again, as before).
    early_ops: Mutex<HashSet<u64>>,
}

/// Operations remembered per session as answered early (see
/// `Session::expect_early`).
pub const EARLY_OPS_MAX: usize = 1 << 16;

impl Session {
    /// Operation `op_id` is answered early with its invalidations: its
    /// apply sends this session none (false: too many remembered; it will).
    pub fn expect_early(&self, op_id: u64) -> bool {
        let mut s = self.early_ops.lock().expect("early ops lock");
        s.len() < EARLY_OPS_MAX && s.insert(op_id)
    }

    /// Whether `op_id` was answered early (forgotten here: asked once, at
    /// its apply or when its answer was not sent after all).
    pub fn take_early(&self, op_id: u64) -> bool {
        self.early_ops
            .lock()
            .expect("early ops lock")
            .remove(&op_id)
    }

    /// Records that the changes of `shard` below `upto` have been
    /// forwarded, the last of them as invalidation `seq` (if any).
    pub fn forwarded(&self, shard: ShardId, upto: Position, seq: Option<u64>) {
        let mut t = self.tracker.lock().expect("tracker lock");
        let waiting = t.pending.iter().any(|(_, s, _)| *s == shard);
        let before = t.forwarded.get(&shard).copied().unwrap_or(Position::ZERO);
        if !waiting {
            // Everything forwarded before this batch is acknowledged.
            let th = t.through.entry(shard).or_default();
            *th = (*th).max(before);
        }
        t.forwarded.insert(shard, before.max(upto));
        if let Some(seq) = seq {
            if t.pending.is_empty() {
                t.oldest_pending = Some(Instant::now());
            }
            t.pending.push_back((seq, shard, upto));
        }
        drop(t);
        self.progress.send_modify(|n| *n += 1);
        self.dirty.notify_one();
    }

    /// Too many invalidations unacknowledged, or one for longer than
    /// [`ACK_LAG_MAX`]: refuse renewals, so that the session's leases run
    /// out within a hold and stop holding changes back.
    ///
    /// A mount cannot always acknowledge at once: the kernel takes a
    /// directory's lock to drop an entry of it (`notify_inval_entry`),
    /// and a call of that same mount on that directory may hold the lock
    /// while it waits for a change that waits for this acknowledgement.
    /// Letting the lease lapse breaks that cycle within a hold; renewing it
    /// would hold the change until the mount gave up on its call.
    pub fn congested(&self) -> bool {
        let t = self.tracker.lock().expect("tracker lock");
        t.pending.len() > PENDING_MAX || t.oldest_pending.is_some_and(|o| o.elapsed() > ACK_LAG_MAX)
    }

    /// The next invalidation sequence number.
    pub fn next_seq(&self) -> u64 {
        let mut t = self.tracker.lock().expect("tracker lock");
        t.sent += 1;
        t.sent
    }

    pub fn acked(&self, seq: u64) {
        let mut t = self.tracker.lock().expect("tracker lock");
        let seq = seq.min(t.sent);
        if seq <= t.acked {
            return;
        }
        t.acked = seq;
        let mut popped = false;
        while let Some(&(s, shard, upto)) = t.pending.front() {
            if s > seq {
                break;
            }
            t.pending.pop_front();
            popped = true;
            let th = t.through.entry(shard).or_default();
            *th = (*th).max(upto);
        }
        if popped {
            // The oldest left was sent no earlier than now, as far as the
            // lag check goes (an acknowledgement is progress).
            t.oldest_pending = (!t.pending.is_empty()).then(Instant::now);
        }
        drop(t);
        self.progress.send_modify(|n| *n += 1);
        self.dirty.notify_one();
    }

    /// Last invalidation sent (what a lease grant waits for).
    pub fn sent(&self) -> u64 {
        self.tracker.lock().expect("tracker lock").sent
    }

    pub fn forwarded_to(&self, shard: ShardId) -> Position {
        self.tracker
            .lock()
            .expect("tracker lock")
            .forwarded
            .get(&shard)
            .copied()
            .unwrap_or(Position::ZERO)
    }

    /// Waits (at most until `deadline`) until the changes of `shard` below
    /// `upto` have been forwarded.
    pub async fn wait_forwarded(&self, shard: ShardId, upto: Position, deadline: Instant) -> bool {
        let mut rx = self.progress.subscribe();
        loop {
            if self.forwarded_to(shard) >= upto {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                return self.forwarded_to(shard) >= upto;
            }
        }
    }

    /// The client stopped using its cache: no lease holds changes back.
    pub fn release(&self) {
        self.leases.lock().expect("leases lock").clear();
        self.dirty.notify_one();
    }

    pub fn grant(&self, shard: ShardId, now: Instant) {
        self.leases
            .lock()
            .expect("leases lock")
            .insert(shard, now + lease::server_hold());
    }

    fn holds(&self, shard: ShardId, now: Instant) -> bool {
        self.leases
            .lock()
            .expect("leases lock")
            .get(&shard)
            .is_some_and(|t| *t > now)
    }

    fn holds_any(&self, now: Instant) -> bool {
        self.leases
            .lock()
            .expect("leases lock")
            .values()
            .any(|t| *t > now)
    }
}

/// The sessions of this node and the clean position of each shard.
pub struct Leases {
    sessions: Mutex<HashMap<u64, (Arc<Session>, bool)>>,
    next: AtomicU64,
    /// Leadership terms seen: shard → (ballot, when first seen leading).
    led_since: Mutex<HashMap<ShardId, (u32, Instant)>>,
    clean: HashMap<ShardId, watch::Sender<Position>>,
    /// Notified when a session's progress may have moved a clean position.
    pub dirty: Arc<Notify>,
}

impl Leases {
    pub fn new(shards: &[ShardId]) -> Leases {
        Leases {
            sessions: Mutex::default(),
            next: AtomicU64::new(1),
            led_since: Mutex::default(),
            clean: shards
                .iter()
                .map(|s| (*s, watch::channel(Position::ZERO).0))
                .collect(),
            dirty: Arc::new(Notify::new()),
        }
    }

    /// A new session; `applied` is each shard's applied position when it
    /// subscribed to changes (everything below was forwarded, trivially).
    pub fn open(&self, client: u64, applied: &[(ShardId, Position)]) -> (u64, Arc<Session>) {
        let s = Arc::new(Session {
            client,
            tracker: Mutex::new(Tracker {
                forwarded: applied.iter().copied().collect(),
                ..Tracker::default()
            }),
            leases: Mutex::default(),
            progress: watch::channel(0).0,
            dirty: self.dirty.clone(),
            early_ops: Mutex::default(),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.sessions
            .lock()
            .expect("sessions lock")
            .insert(id, (s.clone(), true));
        (id, s)
    }

    /// The session's connection ended; its leases are honoured until they
    /// run out (the client may not have noticed yet), then it is dropped.
    pub fn close(&self, id: u64) {
        if let Some(e) = self.sessions.lock().expect("sessions lock").get_mut(&id) {
            e.1 = false;
        }
    }

    /// Notes the leadership of `shard` (`ballot` is its term) as of now.
    pub fn observe_leadership(&self, shard: ShardId, leading: bool, ballot: u32, now: Instant) {
        let mut m = self.led_since.lock().expect("led_since lock");
        if !leading {
            m.remove(&shard);
        } else if m.get(&shard).is_none_or(|(b, _)| *b != ballot) {
            m.insert(shard, (ballot, now));
        }
    }

    /// Recomputes `shard`'s clean position (0 unless this node has led it
    /// for a lease's hold): the applied position, lowered to what every
    /// session leasing the shard has acknowledged.
    pub fn recompute(&self, shard: ShardId, applied: Position, now: Instant) -> Position {
        let fenced = self
            .led_since
            .lock()
            .expect("led_since lock")
            .get(&shard)
            .is_none_or(|(_, since)| now.duration_since(*since) < lease::server_hold());
        let mut clean = if fenced { Position::ZERO } else { applied };
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, (s, open)| *open || s.holds_any(now));
        if clean > Position::ZERO {
            for (s, _) in sessions.values() {
                if s.holds(shard, now) {
                    clean = clean.min(s.tracker.lock().expect("tracker lock").through(shard));
                }
            }
        }
        drop(sessions);
        if let Some(tx) = self.clean.get(&shard) {
            tx.send_if_modified(|c| {
                let changed = *c != clean;
                *c = clean;
                changed
            });
        }
        clean
    }

    /// Waits until this node's clean position of `shard` passes `pos`.
    pub async fn wait_clean_local(&self, shard: ShardId, pos: Position, deadline: Instant) -> bool {
        let Some(tx) = self.clean.get(&shard) else {
            return false;
        };
        let mut rx = tx.subscribe();
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, rx.wait_for(|c| *c > pos)).await;
        matches!(r, Ok(Ok(_)))
    }

    /// Whether this node took over `shard`'s leadership less than a
    /// lease's hold ago: sessions of the previous leader may still serve
    /// it from their caches (so changes wait for the clean position).
    pub fn fenced(&self, shard: ShardId, now: Instant) -> bool {
        self.led_since
            .lock()
            .expect("led_since lock")
            .get(&shard)
            .is_none_or(|(_, since)| now.duration_since(*since) < lease::server_hold())
    }

    /// Whether a session of another client than `client` holds a lease on
    /// `shard` (its cache must let go before a change is answered).
    pub fn others_hold(&self, shard: ShardId, client: u64, now: Instant) -> bool {
        self.sessions
            .lock()
            .expect("sessions lock")
            .values()
            .any(|(s, _)| s.client != client && s.holds(shard, now))
    }

    /// Sessions holding a lease on any shard (for metrics).
    pub fn leased_sessions(&self, now: Instant) -> usize {
        self.sessions
            .lock()
            .expect("sessions lock")
            .values()
            .filter(|(s, _)| s.holds_any(now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: ShardId = ShardId(0);

    fn p(n: u64) -> Position {
        Position(n)
    }

    fn led_long_ago(l: &Leases, shard: ShardId) -> Instant {
        let now = Instant::now();
        let past = now - lease::server_hold() - Duration::from_millis(1);
        l.observe_leadership(shard, true, 1, past);
        now
    }

    #[test]
    fn clean_waits_for_a_leased_sessions_ack_and_not_an_unleased_ones() {
        let l = Leases::new(&[S]);
        let now = led_long_ago(&l, S);
        let (_, a) = l.open(1, &[(S, p(10))]);
        let (_, b) = l.open(2, &[(S, p(10))]);
        a.grant(S, now);
        assert_eq!(l.recompute(S, p(10), now), p(10));
        // A change at position 10 (upto 11) reaches both as invalidations.
        let sa = a.next_seq();
        a.forwarded(S, p(11), Some(sa));
        let sb = b.next_seq();
        b.forwarded(S, p(11), Some(sb));
        assert_eq!(
            l.recompute(S, p(11), now),
            p(10),
            "a holds a lease and has not acked"
        );
        b.acked(sb);
        assert_eq!(l.recompute(S, p(11), now), p(10));
        a.acked(sa);
        assert_eq!(l.recompute(S, p(11), now), p(11));
        // Progress without changes for the session moves it on.
        a.forwarded(S, p(15), None);
        assert_eq!(l.recompute(S, p(15), now), p(15));
    }

    #[test]
    fn an_expired_lease_stops_holding_clean_back() {
        let l = Leases::new(&[S]);
        let now = led_long_ago(&l, S);
        let (_, a) = l.open(1, &[(S, p(0))]);
        a.grant(S, now);
        let s = a.next_seq();
        a.forwarded(S, p(5), Some(s));
        assert_eq!(l.recompute(S, p(5), now), p(0));
        let later = now + lease::server_hold() + Duration::from_millis(1);
        assert_eq!(l.recompute(S, p(5), later), p(5));
    }

    #[test]
    fn a_new_leader_is_fenced_for_a_lease_hold() {
        let l = Leases::new(&[S]);
        let now = Instant::now();
        l.observe_leadership(S, true, 3, now);
        assert_eq!(l.recompute(S, p(7), now), p(0));
        let later = now + lease::server_hold();
        assert_eq!(l.recompute(S, p(7), later), p(7));
        // A new term (even by the same node) starts a new fence.
        l.observe_leadership(S, true, 4, later);
        assert_eq!(l.recompute(S, p(7), later), p(0));
        // Not leading: nothing is clean here.
        l.observe_leadership(S, false, 4, later);
        assert_eq!(l.recompute(S, p(7), later + lease::server_hold()), p(0));
    }

    #[test]
    fn a_released_lease_holds_nothing_back() {
        let l = Leases::new(&[S]);
        let now = led_long_ago(&l, S);
        let (_, a) = l.open(1, &[(S, p(0))]);
        a.grant(S, now);
        let s = a.next_seq();
        a.forwarded(S, p(5), Some(s));
        assert_eq!(l.recompute(S, p(5), now), p(0));
        a.release();
        assert_eq!(l.recompute(S, p(5), now), p(5));
    }

    #[test]
    fn closed_sessions_are_dropped_once_their_leases_run_out() {
        let l = Leases::new(&[S]);
        let now = led_long_ago(&l, S);
        let (id, a) = l.open(1, &[(S, p(0))]);
        a.grant(S, now);
        l.close(id);
        l.recompute(S, p(0), now);
        assert_eq!(l.leased_sessions(now), 1);
        let later = now + lease::server_hold() + Duration::from_millis(1);
        l.recompute(S, p(0), later);
        assert_eq!(l.sessions.lock().unwrap().len(), 0);
    }
}
