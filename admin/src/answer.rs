//! A query's answer and its forms: JSON (rows as objects), CSV, Arrow IPC
//! (stream format) and a text table; each carries the index's timestamp
//! and lag.

use std::collections::BTreeMap;
use std::time::Duration;

use cfs_lakehouse::manifest::{rfc3339, Manifest};
use std::sync::Arc;

use duckdb::arrow::array::{ArrayRef, AsArray};
use duckdb::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType,
};
use duckdb::arrow::record_batch::RecordBatch;
use serde::Serialize;

use crate::AdminError;

/// How fresh the index an answer came from is.
#[derive(Clone, Debug, Serialize)]
pub struct IndexInfo {
    pub generation: u64,
    /// The last time the index was known to hold every change (RFC 3339).
    pub timestamp: String,
    /// When its files were written.
    pub written_at: String,
    /// Seconds since `timestamp`.
    pub lag_seconds: f64,
    pub rows: u64,
    /// Shard → the log position the index covers.
    pub positions: BTreeMap<u32, u64>,
}

impl IndexInfo {
    pub fn of(m: &Manifest, now_ns: i64) -> IndexInfo {
        IndexInfo {
            generation: m.generation,
            timestamp: rfc3339(m.current_at_ns),
            written_at: rfc3339(m.written_at_ns),
            lag_seconds: (m.lag_seconds(now_ns) * 1000.0).round() / 1000.0,
            rows: m.rows,
            positions: m.positions.clone(),
        }
    }
}

pub struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// More rows matched than the limit let through.
    pub truncated: bool,
    pub elapsed: Duration,
    pub index: IndexInfo,
    /// A word for the reader (e.g. what a report cannot tell yet).
    pub note: Option<String>,
}

/// The zone every timestamp is given in: DuckDB names its session zone
/// ("Etc/UTC"), which Arrow's writers cannot read without the whole zone
/// database; the instants are the same.
const UTC_OFFSET: &str = "+00:00";

fn utc_field(f: &Field) -> Field {
    match f.data_type() {
        DataType::Timestamp(unit, Some(_)) => f
            .clone()
            .with_data_type(DataType::Timestamp(*unit, Some(UTC_OFFSET.into()))),
        _ => f.clone(),
    }
}

/// `schema` with every zoned timestamp in [`UTC_OFFSET`].
pub fn utc_schema(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| utc_field(f))
            .collect::<Vec<_>>(),
    ))
}

/// `b` with every zoned timestamp column in [`UTC_OFFSET`] (the values,
/// instants since the epoch, do not change).
pub fn utc_batch(b: RecordBatch) -> Result<RecordBatch, AdminError> {
    if !b
        .schema()
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Timestamp(_, Some(_))))
    {
        return Ok(b);
    }
    let cols: Vec<ArrayRef> = b
        .columns()
        .iter()
        .map(|c| -> ArrayRef {
            match c.data_type() {
                DataType::Timestamp(TimeUnit::Second, Some(_)) => Arc::new(
                    c.as_primitive::<TimestampSecondType>()
                        .clone()
                        .with_timezone(UTC_OFFSET),
                ),
                DataType::Timestamp(TimeUnit::Millisecond, Some(_)) => Arc::new(
                    c.as_primitive::<TimestampMillisecondType>()
                        .clone()
                        .with_timezone(UTC_OFFSET),
                ),
                DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => Arc::new(
                    c.as_primitive::<TimestampMicrosecondType>()
                        .clone()
                        .with_timezone(UTC_OFFSET),
                ),
                DataType::Timestamp(TimeUnit::Nanosecond, Some(_)) => Arc::new(
                    c.as_primitive::<TimestampNanosecondType>()
                        .clone()
                        .with_timezone(UTC_OFFSET),
                ),
                _ => c.clone(),
            }
        })
        .collect();
    Ok(RecordBatch::try_new(utc_schema(&b.schema()), cols)?)
}

/// Keeps the first `limit` rows of `batches`; says whether any were cut.
pub fn cut(batches: Vec<RecordBatch>, limit: usize) -> (Vec<RecordBatch>, bool) {
    let mut out = Vec::new();
    let mut left = limit;
    let mut truncated = false;
    for b in batches {
        if left == 0 {
            truncated |= b.num_rows() > 0;
            continue;
        }
        if b.num_rows() > left {
            out.push(b.slice(0, left));
            truncated = true;
            left = 0;
        } else {
            left -= b.num_rows();
            out.push(b);
        }
    }
    (out, truncated)
}

/// The output forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
    Arrow,
}

impl std::str::FromStr for Format {
    type Err = AdminError;
    fn from_str(s: &str) -> Result<Format, AdminError> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            "arrow" => Ok(Format::Arrow),
            other => Err(AdminError::Refused(format!(
                "unknown format {other:?}: table, csv, json or arrow"
            ))),
        }
    }
}

impl Answer {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    pub fn columns(&self) -> Vec<String> {
        self.schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    }

    /// The rows as JSON objects.
    pub fn json_rows(&self) -> Result<serde_json::Value, AdminError> {
        let mut buf = Vec::new();
        {
            let mut w = arrow_json::ArrayWriter::new(&mut buf);
            let refs: Vec<&RecordBatch> = self.batches.iter().collect();
            w.write_batches(&refs)?;
            w.finish()?;
        }
        if buf.is_empty() {
            return Ok(serde_json::Value::Array(Vec::new()));
        }
        serde_json::from_slice(&buf).map_err(|e| AdminError::Format(e.to_string()))
    }

    /// The whole answer as JSON: columns, rows, the index's freshness.
    pub fn to_json(&self) -> Result<serde_json::Value, AdminError> {
        Ok(serde_json::json!({
            "columns": self.columns(),
            "rows": self.json_rows()?,
            "truncated": self.truncated,
            "elapsed_ms": (self.elapsed.as_secs_f64() * 1e6).round() / 1e3,
            "index": self.index,
            "note": self.note,
        }))
    }

    pub fn to_csv(&self) -> Result<Vec<u8>, AdminError> {
        let mut buf = Vec::new();
        {
            let mut w = arrow_csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut buf);
            if self.batches.is_empty() {
                w.write(&RecordBatch::new_empty(self.schema.clone()))?;
            }
            for b in &self.batches {
                w.write(b)?;
            }
        }
        Ok(buf)
    }

    /// Arrow IPC, stream format (`pyarrow.ipc.open_stream`).
    pub fn to_arrow(&self) -> Result<Vec<u8>, AdminError> {
        let mut buf = Vec::new();
        {
            let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut buf, &self.schema)?;
            for b in &self.batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        Ok(buf)
    }

    pub fn to_table(&self) -> Result<String, AdminError> {
        let t = if self.batches.is_empty() {
            duckdb::arrow::util::pretty::pretty_format_batches(&[RecordBatch::new_empty(
                self.schema.clone(),
            )])?
        } else {
            duckdb::arrow::util::pretty::pretty_format_batches(&self.batches)?
        };
        Ok(t.to_string())
    }

    /// The line every CLI answer ends with.
    pub fn freshness_line(&self) -> String {
        format!(
            "{} rows{}; index as of {} ({:.1} s behind), generation {}",
            self.rows(),
            if self.truncated {
                " (cut at the row limit)"
            } else {
                ""
            },
            self.index.timestamp,
            self.index.lag_seconds,
            self.index.generation
        )
    }
}
