//! The vocabulary of cross-shard transactions as it appears in log
//! entries (`Op::TxPrepare` carries a [`Part`]); the protocol itself is in
//! `cfs-materializers` (apply) and `cfs-meta` (the coordinator).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);
/// A scanned key range `[start, end)` with the live keys it held.
pub type Scan = (Vec<u8>, Vec<u8>, Vec<KeyValue>);

/// A transaction attempt: (coordinator id, sequence). Each attempt of an
/// operation gets a new id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxId {
    /// The coordinator process (random per start).
    pub coordinator: u64,
    /// Its attempt number.
    pub seq: u64,
}

impl TxId {
    pub fn new(coordinator: u64, seq: u64) -> TxId {
        TxId { coordinator, seq }
    }
}

impl std::fmt::Display for TxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}:{}", self.coordinator, self.seq)
    }
}

/// What one shard does in a transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// Keys the plan read, with the value it saw (`None`: absent).
    pub reads: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Ranges the plan scanned, with the live keys it saw.
    pub scans: Vec<Scan>,
    /// The values to write on commit (`None`: delete).
    pub writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Part {
    /// Every key this part locks.
    pub fn keys(&self) -> BTreeSet<&[u8]> {
        let mut k: BTreeSet<&[u8]> = BTreeSet::new();
        k.extend(self.reads.iter().map(|(k, _)| k.as_slice()));
        k.extend(self.writes.iter().map(|(k, _)| k.as_slice()));
        for (_, _, found) in &self.scans {
            k.extend(found.iter().map(|(k, _)| k.as_slice()));
        }
        k
    }
}
