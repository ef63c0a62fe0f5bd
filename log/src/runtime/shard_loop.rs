//! One shard's thread: applies inputs to its `ShardCore`, runs the group
//! commit (`ready`), then answers waiters and readers, re-proposes
//! undecided entries and re-forwards unanswered reads, and exchanges trim
//! floors.

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
    pub(super) waiters: HashMap<RequestId, Vec<Reply>>,
    /// Undecided entries proposed through this node for local waiters, with
    /// the tick they were last proposed: an entry can be lost before it is
    /// decided (a leader replaced before replicating it, a forward sent to
    /// a leader still preparing), so it is proposed again until decided;
    /// the log deduplicates by request id.
    pub(super) inflight: HashMap<RequestId, (Entry, u64)>,
    pub(super) peer_floors: HashMap<NodeId, Position>,
    pub(super) trimmed_to: Position,
    pub(super) ticks: u64,
    /// Reads of callers on this node, by their number (`ReadId::seq`).
    pub(super) reads: HashMap<u64, ReadReply>,
    /// Of those, the ones forwarded to a leader, with the tick they were
    /// last sent: a forward can be lost (a link not up yet, a leader
    /// replaced), so it is sent again until answered, like proposals.
    pub(super) reads_forwarded: HashMap<u64, u64>,
    pub(super) next_read: u64,
    /// See [`LogNode::set_watermark`].
    pub(super) watermark: Arc<AtomicU64>,
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
                if !self.apply(input) {
                    return Ok(());
                }
                n += 1;
                if n >= SHARD_BATCH_INPUTS_MAX {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            if Instant::now() >= next_tick {
                self.core.tick();
                self.ticks += 1;
                next_tick += tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + tick;
                }
                if self.ticks.is_multiple_of(HOUSEKEEPING_TICKS) {
                    self.housekeeping();
                }
                if self.ticks.is_multiple_of(REPROPOSE_TICKS) {
                    self.repropose_inflight();
                    self.reforward_reads();
                }
            }
            self.flush()?;
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
            } => {
                let req = entry.request;
                let outcome = self.core.propose(entry.clone());
                tracing::debug!(?req, ?outcome, local = reply.is_some(), "propose");
                match outcome {
                    Proposed::Appended | Proposed::Duplicate(None) => {
                        if let Some(r) = reply {
                            self.inflight.insert(req, (entry, self.ticks));
                            self.waiters.entry(req).or_default().push(r);
                        }
                    }
                    Proposed::Duplicate(Some(p)) => {
                        if let Some(r) = reply {
                            r.send(Ok(p));
                        }
                    }
                    Proposed::Forward(leader) if redirect => {
                        if let Some(r) = reply {
                            let addr = self
                                .links
                                .upgrade()
                                .and_then(|i| i.cfg.nodes.get(&leader).map(|a| a.to_string()));
                            r.send(Err(LogError::NotLeader {
                                shard: self.core.shard,
                                leader: Some(leader),
                                addr,
                            }));
                        }
                    }
                    Proposed::Forward(leader) => {
                        if reply.is_some() {
                            self.inflight.insert(req, (entry.clone(), self.ticks));
                        }
                        if let Some(inner) = self.links.upgrade() {
                            inner.links.send(
                                leader,
                                &Wire::Forward {
                                    shard: self.core.shard,
                                    entries: vec![entry],
                                },
                            );
                        }
                        if let Some(r) = reply {
                            self.waiters.entry(req).or_default().push(r);
                        }
                    }
                    Proposed::NoLeader | Proposed::Stopping => {
                        if let Some(r) = reply {
                            r.send(Err(LogError::NoLeader(self.core.shard)));
                        }
                    }
                }
            }
            Input::Read(reply) => self.start_read(reply),
            Input::ReadForwarded { from, seq } => {
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
            Input::ReadDone { seq, result } => {
                let origin = self.core.node;
                self.answer_read(ReadId { origin, seq }, result);
            }
            Input::ReadMsg(from, msg) => self.core.handle_read(from, msg),
            Input::Reconnected(p) => self.core.reconnected(p),
            Input::PeerFloor(p, f) => {
                self.peer_floors.insert(p, f);
            }
            Input::Stop => return false,
        }
        true
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
                self.reads_forwarded.insert(seq, self.ticks);
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
            self.reads_forwarded.remove(&id.seq);
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
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        {
            let w = self.core.wal().lock();
            let st = w.stats();
            self.counters.wal_syncs.store(st.syncs, Ordering::Relaxed);
            self.counters
                .wal_bytes
                .store(st.bytes_written, Ordering::Relaxed);
        }
        if !ready.decided.is_empty() {
            self.counters
                .decided_entries
                .fetch_add(ready.decided.len() as u64, Ordering::Relaxed);
            for (pos, e) in &ready.decided {
                self.inflight.remove(&e.request);
                if let Some(ws) = self.waiters.remove(&e.request) {
                    for w in ws {
                        w.send(Ok(*pos));
                    }
                }
            }
            let _ = self.decided_tx.send(self.core.delivered());
        }
        if ready.stopped.is_some() {
            warn!(
                "epoch stopped; runtime reconfiguration is not supported yet, shard is read-only"
            );
        }
        let mut st = self.status.lock().expect("status lock");
        st.leader = self.core.leader();
        st.is_leader = self.core.is_leader();
        st.ballot = self.core.ballot();
        st.decided = self.core.delivered();
        Ok(())
    }

    /// Proposes again every entry still undecided after
    /// [`REPROPOSE_TICKS`] (to whoever leads now; duplicates are recognised
    /// by request id).
    fn repropose_inflight(&mut self) {
        let stale: Vec<RequestId> = self
            .inflight
            .iter()
            .filter(|(_, (_, sent))| self.ticks - sent >= REPROPOSE_TICKS)
            .map(|(r, _)| *r)
            .collect();
        for req in stale {
            let Some((entry, _)) = self.inflight.remove(&req) else {
                continue;
            };
            if !self.waiters.contains_key(&req) {
                continue;
            }
            match self.core.propose(entry.clone()) {
                Proposed::Forward(leader) => {
                    if let Some(inner) = self.links.upgrade() {
                        inner.links.send(
                            leader,
                            &Wire::Forward {
                                shard: self.core.shard,
                                entries: vec![entry.clone()],
                            },
                        );
                    }
                    self.inflight.insert(req, (entry, self.ticks));
                }
                Proposed::Duplicate(Some(p)) => {
                    for w in self.waiters.remove(&req).unwrap_or_default() {
                        w.send(Ok(p));
                    }
                }
                Proposed::Appended
                | Proposed::Duplicate(None)
                | Proposed::NoLeader
                | Proposed::Stopping => {
                    self.inflight.insert(req, (entry, self.ticks));
                }
            }
        }
    }

    /// Sends again every read forwarded [`REPROPOSE_TICKS`] ago and not
    /// answered, to whoever leads now (a duplicate answer is ignored).
    fn reforward_reads(&mut self) {
        let stale: Vec<u64> = self
            .reads_forwarded
            .iter()
            .filter(|(_, sent)| self.ticks - **sent >= REPROPOSE_TICKS)
            .map(|(s, _)| *s)
            .collect();
        let shard = self.core.shard;
        for seq in stale {
            if !self.reads.contains_key(&seq) {
                self.reads_forwarded.remove(&seq);
                continue;
            }
            self.reads_forwarded.insert(seq, self.ticks);
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
                ReadStart::Pending => {
                    self.reads_forwarded.remove(&seq);
                }
                ReadStart::NoLeader | ReadStart::Busy => {}
            }
        }
    }

    fn housekeeping(&mut self) {
        self.waiters.retain(|_, ws| {
            ws.retain(|w| !w.is_closed());
            !ws.is_empty()
        });
        let waiters = &self.waiters;
        self.inflight.retain(|r, _| waiters.contains_key(r));
        self.reads.retain(|_, r| !r.is_closed());
        let reads = &self.reads;
        self.reads_forwarded.retain(|s, _| reads.contains_key(s));
        let floor = {
            let mut t = self.subs.lock().expect("subscribers lock");
            if let Err(e) = t.save() {
                warn!("cannot persist subscriber positions: {e}");
            }
            t.floor()
        };
        let Some(inner) = self.links.upgrade() else {
            return;
        };
        for id in inner.cfg.nodes.keys() {
            if *id != self.core.node {
                inner.links.send(
                    *id,
                    &Wire::Persisted {
                        shard: self.core.shard,
                        floor,
                    },
                );
            }
        }
        if self.core.is_leader() {
            let others = inner.cfg.nodes.len() - 1;
            if self.peer_floors.len() >= others {
                let min = self
                    .peer_floors
                    .values()
                    .copied()
                    .min()
                    .unwrap_or(0)
                    .min(floor)
                    .saturating_sub(inner.cfg.retain_entries);
                if min > self.trimmed_to && self.core.trim(min) {
                    info!(below = min, "trimmed log");
                    self.trimmed_to = min;
                }
            }
        }
    }
}
