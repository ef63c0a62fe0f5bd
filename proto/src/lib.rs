//! What the FUSE client and the servers share: namespace operations
//! (`ops`: the `Op` in a log entry, requests, replies, server messages),
//! inode, directory entry, extent reference and errno types (`types`), and
//! the transaction vocabulary carried in entries (`tx`).
//!
//! Invariant: depends on no storage or consensus crate (no RocksDB, no
//! OmniPaxos, no segment store): only `cfs-stripe`'s plain data. The FUSE
//! client links this, not the materializer.

pub mod hold;
pub mod lease;
pub mod ops;
pub mod rpc;
pub mod tenant;
pub mod tx;
pub mod types;

pub use rpc::RequestTag;
