//! Per-run fault rates and the simulated network (FIFO links, loss,
//! delay, duplication, cuts).

use super::*;

/// Per-run rates (per step, or per message for the network), drawn from the
/// seed so that runs range from calm to hostile.
#[derive(Clone, Debug)]
pub(super) struct Profile {
    pub(super) crash: f64,
    pub(super) fsync_fail: f64,
    pub(super) partition: f64,
    pub(super) tick_skip: f64,
    pub(super) propose: f64,
    pub(super) retry: f64,
    pub(super) snapshot: f64,
    /// A replica skips `ready` this step (bigger batches, like a slow fsync).
    pub(super) ready_skip: f64,
    /// Step from which an admin asks for a new epoch, if this run does.
    pub(super) reconfig_at: Option<u64>,
}

/// Network rates of one run.
#[derive(Clone, Debug, Default)]
pub(super) struct NetProfile {
    /// Silent loss (the transport drops messages when a peer's queue is full).
    pub(super) drop: f64,
    /// A message delivered twice in a row.
    pub(super) dup: f64,
    /// A long stall of one message (and, FIFO, of those behind it).
    pub(super) delay: f64,
    /// Extra random latency `0..=jitter` steps: reorders across links.
    pub(super) jitter: u64,
}

/// `max * uniform` with probability `p_on`, else 0.
pub(super) fn maybe_rate(rng: &mut StdRng, p_on: f64, max: f64) -> f64 {
    if rng.gen_bool(p_on) {
        rng.gen_range(0.0..max)
    } else {
        0.0
    }
}

impl Profile {
    pub(super) fn draw(rng: &mut StdRng, steps: u64) -> Profile {
        Profile {
            crash: maybe_rate(rng, 0.8, 0.004),
            fsync_fail: maybe_rate(rng, 0.5, 0.01),
            partition: maybe_rate(rng, 0.7, 0.006),
            tick_skip: maybe_rate(rng, 0.5, 0.2),
            propose: rng.gen_range(0.1..0.9),
            retry: rng.gen_range(0.0..0.2),
            snapshot: rng.gen_range(0.01..0.2),
            ready_skip: maybe_rate(rng, 0.5, 0.3),
            reconfig_at: rng.gen_bool(0.5).then(|| rng.gen_range(0..=steps * 3 / 4)),
        }
    }

    /// The same run without faults, with enough load to make progress.
    pub(super) fn calm(&self) -> Profile {
        Profile {
            crash: 0.0,
            fsync_fail: 0.0,
            partition: 0.0,
            tick_skip: 0.0,
            ready_skip: 0.0,
            propose: self.propose.max(0.3),
            ..self.clone()
        }
    }
}

impl NetProfile {
    pub(super) fn draw(rng: &mut StdRng) -> NetProfile {
        NetProfile {
            drop: maybe_rate(rng, 0.7, 0.08),
            dup: maybe_rate(rng, 0.5, 0.05),
            delay: maybe_rate(rng, 0.5, 0.05),
            jitter: rng.gen_range(0..=3),
        }
    }
}

/// What travels between replicas.
#[derive(Clone, Debug)]
pub(super) enum Payload {
    Paxos(Message<Entry>),
    /// `Proposed::Forward`: a proposal on its way to the leader.
    Forward(Entry),
    /// A replica's trim floor (its persisted snapshot), as `Wire::Persisted`.
    Floor(Position),
    /// A read-index probe or ack.
    Read(ReadMsg),
    /// `ReadStart::Forward`: a read on its way to the leader.
    ReadForward(ReadId),
}

#[derive(Debug)]
pub(super) struct Packet {
    /// Step at which it arrives.
    pub(super) at: u64,
    /// Send order, to break ties deterministically.
    pub(super) seq: u64,
    pub(super) from: NodeId,
    pub(super) to: NodeId,
    /// Epoch (OmniPaxos configuration) of the sending and receiving core.
    pub(super) config: u32,
    pub(super) payload: Payload,
}

/// In-flight messages and link state. Has its own RNG so that message
/// traffic and the other random choices stay independent streams.
///
/// Model (the contract of `transport`: one TCP connection per directed
/// link): each directed link is FIFO, so a stalled message holds back the
/// ones behind it; messages on different links are reordered freely; loss
/// is silent; a cut link loses what it carries and, once healed, both ends
/// are told (`reconnected`). Duplicates arrive right behind the original.
/// Reordering within one link is outside that contract and not simulated:
/// OmniPaxos assumes FIFO sessions (a stale `AcceptSync` overtaking a newer
/// `Prepare` trips its own `log sync would overwrite decided entries`
/// assertion).
pub(super) struct Network {
    pub(super) rng: StdRng,
    pub(super) profile: NetProfile,
    pub(super) in_flight: Vec<Packet>,
    pub(super) next_seq: u64,
    /// Arrival step of the last packet queued on each directed link.
    pub(super) link_tail: BTreeMap<(NodeId, NodeId), u64>,
    /// Directed links currently cut by a partition.
    pub(super) cut: BTreeSet<(NodeId, NodeId)>,
    pub(super) heal_at: u64,
    pub(super) messages: u64,
    pub(super) dropped: u64,
    pub(super) duplicated: u64,
    pub(super) delayed: u64,
}

impl Network {
    pub(super) fn new(seed: u64) -> Network {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_7477_6f72_6b00);
        let profile = NetProfile::draw(&mut rng);
        Network {
            rng,
            profile,
            in_flight: Vec::new(),
            next_seq: 0,
            link_tail: BTreeMap::new(),
            cut: BTreeSet::new(),
            heal_at: 0,
            messages: 0,
            dropped: 0,
            duplicated: 0,
            delayed: 0,
        }
    }

    pub(super) fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.cut.contains(&(from, to))
    }

    /// Queues `payload`, subject to cuts, loss, duplication and delay.
    pub(super) fn send(
        &mut self,
        now: u64,
        from: NodeId,
        to: NodeId,
        config: u32,
        payload: Payload,
    ) {
        self.messages += 1;
        if self.is_cut(from, to) || self.rng.gen_bool(self.profile.drop) {
            self.dropped += 1;
            return;
        }
        let copies = if self.rng.gen_bool(self.profile.dup) {
            self.duplicated += 1;
            2
        } else {
            1
        };
        let mut delay = 1 + self.rng.gen_range(0..=self.profile.jitter);
        if self.rng.gen_bool(self.profile.delay) {
            self.delayed += 1;
            delay += self.rng.gen_range(5..=40);
        }
        let tail = self.link_tail.entry((from, to)).or_insert(0);
        let at = (now + delay).max(*tail);
        *tail = at;
        for _ in 0..copies {
            self.in_flight.push(Packet {
                at,
                seq: self.next_seq,
                from,
                to,
                config,
                payload: payload.clone(),
            });
            self.next_seq += 1;
        }
    }

    /// Removes and returns the packets due at `now`, in arrival order.
    pub(super) fn take_due(&mut self, now: u64) -> Vec<Packet> {
        let (mut due, rest): (Vec<Packet>, Vec<Packet>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|p| p.at <= now);
        self.in_flight = rest;
        due.sort_by_key(|p| (p.at, p.seq));
        due
    }

    /// No more loss, duplication or extra delay (packets in flight stay).
    pub(super) fn calm(&mut self) {
        self.profile = NetProfile::default();
    }
}
