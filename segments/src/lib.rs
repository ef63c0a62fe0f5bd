//! The erasure-coded segment store. File data never goes through
//! consensus: clients cut it into stripes, Reed-Solomon-encode them, and
//! append each fragment to a segment file on a distinct node; the extent
//! descriptor that says where is what the file system commits to the log.
//!
//! Modules: `layout` (k+m, sizes) → `ec` (the code) → `format` (bytes on
//! disk) → `io` (io_uring + O_DIRECT or plain I/O) → `store` (a node's
//! segment files) → `proto` (messages) → `server` (TCP) / `client` (stripe
//! writer and reader) → `repair`.
//!
//! Invariant: this crate knows nothing of the log, inodes or files.

pub mod client;
pub mod ec;
pub mod format;
pub mod io;
pub mod pack;
pub mod proof;
pub use cfs_stripe::layout;
pub mod proto;
pub use serde_bytes::ByteBuf;
pub mod repair;
pub mod seal;
pub mod server;
pub mod server_metrics;
pub mod store;
