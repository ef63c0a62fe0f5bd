//! The erasure code: Reed-Solomon over GF(2^8) (`reed-solomon-erasure`,
//! SIMD-accelerated), or plain copies when `m = 0`.
//!
//! A stripe's data is cut into `k` equal, aligned fragments (the last padded
//! with zeros); `m` parity fragments of the same length are added. Any `k`
//! of the `k + m` rebuild the data.

use reed_solomon_erasure::galois_8::ReedSolomon;

use crate::layout::Layout;

#[derive(Debug, thiserror::Error)]
pub enum EcError {
    #[error("need {need} fragments to rebuild, have {have}")]
    TooFewFragments { need: usize, have: usize },
    #[error("fragments of unequal length")]
    Unequal,
    #[error("erasure code: {0:?}")]
    Codec(reed_solomon_erasure::Error),
}

/// Encoder/decoder for one layout. Cheap to share.
pub struct Codec {
    layout: Layout,
    rs: Option<ReedSolomon>,
}

impl Codec {
    pub fn new(layout: Layout) -> Result<Self, EcError> {
        let rs = if layout.m == 0 {
            None
        } else {
            Some(ReedSolomon::new(layout.k as usize, layout.m as usize).map_err(EcError::Codec)?)
        };
        Ok(Codec { layout, rs })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Cuts `data` into `k` data fragments and computes `m` parity ones.
    pub fn encode(&self, data: &[u8]) -> Result<Vec<Vec<u8>>, EcError> {
        let k = self.layout.k as usize;
        let flen = self.layout.fragment_len(data.len());
        let mut frags: Vec<Vec<u8>> = Vec::with_capacity(self.layout.width());
        for i in 0..k {
            let start = (i * flen).min(data.len());
            let end = ((i + 1) * flen).min(data.len());
            let mut f = Vec::with_capacity(flen);
            f.extend_from_slice(&data[start..end]);
            f.resize(flen, 0);
            frags.push(f);
        }
        for _ in 0..self.layout.m {
            frags.push(vec![0u8; flen]);
        }
        if let Some(rs) = &self.rs {
            rs.encode(&mut frags).map_err(EcError::Codec)?;
        }
        Ok(frags)
    }

    /// Rebuilds the stripe's `data_len` bytes from any `k` fragments
    /// (`None` = missing). Only missing *data* fragments are computed.
    pub fn decode(
        &self,
        mut frags: Vec<Option<Vec<u8>>>,
        data_len: usize,
    ) -> Result<Vec<u8>, EcError> {
        let k = self.layout.k as usize;
        let have = frags.iter().filter(|f| f.is_some()).count();
        if have < k {
            return Err(EcError::TooFewFragments { need: k, have });
        }
        let lens: Vec<usize> = frags.iter().flatten().map(|f| f.len()).collect();
        if lens.windows(2).any(|w| w[0] != w[1]) {
            return Err(EcError::Unequal);
        }
        if frags[..k].iter().any(|f| f.is_none()) {
            match &self.rs {
                Some(rs) => rs.reconstruct_data(&mut frags).map_err(EcError::Codec)?,
                None => return Err(EcError::TooFewFragments { need: k, have }),
            }
        }
        let mut out = Vec::with_capacity(data_len);
        for f in frags.into_iter().take(k) {
            let f = f.ok_or(EcError::TooFewFragments { need: k, have })?;
            let take = (data_len - out.len()).min(f.len());
            out.extend_from_slice(&f[..take]);
            if out.len() == data_len {
                break;
            }
        }
        Ok(out)
    }

    /// Recomputes every fragment (data and parity) from any `k`: used by
    /// repair to recreate a lost parity fragment.
    pub fn reconstruct_all(&self, frags: &mut [Option<Vec<u8>>]) -> Result<(), EcError> {
        match &self.rs {
            Some(rs) => rs.reconstruct(frags).map_err(EcError::Codec),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 253) as u8).collect()
    }

    #[test]
    fn any_k_fragments_rebuild() {
        for (k, m) in [(1, 0), (1, 1), (2, 1), (3, 1), (4, 1), (4, 2)] {
            let c = Codec::new(Layout::new(k, m).unwrap()).unwrap();
            for len in [1usize, 4096, 100_000, 1 << 20] {
                let d = data(len);
                let frags = c.encode(&d).unwrap();
                let w = (k + m) as usize;
                // Every subset of k fragments.
                for mask in 0u32..(1 << w) {
                    if mask.count_ones() != k as u32 {
                        continue;
                    }
                    let sel = frags
                        .iter()
                        .enumerate()
                        .map(|(i, f)| (mask & (1 << i) != 0).then(|| f.clone()))
                        .collect();
                    assert_eq!(
                        c.decode(sel, len).unwrap(),
                        d,
                        "{k}+{m} len {len} mask {mask:b}"
                    );
                }
            }
        }
    }

    #[test]
    fn too_few_is_an_error() {
        let c = Codec::new(Layout::new(2, 1).unwrap()).unwrap();
        let f = c.encode(&data(10_000)).unwrap();
        let sel = vec![Some(f[0].clone()), None, None];
        assert!(matches!(
            c.decode(sel, 10_000),
            Err(EcError::TooFewFragments { need: 2, have: 1 })
        ));
    }

    #[test]
    fn parity_is_recreated() {
        let c = Codec::new(Layout::new(4, 2).unwrap()).unwrap();
        let f = c.encode(&data(50_000)).unwrap();
        let mut sel: Vec<Option<Vec<u8>>> = f.iter().cloned().map(Some).collect();
        sel[5] = None;
        sel[1] = None;
        c.reconstruct_all(&mut sel).unwrap();
        assert_eq!(sel[5].as_ref().unwrap(), &f[5]);
        assert_eq!(sel[1].as_ref().unwrap(), &f[1]);
    }
}
