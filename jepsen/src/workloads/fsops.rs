//! The fs-ops workload: many small namespace changes with fsync points on
//! several mounts, checked against a model. It aims at the early answers
//! of D30 (docs/decisions.md): a leader answers a change once it has
//! ordered it, the mount keeps the change until it is settled and replays
//! it to a new leader, and fsync/fsyncdir wait for settlement.
//!
//! Each client slot owns a directory `ops/c<slot>` and is its only writer,
//! through the mount `slot % mounts`: creates (O_EXCL, a small unique
//! content written, then close, no fsync), renames (over an existing
//! target too), unlinks, fsyncs of the directory and of a file, over the
//! names f0..f7. Its operations are therefore sequential per directory,
//! and a model (name → the file's inode and content) says what each
//! outcome must be. Slots also read other slots' directories (listing,
//! then each file's content) through a mount other than the owner's.
//!
//! Checked per directory:
//! - every ok/fail outcome of the owner's operations fits the model at
//!   that point. An indeterminate (info) change may take effect at any
//!   later point or never: the model keeps the set of candidate states
//!   (each with the changes still pending), deduplicated, and gives up
//!   (`unknown`) past [`CANDIDATES_MAX`];
//! - an answer is final only once a later fsync of the directory succeeds:
//!   a change that did not apply as answered is reported by that fsync
//!   (EIO), so when one fails (or the owner's fsync after the run does),
//!   the changes answered since the last successful one count as
//!   indeterminate;
//! - a reader's listing and contents fit the states between the last owner
//!   operation settled (a successful fsync) before the read began and the
//!   owner operations invoked before it ended (each observation in order,
//!   on a state no earlier than the previous one's); else `stale-read` or
//!   `inconsistent-read`. Reads that miss changes answered before they
//!   began but not yet settled are counted, not reported: a change
//!   answered just before a leader change or a partition is invisible to
//!   other mounts until it is decided (docs/filesystem.md, "When changes
//!   are durable, and who sees them");
//! - the final listing and contents, read after healing through a mount
//!   other than the owner's, fit a state after every operation.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{definite, Checked, Ctx, Process};
use crate::history::{pair, Event, History, Kind, Op};

/// The workload's directory on the file system: one subdirectory per slot.
pub const DIR: &str = "ops";
/// Names each owner's operations choose from (f0..f7).
const NAMES: usize = 8;
/// Of every 100 operations: creates, renames, unlinks, directory fsyncs
/// and file fsyncs; the rest read another slot's directory.
const CREATE: u32 = 35;
const RENAME: u32 = 20;
const UNLINK: u32 = 17;
const FSYNC_DIR: u32 = 8;
const FSYNC_FILE: u32 = 8;
const READ_FROM: u32 = CREATE + RENAME + UNLINK + FSYNC_DIR + FSYNC_FILE;
/// Attempts of each final fsync and read.
const FINAL_TRIES: usize = 10;
/// An indeterminate change may take effect at any later point, or never;
/// this long after its invocation (history clock) it is taken as settled
/// one way or the other, which bounds the candidate states: a mount gives
/// up on a call after 10 s, the nodes on a proposal after 5 s, and fault
/// windows last at most 12 s.
const PENDING_HORIZON_NS: u64 = 60_000_000_000;
/// Candidate states per point of a directory's history before the
/// checker gives up on the directory (`unknown`). 2,000 gave up on a CI
/// smoke run with 20 indeterminate changes (`--recheck` decided it, valid,
/// with this bound, in 9 s of a debug build).
const CANDIDATES_MAX: usize = 50_000;
/// States one read's search may visit before it gives up (`unknown`).
const READ_SEARCH_MAX: usize = 200_000;
/// How far before a failed read's window the checker looks for an older
/// state it fits (to call it stale), in model steps.
const STALE_LOOKBACK: usize = 64;
/// Reports kept per directory for each of: read anomalies, examples of
/// reads that missed unsettled changes.
const REPORT_MAX: usize = 20;
/// Node counters the run samples for this workload (main.rs).
pub const COUNTERS: [&str; 3] = [
    "claudefs_meta_early_answers_total",
    "claudefs_meta_sequenced_total",
    "claudefs_meta_mispredicted_total",
];
/// How often the run samples them.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

fn dir_name(slot: u64) -> String {
    format!("c{slot}")
}

fn file(i: usize) -> String {
    format!("f{i}")
}

pub fn setup(mount: &Path, concurrency: u64) -> std::io::Result<()> {
    for slot in 0..concurrency {
        std::fs::create_dir_all(mount.join(DIR).join(dir_name(slot)))?;
    }
    Ok(())
}

/// Where an operation's error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Its first call: nothing was done if the error is definite.
    Before,
    /// A later call (a create's write or close, an fsync after its open):
    /// the first took effect.
    After,
    /// Unknown (the blocking task did not return).
    Unknown,
}

struct OpError {
    err: std::io::Error,
    stage: Stage,
}

impl From<std::io::Error> for OpError {
    fn from(err: std::io::Error) -> OpError {
        OpError {
            err,
            stage: Stage::Before,
        }
    }
}

/// Closes `f`, returning what close(2) said: a FUSE flush, where the
/// mount reports a change to the file that did not apply as answered.
fn close(f: std::fs::File) -> std::io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just taken out of its File: nothing else closes it.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Creates `path` exclusively, writes `value` and closes it (no fsync).
fn create(path: &Path, value: &str) -> Result<(), OpError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let made = |err: std::io::Error| OpError {
        err,
        stage: Stage::After,
    };
    f.write_all(value.as_bytes()).map_err(made)?;
    close(f).map_err(made)
}

/// fsync of a directory or a file (opened read-only).
fn sync_path(path: &Path) -> Result<(), OpError> {
    let f = std::fs::File::open(path)?;
    let opened = |err: std::io::Error| OpError {
        err,
        stage: Stage::After,
    };
    f.sync_all().map_err(opened)?;
    close(f).map_err(opened)
}

/// A directory's sorted listing, then each listed file's content in that
/// order (`None`: gone by then, ENOENT).
/// Names listed, each file's content (`None`: the open found no such
/// name) and the files opened whose inode was gone when read.
type Snapshot = (Vec<String>, Vec<(String, Option<String>)>, Vec<String>);

fn read_all(dir: &Path) -> std::io::Result<Snapshot> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir)? {
        names.push(e?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    let mut files = Vec::new();
    let mut reclaimed = Vec::new();
    for n in &names {
        let mut f = match std::fs::File::open(dir.join(n)) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                files.push((n.clone(), None));
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut b = Vec::new();
        match std::io::Read::read_to_end(&mut f, &mut b) {
            Ok(_) => files.push((n.clone(), Some(String::from_utf8_lossy(&b).into_owned()))),
            // Opened, then its inode deleted by another mount's rename or
            // unlink before the read: the documented gap of open files
            // across mounts (docs/filesystem.md, "Known gaps"), not a
            // wrong name. Its content is not observed; it is counted.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE)) => {
                reclaimed.push(n.clone())
            }
            Err(e) => return Err(e),
        }
    }
    Ok((names, files, reclaimed))
}

async fn blocking<F>(f: F) -> Result<(), OpError>
where
    F: FnOnce() -> Result<(), OpError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(OpError {
            err: std::io::Error::other(e.to_string()),
            stage: Stage::Unknown,
        })
    })
}

/// Completes an owner operation: a definite error on its first call is a
/// failure, any other error indeterminate (and the process crashes).
fn record(h: &History, p: &mut Process, f: &str, key: &str, args: Value, r: Result<(), OpError>) {
    match r {
        Ok(()) => h.complete(p.id, Kind::Ok, f, Some(key), args),
        Err(e) if e.stage == Stage::Before && definite(&e.err) => h.complete(
            p.id,
            Kind::Fail,
            f,
            Some(key),
            json!({"errno": e.err.raw_os_error(), "error": e.err.to_string()}),
        ),
        Err(e) => {
            // For a create: whether its open (the create itself) succeeded.
            let created = match e.stage {
                Stage::Before => Some(false),
                Stage::After => Some(true),
                Stage::Unknown => None,
            };
            h.complete(
                p.id,
                Kind::Info,
                f,
                Some(key),
                json!({"errno": e.err.raw_os_error(), "error": e.err.to_string(),
                    "created": created}),
            );
            p.crashed();
        }
    }
}

/// The mount through which `slot` reads `other`'s directory: its own,
/// unless that is the owner's, then the next (the same only when there is
/// a single mount).
fn reader_mount(slot: u64, other: u64, mounts: usize) -> usize {
    let (mine, owner) = (slot as usize % mounts, other as usize % mounts);
    if mine != owner {
        mine
    } else {
        (owner + 1) % mounts
    }
}

pub async fn client(ctx: Arc<Ctx>, slot: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(ctx.seed.wrapping_add(slot * 7_877));
    let mut p = Process::new(slot, ctx.concurrency);
    let h: &History = &ctx.history;
    let mounts = ctx.mounts.len();
    let key = dir_name(slot);
    let dir = ctx.mounts[slot as usize % mounts].join(DIR).join(&key);
    // With a single slot there is no other directory to read.
    let top = if ctx.concurrency > 1 { 100 } else { READ_FROM };
    let mut n = 0u64;
    while h.now() < ctx.until {
        let roll = rng.gen_range(0..top);
        let a = rng.gen_range(0..NAMES);
        let b = (a + rng.gen_range(1..NAMES)) % NAMES;
        let (fa, fb) = (file(a), file(b));
        if roll < CREATE {
            n += 1;
            let value = format!("{}-{n}", p.id);
            let path = dir.join(&fa);
            let args = json!({"name": fa, "value": value});
            h.invoke(p.id, "create", Some(&key), args.clone());
            let r = blocking(move || create(&path, &value)).await;
            record(h, &mut p, "create", &key, args, r);
        } else if roll < CREATE + RENAME {
            let (from, to) = (dir.join(&fa), dir.join(&fb));
            let args = json!({"from": fa, "to": fb});
            h.invoke(p.id, "rename", Some(&key), args.clone());
            let r = blocking(move || std::fs::rename(from, to).map_err(OpError::from)).await;
            record(h, &mut p, "rename", &key, args, r);
        } else if roll < CREATE + RENAME + UNLINK {
            let path = dir.join(&fa);
            let args = json!({"name": fa});
            h.invoke(p.id, "unlink", Some(&key), args.clone());
            let r = blocking(move || std::fs::remove_file(path).map_err(OpError::from)).await;
            record(h, &mut p, "unlink", &key, args, r);
        } else if roll < CREATE + RENAME + UNLINK + FSYNC_DIR {
            let path = dir.clone();
            h.invoke(p.id, "fsync-dir", Some(&key), Value::Null);
            let r = blocking(move || sync_path(&path)).await;
            record(h, &mut p, "fsync-dir", &key, Value::Null, r);
        } else if roll < READ_FROM {
            let path = dir.join(&fa);
            let args = json!({"name": fa});
            h.invoke(p.id, "fsync-file", Some(&key), args.clone());
            let r = blocking(move || sync_path(&path)).await;
            record(h, &mut p, "fsync-file", &key, args, r);
        } else {
            let other = (slot + rng.gen_range(1..ctx.concurrency)) % ctx.concurrency;
            let okey = dir_name(other);
            let mi = reader_mount(slot, other, mounts);
            let odir = ctx.mounts[mi].join(DIR).join(&okey);
            h.invoke(p.id, "read", Some(&okey), json!({"mount": mi}));
            let r = tokio::task::spawn_blocking(move || read_all(&odir))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match r {
                Ok((names, files, reclaimed)) => h.complete(
                    p.id,
                    Kind::Ok,
                    "read",
                    Some(&okey),
                    json!({"mount": mi, "names": names, "files": files,
                           "reclaimed_while_open": reclaimed}),
                ),
                // A read changes nothing: a failed one is simply failed.
                Err(e) => h.complete(p.id, Kind::Fail, "read", Some(&okey), json!(e.to_string())),
            }
        }
    }
}

/// After healing, per directory: an fsync of it through the owner's mount
/// (settles its changes, and reports one that did not apply as answered),
/// then its listing and contents through another mount.
pub async fn final_reads(ctx: &Ctx) -> anyhow::Result<Value> {
    let mounts = ctx.mounts.len();
    let mut dirs = Vec::new();
    for slot in 0..ctx.concurrency {
        let key = dir_name(slot);
        let own = slot as usize % mounts;
        // Each attempt's error (null: it succeeded, the last one).
        let mut sync = Vec::new();
        for _ in 0..FINAL_TRIES {
            let d = ctx.mounts[own].join(DIR).join(&key);
            match blocking(move || sync_path(&d)).await {
                Ok(()) => {
                    sync.push(Value::Null);
                    break;
                }
                Err(e) => sync.push(json!(e.err.to_string())),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let rm = if mounts > 1 { (own + 1) % mounts } else { own };
        let mut got = None;
        let mut error = None;
        for _ in 0..FINAL_TRIES {
            let d = ctx.mounts[rm].join(DIR).join(&key);
            match tokio::task::spawn_blocking(move || read_all(&d)).await? {
                Ok(s) => {
                    got = Some(s);
                    break;
                }
                Err(e) => error = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Nothing changes any more: a file whose inode is gone when read
        // is simply one that is not there (the checker judges it).
        let (names, files) = match got {
            Some((n, mut f, gone)) => {
                f.extend(gone.into_iter().map(|g| (g, None)));
                (json!(n), json!(f))
            }
            None => (Value::Null, Value::Null),
        };
        dirs.push(
            json!({"dir": key, "owner_mount": own, "sync_attempts": sync,
            "read_mount": rm, "names": names, "files": files, "error": error}),
        );
    }
    Ok(json!({ "dirs": dirs }))
}

// ---------------------------------------------------------------------
// The model and the checker.

/// A file of the model: its inode (the history index of the create that
/// made it) and whether its content was written (else it is empty).
type Entry = (usize, bool);
/// A directory of the model: name → file.
type State = BTreeMap<String, Entry>;

/// A change to a directory, with the materializer's semantics: applied
/// to a state where its precondition fails it does nothing (the error).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Change {
    Create {
        name: String,
        ino: usize,
    },
    /// The create's content, committed at its close, on whatever name the
    /// inode has by then.
    Write {
        ino: usize,
    },
    Unlink {
        name: String,
    },
    Rename {
        from: String,
        to: String,
    },
}

/// Applies `c` to `s`; whether it took effect (else `s` is unchanged).
fn apply(s: &mut State, c: &Change) -> bool {
    match c {
        Change::Create { name, ino } => {
            if s.contains_key(name) {
                return false;
            }
            s.insert(name.clone(), (*ino, false));
            true
        }
        Change::Write { ino } => match s.values_mut().find(|e| e.0 == *ino) {
            Some(e) => {
                e.1 = true;
                true
            }
            None => false,
        },
        Change::Unlink { name } => s.remove(name).is_some(),
        Change::Rename { from, to } => {
            if from == to {
                return s.contains_key(from);
            }
            match s.remove(from) {
                Some(e) => {
                    s.insert(to.clone(), e);
                    true
                }
                None => false,
            }
        }
    }
}

/// One step of a directory's history, in the owner's order.
#[derive(Clone, Debug)]
enum Step {
    /// A change whose outcome was answered: it took effect (`ok`) or its
    /// precondition failed.
    Known { change: Change, ok: bool },
    /// The name existed (an fsync opened it) or not (ENOENT).
    Exists { name: String, exists: bool },
    /// An indeterminate change (an id in [`Model::pending`]): from here on
    /// it may take effect at any point, or never.
    Pending(usize),
}

struct Pending {
    change: Change,
    invoked: u64,
}

/// A candidate state at a point of the history, with the indeterminate
/// changes that may still take effect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Cand {
    state: State,
    pending: BTreeSet<usize>,
}

/// A directory's history as model steps. Position `p` is the point after
/// `p` steps.
#[derive(Default)]
struct Model {
    /// Each step and the owner operation (its index in the owner's list)
    /// it comes from.
    steps: Vec<(Step, usize)>,
    pending: Vec<Pending>,
    /// Per position: the history time it stands for (its operation's
    /// invocation), for [`PENDING_HORIZON_NS`].
    time: Vec<u64>,
    /// Per owner operation: the position after its steps.
    op_end: Vec<usize>,
    /// What each create wrote, by inode.
    values: HashMap<usize, String>,
}

impl Model {
    fn push(&mut self, step: Step, op: usize, o: &Op) {
        self.steps.push((step, op));
        self.time.push(o.invoke.time);
    }

    fn pend(&mut self, change: Change, op: usize, o: &Op) {
        self.pending.push(Pending {
            change,
            invoked: o.invoke.time,
        });
        self.push(Step::Pending(self.pending.len() - 1), op, o);
    }

    /// The position after the first `ops` owner operations.
    fn after(&self, ops: usize) -> usize {
        if ops == 0 {
            0
        } else {
            self.op_end[ops - 1]
        }
    }

    /// `c` with pending change `id` taken effect; None if it would do
    /// nothing (that candidate is covered by `c` itself).
    fn fire(&self, c: &Cand, id: usize) -> Option<Cand> {
        let mut n = c.clone();
        if !apply(&mut n.state, &self.pending[id].change) {
            return None;
        }
        n.pending.remove(&id);
        Some(n)
    }

    /// `c` through step `p` (to position `p + 1`); None if the step's
    /// outcome cannot happen in `c`.
    fn step(&self, c: &Cand, p: usize) -> Option<Cand> {
        let mut n = c.clone();
        match &self.steps[p].0 {
            Step::Known { change, ok } => {
                if apply(&mut n.state, change) != *ok {
                    return None;
                }
            }
            Step::Exists { name, exists } => {
                if n.state.contains_key(name) != *exists {
                    return None;
                }
            }
            Step::Pending(id) => {
                n.pending.insert(*id);
            }
        }
        let t = self.time[p + 1];
        n.pending
            .retain(|id| t <= self.pending[*id].invoked.saturating_add(PENDING_HORIZON_NS));
        Some(n)
    }

    /// Every candidate reachable from `start` by pending changes taking
    /// effect, without those another candidate covers; None past
    /// [`CANDIDATES_MAX`].
    fn close(&self, start: Vec<Cand>) -> Option<Vec<Cand>> {
        let mut seen: HashSet<Cand> = HashSet::new();
        let mut todo = Vec::new();
        for c in start {
            if seen.insert(c.clone()) {
                todo.push(c);
            }
        }
        while let Some(c) = todo.pop() {
            for &id in &c.pending {
                if let Some(n) = self.fire(&c, id) {
                    if seen.insert(n.clone()) {
                        if seen.len() > CANDIDATES_MAX {
                            return None;
                        }
                        todo.push(n);
                    }
                }
            }
        }
        Some(prune(seen))
    }

    /// Whether a reader's observations, in order, fit a path of states from
    /// position `lo` up to `hi` (pending changes taking effect anywhere
    /// along it); None past [`READ_SEARCH_MAX`].
    fn explain(&self, cands: &[Vec<Cand>], obs: &[Obs], lo: usize, hi: usize) -> Option<bool> {
        let mut best: HashMap<(usize, Cand), usize> = HashMap::new();
        let mut todo: Vec<(usize, Cand, usize)> = cands[lo]
            .iter()
            .map(|c| (lo, c.clone(), consume(&c.state, obs, 0, &self.values)))
            .collect();
        while let Some((p, c, j)) = todo.pop() {
            if j == obs.len() {
                return Some(true);
            }
            if best.get(&(p, c.clone())).is_some_and(|b| *b >= j) {
                continue;
            }
            best.insert((p, c.clone()), j);
            if best.len() > READ_SEARCH_MAX {
                return None;
            }
            for &id in &c.pending {
                if let Some(n) = self.fire(&c, id) {
                    let j2 = consume(&n.state, obs, j, &self.values);
                    todo.push((p, n, j2));
                }
            }
            if p < hi {
                if let Some(n) = self.step(&c, p) {
                    let j2 = consume(&n.state, obs, j, &self.values);
                    todo.push((p + 1, n, j2));
                }
            }
        }
        Some(false)
    }
}

/// Drops each candidate another one covers: the same state with a superset
/// of pending changes can do all it can.
fn prune(all: HashSet<Cand>) -> Vec<Cand> {
    let mut by_state: BTreeMap<State, Vec<BTreeSet<usize>>> = BTreeMap::new();
    for c in all {
        by_state.entry(c.state).or_default().push(c.pending);
    }
    let mut out = Vec::new();
    for (state, sets) in by_state {
        for (i, p) in sets.iter().enumerate() {
            let covered = sets
                .iter()
                .enumerate()
                .any(|(j, q)| j != i && q.len() > p.len() && p.is_subset(q));
            if !covered {
                out.push(Cand {
                    state: state.clone(),
                    pending: p.clone(),
                });
            }
        }
    }
    out
}

/// What a reader saw, in the order it saw it.
#[derive(Debug)]
enum Obs {
    /// The listing: exactly these names.
    Names(BTreeSet<String>),
    /// A listed file, read afterwards: its content, or None (gone).
    File(String, Option<String>),
}

fn content<'a>(e: &Entry, values: &'a HashMap<usize, String>) -> &'a str {
    if e.1 {
        values.get(&e.0).map(String::as_str).unwrap_or("")
    } else {
        ""
    }
}

fn matches(s: &State, o: &Obs, values: &HashMap<usize, String>) -> bool {
    match o {
        Obs::Names(names) => s.len() == names.len() && s.keys().all(|k| names.contains(k)),
        Obs::File(name, None) => !s.contains_key(name),
        Obs::File(name, Some(c)) => s
            .get(name)
            .is_some_and(|e| content(e, values) == c.as_str()),
    }
}

/// How many of `obs` from `j` on state `s` shows, in order.
fn consume(s: &State, obs: &[Obs], mut j: usize, values: &HashMap<usize, String>) -> usize {
    while j < obs.len() && matches(s, &obs[j], values) {
        j += 1;
    }
    j
}

/// A read's (or the final read's) observations from its recorded value.
fn observations(v: &Value) -> Option<Vec<Obs>> {
    let names = v["names"]
        .as_array()?
        .iter()
        .map(|n| n.as_str().map(str::to_string))
        .collect::<Option<BTreeSet<String>>>()?;
    let mut obs = vec![Obs::Names(names)];
    for f in v["files"].as_array()? {
        obs.push(Obs::File(
            f[0].as_str()?.to_string(),
            f[1].as_str().map(str::to_string),
        ));
    }
    Some(obs)
}

fn render(s: &State, values: &HashMap<usize, String>) -> Value {
    Value::Object(
        s.iter()
            .map(|(n, e)| (n.clone(), json!(content(e, values))))
            .collect(),
    )
}

/// name → content read (null: listed, gone when read).
fn render_obs(obs: &[Obs]) -> Value {
    let mut m = serde_json::Map::new();
    for o in obs {
        match o {
            Obs::Names(names) => {
                for n in names {
                    m.entry(n.clone()).or_insert(Value::Null);
                }
            }
            Obs::File(n, c) => {
                m.insert(n.clone(), json!(c));
            }
        }
    }
    Value::Object(m)
}

/// A change the owner was answered as done (possibly early), so one a
/// failed directory fsync may take back.
fn answered(o: &Op) -> bool {
    match o.f.as_str() {
        "create" => {
            o.ok() || (o.kind() == Kind::Info && o.value()["created"].as_bool() == Some(true))
        }
        "rename" | "unlink" => o.ok(),
        _ => false,
    }
}

fn retract(own: &[&Op], retracted: &mut [bool], from: usize, to: usize) {
    for (r, o) in retracted[from..to].iter_mut().zip(&own[from..to]) {
        if answered(o) {
            *r = true;
        }
    }
}

/// The owner's operations as model steps; also how many answers were
/// taken back. Errors the model has no place for are anomalies.
fn build(
    key: &str,
    own: &[&Op],
    final_sync_ok: bool,
    anomalies: &mut Vec<Value>,
) -> (Model, usize) {
    // A directory fsync reports (once) a change in the directory that did
    // not apply as answered; one that failed may have been that report.
    let mut retracted = vec![false; own.len()];
    let mut since = 0;
    for (i, o) in own.iter().enumerate() {
        if o.f == "fsync-dir" {
            if o.ok() {
                since = i + 1;
            } else {
                retract(own, &mut retracted, since, i);
            }
        }
    }
    if !final_sync_ok {
        retract(own, &mut retracted, since, own.len());
    }
    let mut m = Model {
        time: vec![0],
        ..Model::default()
    };
    for (i, o) in own.iter().enumerate() {
        let a = &o.invoke.value;
        let arg = |f: &str| a[f].as_str().unwrap_or("").to_string();
        let (name, from, to) = (arg("name"), arg("from"), arg("to"));
        let ino = o.invoke.index;
        let kind = if retracted[i] { Kind::Info } else { o.kind() };
        let errno = o.value()["errno"].as_i64();
        let expect = |want: i32| errno == Some(i64::from(want));
        let mut unexpected = false;
        match (o.f.as_str(), kind) {
            ("create", Kind::Ok) => {
                m.values.insert(ino, arg("value"));
                let change = Change::Create { name, ino };
                m.push(Step::Known { change, ok: true }, i, o);
                let change = Change::Write { ino };
                m.push(Step::Known { change, ok: true }, i, o);
            }
            ("create", Kind::Fail) if expect(libc::EEXIST) => {
                let change = Change::Create { name, ino };
                m.push(Step::Known { change, ok: false }, i, o);
            }
            ("create", Kind::Info) => {
                m.values.insert(ino, arg("value"));
                let created = if retracted[i] {
                    None
                } else {
                    o.value()["created"].as_bool()
                };
                let change = Change::Create { name, ino };
                if created == Some(true) {
                    m.push(Step::Known { change, ok: true }, i, o);
                } else {
                    m.pend(change, i, o);
                }
                if created != Some(false) {
                    m.pend(Change::Write { ino }, i, o);
                }
            }
            ("unlink", Kind::Ok) => {
                let change = Change::Unlink { name };
                m.push(Step::Known { change, ok: true }, i, o);
            }
            ("unlink", Kind::Fail) if expect(libc::ENOENT) => {
                let change = Change::Unlink { name };
                m.push(Step::Known { change, ok: false }, i, o);
            }
            ("unlink", Kind::Info) => m.pend(Change::Unlink { name }, i, o),
            ("rename", Kind::Ok) => {
                let change = Change::Rename { from, to };
                m.push(Step::Known { change, ok: true }, i, o);
            }
            ("rename", Kind::Fail) if expect(libc::ENOENT) => {
                let change = Change::Rename { from, to };
                m.push(Step::Known { change, ok: false }, i, o);
            }
            ("rename", Kind::Info) => m.pend(Change::Rename { from, to }, i, o),
            ("fsync-file", Kind::Ok) => m.push(Step::Exists { name, exists: true }, i, o),
            ("fsync-file", Kind::Fail) if expect(libc::ENOENT) => m.push(
                Step::Exists {
                    name,
                    exists: false,
                },
                i,
                o,
            ),
            (_, Kind::Fail) => unexpected = true,
            // Indeterminate fsyncs change nothing; a successful directory
            // fsync is a settle point (see the reads).
            _ => {}
        }
        if unexpected {
            anomalies.push(
                json!({"kind": "wrong-outcome", "dir": key, "op": o.invoke.index,
                "process": o.process, "f": o.f, "args": a, "got": o.value(),
                "detail": format!("{} failed with an error the model has no place for", o.f)}),
            );
        }
        m.op_end.push(m.steps.len());
    }
    let n = retracted.iter().filter(|r| **r).count();
    (m, n)
}

/// What an owner outcome that fits no candidate means.
fn describe(step: &Step, s: Option<&State>) -> (&'static str, String) {
    let made = |name: &str| {
        s.and_then(|s| s.get(name))
            .map(|e| format!(" (made by op {})", e.0))
            .unwrap_or_default()
    };
    match step {
        Step::Known {
            change: Change::Create { name, .. },
            ok: true,
        } => (
            "lost-change",
            format!(
                "create of {name} succeeded, but the model holds {name}{}",
                made(name.as_str())
            ),
        ),
        Step::Known {
            change: Change::Create { name, .. },
            ok: false,
        } => (
            "phantom",
            format!("create of {name} failed with EEXIST, but the model does not hold {name}"),
        ),
        Step::Known {
            change: Change::Unlink { name },
            ok: true,
        } => (
            "phantom",
            format!("unlink of {name} succeeded, but the model does not hold {name}"),
        ),
        Step::Known {
            change: Change::Unlink { name },
            ok: false,
        } => (
            "lost-change",
            format!(
                "unlink of {name} failed with ENOENT, but the model holds {name}{}",
                made(name.as_str())
            ),
        ),
        Step::Known {
            change: Change::Rename { from, to },
            ok: true,
        } => (
            "phantom",
            format!("rename of {from} to {to} succeeded, but the model does not hold {from}"),
        ),
        Step::Known {
            change: Change::Rename { from, to },
            ok: false,
        } => (
            "lost-change",
            format!(
                "rename of {from} to {to} failed with ENOENT, but the model holds {from}{}",
                made(from.as_str())
            ),
        ),
        Step::Exists { name, exists: true } => (
            "phantom",
            format!("{name} was opened for fsync, but the model does not hold it"),
        ),
        Step::Exists {
            name,
            exists: false,
        } => (
            "lost-change",
            format!(
                "opening {name} for fsync failed with ENOENT, but the model holds it{}",
                made(name.as_str())
            ),
        ),
        _ => (
            "wrong-outcome",
            "the outcome fits no state of the model".to_string(),
        ),
    }
}

/// The last few owner operations that named `name`.
fn last_ops_on(own: &[&Op], name: &str) -> Vec<usize> {
    let mut v: Vec<usize> = own
        .iter()
        .rev()
        .filter(|o| {
            let a = &o.invoke.value;
            a["name"] == name || a["from"] == name || a["to"] == name
        })
        .take(3)
        .map(|o| o.invoke.index)
        .collect();
    v.reverse();
    v
}

/// The final read fits no candidate: described against the closest one.
fn final_anomaly(key: &str, own: &[&Op], model: &Model, cands: &[Cand], obs: &[Obs]) -> Value {
    let names: BTreeSet<String> = match obs.first() {
        Some(Obs::Names(n)) => n.clone(),
        _ => BTreeSet::new(),
    };
    let read: BTreeMap<&str, Option<&str>> = obs
        .iter()
        .filter_map(|o| match o {
            Obs::File(n, c) => Some((n.as_str(), c.as_deref())),
            Obs::Names(_) => None,
        })
        .collect();
    let mut best: Option<(usize, Value)> = None;
    for c in cands {
        let missing: Vec<Value> = c
            .state
            .iter()
            .filter(|(n, _)| !names.contains(*n))
            .map(|(n, e)| json!({"name": n, "content": content(e, &model.values), "made_by": e.0}))
            .collect();
        let extra: Vec<Value> = names
            .iter()
            .filter(|n| !c.state.contains_key(*n))
            .map(|n| json!({"name": n, "last_ops": last_ops_on(own, n)}))
            .collect();
        let wrong: Vec<Value> = c
            .state
            .iter()
            .filter_map(|(n, e)| {
                let want = content(e, &model.values);
                match read.get(n.as_str()) {
                    Some(Some(got)) if *got != want => {
                        Some(json!({"name": n, "read": got, "expected": want, "made_by": e.0}))
                    }
                    Some(None) => Some(
                        json!({"name": n, "read": Value::Null, "expected": want, "made_by": e.0}),
                    ),
                    _ => None,
                }
            })
            .collect();
        let score = missing.len() + extra.len() + wrong.len();
        if let Some((s, _)) = &best {
            if *s <= score {
                continue;
            }
        }
        let kind = if !missing.is_empty() {
            "lost-change"
        } else if !extra.is_empty() {
            "phantom"
        } else {
            "wrong-content"
        };
        best = Some((
            score,
            json!({"kind": kind, "dir": key, "final": true, "missing": missing,
                "extra": extra, "wrong": wrong, "expected": render(&c.state, &model.values),
                "read": render_obs(obs)}),
        ));
    }
    match best {
        Some((_, v)) => v,
        None => json!({"kind": "lost-change", "dir": key, "final": true, "read": render_obs(obs)}),
    }
}

/// A read of a directory and the positions it may have seen.
struct ReadWindow<'a> {
    op: &'a Op,
    obs: Vec<Obs>,
    /// After the owner operations completed before the read began.
    strict: usize,
    /// After the owner operations settled (a successful fsync) before the
    /// read began.
    relaxed: usize,
    /// After the owner operations invoked before the read ended.
    hi: usize,
    /// The same three as counts of owner operations.
    settled_ops: usize,
    done_ops: usize,
    invoked_ops: usize,
}

#[derive(Default)]
struct DirResult {
    anomalies: Vec<Value>,
    unknown: bool,
    /// The final read: name → content.
    entries: Value,
    reads_checked: usize,
    /// Reads that fit only once unsettled changes may be invisible.
    reads_unsettled: usize,
    unsettled_examples: Vec<Value>,
    read_anomalies: usize,
    reads_unchecked: usize,
    retracted: usize,
    pending: usize,
    max_candidates: usize,
}

fn check_read(
    model: &Model,
    cands: &[Vec<Cand>],
    freed: usize,
    w: &ReadWindow,
    key: &str,
    own: &[&Op],
    out: &mut DirResult,
) {
    let indices = |from: usize, to: usize| -> Vec<usize> {
        own[from..to].iter().map(|o| o.invoke.index).collect()
    };
    match model.explain(cands, &w.obs, w.strict, w.hi) {
        None => out.unknown = true,
        Some(true) => out.reads_checked += 1,
        Some(false) => match model.explain(cands, &w.obs, w.relaxed, w.hi) {
            None => out.unknown = true,
            Some(true) => {
                out.reads_checked += 1;
                out.reads_unsettled += 1;
                if out.unsettled_examples.len() < REPORT_MAX {
                    out.unsettled_examples
                        .push(json!({"dir": key, "read": w.op.invoke.index,
                        "unsettled_ops": indices(w.settled_ops, w.done_ops)}));
                }
            }
            Some(false) => {
                out.read_anomalies += 1;
                if out.read_anomalies > REPORT_MAX {
                    return;
                }
                let from = w.relaxed.saturating_sub(STALE_LOOKBACK).max(freed);
                let stale =
                    from < w.relaxed && model.explain(cands, &w.obs, from, w.hi) == Some(true);
                let kind = if stale {
                    "stale-read"
                } else {
                    "inconsistent-read"
                };
                let expected: Vec<Value> = cands[w.strict]
                    .iter()
                    .take(3)
                    .map(|c| render(&c.state, &model.values))
                    .collect();
                out.anomalies.push(json!({
                    "kind": kind,
                    "dir": key, "read": w.op.invoke.index, "process": w.op.process,
                    "mount": w.op.value()["mount"], "saw": render_obs(&w.obs),
                    "owner_ops": indices(w.settled_ops, w.invoked_ops),
                    "expected_one_of": expected,
                }));
            }
        },
    }
}

fn check_dir(key: &str, own: &[&Op], reads: &[&Op], fin: Option<&Value>) -> DirResult {
    let mut out = DirResult::default();
    // The owner's fsync after the run: its first attempt succeeded.
    let final_sync_ok = fin
        .and_then(|d| d["sync_attempts"].as_array())
        .and_then(|a| a.first())
        .is_some_and(Value::is_null);
    let (model, retracted) = build(key, own, final_sync_ok, &mut out.anomalies);
    out.retracted = retracted;
    out.pending = model.pending.len();

    let mut windows: Vec<ReadWindow> = Vec::new();
    for r in reads.iter().filter(|r| r.ok()) {
        let (Some(end), Some(obs)) = (r.complete.as_ref(), observations(r.value())) else {
            continue;
        };
        let began = r.invoke.time;
        let done_ops = own
            .iter()
            .take_while(|o| o.complete.as_ref().is_some_and(|c| c.time < began))
            .count();
        let invoked_ops = own.iter().take_while(|o| o.invoke.time < end.time).count();
        let settled_ops = (0..done_ops)
            .rev()
            .find(|&k| own[k].ok() && (own[k].f == "fsync-dir" || own[k].f == "fsync-file"))
            .unwrap_or(0);
        windows.push(ReadWindow {
            op: r,
            obs,
            strict: model.after(done_ops),
            relaxed: model.after(settled_ops),
            hi: model.after(invoked_ops),
            settled_ops,
            done_ops,
            invoked_ops,
        });
    }
    windows.sort_by_key(|w| w.hi);
    // The lowest position a read from the k-th on needs.
    let mut keep_lo = vec![usize::MAX; windows.len() + 1];
    for (k, w) in windows.iter().enumerate().rev() {
        keep_lo[k] = keep_lo[k + 1].min(w.relaxed);
    }

    let total = model.steps.len();
    let mut cands: Vec<Vec<Cand>> = Vec::with_capacity(total + 1);
    cands.push(vec![Cand::default()]);
    let mut at = 0;
    let mut freed = 0;
    let mut next = 0;
    let mut stopped = false;
    loop {
        while next < windows.len() && windows[next].hi <= at {
            check_read(&model, &cands, freed, &windows[next], key, own, &mut out);
            next += 1;
        }
        // Positions no read needs any more are dropped.
        let keep = keep_lo[next].saturating_sub(STALE_LOOKBACK).min(at);
        while freed < keep {
            cands[freed] = Vec::new();
            freed += 1;
        }
        if at == total {
            break;
        }
        let stepped: Vec<Cand> = cands[at].iter().filter_map(|c| model.step(c, at)).collect();
        if stepped.is_empty() {
            let (step, k) = &model.steps[at];
            let o = own[*k];
            let (kind, detail) = describe(step, cands[at].first().map(|c| &c.state));
            let before: Vec<Value> = cands[at]
                .iter()
                .take(3)
                .map(|c| render(&c.state, &model.values))
                .collect();
            out.anomalies
                .push(json!({"kind": kind, "dir": key, "op": o.invoke.index,
                "process": o.process, "f": o.f, "args": o.invoke.value, "outcome": o.kind(),
                "got": o.value(), "model_before": before, "detail": detail}));
            stopped = true;
            break;
        }
        match model.close(stepped) {
            Some(v) => {
                out.max_candidates = out.max_candidates.max(v.len());
                cands.push(v);
                at += 1;
            }
            None => {
                out.unknown = true;
                stopped = true;
                break;
            }
        }
    }
    out.reads_unchecked = windows.len() - next;

    match fin.and_then(observations) {
        None => out
            .anomalies
            .push(json!({"kind": "final-read-failed", "dir": key,
            "error": fin.map(|d| d["error"].clone())})),
        Some(obs) => {
            out.entries = render_obs(&obs);
            if !stopped {
                match model.explain(&cands, &obs, total, total) {
                    None => out.unknown = true,
                    Some(true) => {}
                    Some(false) => {
                        out.anomalies
                            .push(final_anomaly(key, own, &model, &cands[total], &obs))
                    }
                }
            }
        }
    }
    out
}

pub fn check(events: &[Event], fin: &Value) -> Checked {
    let ops = pair(events);
    let mut owners: BTreeMap<String, Vec<&Op>> = BTreeMap::new();
    let mut readers: BTreeMap<String, Vec<&Op>> = BTreeMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    // Files a read opened whose inode another mount's change deleted
    // before the read (docs/filesystem.md, "Known gaps").
    let reclaimed_while_open: usize = ops
        .iter()
        .filter_map(|o| o.complete.as_ref())
        .filter_map(|c| c.value["reclaimed_while_open"].as_array().map(Vec::len))
        .sum();
    for o in &ops {
        *counts
            .entry(format!("{} {:?}", o.f, o.kind()).to_lowercase())
            .or_default() += 1;
        let Some(k) = &o.key else { continue };
        let to = if o.f == "read" {
            &mut readers
        } else {
            &mut owners
        };
        to.entry(k.clone()).or_default().push(o);
    }
    let finals: BTreeMap<String, &Value> = fin["dirs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| Some((d["dir"].as_str()?.to_string(), d)))
                .collect()
        })
        .unwrap_or_default();
    let mut keys: BTreeSet<String> = owners.keys().cloned().collect();
    keys.extend(readers.keys().cloned());
    keys.extend(finals.keys().cloned());

    let none: Vec<&Op> = Vec::new();
    let mut anomalies = Vec::new();
    // A file whose inode vanished under a reader's open descriptor is the
    // known gap only if its owner renamed or unlinked that name while the
    // read ran; otherwise an inode vanished that nothing removed.
    for (key, reads) in &readers {
        let own = owners.get(key).unwrap_or(&none);
        for r in reads {
            let Some(c) = &r.complete else { continue };
            let Some(gone) = c.value["reclaimed_while_open"].as_array() else {
                continue;
            };
            for name in gone.iter().filter_map(Value::as_str) {
                let removed_meanwhile = own.iter().any(|o| {
                    let v = &o.invoke.value;
                    let touches = match o.f.as_str() {
                        "rename" => v["from"] == name || v["to"] == name,
                        "unlink" => v["name"] == name,
                        _ => false,
                    };
                    touches
                        && o.invoke.time <= c.time
                        && o.complete
                            .as_ref()
                            .is_none_or(|oc| oc.time >= r.invoke.time)
                });
                if !removed_meanwhile {
                    anomalies.push(json!({
                        "kind": "inode-vanished",
                        "dir": key,
                        "read": r.invoke.index,
                        "name": name,
                        "why": "opened, then its inode was gone, and no rename or unlink of the name overlapped the read",
                    }));
                }
            }
        }
    }
    let mut unknown = false;
    let mut undecided = Vec::new();
    let mut entries = serde_json::Map::new();
    let mut unsettled_examples = Vec::new();
    let (mut reads_checked, mut reads_unsettled, mut read_anomalies, mut reads_unchecked) =
        (0usize, 0usize, 0usize, 0usize);
    let (mut retracted, mut pending, mut max_candidates) = (0usize, 0usize, 0usize);
    for key in &keys {
        let r = check_dir(
            key,
            owners.get(key).unwrap_or(&none),
            readers.get(key).unwrap_or(&none),
            finals.get(key).copied(),
        );
        anomalies.extend(r.anomalies);
        if r.unknown {
            unknown = true;
            undecided.push(key.clone());
        }
        entries.insert(key.clone(), r.entries);
        reads_checked += r.reads_checked;
        reads_unsettled += r.reads_unsettled;
        read_anomalies += r.read_anomalies;
        reads_unchecked += r.reads_unchecked;
        retracted += r.retracted;
        pending += r.pending;
        max_candidates = max_candidates.max(r.max_candidates);
        unsettled_examples.extend(r.unsettled_examples);
    }
    if finals.is_empty() {
        anomalies.push(json!({"kind": "no-final-read"}));
    }
    unsettled_examples.truncate(REPORT_MAX);
    let fsync_points = ops
        .iter()
        .filter(|o| (o.f == "fsync-dir" || o.f == "fsync-file") && o.ok())
        .count();
    let counter = |name: &str| fin["node_counters"][name].as_u64();
    Checked {
        valid: anomalies.is_empty() && !unknown,
        anomalies,
        summary: json!({
            "ops": counts,
            "fsync_points": fsync_points,
            "early_answers": counter("claudefs_meta_early_answers_total"),
            "sequenced": counter("claudefs_meta_sequenced_total"),
            "mispredicted": counter("claudefs_meta_mispredicted_total"),
            "reads_checked": reads_checked,
            "reclaimed_while_open": reclaimed_while_open,
            "reads_missing_unsettled_changes": reads_unsettled,
            "unsettled_examples": unsettled_examples,
            "read_anomalies": read_anomalies,
            "reads_unchecked": reads_unchecked,
            "answers_taken_back": retracted,
            "indeterminate_changes": pending,
            "max_candidates": max_candidates,
            "undecided_dirs": undecided,
            "final": entries,
        }),
        unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A history built in order, one microsecond per event.
    #[derive(Default)]
    struct H {
        ev: Vec<Event>,
    }

    impl H {
        fn add(&mut self, process: u64, kind: Kind, f: &str, key: &str, value: Value) -> &mut H {
            let index = self.ev.len();
            self.ev.push(Event {
                index,
                process,
                kind,
                f: f.to_string(),
                key: Some(key.to_string()),
                value,
                time: index as u64 * 1_000,
            });
            self
        }

        /// An owner operation of c0 (process 0) that completed with `kind`.
        fn op(&mut self, kind: Kind, f: &str, args: Value, done: Value) -> &mut H {
            self.add(0, Kind::Invoke, f, "c0", args);
            self.add(0, kind, f, "c0", done)
        }

        fn create(&mut self, name: &str, value: &str) -> &mut H {
            let a = json!({"name": name, "value": value});
            self.op(Kind::Ok, "create", a.clone(), a)
        }

        fn fsync_dir(&mut self, kind: Kind) -> &mut H {
            self.op(kind, "fsync-dir", Value::Null, Value::Null)
        }

        /// A read of c0 by process 1, invoked and completed here.
        fn read(&mut self, files: &[(&str, Option<&str>)]) -> &mut H {
            let names: Vec<&str> = files.iter().map(|f| f.0).collect();
            self.add(1, Kind::Invoke, "read", "c0", json!({"mount": 1}));
            self.add(
                1,
                Kind::Ok,
                "read",
                "c0",
                json!({"mount": 1, "names": names, "files": files}),
            )
        }
    }

    fn fin(files: &[(&str, Option<&str>)], synced: bool) -> Value {
        let names: Vec<&str> = files.iter().map(|f| f.0).collect();
        let first = if synced { Value::Null } else { json!("EIO") };
        json!({"dirs": [{"dir": "c0", "sync_attempts": [first], "names": names,
            "files": files}]})
    }

    fn kinds(c: &Checked) -> Vec<String> {
        c.anomalies
            .iter()
            .filter_map(|a| a["kind"].as_str().map(str::to_string))
            .collect()
    }

    #[test]
    fn a_clean_history_is_valid() {
        let mut h = H::default();
        h.create("f0", "0-1")
            .read(&[("f0", Some("0-1"))])
            .op(
                Kind::Ok,
                "rename",
                json!({"from": "f0", "to": "f3"}),
                json!({"from": "f0", "to": "f3"}),
            )
            .op(
                Kind::Fail,
                "unlink",
                json!({"name": "f0"}),
                json!({"errno": libc::ENOENT, "error": "No such file or directory"}),
            )
            .fsync_dir(Kind::Ok);
        let c = check(&h.ev, &fin(&[("f3", Some("0-1"))], true));
        assert!(c.valid, "{:?}", c.anomalies);
        assert_eq!(c.summary["fsync_points"].as_u64(), Some(1));
    }

    #[test]
    fn a_create_missing_at_the_end_is_lost() {
        let mut h = H::default();
        h.create("f0", "0-1").fsync_dir(Kind::Ok);
        let c = check(&h.ev, &fin(&[], true));
        assert_eq!(kinds(&c), ["lost-change"], "{:?}", c.anomalies);
    }

    #[test]
    fn eexist_on_a_free_name_is_a_phantom() {
        let mut h = H::default();
        h.op(
            Kind::Fail,
            "create",
            json!({"name": "f0", "value": "0-1"}),
            json!({"errno": libc::EEXIST, "error": "File exists"}),
        );
        let c = check(&h.ev, &fin(&[], true));
        assert_eq!(kinds(&c), ["phantom"], "{:?}", c.anomalies);
    }

    #[test]
    fn a_read_missing_a_settled_create_is_stale() {
        let mut h = H::default();
        h.create("f0", "0-1").fsync_dir(Kind::Ok).read(&[]);
        let c = check(&h.ev, &fin(&[("f0", Some("0-1"))], true));
        assert_eq!(kinds(&c), ["stale-read"], "{:?}", c.anomalies);
    }

    #[test]
    fn a_read_may_miss_an_unsettled_change_but_it_is_counted() {
        let mut h = H::default();
        h.create("f0", "0-1").read(&[]).fsync_dir(Kind::Ok);
        let c = check(&h.ev, &fin(&[("f0", Some("0-1"))], true));
        assert!(c.valid, "{:?}", c.anomalies);
        assert_eq!(
            c.summary["reads_missing_unsettled_changes"].as_u64(),
            Some(1)
        );
    }

    #[test]
    fn a_read_during_a_create_may_see_the_file_empty() {
        let mut h = H::default();
        let a = json!({"name": "f0", "value": "0-1"});
        h.add(0, Kind::Invoke, "create", "c0", a.clone())
            .read(&[("f0", Some(""))])
            .add(0, Kind::Ok, "create", "c0", a);
        let c = check(&h.ev, &fin(&[("f0", Some("0-1"))], true));
        assert!(c.valid, "{:?}", c.anomalies);
    }

    #[test]
    fn an_indeterminate_create_may_or_may_not_have_happened() {
        let run = |files: &[(&str, Option<&str>)]| {
            let mut h = H::default();
            h.op(
                Kind::Info,
                "create",
                json!({"name": "f0", "value": "0-1"}),
                json!({"errno": libc::EIO, "error": "EIO", "created": false}),
            );
            check(&h.ev, &fin(files, true))
        };
        assert!(run(&[]).valid);
        assert!(run(&[("f0", Some(""))]).valid);
        // Its open failed, so nothing was written.
        assert!(!run(&[("f0", Some("0-1"))]).valid);
    }

    #[test]
    fn an_indeterminate_unlink_may_take_effect_later() {
        let run = |files: &[(&str, Option<&str>)]| {
            let mut h = H::default();
            h.create("f0", "0-1")
                .op(
                    Kind::Info,
                    "unlink",
                    json!({"name": "f0"}),
                    json!({"errno": libc::EIO, "error": "EIO", "created": false}),
                )
                .op(
                    Kind::Ok,
                    "fsync-file",
                    json!({"name": "f0"}),
                    json!({"name": "f0"}),
                )
                .fsync_dir(Kind::Ok);
            check(&h.ev, &fin(files, true))
        };
        assert!(run(&[]).valid);
        assert!(run(&[("f0", Some("0-1"))]).valid);
        assert!(!run(&[("f1", Some("0-1"))]).valid);
    }

    #[test]
    fn a_failed_directory_fsync_takes_answers_back() {
        let mut h = H::default();
        h.create("f0", "0-1").fsync_dir(Kind::Info);
        let c = check(&h.ev, &fin(&[], true));
        assert!(c.valid, "{:?}", c.anomalies);
        assert_eq!(c.summary["answers_taken_back"].as_u64(), Some(1));
        // Without the failed fsync after the run either, still taken back.
        let mut h = H::default();
        h.create("f0", "0-1");
        assert!(check(&h.ev, &fin(&[], false)).valid);
        // Confirmed by the final fsync: lost.
        assert!(!check(&h.ev, &fin(&[], true)).valid);
    }
}
