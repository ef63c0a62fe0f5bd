//! Inline dedupe on the write path (docs/decisions.md D50): a flush's
//! bytes are cut into content-defined chunks (FastCDC), each named by a
//! keyed blake3 of its bytes; chunks the cluster already stores are
//! referenced, not written again.

use std::ops::Range;

use cfs_proto::types::ChunkId;

/// Smallest chunk cut (a range shorter than this is one chunk).
pub const CHUNK_MIN: u32 = 64 << 10;
/// The chunk size FastCDC aims for.
pub const CHUNK_AVG: u32 = 256 << 10;
/// Largest chunk: a chunk is one stripe, so at most a stripe's data.
pub const CHUNK_MAX: u32 = 512 << 10;

/// The key chunk ids are made with: one per dedupe domain (today the
/// cluster), so the same bytes get unrelated ids in two domains and one
/// domain's index can never answer another's (D50).
#[derive(Clone)]
pub struct ChunkKey([u8; 32]);

impl ChunkKey {
    /// The key of the cluster's one dedupe domain.
    pub fn for_cluster(cluster_id: &str) -> Self {
        ChunkKey(blake3::derive_key(
            "ClaudeFS 2026-12-04 chunk content address",
            cluster_id.as_bytes(),
        ))
    }

    /// A tenant's dedupe domain key (D51), as its metadata service
    /// derived it.
    pub fn from_bytes(key: [u8; 32]) -> Self {
        ChunkKey(key)
    }

    /// The content address of `data`.
    pub fn id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.0, data).as_bytes())
    }
}

/// The chunks of `data`, content-defined: the same bytes cut the same way
/// wherever they start, up to `max` bytes each (at most [`CHUNK_MAX`]).
pub fn cut(data: &[u8], max: usize) -> Vec<Range<usize>> {
    let max = (max.min(CHUNK_MAX as usize) as u32).max(CHUNK_MIN);
    if data.len() <= CHUNK_MIN as usize {
        return std::iter::once(0..data.len()).collect();
    }
    let avg = CHUNK_AVG.min(max / 2).max(CHUNK_MIN);
    fastcdc::v2020::FastCDC::new(data, CHUNK_MIN, avg, max)
        .map(|c| c.offset..c.offset + c.length)
        .collect()
}

/// The chunks one range of a flush was already cut into, so that the
/// flush does not cut its bytes twice (`DataPath::plan_chunks`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownCuts {
    /// The range's file offset.
    pub offset: u64,
    /// Its chunks, as [`cut`] gives them.
    pub chunks: Vec<Range<usize>>,
}

impl KnownCuts {
    /// The chunks of `data`, the range at `offset`, if these are its cuts.
    pub fn of(&self, offset: u64, data: &[u8]) -> Option<&[Range<usize>]> {
        let ends = self.chunks.last().map(|r| r.end) == Some(data.len());
        (self.offset == offset && ends).then_some(self.chunks.as_slice())
    }
}

/// What a background flush writes now of each of its ranges (`hold_back`):
/// per range, where the bytes it keeps buffered start (the range's length:
/// none), and the cuts of what it writes.
pub type Held = (Vec<usize>, Vec<KnownCuts>);

/// Decides what a background flush of `ranges` (file offset → bytes, in
/// order) writes now and what it keeps buffered, chunks cut as [`cut`]
/// with `max` cuts. It keeps:
/// - the last chunk of each range of several chunks: its bytes end where
///   the buffer filled, not where the content cuts, so the next flush
///   starts at a content-defined cut instead;
/// - every range after the first shorter than [`CHUNK_MAX`]: a write that
///   reached the mount before the one in front of it (requests are
///   served concurrently), whose start is no cut either.
///
/// So the same bytes are chunked the same way however the kernel batched
/// and ordered their writes. If that would keep more than `hold_max`
/// bytes (scattered writes, not a stream), nothing is kept.
pub fn hold_back(ranges: &[(u64, &[u8])], max: usize, hold_max: usize) -> Held {
    // Per range: its cuts (none for an island kept whole).
    let plan: Vec<Option<Vec<Range<usize>>>> = ranges
        .iter()
        .enumerate()
        .map(|(i, (_, b))| (i == 0 || b.len() >= CHUNK_MAX as usize).then(|| cut(b, max)))
        .collect();
    let held_from = |i: usize, cuts: &Option<Vec<Range<usize>>>| -> usize {
        match cuts {
            None => 0,
            Some(c) if c.len() >= 2 => c.last().map_or(0, |r| r.start),
            Some(_) => ranges[i].1.len(),
        }
    };
    let kept: usize = plan
        .iter()
        .enumerate()
        .map(|(i, c)| ranges[i].1.len() - held_from(i, c))
        .sum();
    let hold = kept <= hold_max;
    let mut from = Vec::with_capacity(ranges.len());
    let mut known = Vec::new();
    for (i, cuts) in plan.into_iter().enumerate() {
        let at = if hold {
            held_from(i, &cuts)
        } else {
            ranges[i].1.len()
        };
        from.push(at);
        if let Some(mut chunks) = cuts {
            if at < ranges[i].1.len() {
                chunks.pop();
            }
            known.push(KnownCuts {
                offset: ranges[i].0,
                chunks,
            });
        }
    }
    (from, known)
}

/// Chunks this mount wrote or referenced lately, at most.
pub const RECENT_CHUNKS_MAX: usize = 8192;

/// The stripes of the chunks this mount wrote or referenced lately, so
/// that writing them again does not depend on the cluster's index having
/// applied them yet (a change may be answered before it is decided, D30,
/// and the index is read from decided entries). Oldest out first. A
/// stripe remembered here may have been freed since: the commit then
/// fails with `FREED_DATA` and the bytes are written again, as for any
/// chunk found.
#[derive(Default)]
pub struct RecentChunks {
    map: std::collections::HashMap<ChunkId, cfs_proto::types::Extent>,
    order: std::collections::VecDeque<ChunkId>,
}

impl RecentChunks {
    pub fn get(&self, id: &ChunkId) -> Option<&cfs_proto::types::Extent> {
        self.map.get(id)
    }

    /// Remembers `e` as the stripe of its chunk (stripes without one are
    /// ignored).
    pub fn remember(&mut self, e: &cfs_proto::types::Extent) {
        let Some(id) = e.chunk else { return };
        if self.map.insert(id, e.clone()).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > RECENT_CHUNKS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, mut seed: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn recent_chunks_keep_the_newest_and_only_named_stripes() {
        let stripe = |n: u64, chunk: Option<ChunkId>| cfs_proto::types::Extent {
            segment: cfs_proto::types::SegmentId(u128::from(n)),
            layout: cfs_segments::layout::Layout { k: 2, m: 1 },
            nodes: vec![1, 2, 3],
            stripe: 0,
            data_len: 100,
            packing: cfs_proto::types::Packing::Plain,
            fragment_len: 50,
            checksums: vec![],
            missing: vec![],
            chunk,
            seal: None,
        };
        let id = |n: u64| ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes());
        let mut r = RecentChunks::default();
        r.remember(&stripe(0, None));
        assert!(r.is_empty(), "a stripe without a chunk remembered");
        for n in 0..(RECENT_CHUNKS_MAX as u64 + 10) {
            r.remember(&stripe(n, Some(id(n))));
        }
        // Remembered again: not counted twice, the newer stripe kept.
        r.remember(&stripe(999_999, Some(id(RECENT_CHUNKS_MAX as u64 + 9))));
        assert_eq!(r.len(), RECENT_CHUNKS_MAX);
        assert!(r.get(&id(9)).is_none(), "the oldest outlived the bound");
        assert_eq!(r.get(&id(10)).unwrap().segment.0, 10);
        let last = r.get(&id(RECENT_CHUNKS_MAX as u64 + 9)).unwrap();
        assert_eq!(last.segment.0, 999_999);
    }

    #[test]
    fn chunks_cover_the_bytes_within_bounds() {
        for n in [0, 1, 65_535, 65_536, 65_537, 1 << 20, (4 << 20) + 17] {
            let d = noise(n, 7);
            let c = cut(&d, 512 << 10);
            assert_eq!(c.first().map(|r| r.start), Some(0));
            assert_eq!(c.last().map(|r| r.end), Some(n));
            for w in c.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for (i, r) in c.iter().enumerate() {
                assert!(r.len() <= 512 << 10);
                assert!(i + 1 == c.len() || r.len() >= CHUNK_MIN as usize, "{r:?}");
            }
        }
    }

    #[test]
    fn shifted_bytes_cut_the_same_chunks_after_the_shift() {
        let d = noise(4 << 20, 11);
        let mut shifted = b"a few inserted bytes".to_vec();
        shifted.extend_from_slice(&d);
        let key = ChunkKey::for_cluster("c");
        let ids = |b: &[u8]| -> Vec<ChunkId> {
            cut(b, 512 << 10)
                .into_iter()
                .map(|r| key.id(&b[r]))
                .collect()
        };
        let (a, b) = (ids(&d), ids(&shifted));
        let shared = a.iter().filter(|x| b.contains(x)).count();
        assert!(
            shared + 2 >= a.len(),
            "{shared} of {} chunks found again",
            a.len()
        );
    }

    #[test]
    fn flushes_that_hold_back_cut_as_the_whole_file() {
        use std::collections::BTreeMap;
        let d = noise(12 << 20, 3);
        let whole = cut(&d, CHUNK_MAX as usize);
        let cut_all = |dirty: &[(u64, &[u8])], known: &[KnownCuts], out: &mut Vec<Range<usize>>| {
            for (o, b) in dirty {
                let cuts = match known.iter().find_map(|k| k.of(*o, b)) {
                    Some(c) => c.to_vec(),
                    None => cut(b, CHUNK_MAX as usize),
                };
                assert_eq!(cuts, cut(b, CHUNK_MAX as usize), "known cuts are the cuts");
                let o = *o as usize;
                out.extend(cuts.into_iter().map(|r| r.start + o..r.end + o));
            }
        };
        // Writes of varying sizes, every other pair of them (every pair in
        // the last round) served in reverse order, flushed whenever
        // `buffer` bytes are buffered, as the kernel's batching and the
        // mount's concurrency would make them.
        for (seed, buffer) in [(1u64, 2usize << 20), (2, 3 << 20), (3, 1 << 20)] {
            let mut sizes = noise(1 << 16, seed)
                .into_iter()
                .map(|b| (b as usize + 1) << 10);
            let mut writes = Vec::new();
            let mut at = 0;
            while at < d.len() {
                let n = sizes.next().unwrap().min(d.len() - at);
                writes.push(at..at + n);
                at += n;
            }
            for (i, pair) in writes.chunks_mut(2).enumerate() {
                if i % 2 == 0 || seed == 3 {
                    pair.reverse();
                }
            }
            let (mut dirty, mut flushed) = (BTreeMap::<u64, Vec<u8>>::new(), Vec::new());
            for w in writes {
                // Appended to the range it continues, or a range of its own.
                let joined = dirty
                    .iter_mut()
                    .find(|(o, b)| **o as usize + b.len() == w.start);
                match joined {
                    Some((_, b)) => b.extend_from_slice(&d[w.clone()]),
                    None => {
                        dirty.insert(w.start as u64, d[w.clone()].to_vec());
                    }
                }
                // And the range after it joined on.
                let end = dirty
                    .iter()
                    .find(|(o, b)| **o as usize + b.len() == w.end)
                    .map(|(o, _)| *o);
                if let (Some(o), Some(next)) = (end, dirty.remove(&(w.end as u64))) {
                    dirty.get_mut(&o).unwrap().extend_from_slice(&next);
                }
                if dirty.values().map(Vec::len).sum::<usize>() >= buffer {
                    let ranges: Vec<(u64, &[u8])> =
                        dirty.iter().map(|(o, b)| (*o, b.as_slice())).collect();
                    let (from, known) = hold_back(&ranges, CHUNK_MAX as usize, buffer / 2);
                    let now: Vec<(u64, &[u8])> = ranges
                        .iter()
                        .zip(&from)
                        .filter(|(_, at)| **at > 0)
                        .map(|((o, b), at)| (*o, &b[..*at]))
                        .collect();
                    cut_all(&now, &known, &mut flushed);
                    let held: BTreeMap<u64, Vec<u8>> = ranges
                        .iter()
                        .zip(&from)
                        .filter(|((_, b), at)| **at < b.len())
                        .map(|((o, b), at)| (o + *at as u64, b[*at..].to_vec()))
                        .collect();
                    dirty = held;
                }
            }
            let rest: Vec<(u64, &[u8])> = dirty.iter().map(|(o, b)| (*o, b.as_slice())).collect();
            cut_all(&rest, &[], &mut flushed);
            flushed.sort_by_key(|r| r.start);
            assert_eq!(flushed, whole, "buffer {buffer}");
        }
    }

    #[test]
    fn scattered_writes_are_not_held_back() {
        let bytes: Vec<Vec<u8>> = (0..64u64).map(|i| noise(100 << 10, i)).collect();
        let ranges: Vec<(u64, &[u8])> = bytes
            .iter()
            .enumerate()
            .map(|(i, b)| ((i as u64) << 20, b.as_slice()))
            .collect();
        let (from, known) = hold_back(&ranges, CHUNK_MAX as usize, 4 << 20);
        assert!(from.iter().all(|at| *at == 100 << 10), "{from:?}");
        assert_eq!(known.len(), 1, "islands are not cut here");
    }

    #[test]
    fn ids_depend_on_the_domain_key() {
        let (a, b) = (ChunkKey::for_cluster("one"), ChunkKey::for_cluster("two"));
        assert_eq!(a.id(b"x"), a.id(b"x"));
        assert_ne!(a.id(b"x"), b.id(b"x"));
        assert_ne!(a.id(b"x"), a.id(b"y"));
    }
}
