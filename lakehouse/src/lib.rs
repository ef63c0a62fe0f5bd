//! The metadata lakehouse: one more view of the shard logs. It follows
//! the namespace materializer's published changes, keeps the namespace in
//! memory (`state`), and every flush interval writes it as Parquet under
//! Hive partitions with a manifest naming the files, the time and the log
//! position of every shard they cover (docs/lakehouse.md).
//!
//! | module | job |
//! |---|---|
//! | `state` | the namespace in memory: inodes, names, full paths |
//! | `source` | what changed (from published changes) and what it is now (from the namespace database); the full scan |
//! | `names` | owner and group names through NSS |
//! | `parquet_out` | rows to Parquet files, atomically |
//! | `manifest` | `index.json`: files, timestamps, positions |
//! | `run` | the flusher thread and its metrics |

pub mod manifest;
pub mod names;
pub mod parquet_out;
pub mod run;
pub mod source;
pub mod state;

pub use manifest::Manifest;
pub use run::{Lakehouse, LakehouseConfig};

#[derive(Debug, thiserror::Error)]
pub enum LakehouseError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("namespace database: {0}")]
    Db(#[from] cfs_materializers::store::DbError),
    #[error("index manifest: {0}")]
    Manifest(String),
    #[error("{0} panicked")]
    Panic(&'static str),
}
