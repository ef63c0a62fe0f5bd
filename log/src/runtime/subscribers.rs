//! Readers of decided entries (`Subscription`) and the durable table of
//! named subscribers' positions that holds back trimming.

use super::*;

/// Durable positions of a shard's named subscribers (materializers).
pub(super) struct SubscriberTable {
    pub(super) path: PathBuf,
    pub(super) persisted: BTreeMap<String, Position>,
    pub(super) dirty: bool,
}

impl SubscriberTable {
    pub(super) fn load(path: PathBuf) -> Result<Self, String> {
        let mut persisted = BTreeMap::new();
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                for (n, line) in s.lines().enumerate() {
                    let mut it = line.split_whitespace();
                    let (Some(name), Some(pos), None) = (it.next(), it.next(), it.next()) else {
                        return Err(format!(
                            "{}: line {}: expected `name position`",
                            path.display(),
                            n + 1
                        ));
                    };
                    let pos = Position(
                        pos.parse()
                            .map_err(|e| format!("{}: line {}: {e}", path.display(), n + 1))?,
                    );
                    persisted.insert(name.to_string(), pos);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
        Ok(SubscriberTable {
            path,
            persisted,
            dirty: false,
        })
    }

    /// Lowest position some subscriber still needs; with no subscribers,
    /// nothing may be trimmed.
    pub(super) fn floor(&self) -> Position {
        self.persisted
            .values()
            .copied()
            .min()
            .unwrap_or(Position::ZERO)
    }

    pub(super) fn save(&mut self) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let mut s = String::new();
        for (n, p) in &self.persisted {
            s.push_str(&format!("{n} {p}\n"));
        }
        let tmp = self.path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(s.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        self.dirty = false;
        Ok(())
    }
}

/// A reader of one shard's decided entries, in order.
pub struct Subscription {
    pub(super) next: Position,
    pub(super) wal: SharedWal<FsDisk>,
    pub(super) base: Position,
    pub(super) decided: watch::Receiver<Position>,
    pub(super) name: Option<String>,
    pub(super) table: Arc<Mutex<SubscriberTable>>,
}

impl Subscription {
    /// Position of the next entry this subscription returns.
    pub fn position(&self) -> Position {
        self.next
    }

    /// Waits for and returns up to `max` decided entries from the current
    /// position.
    ///
    /// # Errors
    /// `Trimmed` if the position was trimmed (the subscriber must restore a
    /// snapshot first); `ShuttingDown` if the shard stopped.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<(Position, Entry)>, LogError> {
        loop {
            let decided = *self.decided.borrow_and_update();
            if decided > self.next {
                let to = decided.min(self.next + max.max(1) as u64);
                let w = self.wal.lock();
                let s = w.state();
                let (from_idx, to_idx) = (self.next - self.base, to - self.base);
                let Some(entries) = s.get(from_idx, to_idx) else {
                    return Err(LogError::Trimmed(self.base + s.entries_start));
                };
                drop(w);
                let out: Vec<(Position, Entry)> = entries
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| (self.next + i as u64, e))
                    .collect();
                self.next = to;
                return Ok(out);
            }
            if self.decided.changed().await.is_err() {
                return Err(LogError::ShuttingDown);
            }
        }
    }

    /// Declares that everything below `pos` is durably applied by this
    /// (named) subscriber, so the log may be trimmed below it.
    pub fn persisted(&self, pos: Position) {
        if let Some(n) = &self.name {
            let mut t = self.table.lock().expect("subscribers lock");
            let e = t.persisted.entry(n.clone()).or_insert(Position::ZERO);
            if pos > *e {
                *e = pos;
                t.dirty = true;
            }
        }
    }
}
