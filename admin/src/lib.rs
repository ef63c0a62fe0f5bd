//! The admin gateway: one DuckDB engine over the metadata lakehouse behind
//! three faces, the `cfs admin` CLI, an HTTP API and a web UI
//! (docs/lakehouse.md).
//!
//! | module | job |
//! |---|---|
//! | `engine` | the locked-down DuckDB: SELECT only, reads only the index and allowed files, time and row limits |
//! | `answer` | an answer and its forms (JSON, CSV, Arrow IPC, table) with the index's freshness |
//! | `reports` | the shortcuts: top-users, top-dirs, find, stale, types, reduction-report |
//! | `http` | the gateway (axum): token or cookie authentication, the API, the UI's files |
//! | `ui` | the web UI's files, embedded |

pub mod answer;
pub mod engine;
pub mod http;
pub mod reports;
pub mod ui;

pub use answer::{Answer, Format, IndexInfo};
pub use engine::{Engine, Limits};
pub use reports::Report;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The index is not there (yet) or unreadable.
    #[error("no index: {0}")]
    NoIndex(String),
    /// The request is not allowed (not a SELECT, a bad parameter).
    #[error("refused: {0}")]
    Refused(String),
    /// DuckDB could not parse the query.
    #[error("{0}")]
    Sql(String),
    #[error("cancelled: the query ran longer than {0:?}")]
    Cancelled(std::time::Duration),
    #[error("{0}")]
    DuckDb(#[from] duckdb::Error),
    #[error("arrow: {0}")]
    Arrow(#[from] duckdb::arrow::error::ArrowError),
    #[error("encoding the answer: {0}")]
    Format(String),
}

impl AdminError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            AdminError::NoIndex(_) => 503,
            AdminError::Refused(_) | AdminError::Sql(_) | AdminError::DuckDb(_) => 400,
            AdminError::Cancelled(_) => 408,
            AdminError::Arrow(_) | AdminError::Format(_) => 500,
        }
    }
}
