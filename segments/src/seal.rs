//! Sealing a stripe's stored bytes with a tenant's data key
//! (docs/decisions.md D51): after compression (`pack`), before erasure
//! coding. Each frame of [`FRAME_BYTES`] file bytes (a zstd frame, or
//! that many plain bytes) is sealed on its own with XChaCha20-Poly1305,
//! its tag after it, so that a part of a stripe is still read by fetching
//! and opening only the frames covering it. Each frame's nonce is the
//! stripe's random 24-byte nonce with the frame's index mixed in; the
//! associated data binds the key id, the stripe's file length, the frame's
//! index and the frame count, so frames cannot be reordered, dropped or
//! moved to another stripe unnoticed.
//!
//! The cipher is XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha), computed
//! as its definition reads: HChaCha20 of the key and the nonce's first 16
//! bytes gives a subkey, then ChaCha20-Poly1305 (RFC 8439, `ring`'s
//! assembly) with the nonce's last 8 bytes. Every frame of a stripe shares
//! those 16 bytes, so a stripe costs one subkey. The bytes are those of
//! the `chacha20poly1305` crate's `XChaCha20Poly1305`, which sealed the
//! first stripes (a test holds them equal); `ring` seals and opens about
//! 1.6 times as fast here (`examples/seal_speed.rs`, D51).
//!
//! Invariant: a frame that does not open (wrong key, or bytes changed) is
//! an error, never bytes.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, RwLock};

use cfs_stripe::{KeyId, Packing, Seal, FRAME_BYTES, SEAL_TAG_BYTES};
use chacha20::cipher::consts::U10;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};

/// Keys a ring holds at most (a tenant's generations, every tenant a
/// mount reads).
pub const KEY_RING_MAX: usize = 4096;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("{0} is not known here: the tenant's key was not given to this mount")]
    NoKey(KeyId),
    #[error("frame {frame} does not open with {key}: wrong key, or the stored bytes changed")]
    Open { key: KeyId, frame: usize },
    #[error("sealed frames do not fit the stripe: {0}")]
    Shape(String),
    #[error("a stripe of one zstd frame cannot be sealed")]
    Unsupported,
}

/// One generation of a tenant's data key, in the clear: only in memory,
/// never printed.
pub struct DataKey {
    id: KeyId,
    bytes: [u8; 32],
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey({})", self.id)
    }
}

impl DataKey {
    pub fn new(id: KeyId, bytes: &[u8; 32]) -> Self {
        DataKey { id, bytes: *bytes }
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The ChaCha20-Poly1305 key of the stripe sealed with `nonce`:
    /// HChaCha20 of this key and the nonce's first 16 bytes.
    fn stripe_key(&self, nonce: &[u8; 24]) -> Result<LessSafeKey, SealError> {
        let sub = chacha20::hchacha::<U10>(
            (&self.bytes).into(),
            chacha20::cipher::generic_array::GenericArray::from_slice(&nonce[..16]),
        );
        let key = UnboundKey::new(&CHACHA20_POLY1305, &sub)
            .map_err(|_| SealError::Shape("subkey of the wrong length".into()))?;
        Ok(LessSafeKey::new(key))
    }
}

/// The data keys a reader may open stripes with, by id; shared by the
/// mount (which adds the keys of the tenants it reads) and its readers.
#[derive(Default)]
pub struct KeyRing {
    keys: RwLock<HashMap<KeyId, Arc<DataKey>>>,
}

impl KeyRing {
    pub fn get(&self, id: KeyId) -> Option<Arc<DataKey>> {
        self.keys.read().ok()?.get(&id).cloned()
    }

    pub fn contains(&self, id: KeyId) -> bool {
        self.get(id).is_some()
    }

    /// Adds `key` (a ring that is full forgets every key first: they are
    /// fetched again when needed).
    pub fn insert(&self, key: Arc<DataKey>) {
        if let Ok(mut m) = self.keys.write() {
            if m.len() >= KEY_RING_MAX && !m.contains_key(&key.id) {
                m.clear();
            }
            m.insert(key.id, key);
        }
    }
}

/// Frame `i`'s nonce under its stripe's key (`DataKey::stripe_key`):
/// four zero bytes, then the last 8 bytes of the stripe's nonce `base`
/// with `i` mixed in (XChaCha20's nonce of the frame would be `base` with
/// `i` xored into bytes 16..24).
fn frame_nonce(base: &[u8; 24], i: usize) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&base[16..]);
    for (b, x) in n[4..].iter_mut().zip((i as u64).to_le_bytes()) {
        *b ^= x;
    }
    Nonce::assume_unique_for_key(n)
}

fn frame_aad(key: KeyId, data_len: u32, i: usize, frames: usize) -> [u8; 28] {
    let mut a = [0u8; 28];
    a[..8].copy_from_slice(&key.0.to_le_bytes());
    a[8..12].copy_from_slice(&data_len.to_le_bytes());
    a[12..20].copy_from_slice(&(i as u64).to_le_bytes());
    a[20..28].copy_from_slice(&(frames as u64).to_le_bytes());
    a
}

/// The stored form of a stripe sealed under `key`: each frame of `stored`
/// (as `packing` cuts it: its zstd frames, or [`FRAME_BYTES`] plain bytes
/// each) followed by its tag, the packing with the sealed frames' ends,
/// and the seal to record in the extent.
pub fn seal(
    stored: Vec<u8>,
    packing: Packing,
    data_len: u32,
    key: &DataKey,
) -> Result<(Vec<u8>, Packing, Seal), SealError> {
    let bounds: Vec<usize> = match &packing {
        Packing::Plain => (1..=data_len.div_ceil(FRAME_BYTES) as usize)
            .map(|i| (i * FRAME_BYTES as usize).min(stored.len()))
            .collect(),
        Packing::Frames { ends } => ends.iter().map(|e| *e as usize).collect(),
        Packing::Zstd { .. } => return Err(SealError::Unsupported),
    };
    if bounds.last().copied().unwrap_or(0) != stored.len() {
        return Err(SealError::Shape(
            "frames do not cover the stored bytes".into(),
        ));
    }
    let nonce: [u8; 24] = rand::random();
    let cipher = key.stripe_key(&nonce)?;
    let frames = bounds.len();
    let mut out = Vec::with_capacity(stored.len() + frames * SEAL_TAG_BYTES as usize);
    let mut ends = Vec::with_capacity(frames);
    let mut at = 0;
    for (i, end) in bounds.into_iter().enumerate() {
        let part = stored
            .get(at..end)
            .ok_or_else(|| SealError::Shape("frame ends out of order".into()))?;
        let start = out.len();
        out.extend_from_slice(part);
        let tag = cipher
            .seal_in_place_separate_tag(
                frame_nonce(&nonce, i),
                Aad::from(frame_aad(key.id, data_len, i, frames)),
                &mut out[start..],
            )
            .map_err(|_| SealError::Shape("frame too long to seal".into()))?;
        out.extend_from_slice(tag.as_ref());
        ends.push(
            u32::try_from(out.len()).map_err(|_| SealError::Shape("stripe too long".into()))?,
        );
        at = end;
    }
    let packing = match packing {
        Packing::Frames { .. } => Packing::Frames { ends },
        other => other,
    };
    Ok((out, packing, Seal { key: key.id, nonce }))
}

/// The ends frames had before they were sealed (each sealed frame is its
/// bytes and a tag).
pub fn unsealed_ends(sealed: &[u32]) -> Vec<u32> {
    sealed
        .iter()
        .enumerate()
        .map(|(i, e)| e.saturating_sub((i as u32 + 1) * SEAL_TAG_BYTES))
        .collect()
}

/// The packing of a sealed stripe once opened: what `pack::unpack` reads.
pub fn unsealed_packing(p: &Packing) -> Packing {
    match p {
        Packing::Frames { ends } => Packing::Frames {
            ends: unsealed_ends(ends),
        },
        other => other.clone(),
    }
}

/// Opens frames `frames` of a sealed stripe from `stored`, their sealed
/// bytes (from the end of the frame before the first, or the start, to
/// the end of the last; `ends` the sealed frames' ends): the frames'
/// bytes as they were before sealing, one after another.
pub fn open_frames(
    stored: &[u8],
    ends: &[u32],
    frames: Range<usize>,
    data_len: u32,
    seal: &Seal,
    key: &DataKey,
) -> Result<Vec<u8>, SealError> {
    if key.id != seal.key {
        return Err(SealError::NoKey(seal.key));
    }
    let shape = |w: &str| SealError::Shape(w.to_string());
    let base = match frames.start {
        0 => 0,
        i => *ends.get(i - 1).ok_or_else(|| shape("frame out of range"))? as usize,
    };
    let cipher = key.stripe_key(&seal.nonce)?;
    let mut out = Vec::with_capacity(stored.len());
    let mut at = base;
    for i in frames {
        let end = *ends.get(i).ok_or_else(|| shape("frame out of range"))? as usize;
        if end < at + SEAL_TAG_BYTES as usize {
            return Err(shape("sealed frame shorter than its tag"));
        }
        let part = stored
            .get(at - base..end - base)
            .ok_or_else(|| shape("frames past the stored bytes"))?;
        let (body, tag) = part.split_at(part.len() - SEAL_TAG_BYTES as usize);
        let tag: [u8; SEAL_TAG_BYTES as usize] = tag
            .try_into()
            .map_err(|_| shape("tag of the wrong length"))?;
        let start = out.len();
        out.extend_from_slice(body);
        cipher
            .open_in_place_separate_tag(
                frame_nonce(&seal.nonce, i),
                Aad::from(frame_aad(seal.key, data_len, i, ends.len())),
                Tag::from(tag),
                &mut out[start..],
                0..,
            )
            .map_err(|_| SealError::Open {
                key: seal.key,
                frame: i,
            })?;
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cfs_stripe::{Compression, Extent, Layout, SegmentId};

    fn extent(data_len: u32, packing: Packing, seal: Seal) -> Extent {
        Extent {
            segment: SegmentId(1),
            layout: Layout { k: 2, m: 1 },
            nodes: vec![1, 2, 3],
            stripe: 0,
            data_len,
            packing,
            fragment_len: 0,
            checksums: vec![],
            missing: vec![],
            chunk: None,
            seal: Some(seal),
        }
    }

    fn text(n: usize) -> Vec<u8> {
        (0..n).map(|i| b"sealed frames "[i % 14]).collect()
    }

    /// Seals, then opens every run of frames, as a reader of a part does.
    fn round_trip(data: Vec<u8>, compression: Compression) {
        let key = DataKey::new(KeyId(7), &[9; 32]);
        let n = data.len() as u32;
        let (stored, packing) = crate::pack::pack(data.clone(), compression);
        let (sealed, packing, s) = seal(stored, packing, n, &key).unwrap();
        let e = extent(n, packing.clone(), s);
        assert_eq!(e.stored_len() as usize, sealed.len());
        assert!(!sealed.windows(14).any(|w| w == b"sealed frames "));
        let ends = e.frame_ends().unwrap().into_owned();
        // Whole.
        let opened = open_frames(&sealed, &ends, 0..ends.len(), n, &s, &key).unwrap();
        let plain = crate::pack::unpack(opened, &unsealed_packing(&packing), n as usize).unwrap();
        assert_eq!(plain, data);
        // Each part, through its span.
        for (off, len) in [(0, 1), (n / 2, 100.min(n - n / 2)), (n - 1, 1)] {
            let span = e.frame_span(off, len).unwrap();
            let part = &sealed[span.stored.start as usize..span.stored.end as usize];
            let opened = open_frames(part, &ends, span.frames.clone(), n, &s, &key).unwrap();
            let file = match &packing {
                Packing::Frames { .. } => crate::pack::unpack_frames(
                    &opened,
                    &unsealed_ends(&ends),
                    span.frames,
                    n as usize,
                )
                .unwrap(),
                _ => opened,
            };
            let from = (off - span.file_start) as usize;
            assert_eq!(
                &file[from..from + len as usize],
                &data[off as usize..(off + len) as usize]
            );
        }
    }

    #[test]
    fn sealed_stripes_open_whole_and_in_parts() {
        for n in [
            1,
            4096,
            FRAME_BYTES as usize,
            FRAME_BYTES as usize + 1,
            1 << 20,
        ] {
            round_trip(text(n), Compression::Zstd { level: 1 });
            round_trip(text(n), Compression::Off);
        }
        let random: Vec<u8> = (0..300_000).map(|_| rand::random::<u8>()).collect();
        round_trip(random, Compression::Zstd { level: 1 });
    }

    /// A stripe's frames are the crate's XChaCha20-Poly1305 of the
    /// stripe's nonce with the frame's index mixed in: stripes sealed
    /// before `ring` did it open, and new ones are the same bytes.
    #[test]
    fn frames_are_the_xchacha20poly1305_of_the_chacha20poly1305_crate() {
        use chacha20poly1305::aead::{AeadInPlace, KeyInit};
        use chacha20poly1305::{XChaCha20Poly1305, XNonce};
        let bytes = [5u8; 32];
        let key = DataKey::new(KeyId(3), &bytes);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let n = data.len() as u32;
        let (sealed, packing, s) = seal(data.clone(), Packing::Plain, n, &key).unwrap();
        let reference = XChaCha20Poly1305::new((&bytes).into());
        let frames = n.div_ceil(FRAME_BYTES) as usize;
        let mut expected = Vec::new();
        for (i, part) in data.chunks(FRAME_BYTES as usize).enumerate() {
            let mut nonce = s.nonce;
            for (b, x) in nonce[16..].iter_mut().zip((i as u64).to_le_bytes()) {
                *b ^= x;
            }
            let mut frame = part.to_vec();
            let tag = reference
                .encrypt_in_place_detached(
                    XNonce::from_slice(&nonce),
                    &frame_aad(key.id, n, i, frames),
                    &mut frame,
                )
                .unwrap();
            expected.extend_from_slice(&frame);
            expected.extend_from_slice(&tag);
        }
        assert_eq!(sealed, expected);
        let ends = extent(n, packing, s).frame_ends().unwrap().into_owned();
        let opened = open_frames(&expected, &ends, 0..ends.len(), n, &s, &key).unwrap();
        assert_eq!(opened, data);
    }

    #[test]
    fn a_wrong_key_or_a_changed_byte_never_gives_bytes() {
        let key = DataKey::new(KeyId(1), &[1; 32]);
        let data = text(200_000);
        let (sealed, packing, s) = seal(data.clone(), Packing::Plain, 200_000, &key).unwrap();
        let ends = extent(200_000, packing, s)
            .frame_ends()
            .unwrap()
            .into_owned();
        let all = 0..ends.len();
        // Another key under the same id: the tag refuses it.
        let wrong = DataKey::new(KeyId(1), &[2; 32]);
        assert_eq!(
            open_frames(&sealed, &ends, all.clone(), 200_000, &s, &wrong),
            Err(SealError::Open {
                key: KeyId(1),
                frame: 0
            })
        );
        // A key of another id is not tried.
        let other = DataKey::new(KeyId(2), &[1; 32]);
        assert_eq!(
            open_frames(&sealed, &ends, all.clone(), 200_000, &s, &other),
            Err(SealError::NoKey(KeyId(1)))
        );
        // One byte changed, anywhere.
        for at in [0, 70_000, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(matches!(
                open_frames(&bad, &ends, all.clone(), 200_000, &s, &key),
                Err(SealError::Open { .. })
            ));
        }
        // Frames swapped, or a frame claimed for another stripe length.
        assert!(open_frames(&sealed, &ends, all.clone(), 199_999, &s, &key).is_err());
        let f = ends[0] as usize;
        let mut swapped = sealed[f..2 * f].to_vec();
        swapped.extend_from_slice(&sealed[..f]);
        assert!(open_frames(&swapped, &ends, 0..2, 200_000, &s, &key).is_err());
        // Ends that do not fit.
        assert!(open_frames(&sealed[..10], &ends, all, 200_000, &s, &key).is_err());
        assert_eq!(
            seal(vec![1, 2], Packing::Zstd { stored_len: 2 }, 9, &key).err(),
            Some(SealError::Unsupported)
        );
    }

    #[test]
    fn key_rings_are_bounded() {
        let ring = KeyRing::default();
        for i in 0..(KEY_RING_MAX as u64 + 5) {
            ring.insert(Arc::new(DataKey::new(KeyId(i), &[0; 32])));
        }
        assert!(ring.keys.read().unwrap().len() <= KEY_RING_MAX);
        assert!(ring.contains(KeyId(KEY_RING_MAX as u64 + 4)));
        assert!(!ring.contains(KeyId(0)));
    }
}
