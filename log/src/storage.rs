//! OmniPaxos' `Storage` over our [`Wal`].
//!
//! OmniPaxos owns its storage value, but the shard loop must also reach the
//! WAL (to `sync` once per batch, to read decided entries for subscribers),
//! so both hold a [`SharedWal`]. Every write here only queues a record; the
//! shard loop's `sync` makes the batch durable before anything leaves the
//! node (see `shard::ShardCore::ready`), except the decided index, which it
//! does not wait for (`Wal::append_lazy`, D39).

use std::sync::{Arc, Mutex, MutexGuard};

use omnipaxos::ballot_leader_election::Ballot;
use omnipaxos::storage::{NoSnapshot, StopSign, Storage, StorageOp, StorageResult};

use crate::disk::Disk;
use crate::entry::Entry;
use crate::wal::{Wal, WalOp};

/// A WAL shared between OmniPaxos and the shard loop.
pub struct SharedWal<D: Disk + Clone>(Arc<Mutex<Wal<D>>>);

impl<D: Disk + Clone> Clone for SharedWal<D> {
    fn clone(&self) -> Self {
        SharedWal(self.0.clone())
    }
}

impl<D: Disk + Clone> SharedWal<D> {
    pub fn new(wal: Wal<D>) -> Self {
        SharedWal(Arc::new(Mutex::new(wal)))
    }

    /// Locks the WAL. Holders never panic while holding it except on
    /// programming errors, so poisoning is treated as fatal.
    pub fn lock(&self) -> MutexGuard<'_, Wal<D>> {
        self.0.lock().expect("wal lock poisoned")
    }
}

fn to_op(op: StorageOp<Entry>, end: &mut u64) -> WalOp {
    match op {
        StorageOp::AppendEntry(e) => {
            let first_idx = *end;
            *end += 1;
            WalOp::Append {
                first_idx,
                entries: vec![e],
            }
        }
        StorageOp::AppendEntries(v) => {
            let first_idx = *end;
            *end += v.len() as u64;
            WalOp::Append {
                first_idx,
                entries: v,
            }
        }
        StorageOp::AppendOnPrefix(from, v) => {
            let from = from as u64;
            *end = from + v.len() as u64;
            WalOp::Atomic(vec![
                WalOp::Truncate(from),
                WalOp::Append {
                    first_idx: from,
                    entries: v,
                },
            ])
        }
        StorageOp::SetPromise(b) => WalOp::Promise(b),
        StorageOp::SetDecidedIndex(i) => WalOp::Decided(i as u64),
        StorageOp::SetAcceptedRound(b) => WalOp::AcceptedRound(b),
        StorageOp::SetCompactedIdx(i) => WalOp::Compacted(i as u64),
        StorageOp::Trim(i) => {
            *end = (*end).max(i as u64);
            WalOp::Trim(i as u64)
        }
        StorageOp::SetStopsign(s) => WalOp::StopSign(s),
        StorageOp::SetSnapshot(_) => WalOp::Atomic(vec![]),
    }
}

impl<D: Disk + Clone> Storage<Entry> for SharedWal<D> {
    fn write_atomically(&mut self, ops: Vec<StorageOp<Entry>>) -> StorageResult<()> {
        let mut w = self.lock();
        if let [StorageOp::SetDecidedIndex(i)] = ops[..] {
            w.append_lazy(WalOp::Decided(i as u64))?;
            return Ok(());
        }
        let mut end = w.state().end();
        let ops: Vec<WalOp> = ops.into_iter().map(|o| to_op(o, &mut end)).collect();
        w.append(WalOp::Atomic(ops))?;
        Ok(())
    }

    fn append_entry(&mut self, entry: Entry) -> StorageResult<()> {
        let mut w = self.lock();
        let first_idx = w.state().end();
        w.append(WalOp::Append {
            first_idx,
            entries: vec![entry],
        })?;
        Ok(())
    }

    fn append_entries(&mut self, entries: Vec<Entry>) -> StorageResult<()> {
        let mut w = self.lock();
        let first_idx = w.state().end();
        w.append(WalOp::Append { first_idx, entries })?;
        Ok(())
    }

    fn append_on_prefix(&mut self, from_idx: usize, entries: Vec<Entry>) -> StorageResult<()> {
        let mut end = 0;
        let op = to_op(StorageOp::AppendOnPrefix(from_idx, entries), &mut end);
        self.lock().append(op)?;
        Ok(())
    }

    fn set_promise(&mut self, n_prom: Ballot) -> StorageResult<()> {
        self.lock().append(WalOp::Promise(n_prom))?;
        Ok(())
    }

    fn set_decided_idx(&mut self, ld: usize) -> StorageResult<()> {
        // Lazy (D39): not waited for by the shard's sync.
        self.lock().append_lazy(WalOp::Decided(ld as u64))?;
        Ok(())
    }

    fn get_decided_idx(&self) -> StorageResult<usize> {
        Ok(self.lock().state().decided as usize)
    }

    fn set_accepted_round(&mut self, na: Ballot) -> StorageResult<()> {
        self.lock().append(WalOp::AcceptedRound(na))?;
        Ok(())
    }

    fn get_accepted_round(&self) -> StorageResult<Option<Ballot>> {
        Ok(self.lock().state().accepted_round)
    }

    fn get_entries(&self, from: usize, to: usize) -> StorageResult<Vec<Entry>> {
        Ok(self
            .lock()
            .state()
            .get(from as u64, to as u64)
            .unwrap_or_default())
    }

    fn get_log_len(&self) -> StorageResult<usize> {
        let w = self.lock();
        let s = w.state();
        Ok(s.end().saturating_sub(s.compacted) as usize)
    }

    fn get_suffix(&self, from: usize) -> StorageResult<Vec<Entry>> {
        let w = self.lock();
        let s = w.state();
        Ok(s.get(from as u64, s.end()).unwrap_or_default())
    }

    fn get_promise(&self) -> StorageResult<Option<Ballot>> {
        Ok(self.lock().state().promise)
    }

    fn set_stopsign(&mut self, s: Option<StopSign>) -> StorageResult<()> {
        self.lock().append(WalOp::StopSign(s))?;
        Ok(())
    }

    fn get_stopsign(&self) -> StorageResult<Option<StopSign>> {
        Ok(self.lock().state().stopsign.clone())
    }

    fn trim(&mut self, idx: usize) -> StorageResult<()> {
        self.lock().append(WalOp::Trim(idx as u64))?;
        Ok(())
    }

    fn set_compacted_idx(&mut self, idx: usize) -> StorageResult<()> {
        self.lock().append(WalOp::Compacted(idx as u64))?;
        Ok(())
    }

    fn get_compacted_idx(&self) -> StorageResult<usize> {
        Ok(self.lock().state().compacted as usize)
    }

    fn set_snapshot(&mut self, _snapshot: Option<NoSnapshot>) -> StorageResult<()> {
        // Snapshots belong to materializers (see `snapshot`), not to
        // OmniPaxos: the log only trims.
        Ok(())
    }

    fn get_snapshot(&self) -> StorageResult<Option<NoSnapshot>> {
        Ok(None)
    }
}
