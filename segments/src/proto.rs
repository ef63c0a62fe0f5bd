//! Messages between segment clients and segment servers: bincode bodies in
//! crc32c frames (`cfs-frame`). Every request carries an id; replies may
//! come back in any order. The first request must be `Hello`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::io::AsyncRead;

use crate::format::SegmentId;
use crate::layout::Layout;
use crate::store::{FragmentInfo, StoreError, StoreStats};

pub const PROTOCOL_VERSION: u32 = 2;
/// Largest frame before the handshake.
pub const HELLO_FRAME_BYTES_MAX: usize = 64 << 10;
/// Largest frame after it: one fragment plus headers.
pub const FRAME_BYTES_MAX: usize = crate::store::FRAGMENT_BYTES_MAX + (64 << 10);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    Hello {
        protocol: u32,
        cluster_id: String,
    },
    /// Append fragment `fragment` of `stripe` of `segment` (creating the
    /// fragment file on first use). Idempotent for identical data.
    Append {
        segment: SegmentId,
        fragment: u8,
        layout: Layout,
        nodes: Vec<u64>,
        stripe: u32,
        data: ByteBuf,
    },
    Read {
        segment: SegmentId,
        fragment: u8,
        stripe: u32,
    },
    /// Bytes `[offset, offset + len)` of a stripe's fragment, as the
    /// whole verified groups covering them (`proof`).
    ReadRange {
        segment: SegmentId,
        fragment: u8,
        stripe: u32,
        offset: u32,
        len: u32,
    },
    Seal {
        segment: SegmentId,
        fragment: u8,
    },
    Free {
        segment: SegmentId,
    },
    MarkDead {
        segment: SegmentId,
        fragment: u8,
        bytes: u64,
    },
    List,
    Stat,
}

impl Request {
    /// Calls only nodes and administrators may make.
    pub fn is_administrative(&self) -> bool {
        matches!(
            self,
            Request::Free { .. } | Request::MarkDead { .. } | Request::List
        )
    }
}

/// A node's segment store, as `/health` and `cfs` report it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatInfo {
    pub node_id: u64,
    pub io_mode: String,
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub fragments: u64,
    pub stats: StoreStats,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Welcome {
        node_id: u64,
    },
    Refused {
        reason: String,
    },
    Appended {
        checksum: [u8; 32],
    },
    Data {
        data: ByteBuf,
        checksum: [u8; 32],
    },
    /// Groups from `first_group` on, and every group's chaining value.
    Range {
        first_group: u32,
        data: ByteBuf,
        cvs: Vec<[u8; 32]>,
    },
    Done,
    Freed {
        fragments: u32,
    },
    Fragments(Vec<FragmentInfo>),
    Stat(StatInfo),
    Error(StoreError),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub id: u64,
    pub body: T,
}

pub fn encode<T: Serialize>(msg: &Envelope<T>, out: &mut Vec<u8>) {
    cfs_frame::encode_with(out, |o| bincode::serialize_into(o, msg)).expect("messages serialize");
}

pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<Envelope<T>, String> {
    cfs_frame::decode_body(body, FRAME_BYTES_MAX)
}

/// Reads envelopes from a stream with a size limit (`max`, raised after
/// the handshake).
pub struct FrameReader<R> {
    inner: cfs_frame::BodyReader<R>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] cfs_frame::FrameError),
    #[error("{0}")]
    Malformed(String),
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        FrameReader {
            inner: cfs_frame::BodyReader::new(inner, max),
        }
    }

    pub fn set_max(&mut self, max: usize) {
        self.inner.max = max;
    }

    pub async fn next<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Envelope<T>, ReadError> {
        match self.inner.next_with(|body| decode(body)).await {
            Ok(m) => m.map_err(ReadError::Malformed),
            Err(cfs_frame::ReadError::Closed) => Err(ReadError::Closed),
            Err(cfs_frame::ReadError::Io(e)) => Err(ReadError::Io(e)),
            Err(cfs_frame::ReadError::Frame(e)) => Err(ReadError::Frame(e)),
        }
    }
}

/// Which node serves segments where.
pub type ServerMap = BTreeMap<u64, std::net::SocketAddr>;
