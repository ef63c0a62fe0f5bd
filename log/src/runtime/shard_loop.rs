//! One shard's thread: applies inputs to its `ShardCore`, runs the group
//! commit (`ready`), then answers waiters and readers. The rules for
//! re-proposing undecided entries, re-forwarding unanswered reads and
//! trimming are in `policy` (shared with the simulation); this module only
//! does their I/O.

use super::*;

/// State of one shard thread.
pub(super) struct ShardLoop {
    pub(super) core: ShardCore<FsDisk>,
    pub(super) rx: std_mpsc::Receiver<Input>,
    pub(super) decided_tx: watch::Sender<Position>,
    pub(super) status: Arc<Mutex<ShardStatus>>,
    pub(super) subs: Arc<Mutex<SubscriberTable>>,
    pub(super) counters: Arc<ShardCounters>,
    pub(super) links: std::sync::Weak<Inner>,
    pub(super) proposals: Proposals<Reply>,
    pub(super) floors: TrimFloors,
    pub(super) ticks: Ticks,
    /// Reads of callers on this node, by their number (`ReadId::seq`).
    pub(super) reads: HashMap<u64, ReadReply>,
    /// Of those, the ones forwarded to a leader.
    pub(super) forwarded: ForwardedReads,
    pub(super) next_read: u64,
    /// See [`LogNode::set_watermark`].
    pub(super) watermark: Arc<AtomicU64>,
    /// See [`LogNode::answered_early`].
    pub(super) gate: Arc<ReadGate>,
    /// Reads waiting for early answers to settle: what they wait for.
    pub(super) parked: Vec<(u64, Parked)>,
    /// The last leader this replica knew (`claudefs_log_leader_changes_total`).
    pub(super) known_leader: Option<NodeId>,
}

/// A follower's read held back by the [`ReadGate`].
pub(super) struct Parked {
    from: NodeId,
    seq: u64,
}

impl ShardLoop {
    pub(super) fn run(&mut self, tick: Duration) -> Result<(), String> {
        let mut next_tick = Instant::now() + tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let first = match self.rx.recv_timeout(wait) {
                Ok(i) => Some(i),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            let mut n = 0;
            let mut next = first;
            while let Some(input) = next {
                // A batch of proposals counts as what it holds.
                n += match &input {
                    Input::ProposeMany { proposals, .. } => proposals.len().max(1),
                    _ => 1,
                };
                if let Input::Fail(why) = input {
                    return Err(why);
                }
                if !self.apply(input) {
                    return Ok(());
                }
                if n >= SHARD_BATCH_INPUTS_MAX {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            if n > 0 {
                self.counters.batch_entries.observe(n as f64);
            }
            if Instant::now() >= next_tick {
                self.core.tick();
                let due = self.ticks.tick();
                next_tick += tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + tick;
                }
                if due.housekeeping {
                    self.housekeeping();
                }
                if due.retry {
                    self.repropose_inflight();
                    self.reforward_reads();
                }
            }
            self.release_parked();
            self.flush()?;
        }
    }

    fn send_forward(&self, leader: NodeId, entries: Vec<Entry>) {
        if let Some(inner) = self.links.upgrade() {
            inner.links.send(
                leader,
                &Wire::Forward {
                    shard: self.core.shard,
                    entries,
                },
            );
        }
    }

    fn refusal(&self, r: Refused) -> LogError {
        let shard = self.core.shard;
        match r {
            Refused::NotLeader(leader) => LogError::NotLeader {
                shard,
                leader: Some(leader),
                addr: self
                    .links
                    .upgrade()
                    .and_then(|i| i.cfg.nodes.get(&leader).map(|a| a.to_string())),
            },
            Refused::NoLeader => LogError::NoLeader(shard),
        }
    }

    /// Submits proposals that arrived together; those this replica cannot
    /// take go to the leader in one `Forward` per leader.
    fn propose(&mut self, proposals: Vec<(Entry, Option<Reply>)>, redirect: bool) {
        let now = self.ticks.now();
        let mut forward: Vec<(NodeId, Vec<Entry>)> = Vec::new();
        for (entry, reply) in proposals {
            let done = self
                .proposals
                .submit(&mut self.core, entry.clone(), reply, redirect, now);
            if let Some(leader) = done.forward {
                match forward.iter_mut().find(|(l, _)| *l == leader) {
                    Some((_, entries)) => entries.push(entry),
                    None => forward.push((leader, vec![entry])),
                }
            }
            if let Some((r, result)) = done.answer {
                r.send(result.map_err(|e| self.refusal(e)));
            }
        }
        for (leader, entries) in forward {
            self.send_forward(leader, entries);
        }
    }

    /// Applies one input; false means stop.
    fn apply(&mut self, input: Input) -> bool {
        match input {
            Input::Paxos(m) => self.core.handle(m),
            Input::Propose {
                entry,
                reply,
                redirect,
            } => self.propose(vec![(entry, reply)], redirect),
            Input::ProposeMany {
                proposals,
                redirect,
            } => self.propose(proposals, redirect),
            // A caller here reads through the layer that answered early
            // (it sees those answers); a follower's does not.
            Input::Read(reply) => self.start_read(reply),
            Input::ReadForwarded { from, seq } => self.gated(Parked { from, seq }),
            Input::Wake => {}
            Input::ReadDone { seq, result } => {
                let origin = self.core.node;
                self.answer_read(ReadId { origin, seq }, result);
            }
            Input::ReadMsg(from, msg) => self.core.handle_read(from, msg),
            Input::Reconnected(p) => self.core.reconnected(p),
            Input::PeerFloor(p, f) => self.floors.peer(p, f),
            Input::Campaign => self.core.campaign(),
            // Taken by `run` before it gets here.
            Input::Stop | Input::Fail(_) => return false,
        }
        true
    }

    /// Starts a follower's read now, or parks it behind the early answers
    /// given before it arrived.
    fn gated(&mut self, read: Parked) {
        match self.gate.hold() {
            Some(_) if self.parked.len() >= PARKED_READS_MAX => {
                let id = ReadId {
                    origin: read.from,
                    seq: read.seq,
                };
                self.send_read_done(id, Err(LogError::Busy(self.core.shard)));
            }
            Some(upto) => {
                self.parked.push((upto, read));
                self.gate.parked.store(true, Ordering::SeqCst);
            }
            None => self.start_forwarded_read(read.from, read.seq),
        }
    }

    /// Starts the parked reads whose early answers have settled.
    fn release_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let (ready, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|(upto, _)| self.gate.open_for(*upto));
        self.parked = wait;
        self.gate
            .parked
            .store(!self.parked.is_empty(), Ordering::SeqCst);
        for (_, r) in ready {
            self.start_forwarded_read(r.from, r.seq);
        }
    }

    /// Starts a read a follower forwarded (this node should lead).
    fn start_forwarded_read(&mut self, from: NodeId, seq: u64) {
        let id = ReadId { origin: from, seq };
        let refused = match self.core.read(id) {
            ReadStart::Pending => None,
            ReadStart::Busy => Some(LogError::Busy(self.core.shard)),
            ReadStart::Forward(_) | ReadStart::NoLeader => {
                Some(LogError::NoLeader(self.core.shard))
            }
        };
        if let Some(e) = refused {
            self.send_read_done(id, Err(e));
        }
    }

    /// Starts a read of a caller on this node: at the leader, or forwarded.
    fn start_read(&mut self, reply: ReadReply) {
        self.next_read += 1;
        let seq = self.next_read;
        let shard = self.core.shard;
        match self.core.read(ReadId {
            origin: self.core.node,
            seq,
        }) {
            ReadStart::Pending => {
                self.reads.insert(seq, reply);
            }
            ReadStart::Forward(leader) => {
                self.reads.insert(seq, reply);
                self.forwarded.sent(seq, self.ticks.now());
                if let Some(inner) = self.links.upgrade() {
                    inner.links.send(leader, &Wire::ReadForward { shard, seq });
                }
            }
            ReadStart::NoLeader => reply.send(Err(LogError::NoLeader(shard))),
            ReadStart::Busy => reply.send(Err(LogError::Busy(shard))),
        }
    }

    /// Answers a read: to the caller here, or to the follower that
    /// forwarded it.
    fn send_read_done(&mut self, id: ReadId, result: Result<Position, LogError>) {
        let watermark = self.watermark.load(Ordering::SeqCst);
        let result = result.map(|position| ReadPoint {
            position,
            watermark,
        });
        self.answer_read(id, result);
    }

    fn answer_read(&mut self, id: ReadId, result: Result<ReadPoint, LogError>) {
        if id.origin == self.core.node {
            self.forwarded.answered(id.seq);
            if let Some(r) = self.reads.remove(&id.seq) {
                r.send(result);
            }
        } else if let Some(inner) = self.links.upgrade() {
            inner.links.send(
                id.origin,
                &Wire::ReadDone {
                    shard: self.core.shard,
                    seq: id.seq,
                    result,
                },
            );
        }
    }

    /// One group commit: fsync, then send and acknowledge.
    fn flush(&mut self) -> Result<(), String> {
        let shard = self.core.shard;
        let config_id = self.core.epoch().config_id;
        let links = self.links.upgrade();
        let send = |msgs: Vec<Message<Entry>>| {
            if let Some(inner) = &links {
                for m in msgs {
                    let to = m.get_receiver();
                    tracing::trace!(?m, "send");
                    inner.links.send(
                        to,
                        &Wire::Paxos {
                            shard,
                            config_id,
                            msg: m,
                        },
                    );
                }
            }
        };
        let mut ready = self.core.ready_pipelined(send).map_err(|e| e.to_string())?;
        send(std::mem::take(&mut ready.messages));
        if let Some(inner) = &links {
            for (to, msg) in std::mem::take(&mut ready.read_msgs) {
                inner.links.send(
                    to,
                    &Wire::ReadIndex {
                        shard,
                        config_id,
                        msg,
                    },
                );
            }
        }
        drop(links);
        for (id, r) in std::mem::take(&mut ready.reads) {
            let r = r.map_err(|e| match e {
                ReadFailed::NotLeader => LogError::NoLeader(shard),
                ReadFailed::Busy => LogError::Busy(shard),
            });
            self.send_read_done(id, r);
        }
        self.counters.batches.inc();
        if !ready.decided.is_empty() {
            self.counters
                .decided_entries
                .inc_by(ready.decided.len() as u64);
            for (pos, e) in &ready.decided {
                for w in self.proposals.decided(e.request) {
                    w.send(Ok(*pos));
                }
            }
            let _ = self.decided_tx.send(self.core.delivered());
        }
        if ready.stopped.is_some() {
            warn!(
                "epoch stopped; runtime reconfiguration is not supported yet, shard is read-only"
            );
            for w in self.proposals.drain() {
                w.send(Err(LogError::NoLeader(shard)));
            }
        }
        let mut st = self.status.lock().expect("status lock");
        let leader = self.core.leader();
        // A change of leader: another node than the last one known (the
        // first election, or the same leader after a gap, is none).
        if let Some(now) = leader {
            if self.known_leader.is_some_and(|was| was != now) {
                self.counters.leader_changes.inc();
            }
            self.known_leader = Some(now);
        }
        st.leader = leader;
        st.trimmed = self.core.epoch().base + self.core.wal().lock().state().compacted;
        st.is_leader = self.core.is_leader();
        st.ballot = self.core.ballot();
        st.term_start = self.core.term_start();
        st.decided = self.core.delivered();
        Ok(())
    }

    /// Proposes again every entry still undecided (see
    /// [`Proposals::retry`]).
    fn repropose_inflight(&mut self) {
        let done = self.proposals.retry(&mut self.core, self.ticks.now());
        for (leader, entry) in done.forward {
            self.send_forward(leader, vec![entry]);
        }
        for (w, p) in done.answered {
            w.send(Ok(p));
        }
    }

    /// Sends again every read forwarded and not answered, to whoever leads
    /// now (a duplicate answer is ignored).
    fn reforward_reads(&mut self) {
        let shard = self.core.shard;
        for seq in self.forwarded.due(self.ticks.now()) {
            if !self.reads.contains_key(&seq) {
                self.forwarded.answered(seq);
                continue;
            }
            let id = ReadId {
                origin: self.core.node,
                seq,
            };
            match self.core.read(id) {
                ReadStart::Forward(leader) => {
                    if let Some(inner) = self.links.upgrade() {
                        inner.links.send(leader, &Wire::ReadForward { shard, seq });
                    }
                }
                // Registered here now (this node leads): answered locally.
                ReadStart::Pending => self.forwarded.answered(seq),
                ReadStart::NoLeader | ReadStart::Busy => {}
            }
        }
    }

    fn housekeeping(&mut self) {
        self.proposals.sweep(Reply::is_closed);
        self.reads.retain(|_, r| !r.is_closed());
        let reads = &self.reads;
        self.forwarded.retain(|s| reads.contains_key(&s));
        let floor = {
            let mut t = self.subs.lock().expect("subscribers lock");
            if let Err(e) = t.save() {
                warn!("cannot persist subscriber positions: {e}");
            }
            t.floor()
        };
        let floor = match self.core.reportable_floor(floor) {
            Ok(f) => f,
            Err(e) => {
                warn!("cannot make the decided index durable: {e}");
                return;
            }
        };
        let Some(inner) = self.links.upgrade() else {
            return;
        };
        let peers: Vec<NodeId> = inner
            .cfg
            .nodes
            .keys()
            .copied()
            .filter(|id| *id != self.core.node)
            .collect();
        for id in &peers {
            inner.links.send(
                *id,
                &Wire::Persisted {
                    shard: self.core.shard,
                    floor,
                },
            );
        }
        if self.core.is_leader() {
            if let Some(upto) = self.floors.due(floor, &peers) {
                if self.core.trim(upto) {
                    info!(below = upto.get(), "trimmed log");
                    self.floors.trimmed(upto);
                }
            }
        }
    }
}
