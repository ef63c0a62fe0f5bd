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
    /// The key the stored bytes are sealed with, when the file's tenant
    /// has one (docs/decisions.md D51): every frame of [`FRAME_BYTES`]
    /// file bytes (compressed or not) is sealed on its own with
    /// XChaCha20-Poly1305, its 16-byte tag after it.
    pub seal: Option<Seal>,
}

/// A tenant's data key, one generation of it: numbered by the namespace
/// when the key is made (docs/decisions.md D51). Never reused.
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub struct KeyId(pub u64);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key {}", self.0)
    }
}

/// How a stripe's stored bytes are sealed: under which key, and the
/// stripe's random nonce (each frame's is derived from it and the
/// frame's index).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub key: KeyId,
    pub nonce: [u8; 24],
}

/// Bytes the seal adds to each frame (the Poly1305 tag).
pub const SEAL_TAG_BYTES: u32 = 16;

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

/// How a stripe's file bytes are stored: as they are, or compressed
/// (docs/decisions.md D49). The fragments' checksums cover the stored
/// bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Packing {
    #[default]
    Plain,
    /// One zstd frame of `stored_len` bytes that decompresses to exactly
    /// the extent's `data_len` (read whole only).
    Zstd { stored_len: u32 },
    /// Independent zstd frames of [`FRAME_BYTES`] file bytes each (the
    /// last may be shorter), stored one after another; frame `i`'s stored
    /// bytes end at `ends[i]` (the last end is the stored length). A part
    /// of the stripe is read by fetching and decompressing only the
    /// frames that cover it.
    Frames { ends: Vec<u32> },
}

/// File bytes per frame of [`Packing::Frames`].
pub const FRAME_BYTES: u32 = 64 << 10;

/// The frames of a [`Packing::Frames`] stripe covering a part of its file
/// bytes: the stored bytes to fetch, the frames they hold and the file
/// offset the first of them starts at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameSpan {
    pub stored: std::ops::Range<u32>,
    pub frames: std::ops::Range<usize>,
    pub file_start: u32,
}

impl Extent {
    /// Bytes erasure-coded into the fragments: the stored form.
    pub fn stored_len(&self) -> u32 {
        match &self.packing {
            Packing::Plain if self.seal.is_some() => self
                .data_len
                .saturating_add(self.data_len.div_ceil(FRAME_BYTES) * SEAL_TAG_BYTES),
            Packing::Plain => self.data_len,
            Packing::Zstd { stored_len } => *stored_len,
            Packing::Frames { ends } => ends.last().copied().unwrap_or(0),
        }
    }

    /// Whether the stored bytes are compressed (sealed or not).
    pub fn is_packed(&self) -> bool {
        self.packing != Packing::Plain
    }

    /// Where each frame's stored bytes end, when the stripe is stored as
    /// frames: compressed ones, or sealed plain ones (each frame's file
    /// bytes and its tag). `None` for unsealed plain bytes and a single
    /// zstd frame.
    pub fn frame_ends(&self) -> Option<std::borrow::Cow<'_, [u32]>> {
        match &self.packing {
            Packing::Frames { ends } => Some(std::borrow::Cow::Borrowed(ends)),
            Packing::Plain if self.seal.is_some() => {
                let frames = self.data_len.div_ceil(FRAME_BYTES);
                Some(std::borrow::Cow::Owned(
                    (1..=frames)
                        .map(|i| (i * FRAME_BYTES).min(self.data_len) + i * SEAL_TAG_BYTES)
                        .collect(),
                ))
            }
            _ => None,
        }
    }

    /// Whether a part of the stripe can be read without the whole (plain
    /// bytes, or independent frames).
    pub fn reads_in_parts(&self) -> bool {
        !matches!(self.packing, Packing::Zstd { .. })
    }

    /// The frames covering file bytes `[offset, offset + len)` of a
    /// framed stripe; `None` for other packings, an empty or out-of-range
    /// part, or frame ends that do not fit the stripe.
    pub fn frame_span(&self, offset: u32, len: u32) -> Option<FrameSpan> {
        let ends = self.frame_ends()?;
        let end = offset.checked_add(len)?;
        if len == 0 || end > self.data_len {
            return None;
        }
        let first = (offset / FRAME_BYTES) as usize;
        let last = ((end - 1) / FRAME_BYTES) as usize;
        let start = if first == 0 { 0 } else { *ends.get(first - 1)? };
        let stop = *ends.get(last)?;
        (start <= stop).then_some(FrameSpan {
            stored: start..stop,
            frames: first..last + 1,
            file_start: first as u32 * FRAME_BYTES,
        })
    }

    /// The stored bytes that `len` of the stripe's file bytes account for
    /// (proportional, rounded down): what a reference to them keeps on
    /// disk, counted per segment by the garbage collector.
    pub fn stored_share(&self, len: u64) -> u64 {
        match self.packing {
            Packing::Plain if self.seal.is_none() => len,
            _ => {
                let d = u128::from(self.data_len.max(1));
                (u128::from(len) * u128::from(self.stored_len()) / d) as u64
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
    fn frame_spans_cover_the_asked_bytes() {
        let f = FRAME_BYTES;
        let e = Extent {
            segment: SegmentId(1),
            layout: Layout { k: 2, m: 1 },
            nodes: vec![1, 2, 3],
            stripe: 0,
            data_len: 3 * f + 100,
            packing: Packing::Frames {
                ends: vec![1000, 1500, 4000, 4010],
            },
            fragment_len: 4096,
            checksums: vec![],
            missing: vec![],
            chunk: None,
            seal: None,
        };
        assert_eq!(e.stored_len(), 4010);
        assert!(e.reads_in_parts());
        let span = |o, l| e.frame_span(o, l);
        assert_eq!(
            span(0, 10),
            Some(FrameSpan {
                stored: 0..1000,
                frames: 0..1,
                file_start: 0
            })
        );
        assert_eq!(
            span(f - 1, 2),
            Some(FrameSpan {
                stored: 0..1500,
                frames: 0..2,
                file_start: 0
            })
        );
        assert_eq!(
            span(3 * f, 100),
            Some(FrameSpan {
                stored: 4000..4010,
                frames: 3..4,
                file_start: 3 * f
            })
        );
        assert_eq!(span(3 * f, 101), None, "past the stripe");
        assert_eq!(span(5, 0), None);
        assert_eq!(span(u32::MAX, 2), None);
        // Ends that name fewer frames than the stripe holds.
        let short = Extent {
            packing: Packing::Frames { ends: vec![10] },
            ..e.clone()
        };
        assert_eq!(short.frame_span(2 * f, 1), None);
        let one = Extent {
            packing: Packing::Zstd { stored_len: 7 },
            ..e
        };
        assert!(!one.reads_in_parts());
        assert_eq!(one.frame_span(0, 1), None);
    }

    #[test]
    fn sealed_plain_stripes_are_frames_of_bytes_and_tags() {
        let f = FRAME_BYTES;
        let e = Extent {
            segment: SegmentId(1),
            layout: Layout { k: 2, m: 1 },
            nodes: vec![1, 2, 3],
            stripe: 0,
            data_len: 2 * f + 10,
            packing: Packing::Plain,
            fragment_len: 4096,
            checksums: vec![],
            missing: vec![],
            chunk: None,
            seal: Some(Seal {
                key: KeyId(1),
                nonce: [0; 24],
            }),
        };
        let t = SEAL_TAG_BYTES;
        assert_eq!(e.stored_len(), 2 * f + 10 + 3 * t);
        assert_eq!(
            e.frame_ends().unwrap().into_owned(),
            vec![f + t, 2 * f + 2 * t, 2 * f + 10 + 3 * t]
        );
        assert!(e.reads_in_parts() && !e.is_packed());
        assert_eq!(
            e.frame_span(f + 5, 10),
            Some(FrameSpan {
                stored: f + t..2 * f + 2 * t,
                frames: 1..2,
                file_start: f
            })
        );
        // The tags count in what a reference keeps on disk.
        assert_eq!(
            e.stored_share(u64::from(e.data_len)),
            u64::from(e.stored_len())
        );
        let unsealed = Extent { seal: None, ..e };
        assert_eq!(unsealed.frame_ends(), None);
        assert_eq!(unsealed.stored_len(), 2 * f + 10);
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
            seal: None,
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
