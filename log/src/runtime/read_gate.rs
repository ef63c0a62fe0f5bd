//! Holding back reads for answers given before their entries were decided.
//!
//! A layer above the log may answer its callers once it has ordered a
//! change and handed it to the log, before the entry is decided (the
//! namespace's sequencer does, docs/decisions.md D30). A reader elsewhere
//! must still see every change answered before its read began: so a read
//! a follower forwards to this node while some early answers are not yet
//! settled (decided and applied above) waits until those answers are.
//! (Readers on this node read through the layer that answered, which
//! shows them its answers: they are not held.) The layer
//! numbers its early answers; `answered` is one past the last one given,
//! `settled` one past the last of an unbroken run of settled ones.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Reads parked behind unsettled early answers, per shard, at most; more
/// are refused as busy (the caller retries).
pub const PARKED_READS_MAX: usize = 4096;

/// The counters a layer above moves and the shard thread consults.
#[derive(Default, Debug)]
pub struct ReadGate {
    answered: AtomicU64,
    settled: AtomicU64,
    /// Reads are parked: a settle wakes the shard thread.
    pub(super) parked: AtomicBool,
}

impl ReadGate {
    pub(super) fn answered(&self, upto: u64) {
        self.answered.fetch_max(upto, Ordering::SeqCst);
    }

    /// Returns whether reads are parked (the shard thread needs a wake).
    pub(super) fn settled(&self, upto: u64) -> bool {
        self.settled.fetch_max(upto, Ordering::SeqCst);
        self.parked.load(Ordering::SeqCst)
    }

    /// What a read arriving now must wait for, if anything.
    pub(super) fn hold(&self) -> Option<u64> {
        let a = self.answered.load(Ordering::SeqCst);
        (self.settled.load(Ordering::SeqCst) < a).then_some(a)
    }

    /// Whether a read that had to wait for `upto` may start.
    pub(super) fn open_for(&self, upto: u64) -> bool {
        self.settled.load(Ordering::SeqCst) >= upto
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_waits_only_for_answers_given_before_it_arrived() {
        let g = ReadGate::default();
        assert_eq!(g.hold(), None);
        g.answered(3);
        let need = g.hold().expect("held");
        assert_eq!(need, 3);
        g.answered(5);
        g.settled(3);
        // Answers after the read arrived do not hold it further.
        assert!(g.open_for(need));
        assert_eq!(g.hold(), Some(5));
        g.settled(2); // settled never goes back
        assert!(g.open_for(3));
    }
}
