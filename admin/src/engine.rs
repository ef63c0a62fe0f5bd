//! One DuckDB engine over the lakehouse, locked down: no extension is
//! installed or loaded, nothing outside the lakehouse directory and the
//! explicitly allowed extra files is readable, the configuration cannot be
//! changed by a query, and only single `SELECT` statements run (checked
//! by DuckDB's own parser), each under a time and a row limit.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cfs_lakehouse::manifest::{now_ns, Manifest};
use duckdb::arrow::datatypes::SchemaRef;
use duckdb::arrow::record_batch::RecordBatch;
use duckdb::{Config, Connection};

use crate::answer::{Answer, IndexInfo};
use crate::AdminError;

/// Limits of one query.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Cancelled past this.
    pub time: Duration,
    /// Rows returned at most (the answer says it was cut).
    pub rows: usize,
    /// DuckDB's memory limit for the engine, in MiB.
    pub memory_mib: u64,
    pub threads: i64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            time: Duration::from_secs(30),
            rows: 100_000,
            memory_mib: 2048,
            threads: 2,
        }
    }
}

/// SQL text longer than this is refused.
pub const SQL_BYTES_MAX: usize = 64 << 10;

pub struct Engine {
    conn: Mutex<Connection>,
    dir: PathBuf,
    limits: Limits,
    /// The generation the `files` view reads.
    generation: Mutex<Option<u64>>,
}

fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Engine {
    /// An engine over the lakehouse in `dir`; `allow` names extra files a
    /// query may read (e.g. a CSV to join with).
    pub fn open(dir: &Path, allow: &[PathBuf], limits: Limits) -> Result<Engine, AdminError> {
        let dir = dir
            .canonicalize()
            .map_err(|e| AdminError::NoIndex(format!("{}: {e}", dir.display())))?;
        let config = Config::default()
            .enable_autoload_extension(false)?
            .max_memory(&format!("{}MiB", limits.memory_mib))?
            .threads(limits.threads)?
            .with("autoinstall_known_extensions", "false")?;
        let conn = Connection::open_in_memory_with_flags(config)?;
        let mut allowed_files = Vec::new();
        for a in allow {
            let p = a
                .canonicalize()
                .map_err(|e| AdminError::Refused(format!("--allow {}: {e}", a.display())))?;
            allowed_files.push(sql_str(&p.to_string_lossy()));
        }
        let dir_s = dir.to_string_lossy().into_owned();
        let setup = format!(
            "SET allowed_directories = [{dirs}];
             SET allowed_paths = [{files}];
             SET file_search_path = {search};
             SET enable_external_access = false;
             SET lock_configuration = true;",
            dirs = sql_str(&format!("{dir_s}/")),
            files = allowed_files.join(", "),
            search = sql_str(&dir_s),
        );
        conn.execute_batch(&setup)?;
        Ok(Engine {
            conn: Mutex::new(conn),
            dir,
            limits,
            generation: Mutex::new(None),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The current manifest, and the `files` view pointed at its files.
    fn refresh_view(&self, conn: &Connection) -> Result<Manifest, AdminError> {
        let m = Manifest::load(&self.dir)
            .map_err(|e| AdminError::NoIndex(e.to_string()))?
            .ok_or_else(|| {
                AdminError::NoIndex(format!(
                    "{} has no index yet: the lakehouse writes one within a flush interval",
                    self.dir.display()
                ))
            })?;
        let mut g = self.generation.lock().expect("generation lock");
        if *g != Some(m.generation) {
            let files: Vec<String> = m
                .files
                .iter()
                .map(|f| sql_str(&self.dir.join(f).to_string_lossy()))
                .collect();
            conn.execute_batch(&format!(
                "CREATE OR REPLACE VIEW files AS SELECT * FROM read_parquet([{}]);",
                files.join(", ")
            ))?;
            *g = Some(m.generation);
        }
        Ok(m)
    }

    /// The seed's relative `'index/**/*.parquet'`: a string literal that
    /// starts with `index/` names the lakehouse's index, wherever the
    /// process runs (DuckDB 1.5 resolves relative globs against the
    /// working directory only). The path stays inside the allowed
    /// directory, so this widens nothing.
    fn resolve_index_paths(&self, sql: &str) -> String {
        let abs = format!("'{}/index/", self.dir.to_string_lossy().replace('\'', "''"));
        sql.replace("'index/", &abs)
    }

    /// Refuses anything but one `SELECT` (DuckDB's parser decides).
    fn check(conn: &Connection, sql: &str) -> Result<(), AdminError> {
        if sql.len() > SQL_BYTES_MAX {
            return Err(AdminError::Refused(format!(
                "the query is {} bytes, more than {SQL_BYTES_MAX}",
                sql.len()
            )));
        }
        let json: String =
            conn.query_row("SELECT json_serialize_sql(?::VARCHAR)", [sql], |r| r.get(0))?;
        let v: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| AdminError::Refused(format!("parsing the query: {e}")))?;
        if v["error"].as_bool() == Some(true) {
            let msg = v["error_message"].as_str().unwrap_or("not a query");
            return Err(
                if v["error_type"].as_str() == Some("parser") || msg.contains("Parser Error") {
                    AdminError::Sql(msg.to_string())
                } else {
                    AdminError::Refused(format!("only SELECT queries run here (read-only): {msg}"))
                },
            );
        }
        let n = v["statements"].as_array().map(|a| a.len()).unwrap_or(0);
        if n != 1 {
            return Err(AdminError::Refused(format!(
                "one SELECT statement per query, not {n}"
            )));
        }
        Ok(())
    }

    /// Runs `sql` (one SELECT) under the limits; `rows` lowers the row
    /// limit for this query.
    pub fn query(&self, sql: &str, rows: Option<usize>) -> Result<Answer, AdminError> {
        let started = Instant::now();
        let conn = self.conn.lock().expect("engine lock").try_clone()?;
        let manifest = self.refresh_view(&conn)?;
        Engine::check(&conn, sql)?;
        let limit = rows.unwrap_or(self.limits.rows).min(self.limits.rows);
        // The statement's own trailing semicolon and comments end inside.
        let body = self.resolve_index_paths(sql.trim().trim_end_matches(';'));
        let wrapped = format!("SELECT * FROM (\n{body}\n) LIMIT {}", limit + 1);
        let interrupt = conn.interrupt_handle();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let time = self.limits.time;
        let watchdog = std::thread::spawn(move || {
            if done_rx.recv_timeout(time).is_err() {
                interrupt.interrupt();
                true
            } else {
                false
            }
        });
        let result: Result<(SchemaRef, Vec<RecordBatch>), duckdb::Error> = (|| {
            let mut stmt = conn.prepare(&wrapped)?;
            let arrow = stmt.query_arrow([])?;
            let schema = arrow.get_schema();
            Ok((schema, arrow.collect()))
        })();
        let _ = done_tx.send(());
        let timed_out = watchdog.join().unwrap_or(false);
        let (schema, batches) = match result {
            Ok(b) => b,
            Err(_) if timed_out => {
                return Err(AdminError::Cancelled(self.limits.time));
            }
            Err(e) => return Err(e.into()),
        };
        let (batches, truncated) = crate::answer::cut(batches, limit);
        let batches = batches
            .into_iter()
            .map(crate::answer::utc_batch)
            .collect::<Result<Vec<_>, _>>()?;
        let schema = crate::answer::utc_schema(&schema);
        Ok(Answer {
            schema,
            batches,
            truncated,
            elapsed: started.elapsed(),
            index: IndexInfo::of(&manifest, now_ns()),
            note: None,
        })
    }
}

impl Engine {
    /// Runs a shortcut report.
    pub fn report(&self, r: &crate::reports::Report) -> Result<Answer, AdminError> {
        let mut a = self.query(&r.sql(), None)?;
        a.note = r.note();
        Ok(a)
    }

    /// The current index's freshness, without a query.
    pub fn index(&self) -> Result<IndexInfo, AdminError> {
        let m = Manifest::load(&self.dir)
            .map_err(|e| AdminError::NoIndex(e.to_string()))?
            .ok_or_else(|| {
                AdminError::NoIndex(format!("{} has no index yet", self.dir.display()))
            })?;
        Ok(IndexInfo::of(&m, now_ns()))
    }
}
