//! The replicated log: one OmniPaxos instance per shard, durable in our own
//! segment-file WAL, with a TCP transport and an API for the rest of
//! ClaudeFS (`propose`, `subscribe`, linearizable read barriers).
//!
//! Layering, bottom up (each module knows only those above it in this list):
//! `frame` → `entry` → `disk` → `wal` → `storage` → `shard` (sans-IO core)
//! → `policy` (sans-IO rules around the core: waiters, re-proposal, trim
//! floors) → `transport`, `runtime` (threads, sockets, clocks); `sim` drives
//! `shard` and `policy` like `runtime` does.
//!
//! Invariant: the log knows no inodes, files or segments; entries are
//! opaque payloads tagged with a kind.

pub mod disk;
pub mod entry;
pub mod policy;
pub use cfs_frame as frame;
pub mod read_index;
pub mod shard;
pub mod sim;
pub mod storage;
pub mod wal;

pub use entry::{Entry, EntryKind, RequestId};
pub use shard::{Epoch, Position, ShardCore, ShardId};
pub mod client;
pub mod runtime;
pub mod transport;
pub mod wire;

pub use runtime::{Faults, LogNode, LogNodeConfig, ReadPoint, Subscription};
pub use wire::LogError;
