//! Verified partial reads of a fragment: blake3 is a Merkle tree over
//! 1 KiB chunks, so the fragment's checksum (kept in the extent) can be
//! recomputed from the chaining values of aligned groups of
//! [`GROUP_BYTES`]. A small read fetches only the groups it covers plus
//! the chaining values of all groups (32 bytes per 16 KiB), hashes the
//! groups it got, and checks that the whole set rebuilds the checksum: the
//! bytes are verified end to end without reading the fragment.
//!
//! Group boundaries are subtree boundaries of blake3's tree (its left
//! subtree is the largest power of two of chunks below the input length,
//! a multiple of the group's 16 chunks whenever the input exceeds one
//! group), so every group is a complete subtree.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

/// Bytes per verified group (16 blake3 chunks; a multiple of the 4 KiB
/// I/O alignment).
pub const GROUP_BYTES: usize = 16 << 10;

/// Groups of a fragment of `len` bytes.
pub fn groups(len: usize) -> usize {
    len.div_ceil(GROUP_BYTES)
}

/// Chaining value of group `index` (its bytes `data`), a non-root subtree.
/// Meaningless for a fragment of one group (its checksum is the plain
/// hash); callers use [`checksum_from_cvs`], which handles that.
pub fn group_cv(index: usize, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset((index * GROUP_BYTES) as u64);
    h.update(data);
    h.finalize_non_root()
}

/// The chaining values of every group of `data` (empty for a fragment of
/// at most one group: nothing to prove, reads take it whole).
pub fn cvs(data: &[u8]) -> Vec<ChainingValue> {
    if data.len() <= GROUP_BYTES {
        return Vec::new();
    }
    data.chunks(GROUP_BYTES)
        .enumerate()
        .map(|(i, g)| group_cv(i, g))
        .collect()
}

/// The blake3 of a fragment of `len` bytes (> one group) from its groups'
/// chaining values; `None` if the count does not fit the length.
pub fn checksum_from_cvs(cvs: &[ChainingValue], len: usize) -> Option<[u8; 32]> {
    if len <= GROUP_BYTES || cvs.len() != groups(len) {
        return None;
    }
    let (l, r) = split(cvs, len as u64);
    Some(*merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
}

/// Left and right chaining values of the subtree of `len` bytes covered
/// by `cvs` (more than one group).
fn split(cvs: &[ChainingValue], len: u64) -> (ChainingValue, ChainingValue) {
    let left_len = left_subtree_len(len);
    let left_groups = (left_len as usize) / GROUP_BYTES;
    let l = subtree(&cvs[..left_groups], left_len);
    let r = subtree(&cvs[left_groups..], len - left_len);
    (l, r)
}

fn subtree(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (l, r) = split(cvs, len);
    merge_subtrees_non_root(&l, &r, Mode::Hash)
}

/// Why a partial read did not verify.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("range {first_group}+{bytes} bytes does not fit a {len}-byte fragment")]
    Shape {
        first_group: usize,
        bytes: usize,
        len: usize,
    },
    #[error("the groups read do not hash to the chaining values sent")]
    Data,
    #[error("the chaining values do not rebuild the fragment's checksum")]
    Root,
}

/// Checks `data`, the bytes of groups `first_group..` of a fragment of
/// `len` bytes, against the fragment's `checksum`, using `cvs` (every
/// group's chaining value, as the server sent them).
pub fn verify_groups(
    checksum: &[u8; 32],
    len: usize,
    first_group: usize,
    data: &[u8],
    cvs: &[ChainingValue],
) -> Result<(), ProofError> {
    let n = groups(len);
    let shape = ProofError::Shape {
        first_group,
        bytes: data.len(),
        len,
    };
    let start = first_group * GROUP_BYTES;
    if cvs.len() != n || start >= len || start + data.len() > len || data.is_empty() {
        return Err(shape);
    }
    // Whole groups, except that the last may end with the fragment.
    if !data.len().is_multiple_of(GROUP_BYTES) && start + data.len() != len {
        return Err(shape);
    }
    for (i, g) in data.chunks(GROUP_BYTES).enumerate() {
        if group_cv(first_group + i, g) != cvs[first_group + i] {
            return Err(ProofError::Data);
        }
    }
    match checksum_from_cvs(cvs, len) {
        Some(c) if &c == checksum => Ok(()),
        _ => Err(ProofError::Root),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn groups_rebuild_blake3_for_every_fragment_size() {
        // Fragments are multiples of 4 KiB up to 256 KiB.
        for len in (4096..=256 << 10)
            .step_by(4096)
            .filter(|l| *l > GROUP_BYTES)
        {
            let d = bytes(len, len as u8);
            let c = cvs(&d);
            assert_eq!(
                checksum_from_cvs(&c, len),
                Some(*blake3::hash(&d).as_bytes()),
                "len {len}"
            );
        }
    }

    #[test]
    fn a_partial_read_verifies_and_a_changed_byte_does_not() {
        let len = 256 << 10;
        let d = bytes(len, 7);
        let sum = *blake3::hash(&d).as_bytes();
        let c = cvs(&d);
        let g = 5;
        let part = &d[g * GROUP_BYTES..(g + 2) * GROUP_BYTES];
        assert_eq!(verify_groups(&sum, len, g, part, &c), Ok(()));
        let mut bad = part.to_vec();
        bad[100] ^= 1;
        assert_eq!(verify_groups(&sum, len, g, &bad, &c), Err(ProofError::Data));
        // A server that also forges the chaining value cannot match the root.
        let mut forged = c.clone();
        forged[g] = group_cv(g, &bad[..GROUP_BYTES]);
        assert_eq!(
            verify_groups(&sum, len, g, &bad[..GROUP_BYTES], &forged),
            Err(ProofError::Root)
        );
    }

    #[test]
    fn the_short_last_group_verifies() {
        let len = 40 << 10; // 2.5 groups
        let d = bytes(len, 3);
        let sum = *blake3::hash(&d).as_bytes();
        let c = cvs(&d);
        assert_eq!(
            verify_groups(&sum, len, 2, &d[2 * GROUP_BYTES..], &c),
            Ok(())
        );
        assert!(verify_groups(&sum, len, 2, &d[2 * GROUP_BYTES..len - 4096], &c).is_err());
        assert!(verify_groups(&sum, len, 3, &d[..4096], &c).is_err());
    }
}
