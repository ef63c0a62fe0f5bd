//! Stripe layouts: how many data (`k`) and parity (`m`) fragments a stripe
//! has, and how they adapt to small clusters.

use serde::{Deserialize, Serialize};

/// Fragment and stripe sizes are multiples of this, so fragments can be
/// written with O_DIRECT.
pub const ALIGN_BYTES: usize = 4096;
/// Default bytes of data per fragment in a full stripe: a stripe holds
/// `k * FRAGMENT_BYTES_DEFAULT` bytes of file data.
pub const FRAGMENT_BYTES_DEFAULT: usize = 256 << 10;
const _: () = assert!(FRAGMENT_BYTES_DEFAULT.is_multiple_of(ALIGN_BYTES));

/// A Reed-Solomon layout: `k` data fragments plus `m` parity fragments, on
/// `k + m` distinct nodes. Any `k` fragments rebuild the stripe.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    pub k: u8,
    pub m: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid layout {k}+{m}: {reason}")]
pub struct LayoutError {
    pub k: u8,
    pub m: u8,
    pub reason: &'static str,
}

impl Layout {
    pub fn new(k: u8, m: u8) -> Result<Self, LayoutError> {
        let err = |reason| LayoutError { k, m, reason };
        if k == 0 {
            return Err(err("k must be at least 1"));
        }
        if k as usize + m as usize > 32 {
            return Err(err("at most 32 fragments per stripe"));
        }
        Ok(Layout { k, m })
    }

    /// The default for a cluster of `nodes` nodes: 4+2 from six nodes up,
    /// one parity fragment from three nodes, a mirror on two, none on one.
    pub fn for_cluster(nodes: usize) -> Layout {
        let m = match nodes {
            0 | 1 => 0,
            2..=5 => 1,
            _ => 2,
        };
        let k = nodes.saturating_sub(m).clamp(1, 4);
        Layout {
            k: k as u8,
            m: m as u8,
        }
    }

    pub fn width(&self) -> usize {
        self.k as usize + self.m as usize
    }

    /// Replication overhead `(k + m) / k`.
    pub fn overhead(&self) -> f64 {
        self.width() as f64 / self.k as f64
    }

    /// The fragment length (aligned) that carries `data_len` bytes.
    pub fn fragment_len(&self, data_len: usize) -> usize {
        let per = data_len.div_ceil(self.k as usize);
        per.div_ceil(ALIGN_BYTES).max(1) * ALIGN_BYTES
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{}", self.k, self.m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapts_to_cluster_size() {
        let l = |n| Layout::for_cluster(n).to_string();
        assert_eq!(l(1), "1+0");
        assert_eq!(l(2), "1+1");
        assert_eq!(l(3), "2+1");
        assert_eq!(l(4), "3+1");
        assert_eq!(l(5), "4+1");
        assert_eq!(l(6), "4+2");
        assert_eq!(l(20), "4+2");
    }

    #[test]
    fn fragment_len_is_aligned_and_sufficient() {
        let l = Layout::new(4, 2).unwrap();
        for len in [0usize, 1, 4095, 4096, 16384, 16385, 1 << 20] {
            let f = l.fragment_len(len);
            assert_eq!(f % ALIGN_BYTES, 0);
            assert!(f * 4 >= len);
        }
        assert!(Layout::new(0, 1).is_err());
    }
}
