//! The `cfs-node` daemon and the `cfs` tool: configuration, the HTTP
//! endpoints, and the local development cluster (`cfs up` / `cfs down`).
//!
//! Invariant: nothing depends on this crate; it only wires the others.
//! Cluster control (configs, the local cluster, mounts) is `cfs-control`;
//! the metadata service is `cfs-meta`.

pub use cfs_control::{config, local as cluster, mounts};

pub mod admin_cli;
pub mod compact;
pub mod fstest;
pub mod gateway;
pub mod gc;
pub mod http;
pub mod keys;
pub mod lakebench;
pub mod policy;
pub mod reencrypt;
pub mod segtools;
pub mod snapshot;
pub mod status;
