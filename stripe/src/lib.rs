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
    /// How those bytes were stored before erasure coding.
    pub packing: Packing,
    pub fragment_len: u32,
    /// blake3 of each fragment.
    pub checksums: Vec<[u8; 32]>,
    /// Fragment indices that were not durable when acknowledged.
    pub missing: Vec<u8>,
    /// The content address of the stripe's file bytes when the stripe was
    /// written as one deduplicated chunk (docs/decisions.md D50): a
    /// later writer of the same bytes may name this stripe instead of
    /// storing them again.
    pub chunk: Option<ChunkId>,
}

/// A chunk's content address: blake3 of its file bytes, keyed by the
/// dedupe domain's key, so that the same bytes have unrelated ids in two
/// domains (docs/decisions.md D50).
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

/// How a stripe's file bytes are stored: as they are, or compressed as
/// one zstd frame (docs/decisions.md D49). The fragments' checksums cover
/// the stored bytes.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Packing {
    #[default]
    Plain,
    /// One zstd frame of `stored_len` bytes that decompresses to exactly
    /// the extent's `data_len`.
    Zstd { stored_len: u32 },
}

impl Extent {
    /// Bytes erasure-coded into the fragments: the stored form.
    pub fn stored_len(&self) -> u32 {
        match self.packing {
            Packing::Plain => self.data_len,
            Packing::Zstd { stored_len } => stored_len,
        }
    }

    /// Whether the stored bytes are not the file bytes themselves (a part
    /// of the stripe cannot be read alone).
    pub fn is_packed(&self) -> bool {
        self.packing != Packing::Plain
    }

    /// The stored bytes that `len` of the stripe's file bytes account for
    /// (proportional, rounded down): what a reference to them keeps on
    /// disk, counted per segment by the garbage collector.
    pub fn stored_share(&self, len: u64) -> u64 {
        match self.packing {
            Packing::Plain => len,
            Packing::Zstd { stored_len } => {
                let d = u128::from(self.data_len.max(1));
                (u128::from(len) * u128::from(stored_len) / d) as u64
            }
        }
    }
}

/// Whether and how writers compress stripes: `zstd:N` (levels 1 to 19)
/// or `off`. The default is `zstd:1` (docs/decisions.md D49).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    Off,
    Zstd { level: i32 },
}

/// The zstd levels accepted.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd { level: 1 }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "compression {s:?}: expected `off`, `zstd` or `zstd:N` with N in {}..={}",
                ZSTD_LEVELS.start(),
                ZSTD_LEVELS.end()
            )
        };
        match s {
            "off" | "none" => Ok(Compression::Off),
            "zstd" => Ok(Compression::default()),
            _ => {
                let n = s.strip_prefix("zstd:").ok_or_else(bad)?;
                let level: i32 = n.parse().map_err(|_| bad())?;
                if !ZSTD_LEVELS.contains(&level) {
                    return Err(bad());
                }
                Ok(Compression::Zstd { level })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_parses_and_prints() {
        for s in ["off", "zstd:1", "zstd:19", "zstd:3"] {
            let c: Compression = s.parse().unwrap();
            assert_eq!(c.to_string(), s);
        }
        assert_eq!("zstd".parse::<Compression>(), Ok(Compression::default()));
        for bad in ["", "zstd:0", "zstd:20", "zstd:-1", "lz4", "zstd:x", "zstd:"] {
            assert!(bad.parse::<Compression>().is_err(), "{bad}");
        }
    }

    #[test]
    fn stored_share_is_proportional_and_bounded() {
        let mut e = Extent {
            segment: SegmentId(1),
            layout: Layout { k: 2, m: 1 },
            nodes: vec![1, 2, 3],
            stripe: 0,
            data_len: 1000,
            packing: Packing::Zstd { stored_len: 250 },
            fragment_len: 4096,
            checksums: vec![],
            missing: vec![],
            chunk: None,
        };
        assert_eq!(e.stored_share(1000), 250);
        assert_eq!(e.stored_share(10), 2);
        assert_eq!(e.stored_len(), 250);
        assert!(e.is_packed());
        e.packing = Packing::Plain;
        assert_eq!(e.stored_share(10), 10);
        assert_eq!(e.stored_len(), 1000);
    }
}
