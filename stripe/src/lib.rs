//! Plain data naming where file bytes live: the stripe layout (`k + m`),
//! the segment id, and the extent descriptor a writer gets back and the
//! file system commits to the log. Shared by the segment store
//! (`cfs-segments`) and the client/server vocabulary (`cfs-proto`), so the
//! protocol needs no storage crate.
//!
//! Invariant: data only; no I/O, no knowledge of inodes or the log.

use serde::{Deserialize, Serialize};

pub mod layout;
pub use layout::Layout;

/// A segment's id: unique in the cluster (chosen by the writer at random).
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct SegmentId(pub u128);

impl std::fmt::Display for SegmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl SegmentId {
    pub fn random() -> Self {
        SegmentId(rand::random())
    }
}

/// Where one stripe of file data lives: what the file system commits to
/// the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub segment: SegmentId,
    pub layout: Layout,
    /// Node of each fragment index, `k + m` distinct nodes.
    pub nodes: Vec<u64>,
    pub stripe: u32,
    /// File bytes in this stripe.
    pub data_len: u32,
    pub fragment_len: u32,
    /// blake3 of each fragment.
    pub checksums: Vec<[u8; 32]>,
    /// Fragment indices that were not durable when acknowledged.
    pub missing: Vec<u8>,
}
