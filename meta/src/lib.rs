//! The metadata service, a role like the segment server: FUSE clients'
//! sessions (`service`), and the cross-shard transaction coordinator
//! (`coordinator`) it runs for operations that span shards.
//!
//! Knows the log (`cfs-log`), the namespace materializer
//! (`cfs-materializers`) and the protocol (`cfs-proto`); nothing depends
//! on it but the daemon that wires it (`cfs-node`).

pub mod coordinator;
pub mod leases;
pub mod metrics;
pub mod sequencer;
pub mod service;
pub mod tenant_keys;

pub use service::{MetaConfig, MetaService};
