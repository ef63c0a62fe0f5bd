//! Bytes on disk: one file per (segment, fragment index) on a node.
//!
//! ```text
//! seg-<segment id, 32 hex>-f<fragment>.frag
//! block 0 (4 KiB)   FileHeader: magic "CFSSEG01", segment, fragment, k, m, nodes[k+m], crc32c
//! then records, each at a 4 KiB-aligned offset:
//!   block (4 KiB)   RecordHeader: magic "CFSREC01", kind (1 fragment, 2 seal), stripe,
//!                   data_len, blake3(data), crc32c of the header
//!   data_len bytes  the fragment (a multiple of 4 KiB)
//! ```
//! Every header carries a crc32c; every fragment its blake3, which is also
//! returned to the writer and kept in the extent descriptor, so reads are
//! verified end to end.

use crate::layout::{Layout, ALIGN_BYTES};

pub const FILE_MAGIC: &[u8; 8] = b"CFSSEG01";
pub const RECORD_MAGIC: &[u8; 8] = b"CFSREC01";
pub const HEADER_BYTES: usize = ALIGN_BYTES;

pub use cfs_stripe::SegmentId;

pub fn file_name(segment: SegmentId, fragment: u8) -> String {
    format!("seg-{segment}-f{fragment}.frag")
}

pub fn parse_file_name(name: &str) -> Option<(SegmentId, u8)> {
    let rest = name.strip_prefix("seg-")?.strip_suffix(".frag")?;
    let (id, frag) = rest.split_once("-f")?;
    if id.len() != 32 {
        return None;
    }
    Some((
        SegmentId(u128::from_str_radix(id, 16).ok()?),
        frag.parse().ok()?,
    ))
}

/// The first block of a fragment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHeader {
    pub segment: SegmentId,
    pub fragment: u8,
    pub layout: Layout,
    /// Node holding each fragment index when the segment was created.
    pub nodes: Vec<u64>,
}

fn finish_block(mut b: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b.resize(HEADER_BYTES, 0);
    b
}

/// Splits a block into its body and checks the crc that follows it.
fn check_block(block: &[u8], body_len: usize) -> Option<&[u8]> {
    if block.len() < body_len + 4 {
        return None;
    }
    let body = &block[..body_len];
    let crc = u32::from_le_bytes(block[body_len..body_len + 4].try_into().ok()?);
    (crc32c::crc32c(body) == crc).then_some(body)
}

impl FileHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_BYTES);
        b.extend_from_slice(FILE_MAGIC);
        b.extend_from_slice(&self.segment.0.to_le_bytes());
        b.push(self.fragment);
        b.push(self.layout.k);
        b.push(self.layout.m);
        b.push(self.nodes.len() as u8);
        for n in &self.nodes {
            b.extend_from_slice(&n.to_le_bytes());
        }
        finish_block(b)
    }

    pub fn decode(block: &[u8]) -> Result<Self, String> {
        if block.len() < 28 || &block[..8] != FILE_MAGIC {
            return Err("not a segment fragment file (bad magic)".into());
        }
        let n = block[27] as usize;
        let body = check_block(block, 28 + 8 * n).ok_or("file header checksum mismatch")?;
        let segment = SegmentId(u128::from_le_bytes(
            body[8..24].try_into().map_err(|_| "short")?,
        ));
        let layout = Layout::new(body[25], body[26]).map_err(|e| e.to_string())?;
        if n != layout.width() {
            return Err(format!("{n} nodes for layout {layout}"));
        }
        let nodes = (0..n)
            .map(|i| u64::from_le_bytes(body[28 + 8 * i..36 + 8 * i].try_into().expect("8 bytes")))
            .collect();
        Ok(FileHeader {
            segment,
            fragment: body[24],
            layout,
            nodes,
        })
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Fragment = 1,
    Seal = 2,
}

/// The block before each fragment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub stripe: u32,
    pub data_len: u32,
    pub checksum: [u8; 32],
}

impl RecordHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_BYTES);
        b.extend_from_slice(RECORD_MAGIC);
        b.push(self.kind as u8);
        b.extend_from_slice(&self.stripe.to_le_bytes());
        b.extend_from_slice(&self.data_len.to_le_bytes());
        b.extend_from_slice(&self.checksum);
        finish_block(b)
    }

    /// `None` for a block that is not a valid record header (zeros at the
    /// end of a file, or a torn write).
    pub fn decode(block: &[u8]) -> Option<Self> {
        if block.len() < 49 + 4 || &block[..8] != RECORD_MAGIC {
            return None;
        }
        let body = check_block(block, 49)?;
        let kind = match body[8] {
            1 => RecordKind::Fragment,
            2 => RecordKind::Seal,
            _ => return None,
        };
        let data_len = u32::from_le_bytes(body[13..17].try_into().ok()?);
        if !(data_len as usize).is_multiple_of(ALIGN_BYTES) {
            return None;
        }
        Some(RecordHeader {
            kind,
            stripe: u32::from_le_bytes(body[9..13].try_into().ok()?),
            data_len,
            checksum: body[17..49].try_into().ok()?,
        })
    }
}

pub fn checksum(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_roundtrip_and_detect_damage() {
        let h = FileHeader {
            segment: SegmentId(0xabc),
            fragment: 2,
            layout: Layout::new(2, 1).unwrap(),
            nodes: vec![1, 2, 3],
        };
        let b = h.encode();
        assert_eq!(b.len(), HEADER_BYTES);
        assert_eq!(FileHeader::decode(&b).unwrap(), h);
        let mut bad = b.clone();
        bad[30] ^= 1;
        assert!(FileHeader::decode(&bad).is_err());

        let r = RecordHeader {
            kind: RecordKind::Fragment,
            stripe: 9,
            data_len: 8192,
            checksum: checksum(b"x"),
        };
        let b = r.encode();
        assert_eq!(RecordHeader::decode(&b).unwrap(), r);
        for i in 0..53 {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(RecordHeader::decode(&bad).is_none(), "byte {i}");
        }
        assert!(RecordHeader::decode(&[0u8; HEADER_BYTES]).is_none());
    }

    #[test]
    fn names() {
        let s = SegmentId(u128::MAX - 5);
        assert_eq!(parse_file_name(&file_name(s, 3)), Some((s, 3)));
        assert_eq!(parse_file_name("seg-zz-f1.frag"), None);
        assert_eq!(parse_file_name("../../etc/passwd"), None);
    }
}
