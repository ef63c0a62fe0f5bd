//! Cluster control, as a library: node configuration (`config`), a local
//! development cluster of `cfs-node` processes (`local`: configs, start,
//! stop, health), and the FUSE mount `cfs up --mount` starts beside it
//! (`mounts`). The `cfs` tool and the Jepsen suite both drive clusters
//! through this crate; neither depends on the daemon's crate.

pub mod config;
pub mod local;
pub mod mounts;
