//! The `cfs-node` daemon and the `cfs` tool: configuration, the HTTP
//! endpoints, and the local development cluster (`cfs up` / `cfs down`).
//!
//! Invariant: nothing depends on this crate; it only wires the others.

pub mod cluster;
pub mod config;
pub mod fstest;
pub mod http;
pub mod meta;
pub mod mounts;
pub mod segtools;
