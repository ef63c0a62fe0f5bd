//! `index.json`, beside the Parquet files: which files make the current
//! index, when it was written, the log position of every shard it covers,
//! and the last time it was known to equal the namespace. Replaced
//! atomically (temporary file, fsync, rename) after the files it names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::LakehouseError;

/// The manifest's name in the lakehouse directory.
pub const MANIFEST: &str = "index.json";
/// The layout this build writes and reads.
pub const FORMAT: u32 = 1;
/// Manifests larger than this are refused as corrupt.
const MANIFEST_BYTES_MAX: u64 = 64 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Increases by one with every set of files written.
    pub generation: u64,
    /// When the files were written (Unix nanoseconds).
    pub written_at_ns: i64,
    /// The latest time the index was known to hold every change the
    /// namespace had published (Unix nanoseconds): the index's timestamp.
    /// Its lag is the time since.
    pub current_at_ns: i64,
    /// Shard → the applied position the index covers (entries below it).
    pub positions: BTreeMap<u32, u64>,
    /// The Parquet files, relative to the lakehouse directory.
    pub files: Vec<PathBuf>,
    pub rows: u64,
    pub bytes: u64,
    /// How long writing the files took.
    pub flush_seconds: f64,
}

impl Manifest {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST)
    }

    /// The manifest in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Manifest>, LakehouseError> {
        let p = Manifest::path(dir);
        let meta = match std::fs::metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LakehouseError::Io { path: p, source }),
        };
        if meta.len() > MANIFEST_BYTES_MAX {
            return Err(LakehouseError::Manifest(format!(
                "{} is {} bytes, more than {MANIFEST_BYTES_MAX}",
                p.display(),
                meta.len()
            )));
        }
        let text = std::fs::read(&p).map_err(|source| LakehouseError::Io {
            path: p.clone(),
            source,
        })?;
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| LakehouseError::Manifest(format!("{}: {e}", p.display())))?;
        if m.format != FORMAT {
            return Err(LakehouseError::Manifest(format!(
                "{} has format {}, this build reads {FORMAT}",
                p.display(),
                m.format
            )));
        }
        for f in &m.files {
            if f.is_absolute() || f.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(LakehouseError::Manifest(format!(
                    "{} names a file outside the index: {}",
                    p.display(),
                    f.display()
                )));
            }
        }
        Ok(Some(m))
    }

    /// Replaces the manifest in `dir`; `durable`: fsync before and after
    /// the rename (a new generation); without, only the timestamp moved.
    pub fn save(&self, dir: &Path, durable: bool) -> Result<(), LakehouseError> {
        let p = Manifest::path(dir);
        let tmp = dir.join(format!(".{MANIFEST}.tmp"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LakehouseError::Io { path, source }
        };
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| LakehouseError::Manifest(format!("encoding: {e}")))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&text).map_err(io(&tmp))?;
            if durable {
                f.sync_all().map_err(io(&tmp))?;
            }
        }
        std::fs::rename(&tmp, &p).map_err(io(&p))?;
        if durable {
            crate::parquet_out::sync_dir(dir)?;
        }
        Ok(())
    }

    /// Whether every file it names exists.
    pub fn files_present(&self, dir: &Path) -> bool {
        self.files.iter().all(|f| dir.join(f).is_file())
    }

    /// Seconds since the index was last known current, at `now_ns`.
    pub fn lag_seconds(&self, now_ns: i64) -> f64 {
        (now_ns.saturating_sub(self.current_at_ns)).max(0) as f64 / 1e9
    }
}

/// `ns` (Unix nanoseconds) as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ns: i64) -> String {
    let s = ns.div_euclid(1_000_000_000);
    let ms = ns.rem_euclid(1_000_000_000) / 1_000_000;
    let (y, mo, d) = crate::parquet_out::civil_date(s);
    let t = s.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        t / 3600,
        t % 3600 / 60,
        t % 60
    )
}

/// Now, in Unix nanoseconds.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_naming_a_file_outside_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Manifest {
            format: FORMAT,
            generation: 1,
            written_at_ns: 1,
            current_at_ns: 2,
            positions: BTreeMap::from([(0, 5)]),
            files: vec![PathBuf::from("index/a.parquet")],
            rows: 1,
            bytes: 10,
            flush_seconds: 0.1,
        };
        m.save(dir.path(), true).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), Some(m.clone()));
        m.files = vec![PathBuf::from("../../etc/passwd")];
        m.save(dir.path(), false).unwrap();
        assert!(Manifest::load(dir.path()).is_err());
        assert_eq!(m.lag_seconds(2_000_000_002), 2.0);
        assert_eq!(
            rfc3339(1_772_281_965_123_000_000),
            "2026-02-28T12:32:45.123Z"
        );
    }
}
