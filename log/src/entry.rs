//! Log entries: the typed, versioned envelope every shard log stores.
//!
//! The log knows no inodes: an [`Entry`] is a `kind` tag, the request that
//! proposed it and an opaque payload whose meaning belongs to the layer that
//! registered the kind (materializers own kinds `>= KIND_USER_MIN`).
//!
//! Stable binary encoding, version 1 (little endian), used on disk and on the
//! wire alike:
//!
//! ```text
//! u8  version (= 1)
//! u16 kind
//! u64 request.client   (0 = system entry, no request)
//! u64 request.seq
//! u32 payload_len      (<= ENTRY_PAYLOAD_BYTES_MAX)
//! [u8; payload_len]
//! ```
//! Checksums are added by the framing layer (`frame`), not here.

use bytes::{BufMut, Bytes};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Encoding version written by this build. Readers accept every version
/// listed in `decode`.
pub const ENTRY_VERSION: u8 = 1;
/// Header bytes before the payload.
pub const ENTRY_HEADER_BYTES: usize = 1 + 2 + 8 + 8 + 4;
/// Largest payload one entry may carry. File data never goes through the
/// log (it lives in segments), so entries are metadata-sized; 4 MiB leaves
/// room for batched extent maps while keeping one entry far below a frame.
pub const ENTRY_PAYLOAD_BYTES_MAX: usize = 4 << 20;

/// What an entry means. Values below [`KIND_USER_MIN`] are reserved for the
/// log itself.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryKind(pub u16);

impl EntryKind {
    /// Written by a new leader or by a linearizable read: carries no state.
    pub const BARRIER: EntryKind = EntryKind(1);
    /// Opaque application bytes (tests, benchmarks, the key-value test API).
    pub const DATA: EntryKind = EntryKind(2);
}

/// Kinds at or above this value belong to layers above the log.
pub const KIND_USER_MIN: u16 = 0x100;

/// Who proposed an entry: a client id and that client's sequence number.
/// Used to deduplicate retried proposals (see `shard::ShardCore::propose`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RequestId {
    pub client: u64,
    pub seq: u64,
}

impl RequestId {
    /// Entries the log writes for itself carry no request.
    pub const NONE: RequestId = RequestId { client: 0, seq: 0 };

    pub fn is_none(&self) -> bool {
        self.client == 0
    }
}

/// One log entry. Cheap to clone: the payload is reference counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub request: RequestId,
    pub payload: Bytes,
}

/// Why bytes could not be decoded into an [`Entry`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryDecodeError {
    #[error("entry truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("unknown entry encoding version {0}")]
    UnknownVersion(u8),
    #[error("entry payload of {0} bytes exceeds the limit")]
    PayloadTooLarge(usize),
    #[error("{0} trailing bytes after entry")]
    Trailing(usize),
}

impl Entry {
    pub fn new(kind: EntryKind, request: RequestId, payload: impl Into<Bytes>) -> Self {
        Entry {
            kind,
            request,
            payload: payload.into(),
        }
    }

    /// A system barrier entry (no request, no payload).
    pub fn barrier() -> Self {
        Entry::new(EntryKind::BARRIER, RequestId::NONE, Bytes::new())
    }

    pub fn encoded_len(&self) -> usize {
        ENTRY_HEADER_BYTES + self.payload.len()
    }

    /// Appends the stable encoding to `out`.
    ///
    /// # Panics
    /// If the payload exceeds [`ENTRY_PAYLOAD_BYTES_MAX`]: callers validate
    /// sizes at the API edge (`propose`), so this is a programming error.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        assert!(self.payload.len() <= ENTRY_PAYLOAD_BYTES_MAX);
        out.reserve(self.encoded_len());
        out.put_u8(ENTRY_VERSION);
        out.put_u16_le(self.kind.0);
        out.put_u64_le(self.request.client);
        out.put_u64_le(self.request.seq);
        out.put_u32_le(self.payload.len() as u32);
        out.extend_from_slice(&self.payload);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut v);
        v
    }

    /// Decodes one entry from the front of `buf`; returns it and the bytes used.
    pub fn decode_prefix(buf: &[u8]) -> Result<(Entry, usize), EntryDecodeError> {
        if buf.len() < ENTRY_HEADER_BYTES {
            return Err(EntryDecodeError::Truncated {
                need: ENTRY_HEADER_BYTES,
                have: buf.len(),
            });
        }
        let version = buf[0];
        if version != 1 {
            return Err(EntryDecodeError::UnknownVersion(version));
        }
        let kind = u16::from_le_bytes([buf[1], buf[2]]);
        let client = u64::from_le_bytes(buf[3..11].try_into().expect("8 bytes"));
        let seq = u64::from_le_bytes(buf[11..19].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(buf[19..23].try_into().expect("4 bytes")) as usize;
        if len > ENTRY_PAYLOAD_BYTES_MAX {
            return Err(EntryDecodeError::PayloadTooLarge(len));
        }
        let end = ENTRY_HEADER_BYTES + len;
        if buf.len() < end {
            return Err(EntryDecodeError::Truncated {
                need: end,
                have: buf.len(),
            });
        }
        let entry = Entry {
            kind: EntryKind(kind),
            request: RequestId { client, seq },
            payload: Bytes::copy_from_slice(&buf[ENTRY_HEADER_BYTES..end]),
        };
        Ok((entry, end))
    }

    /// Decodes exactly one entry; trailing bytes are an error.
    pub fn decode(buf: &[u8]) -> Result<Entry, EntryDecodeError> {
        let (e, used) = Entry::decode_prefix(buf)?;
        if used != buf.len() {
            return Err(EntryDecodeError::Trailing(buf.len() - used));
        }
        Ok(e)
    }
}

// On the wire (inside OmniPaxos messages) an entry is its stable encoding as
// one byte string, so disk and network share one format.
impl Serialize for Entry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.encode())
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an encoded cfs log entry")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Entry, E> {
                Entry::decode(v).map_err(E::custom)
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Entry, E> {
                Entry::decode(&v).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Entry, A::Error> {
                let mut v = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    v.push(b);
                }
                Entry::decode(&v).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

impl omnipaxos::storage::Entry for Entry {
    type Snapshot = omnipaxos::storage::NoSnapshot;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden encoding: if this test changes, the on-disk format changed and
    /// ENTRY_VERSION must be bumped with a reader for the old version kept.
    #[test]
    fn golden_v1_encoding() {
        let e = Entry::new(
            EntryKind(0x0102),
            RequestId { client: 7, seq: 9 },
            &b"hi"[..],
        );
        let expect: Vec<u8> = vec![
            1, 0x02, 0x01, 7, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, b'h', b'i',
        ];
        assert_eq!(e.encode(), expect);
        assert_eq!(Entry::decode(&expect).unwrap(), e);
    }

    #[test]
    fn rejects_bad_input() {
        let e = Entry::new(EntryKind::DATA, RequestId::NONE, vec![1u8; 10]).encode();
        for cut in 0..e.len() {
            assert!(matches!(
                Entry::decode(&e[..cut]),
                Err(EntryDecodeError::Truncated { .. })
            ));
        }
        let mut bad = e.clone();
        bad[0] = 99;
        assert_eq!(
            Entry::decode(&bad),
            Err(EntryDecodeError::UnknownVersion(99))
        );
        let mut huge = e.clone();
        huge[19..23].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Entry::decode(&huge),
            Err(EntryDecodeError::PayloadTooLarge(_))
        ));
        let mut trailing = e.clone();
        trailing.push(0);
        assert_eq!(Entry::decode(&trailing), Err(EntryDecodeError::Trailing(1)));
    }

    #[test]
    fn serde_roundtrip_through_bincode() {
        let e = Entry::new(
            EntryKind::DATA,
            RequestId { client: 1, seq: 2 },
            vec![5u8; 100],
        );
        let b = bincode::serialize(&e).unwrap();
        let d: Entry = bincode::deserialize(&b).unwrap();
        assert_eq!(d, e);
    }
}
