//! Materializers turn each shard's decided log entries into derived state.
//! This crate holds the namespace materializer: inodes, directory entries,
//! symlinks, xattrs, extent maps and locks in RocksDB.

pub mod acl;
pub mod apply;
pub mod check;
pub mod chunks;
pub mod keys;
pub mod materializer;
pub mod ops;
pub mod perm;
pub mod read;
pub mod segment_use;
pub mod store;
pub mod tenant_keys;
pub mod tx;
pub use cfs_proto::types;

pub use materializer::{Change, Waiters};
pub use ops::{Applied, LoggedOp, Op};
pub use store::NamespaceDb;
