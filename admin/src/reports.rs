//! The shortcuts (`cfs admin top-users` …): SQL over the `files` view,
//! the same from the CLI, the HTTP API and the web UI. Sizes count each
//! inode once (a hard-linked file is one file); only regular files hold
//! data.

use crate::AdminError;

/// A shortcut and its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    TopUsers { limit: usize },
    TopDirs { depth: usize, limit: usize },
    Find { pattern: String, limit: usize },
    Stale { days: u32, limit: usize },
    Types { limit: usize },
    Reduction { limit: usize },
}

/// Deepest `top-dirs --depth`.
pub const DEPTH_MAX: usize = 64;
/// What `reduction-report` says beside its rows.
pub const REDUCTION_NOTE: &str = "mapped_bytes: file data mapped to extents; stored_bytes: what \
it takes after compression (before erasure coding); saved_bytes: the difference. Both count \
per file: a chunk shared by dedupe counts in every file naming it, so what dedupe saved is not \
in saved_bytes (the mounts count it: claudefs_fuse_dedupe_bytes_total{result=\"found\"}).";

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Regular files, one row per inode (a hard-linked file by its first
/// path in byte order). Only the few rows with links are ranked: a
/// `DISTINCT ON` over every row held 5 M whole rows in memory and ran out
/// of DuckDB's 2 GiB (`bench/lakehouse.sh`).
const FILES_ONCE: &str = "(SELECT * FROM files WHERE kind = 'file' AND nlink <= 1 \
     UNION ALL SELECT * FROM files WHERE kind = 'file' AND nlink > 1 \
     QUALIFY row_number() OVER (PARTITION BY inode ORDER BY path) = 1)";

/// The first `depth` components of `parent_path` ("/a/b/c" at depth 2:
/// "/a/b").
fn dir_at(depth: usize) -> String {
    format!(
        "array_to_string(list_slice(string_split(parent_path, '/'), 1, {}), '/')",
        depth + 1
    )
}

/// Rows whose `parent_path` is at least `depth` deep: their files lie
/// below a directory of that depth.
fn below(depth: usize) -> String {
    format!("parent_path <> '/' AND len(string_split(parent_path, '/')) > {depth}")
}

impl Report {
    /// A report by its CLI/HTTP name.
    pub fn parse(
        name: &str,
        limit: Option<usize>,
        depth: Option<usize>,
        pattern: Option<&str>,
        days: Option<u32>,
    ) -> Result<Report, AdminError> {
        Ok(match name {
            "top-users" => Report::TopUsers {
                limit: limit.unwrap_or(20),
            },
            "top-dirs" => {
                let depth = depth.unwrap_or(2);
                if !(1..=DEPTH_MAX).contains(&depth) {
                    return Err(AdminError::Refused(format!(
                        "--depth {depth}: from 1 to {DEPTH_MAX}"
                    )));
                }
                Report::TopDirs {
                    depth,
                    limit: limit.unwrap_or(20),
                }
            }
            "find" => Report::Find {
                pattern: pattern
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| {
                        AdminError::Refused("find needs a pattern (e.g. '*.h5')".into())
                    })?
                    .to_string(),
                limit: limit.unwrap_or(1000),
            },
            "stale" => Report::Stale {
                days: days.unwrap_or(180),
                limit: limit.unwrap_or(1000),
            },
            "types" => Report::Types {
                limit: limit.unwrap_or(50),
            },
            "reduction-report" => Report::Reduction {
                limit: limit.unwrap_or(20),
            },
            other => {
                return Err(AdminError::Refused(format!(
                    "no report {other:?}: top-users, top-dirs, find, stale, types, reduction-report"
                )))
            }
        })
    }

    pub fn sql(&self) -> String {
        match self {
            Report::TopUsers { limit } => format!(
                "SELECT owner_name, owner_uid, count(*) AS files, sum(size_bytes) AS bytes \
                 FROM {FILES_ONCE} GROUP BY owner_name, owner_uid \
                 ORDER BY bytes DESC, owner_name LIMIT {limit}"
            ),
            // Summed per parent directory first (a hash on one column),
            // then the far fewer directories cut to `depth`: string
            // functions on every row took 0.7 s over 5 M rows.
            Report::TopDirs { depth, limit } => format!(
                "SELECT {dir} AS dir, CAST(sum(files) AS BIGINT) AS files, sum(bytes) AS bytes FROM \
                 (SELECT parent_path, count(*) AS files, sum(size_bytes) AS bytes \
                 FROM {FILES_ONCE} GROUP BY parent_path) \
                 WHERE {under} GROUP BY dir ORDER BY bytes DESC, dir LIMIT {limit}",
                dir = dir_at(*depth),
                under = below(*depth),
            ),
            Report::Find { pattern, limit } => {
                // A pattern with a '/' matches the whole path, else the
                // name (as `find -path` and `find -name`).
                let col = if pattern.contains('/') {
                    "path"
                } else {
                    "filename"
                };
                format!(
                    "SELECT path, size_bytes, owner_name, mtime FROM files \
                     WHERE {col} GLOB {} ORDER BY path LIMIT {limit}",
                    quote(pattern)
                )
            }
            Report::Stale { days, limit } => format!(
                "SELECT path, size_bytes, owner_name, greatest(atime, mtime) AS last_access \
                 FROM files WHERE kind = 'file' \
                 AND greatest(atime, mtime) < now() - to_days(CAST({days} AS INTEGER)) \
                 ORDER BY last_access, path LIMIT {limit}"
            ),
            Report::Types { limit } => format!(
                "SELECT file_type, count(*) AS files, sum(size_bytes) AS bytes \
                 FROM {FILES_ONCE} GROUP BY file_type ORDER BY bytes DESC, file_type LIMIT {limit}"
            ),
            Report::Reduction { limit } => format!(
                "SELECT {dir} AS dir, sum(bytes) AS bytes, sum(mapped) AS mapped_bytes, \
                 sum(stored) AS stored_bytes, \
                 CAST(greatest(sum(mapped) - sum(stored), 0) AS UBIGINT) AS saved_bytes FROM \
                 (SELECT parent_path, sum(size_bytes) AS bytes, sum(bytes_mapped) AS mapped, \
                 sum(blocks_stored) AS stored \
                 FROM {FILES_ONCE} GROUP BY parent_path) \
                 WHERE {under} GROUP BY dir ORDER BY bytes DESC, dir LIMIT {limit}",
                dir = dir_at(1),
                under = below(1),
            ),
        }
    }

    pub fn note(&self) -> Option<String> {
        match self {
            Report::Reduction { .. } => Some(REDUCTION_NOTE.to_string()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_bad_parameters() {
        assert_eq!(
            Report::parse("top-dirs", None, Some(3), None, None).unwrap(),
            Report::TopDirs {
                depth: 3,
                limit: 20
            }
        );
        assert!(Report::parse("top-dirs", None, Some(0), None, None).is_err());
        assert!(Report::parse("find", None, None, None, None).is_err());
        assert!(Report::parse("drop-table", None, None, None, None).is_err());
        // A quote in a pattern stays inside the string literal.
        let sql = Report::parse("find", None, None, Some("a'; DROP TABLE files; --"), None)
            .unwrap()
            .sql();
        assert!(sql.contains("'a''; DROP TABLE files; --'"));
    }
}
