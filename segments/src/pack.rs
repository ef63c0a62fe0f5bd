//! A stripe's bytes compressed before erasure coding (docs/decisions.md
//! D49): one zstd frame per stripe, kept only when it saves at least
//! [`SAVING_MIN_SHARE`]; a stripe whose first [`SAMPLE_BYTES`] do not
//! shrink is stored as it is without compressing the rest, so that
//! incompressible data (media, archives, encrypted files) costs one small
//! sample per stripe.
//!
//! Invariant: `unpack(pack(d)) == d`; a stored form that does not unpack
//! to exactly the extent's `data_len` bytes is an error, never short or
//! padded bytes.

use cfs_stripe::{Compression, Packing};

/// Bytes compressed first, at level 1, to judge a stripe.
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

/// `data` as it will be stored under `compression`, and how.
pub fn pack(data: Vec<u8>, compression: Compression) -> (Vec<u8>, Packing) {
    let Compression::Zstd { level } = compression else {
        return (data, Packing::Plain);
    };
    if data.len() < 2 * SAVING_MIN_SHARE {
        return (data, Packing::Plain);
    }
    if data.len() > SAMPLE_BYTES {
        let sample = &data[..SAMPLE_BYTES];
        match zstd::bulk::compress(sample, 1) {
            Ok(c) if saves_enough(c.len(), sample.len()) => {}
            _ => return (data, Packing::Plain),
        }
    }
    match zstd::bulk::compress(&data, level) {
        Ok(c) if saves_enough(c.len(), data.len()) => match u32::try_from(c.len()) {
            Ok(stored_len) => (c, Packing::Zstd { stored_len }),
            Err(_) => (data, Packing::Plain),
        },
        _ => (data, Packing::Plain),
    }
}

/// The file bytes of a stripe from its stored form: `data_len` of them.
pub fn unpack(stored: Vec<u8>, packing: Packing, data_len: usize) -> Result<Vec<u8>, UnpackError> {
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
        Packing::Zstd { .. } => {
            // At most `data_len` bytes are produced: a frame that claims or
            // decodes to more is refused, never allocated.
            let out = zstd::bulk::decompress(&stored, data_len)
                .map_err(|e| UnpackError::Corrupt(e.to_string()))?;
            if out.len() != data_len {
                return Err(UnpackError::WrongLength {
                    got: out.len(),
                    want: data_len,
                });
            }
            Ok(out)
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
            let Packing::Zstd { stored_len } = p else {
                panic!("{n} bytes of text stored plain");
            };
            assert_eq!(stored_len as usize, stored.len());
            assert!(stored.len() < n / 4, "{n}: {}", stored.len());
            assert_eq!(unpack(stored, p, n).unwrap(), d);
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
        assert!(unpack(bad, p, d.len()).is_err());
        // A frame that holds more than the extent says.
        assert!(unpack(stored.clone(), p, d.len() - 1).is_err());
        // Less.
        assert!(matches!(
            unpack(stored, p, d.len() + 1),
            Err(UnpackError::WrongLength { .. })
        ));
        // Not a frame at all.
        assert!(matches!(
            unpack(random(100), p, 100),
            Err(UnpackError::Corrupt(_))
        ));
        assert!(unpack(vec![1, 2], Packing::Plain, 3).is_err());
    }
}
