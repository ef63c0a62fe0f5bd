//! The lakehouse's two halves: a task that notes every published change
//! in a bounded dirty set (it never lags behind the broadcast), and a
//! thread that, every flush interval, brings the in-memory namespace up to
//! date and writes a new generation of Parquet files if anything changed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cfs_ids::ShardId;
use cfs_materializers::{Change, NamespaceDb};
use cfs_metrics::{self as m, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use tokio::sync::broadcast;
use tracing::{error, info, warn};

use crate::manifest::{now_ns, Manifest, FORMAT};
use crate::source::{self, Dirty};
use crate::state::Namespace;
use crate::LakehouseError;

/// The shortest flush interval accepted.
pub const FLUSH_INTERVAL_MIN: Duration = Duration::from_secs(1);
/// The default flush interval (the seed's).
pub const FLUSH_INTERVAL_DEFAULT: Duration = Duration::from_secs(60);
/// Files of a replaced generation stay (in `retired/`) this long, for the
/// queries that started on them.
pub const RETIRED_KEEP: Duration = Duration::from_secs(120);
/// Where replaced files wait, outside `index/` (a glob over the index
/// never sees two generations once the rename is done).
const RETIRED: &str = "retired";

#[derive(Clone, Debug)]
pub struct LakehouseConfig {
    /// The lakehouse directory: `index.json`, `index/…`, `retired/`.
    pub dir: PathBuf,
    pub flush_interval: Duration,
    pub shards: Vec<ShardId>,
    /// Files written at once (threads).
    pub threads: usize,
}

/// The lakehouse's families (docs/metrics.md).
pub struct LakehouseMetrics {
    pub registry: m::Registry,
    rows: IntGauge,
    files: IntGauge,
    bytes: IntGauge,
    generation: IntGauge,
    flushes: IntCounterVec,
    rescans: IntCounter,
    flush_seconds: Histogram,
    position: IntGaugeVec,
    current: m::Gauge,
}

impl LakehouseMetrics {
    fn new() -> LakehouseMetrics {
        let registry = m::Registry::new();
        let r = &registry;
        LakehouseMetrics {
            rows: m::gauge(r, "claudefs_lakehouse_rows", "Rows (names) in the current index."),
            files: m::gauge(r, "claudefs_lakehouse_files", "Parquet files in the current index."),
            bytes: m::gauge(r, "claudefs_lakehouse_bytes", "Bytes of the current index's Parquet files."),
            generation: m::gauge(r, "claudefs_lakehouse_generation", "Generation of the current index (one per write)."),
            flushes: m::counter_vec(r, "claudefs_lakehouse_flushes_total", "Flush ticks by result: written (a new generation), current (nothing changed), failed.", &["result"]),
            rescans: m::counter(r, "claudefs_lakehouse_rescans_total", "Full reads of the namespace (start, lost changes, index deleted)."),
            flush_seconds: m::histogram(r, "claudefs_lakehouse_flush_duration_seconds", "Time to bring the index up to date and write a new generation.", m::LATENCY_BUCKETS),
            position: m::gauge_vec(r, "claudefs_lakehouse_position", "Applied position of each shard the index covers.", &["shard"]),
            current: m::float_gauge(r, "claudefs_lakehouse_current_timestamp_seconds", "Last time (Unix seconds) the index was known to hold every published change; lag = time() - this."),
            registry,
        }
    }
}

/// The running lakehouse of this node.
pub struct Lakehouse {
    metrics: Arc<LakehouseMetrics>,
    dir: PathBuf,
}

impl Lakehouse {
    /// Starts following `changes` (subscribed before this call, so nothing
    /// published from then on is missed) and flushing into `cfg.dir`.
    /// Must run inside a tokio runtime.
    pub fn start(
        cfg: LakehouseConfig,
        db: Arc<NamespaceDb>,
        mut changes: broadcast::Receiver<Change>,
    ) -> Result<Lakehouse, LakehouseError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|source| LakehouseError::Io {
            path: cfg.dir.clone(),
            source,
        })?;
        let metrics = Arc::new(LakehouseMetrics::new());
        let dirty: Arc<Mutex<Dirty>> = Arc::default();
        let d2 = dirty.clone();
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(ch) => d2.lock().expect("dirty lock").note(&ch),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "lakehouse missed published changes: rescanning");
                        d2.lock().expect("dirty lock").lost();
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let (m2, dir) = (metrics.clone(), cfg.dir.clone());
        std::thread::Builder::new()
            .name("lakehouse".into())
            .spawn(move || Flusher::new(cfg, db, dirty, m2).run())
            .map_err(|source| LakehouseError::Io {
                path: PathBuf::from("lakehouse thread"),
                source,
            })?;
        Ok(Lakehouse { metrics, dir })
    }

    pub fn metrics_text(&self) -> String {
        m::render(&self.metrics.registry)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

struct Flusher {
    cfg: LakehouseConfig,
    db: Arc<NamespaceDb>,
    dirty: Arc<Mutex<Dirty>>,
    metrics: Arc<LakehouseMetrics>,
    ns: Namespace,
    manifest: Option<Manifest>,
    /// The index on disk lacks changes `ns` has (or `ns` must be read).
    stale: bool,
    rescan: bool,
    retired: Vec<(Instant, PathBuf)>,
}

impl Flusher {
    fn new(
        cfg: LakehouseConfig,
        db: Arc<NamespaceDb>,
        dirty: Arc<Mutex<Dirty>>,
        metrics: Arc<LakehouseMetrics>,
    ) -> Flusher {
        Flusher {
            cfg,
            db,
            dirty,
            metrics,
            ns: Namespace::default(),
            manifest: None,
            stale: true,
            rescan: true,
            retired: Vec::new(),
        }
    }

    fn run(mut self) {
        let interval = self.cfg.flush_interval.max(FLUSH_INTERVAL_MIN);
        match Manifest::load(&self.cfg.dir) {
            Ok(m) => self.manifest = m,
            Err(e) => warn!("lakehouse: {e}: the index is rebuilt"),
        }
        self.clean_leftovers();
        info!(
            dir = %self.cfg.dir.display(),
            interval_s = interval.as_secs_f64(),
            generation = self.manifest.as_ref().map(|m| m.generation).unwrap_or(0),
            "lakehouse started"
        );
        let mut next = Instant::now();
        loop {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next = Instant::now() + interval;
            let started = Instant::now();
            match self.tick() {
                Ok(true) => {
                    self.metrics.flushes.with_label_values(&["written"]).inc();
                    self.metrics
                        .flush_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                Ok(false) => self.metrics.flushes.with_label_values(&["current"]).inc(),
                Err(e) => {
                    error!("lakehouse flush failed: {e}");
                    self.metrics.flushes.with_label_values(&["failed"]).inc();
                }
            }
            self.expire_retired(false);
        }
    }

    /// One flush: returns whether a new generation was written.
    fn tick(&mut self) -> Result<bool, LakehouseError> {
        let dirty = std::mem::take(&mut *self.dirty.lock().expect("dirty lock"));
        let checked_at = now_ns();
        let mut positions = self
            .manifest
            .as_ref()
            .map(|m| m.positions.clone())
            .unwrap_or_default();
        for (s, p) in &dirty.positions {
            let e = positions.entry(s.0).or_insert(p.0);
            *e = (*e).max(p.0);
        }
        if self
            .manifest
            .as_ref()
            .is_some_and(|m| !m.files_present(&self.cfg.dir))
        {
            warn!("lakehouse: index files are missing: rebuilding");
            self.rescan = true;
        }
        if self.rescan || dirty.rescan {
            self.metrics.rescans.inc();
            let started = Instant::now();
            let (ns, at) = source::scan(&self.db, &self.cfg.shards)?;
            info!(
                inodes = ns.inodes(),
                names = ns.links(),
                seconds = started.elapsed().as_secs_f64(),
                "lakehouse read the namespace"
            );
            self.ns = ns;
            for (s, p) in at {
                let e = positions.entry(s.0).or_insert(p.0);
                *e = (*e).max(p.0);
            }
            // Unchanged since the index on disk was written: it stands.
            let same = self
                .manifest
                .as_ref()
                .is_some_and(|m| m.positions == positions && m.files_present(&self.cfg.dir));
            self.stale = !same;
            self.rescan = false;
        } else if !dirty.is_empty() {
            source::refresh(&self.db, &mut self.ns, dirty)?;
            self.stale = true;
        }
        let wrote = if self.stale || self.manifest.is_none() {
            self.write(positions, checked_at)?;
            self.stale = false;
            true
        } else {
            // Nothing new: only the index's timestamp moves.
            if let Some(m) = self.manifest.as_mut() {
                m.current_at_ns = checked_at;
                m.positions = positions;
                m.save(&self.cfg.dir, false)?;
            }
            false
        };
        self.publish();
        Ok(wrote)
    }

    fn write(
        &mut self,
        positions: std::collections::BTreeMap<u32, u64>,
        checked_at: i64,
    ) -> Result<(), LakehouseError> {
        let started = Instant::now();
        let rows = self.ns.rows();
        let generation = self.manifest.as_ref().map(|m| m.generation).unwrap_or(0) + 1;
        let written = crate::parquet_out::write_generation(
            &self.cfg.dir,
            generation,
            checked_at.div_euclid(1_000_000_000),
            &rows,
            self.cfg.threads,
        )?;
        let m = Manifest {
            format: FORMAT,
            generation,
            written_at_ns: now_ns(),
            current_at_ns: checked_at,
            positions,
            files: written.files,
            rows: rows.len() as u64,
            bytes: written.bytes,
            flush_seconds: started.elapsed().as_secs_f64(),
        };
        drop(rows);
        m.save(&self.cfg.dir, true)?;
        info!(
            generation,
            rows = m.rows,
            files = m.files.len(),
            bytes = m.bytes,
            seconds = m.flush_seconds,
            "lakehouse wrote the index"
        );
        if let Some(old) = self.manifest.replace(m) {
            self.retire(&old);
        }
        Ok(())
    }

    fn publish(&self) {
        let Some(m) = &self.manifest else { return };
        self.metrics.rows.set(m::to_i64(m.rows));
        self.metrics.files.set(m::to_i64(m.files.len() as u64));
        self.metrics.bytes.set(m::to_i64(m.bytes));
        self.metrics.generation.set(m::to_i64(m.generation));
        for (s, p) in &m.positions {
            self.metrics
                .position
                .with_label_values(&[&s.to_string()])
                .set(m::to_i64(*p));
        }
        self.metrics.current.set(m.current_at_ns as f64 / 1e9);
    }

    /// Moves `old`'s files out of the index, to be deleted later.
    fn retire(&mut self, old: &Manifest) {
        let retired = self.cfg.dir.join(RETIRED);
        if let Err(e) = std::fs::create_dir_all(&retired) {
            warn!("lakehouse: {}: {e}", retired.display());
            return;
        }
        for f in &old.files {
            let from = self.cfg.dir.join(f);
            let to = retired.join(format!(
                "g{}-{}",
                old.generation,
                f.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            match std::fs::rename(&from, &to) {
                Ok(()) => self.retired.push((Instant::now(), to)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!("lakehouse: retiring {}: {e}", from.display()),
            }
        }
    }

    /// Deletes retired files older than [`RETIRED_KEEP`] (all: `all`).
    fn expire_retired(&mut self, all: bool) {
        self.retired.retain(|(at, p)| {
            if all || at.elapsed() >= RETIRED_KEEP {
                let _ = std::fs::remove_file(p);
                false
            } else {
                true
            }
        });
    }

    /// At start: files a crash left (temporaries, a generation written
    /// without its manifest, retired ones) are deleted.
    fn clean_leftovers(&mut self) {
        let keep: std::collections::HashSet<PathBuf> = self
            .manifest
            .as_ref()
            .map(|m| m.files.iter().map(|f| self.cfg.dir.join(f)).collect())
            .unwrap_or_default();
        let _ = std::fs::remove_dir_all(self.cfg.dir.join(RETIRED));
        let mut stack = vec![self.cfg.dir.join("index")];
        let mut visited = 0usize;
        while let Some(d) = stack.pop() {
            visited += 1;
            if visited > CLEAN_DIRS_MAX {
                break;
            }
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(p);
                } else if !keep.contains(&p) {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }
}

/// Directories looked at when cleaning up at start, at most.
const CLEAN_DIRS_MAX: usize = 100_000;
