//! Namespace operations: the shared vocabulary (`cfs_proto::ops`) and the
//! log entry kind that carries them.

pub use cfs_proto::ops::*;

/// Log entry kind of namespace operations.
pub const KIND_NAMESPACE: u16 = cfs_log::entry::KIND_USER_MIN + 1;
