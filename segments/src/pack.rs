//! A stripe's bytes compressed before erasure coding (docs/decisions.md
//! D49): independent zstd frames of 64 KiB of file bytes each (a part of
//! a stripe is read by decompressing the frames covering it; stripes
//! written before hold one frame), kept only when that saves at least
//! [`SAVING_MIN_SHARE`]; a stripe whose first [`SAMPLE_BYTES`] do not
//! shrink is stored as it is without compressing the rest, so that
//! incompressible data (media, archives, encrypted files) costs one small
//! sample per stripe.
//!
//! Invariant: `unpack(pack(d)) == d`; a stored form that does not unpack
//! to exactly the extent's `data_len` bytes is an error, never short or
//! padded bytes.

use cfs_stripe::{Compression, Packing, FRAME_BYTES};

/// Bytes compressed first (the first frame) to judge a stripe.
pub const SAMPLE_BYTES: usize = 64 << 10;
/// A stripe (or its sample) is kept compressed only when that saves at
/// least 1/16 of its bytes.
pub const SAVING_MIN_SHARE: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnpackError {
    #[error("stored bytes are not a zstd frame: {0}")]
    Corrupt(String),
    #[error("stored bytes unpack to {got} bytes, the extent says {want}")]
    WrongLength { got: usize, want: usize },
}

fn saves_enough(stored: usize, plain: usize) -> bool {
    stored <= plain - plain / SAVING_MIN_SHARE
}

/// `data` as it will be stored under `compression`, and how: independent
/// frames of [`FRAME_BYTES`] file bytes (so that a part can be read
/// alone), or as it is.
pub fn pack(data: Vec<u8>, compression: Compression) -> (Vec<u8>, Packing) {
    let Compression::Zstd { level } = compression else {
        return (data, Packing::Plain);
    };
    if data.len() < 2 * SAVING_MIN_SHARE {
        return (data, Packing::Plain);
    }
    let Ok(mut z) = zstd::bulk::Compressor::new(level) else {
        return (data, Packing::Plain);
    };
    let mut stored = Vec::with_capacity(data.len() / 2);
    let mut ends = Vec::with_capacity(data.len().div_ceil(FRAME_BYTES as usize));
    for (i, frame) in data.chunks(FRAME_BYTES as usize).enumerate() {
        let Ok(c) = z.compress(frame) else {
            return (data, Packing::Plain);
        };
        // The first frame is the sample: one that does not shrink stores
        // the stripe as it is without compressing the rest.
        if i == 0 && data.len() > SAMPLE_BYTES && !saves_enough(c.len(), frame.len()) {
            return (data, Packing::Plain);
        }
        stored.extend_from_slice(&c);
        match u32::try_from(stored.len()) {
            Ok(end) => ends.push(end),
            Err(_) => return (data, Packing::Plain),
        }
    }
    if saves_enough(stored.len(), data.len()) {
        (stored, Packing::Frames { ends })
    } else {
        (data, Packing::Plain)
    }
}

/// File bytes of frame `i` of a framed stripe of `data_len` bytes.
fn frame_len(i: usize, data_len: usize) -> usize {
    let f = FRAME_BYTES as usize;
    data_len.saturating_sub(i * f).min(f)
}

/// Decompresses one frame, which must give exactly `want` bytes.
fn one_frame(stored: &[u8], want: usize) -> Result<Vec<u8>, UnpackError> {
    // At most `want` bytes are produced: a frame that claims or decodes to
    // more is refused, never allocated.
    let out =
        zstd::bulk::decompress(stored, want).map_err(|e| UnpackError::Corrupt(e.to_string()))?;
    if out.len() != want {
        return Err(UnpackError::WrongLength {
            got: out.len(),
            want,
        });
    }
    Ok(out)
}

/// The file bytes of frames `frames` of a framed stripe of `data_len`
/// file bytes, from `stored`: the stored bytes from the end of the frame
/// before the first (or the start) to the end of the last.
pub fn unpack_frames(
    stored: &[u8],
    ends: &[u32],
    frames: std::ops::Range<usize>,
    data_len: usize,
) -> Result<Vec<u8>, UnpackError> {
    let base = match frames.start {
        0 => 0,
        i => *ends
            .get(i - 1)
            .ok_or_else(|| bad_ends("frame out of range"))? as usize,
    };
    let mut out = Vec::with_capacity(frames.len() * FRAME_BYTES as usize);
    let mut at = base;
    for i in frames {
        let end = *ends.get(i).ok_or_else(|| bad_ends("frame out of range"))? as usize;
        let want = frame_len(i, data_len);
        if end < at || want == 0 {
            return Err(bad_ends("frame ends out of order"));
        }
        let part = stored
            .get(at - base..end - base)
            .ok_or_else(|| bad_ends("frames past the stored bytes"))?;
        out.extend_from_slice(&one_frame(part, want)?);
        at = end;
    }
    Ok(out)
}

fn bad_ends(why: &str) -> UnpackError {
    UnpackError::Corrupt(why.to_string())
}

/// The file bytes of a stripe from its stored form: `data_len` of them.
pub fn unpack(stored: Vec<u8>, packing: &Packing, data_len: usize) -> Result<Vec<u8>, UnpackError> {
    match packing {
        Packing::Plain => {
            if stored.len() != data_len {
                return Err(UnpackError::WrongLength {
                    got: stored.len(),
                    want: data_len,
                });
            }
            Ok(stored)
        }
        Packing::Zstd { .. } => one_frame(&stored, data_len),
        Packing::Frames { ends } => {
            let n = data_len.div_ceil(FRAME_BYTES as usize);
            if ends.len() != n || ends.last().map(|e| *e as usize) != Some(stored.len()) {
                return Err(bad_ends("frame ends do not match the stripe"));
            }
            unpack_frames(&stored, ends, 0..n, data_len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    fn text(n: usize) -> Vec<u8> {
        let words = [
            "stripe ",
            "segment ",
            "fragment ",
            "log ",
            "shard\n",
            "extent ",
        ];
        let mut out = Vec::with_capacity(n);
        let mut i = 0usize;
        while out.len() < n {
            out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
            i += 1;
        }
        out.truncate(n);
        out
    }

    fn random(n: usize) -> Vec<u8> {
        let mut d = vec![0u8; n];
        rand::thread_rng().fill_bytes(&mut d);
        d
    }

    #[test]
    fn compressible_stripes_shrink_and_come_back() {
        for n in [4096, SAMPLE_BYTES + 1, 1 << 20] {
            let d = text(n);
            let (stored, p) = pack(d.clone(), Compression::Zstd { level: 3 });
            let Packing::Frames { ends } = &p else {
                panic!("{n} bytes of text stored plain");
            };
            assert_eq!(ends.len(), n.div_ceil(FRAME_BYTES as usize));
            assert_eq!(*ends.last().unwrap() as usize, stored.len());
            assert!(stored.len() < n / 4, "{n}: {}", stored.len());
            assert_eq!(unpack(stored.clone(), &p, n).unwrap(), d);
            // Every frame alone, and runs of them, from their stored bytes.
            for first in 0..ends.len() {
                for last in first..ends.len().min(first + 3) {
                    let from = if first == 0 {
                        0
                    } else {
                        ends[first - 1] as usize
                    };
                    let part = &stored[from..ends[last] as usize];
                    let got = unpack_frames(part, ends, first..last + 1, n).unwrap();
                    let f = FRAME_BYTES as usize;
                    assert_eq!(got, d[first * f..((last + 1) * f).min(n)]);
                }
            }
        }
    }

    #[test]
    fn incompressible_and_tiny_stripes_stay_plain() {
        for d in [random(1 << 20), random(10_000), text(20)] {
            let (stored, p) = pack(d.clone(), Compression::Zstd { level: 1 });
            assert_eq!(p, Packing::Plain);
            assert_eq!(stored, d);
        }
        let (stored, p) = pack(text(1 << 20), Compression::Off);
        assert_eq!(p, Packing::Plain);
        assert_eq!(stored.len(), 1 << 20);
    }

    #[test]
    fn a_bad_stored_form_is_an_error_not_bytes() {
        let d = text(1 << 16);
        let (stored, p) = pack(d.clone(), Compression::default());
        // Damaged frame.
        let mut bad = stored.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        bad.truncate(bad.len() - 3);
        assert!(unpack(bad, &p, d.len()).is_err());
        // Frames that hold more than the extent says.
        assert!(unpack(stored.clone(), &p, d.len() - 1).is_err());
        // Less.
        assert!(unpack(stored.clone(), &p, d.len() + 1).is_err());
        let Packing::Frames { ends } = &p else {
            panic!("text stored plain")
        };
        assert!(unpack_frames(&stored, ends, 0..1, d.len() - 1).is_err());
        // Ends that do not fit the stored bytes, or out of order.
        let mut wrong = ends.clone();
        wrong[0] += 5;
        assert!(unpack(stored.clone(), &Packing::Frames { ends: wrong }, d.len()).is_err());
        assert!(unpack_frames(&stored, &[9, 3], 0..2, 2 * FRAME_BYTES as usize).is_err());
        assert!(unpack_frames(&stored, ends, 0..5, d.len()).is_err());
        // Not a frame at all; a single frame (stripes written before
        // frames) whose length is wrong.
        assert!(matches!(
            unpack(random(100), &Packing::Zstd { stored_len: 100 }, 100),
            Err(UnpackError::Corrupt(_))
        ));
        let one = zstd::bulk::compress(&d, 1).unwrap();
        let single = Packing::Zstd {
            stored_len: one.len() as u32,
        };
        assert_eq!(unpack(one.clone(), &single, d.len()).unwrap(), d);
        assert!(matches!(
            unpack(one, &single, d.len() + 1),
            Err(UnpackError::WrongLength { .. })
        ));
        assert!(unpack(vec![1, 2], &Packing::Plain, 3).is_err());
    }
}
