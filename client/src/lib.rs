//! The ClaudeFS FUSE client (`cfs mount`): metadata through a node's
//! metadata service, file data through the segment store.

pub mod cache;
pub mod conn;
pub mod data;
pub mod dedupe;
pub mod enroll;
pub mod fs;
pub mod metrics_http;
pub mod mount;
pub mod options;
pub mod stats;
pub mod tenants;
pub mod unsettled;

pub use mount::{mount, unmount, MountError};
pub use options::{CacheMode, MountOptions};
