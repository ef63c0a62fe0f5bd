//! Cross-shard transactions driven through the real coordinator
//! (`tx::execute`), the real apply code and RocksDB, with a log per shard
//! kept in memory. The coordinator "crashes" after each of its proposals in
//! turn (every later proposal of it fails, as when its process is killed);
//! recovery then completes the transaction and the client retries the same
//! operation id on another coordinator. Every run must end in the same tree
//! as a run without a crash, with the namespace invariants intact, no
//! transaction left open, and a log that replays to the same database.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cfs_log::{Entry, RequestId};
use cfs_materializers::check::check;
use cfs_materializers::materializer::{apply_batch, entry, init_shard};
use cfs_materializers::ops::{Applied, ApplyResult, LoggedOp, Op};
use cfs_materializers::read::NsRead;
use cfs_materializers::tx::{self, TxId};
use cfs_materializers::types::*;
use cfs_materializers::NamespaceDb;
use cfs_meta::coordinator::{self as coord, Cluster};

const SHARDS: [ShardId; 3] = [ShardId(0), ShardId(1), ShardId(2)];
const CLIENT: u64 = 0xc1;

struct Sim {
    _dir: tempfile::TempDir,
    db: NamespaceDb,
    logs: Mutex<BTreeMap<ShardId, Vec<Entry>>>,
    coordinator: AtomicU64,
    seq: AtomicU64,
    clock: AtomicI64,
    /// Proposals accepted before the coordinator "crashes".
    budget: AtomicUsize,
    /// Proposals accepted so far.
    proposals: AtomicUsize,
    /// Yield to other tasks before each proposal (interleaves coordinators).
    yields: bool,
}

impl Sim {
    fn new() -> Sim {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = NamespaceDb::open(&dir.path().join("ns")).expect("open");
        for s in SHARDS {
            init_shard(&db, s).expect("init");
        }
        Sim {
            _dir: dir,
            db,
            logs: Mutex::default(),
            coordinator: AtomicU64::new(1),
            seq: AtomicU64::new(1),
            clock: AtomicI64::new(1_000_000_000),
            budget: AtomicUsize::new(usize::MAX),
            proposals: AtomicUsize::new(0),
            yields: false,
        }
    }

    fn apply(&self, shard: ShardId, e: Entry) -> ApplyResult {
        let mut logs = self.logs.lock().unwrap();
        let log = logs.entry(shard).or_default();
        let pos = Position(log.len() as u64);
        log.push(e.clone());
        let (outcomes, _) = apply_batch(&self.db, shard, &[(pos, e)]).expect("apply");
        outcomes.into_iter().next().expect("one outcome").1
    }

    /// A new coordinator process (ids and budget reset).
    fn restart_coordinator(&self) {
        self.coordinator.fetch_add(1, Ordering::SeqCst);
        self.budget.store(usize::MAX, Ordering::SeqCst);
    }

    async fn run(&self, op: Op, op_id: u64) -> Result<ApplyResult, Errno> {
        let creds = Creds {
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        coord::execute(self, CLIENT, op_id, creds, op, false).await
    }
}

impl Cluster for Sim {
    async fn propose(&self, shard: ShardId, lop: LoggedOp) -> Result<ApplyResult, Errno> {
        if self.yields {
            tokio::task::yield_now().await;
        }
        let left = self.budget.load(Ordering::SeqCst);
        if left == 0 {
            return Err(Errno::EIO);
        }
        self.budget.store(left.saturating_sub(1), Ordering::SeqCst);
        self.proposals.fetch_add(1, Ordering::SeqCst);
        let id = RequestId {
            client: lop.client,
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
        };
        Ok(self.apply(shard, entry(id, &lop)))
    }
    async fn barrier(&self, _shard: ShardId) -> Result<(), Errno> {
        Ok(())
    }
    fn db(&self) -> &NamespaceDb {
        &self.db
    }
    fn shards(&self) -> &[ShardId] {
        &SHARDS
    }
    fn next_id(&self) -> (u64, u64) {
        (
            self.coordinator.load(Ordering::SeqCst),
            self.seq.fetch_add(1, Ordering::SeqCst),
        )
    }
    fn now(&self) -> Nanos {
        self.clock.fetch_add(1000, Ordering::SeqCst)
    }
}

fn dir(parent: Ino, name: &str) -> Op {
    Op::Create {
        parent,
        name: name.into(),
        mode: libc::S_IFDIR | 0o755,
        umask: 0,
        rdev: 0,
        target: None,
        excl: true,
        ino: None,
    }
}

fn file(parent: Ino, name: &str) -> Op {
    Op::Create {
        parent,
        name: name.into(),
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        rdev: 0,
        target: None,
        excl: true,
        ino: None,
    }
}

/// A directory name in `parent` that placement puts on `shard`.
fn name_on(parent: Ino, shard: ShardId, stem: &str) -> String {
    (0..)
        .map(|i| format!("{stem}{i}"))
        .find(|n| tx::place_dir(parent, n.as_bytes(), &SHARDS) == shard)
        .expect("some name lands on every shard")
}

fn ino_of(r: Result<ApplyResult, Errno>) -> Ino {
    match r {
        Ok(Ok(Applied::Attr(i))) => i.ino,
        other => panic!("expected an inode, got {other:?}"),
    }
}

/// The tree as paths → (kind, nlink, size, mode), without inode numbers
/// (which differ between attempts) or times.
fn tree(db: &NamespaceDb) -> BTreeMap<String, (u32, u32, u64, u32)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![(ROOT_INO, String::new())];
    while let Some((d, path)) = todo.pop() {
        for e in db.readdir(d, 0, usize::MAX).expect("readdir") {
            let i = db.inode(e.ino).expect("entry's inode");
            let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
            out.insert(p.clone(), (i.kind(), i.nlink, i.size, i.mode));
            if i.is_dir() {
                todo.push((i.ino, p));
            }
        }
    }
    out
}

/// Base tree: /a on shard 1 with a file f and a subdirectory s (shard 2)
/// holding a file; /b on shard 2 with a file g and an empty directory e on
/// shard 0; every operation below spans shards.
struct Base {
    a: Ino,
    b: Ino,
    sname: String,
    ename: String,
}

async fn base(sim: &Sim) -> Base {
    let aname = name_on(ROOT_INO, ShardId(1), "a");
    let a = ino_of(sim.run(dir(ROOT_INO, &aname), 1).await);
    let bname = name_on(ROOT_INO, ShardId(2), "b");
    let b = ino_of(sim.run(dir(ROOT_INO, &bname), 2).await);
    assert_eq!((shard_of(a), shard_of(b)), (ShardId(1), ShardId(2)));
    ino_of(sim.run(file(a, "f"), 3).await);
    let sname = name_on(a, ShardId(2), "s");
    let s = ino_of(sim.run(dir(a, &sname), 4).await);
    assert_eq!(shard_of(s), ShardId(2));
    ino_of(sim.run(file(s, "inner"), 5).await);
    let mut g = file(b, "g");
    if let Op::Create { mode, .. } = &mut g {
        *mode = libc::S_IFREG | 0o600;
    }
    ino_of(sim.run(g, 6).await);
    let ename = name_on(b, ShardId(0), "e");
    let e = ino_of(sim.run(dir(b, &ename), 7).await);
    assert_eq!(shard_of(e), ShardId(0));
    Base { a, b, sname, ename }
}

fn scenarios(b: &Base) -> Vec<(&'static str, Vec<Op>)> {
    let ren = |parent, name: &str, newparent, newname: &str, flags| Op::Rename {
        parent,
        name: name.into(),
        newparent,
        newname: newname.into(),
        flags,
        held_open: vec![],
    };
    vec![
        (
            "mkdir on another shard",
            vec![dir(b.b, &name_on(b.b, ShardId(1), "new"))],
        ),
        (
            "rmdir of a directory on another shard",
            vec![Op::Rmdir {
                parent: b.b,
                name: b.ename.clone().into(),
            }],
        ),
        (
            "rename a file across shards",
            vec![ren(b.a, "f", b.b, "f2", 0)],
        ),
        (
            "rename a file over one on another shard",
            vec![ren(b.a, "f", b.b, "g", 0)],
        ),
        (
            "rename a directory across shards",
            vec![ren(b.a, &b.sname, b.b, "moved", 0)],
        ),
        (
            "rename a directory over an empty one",
            vec![ren(b.a, &b.sname, b.b, &b.ename, 0)],
        ),
        (
            "exchange across shards",
            vec![ren(b.a, "f", b.b, "g", libc::RENAME_EXCHANGE)],
        ),
        (
            "link across shards",
            vec![Op::Link {
                ino: 0, // filled in below
                parent: b.b,
                name: "h".into(),
            }],
        ),
        (
            "unlink a name whose inode is on another shard",
            vec![
                ren(b.a, "f", b.b, "f2", 0),
                Op::Unlink {
                    parent: b.b,
                    name: "f2".into(),
                    held_open: vec![],
                },
            ],
        ),
    ]
}

fn fill_link(op: Op, db: &NamespaceDb, a: Ino) -> Op {
    match op {
        Op::Link {
            ino: 0,
            parent,
            name,
        } => Op::Link {
            ino: db.lookup(a, b"f").expect("a/f").ino,
            parent,
            name,
        },
        op => op,
    }
}

fn assert_clean(db: &NamespaceDb, what: &str) {
    let r = check(db).expect("check");
    assert!(r.problems.is_empty(), "{what}: {:#?}", r.problems);
    assert_eq!(r.open_transactions, 0, "{what}: transactions left open");
}

/// Replays every shard's log into a fresh database: same bytes.
fn assert_replays(sim: &Sim, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(&dir.path().join("ns")).unwrap();
    for s in SHARDS {
        init_shard(&db, s).unwrap();
    }
    // Shards are applied one after another here but interleaved live: the
    // result must not depend on it (each shard only touches its own keys).
    for (shard, log) in sim.logs.lock().unwrap().iter() {
        let entries: Vec<_> = log
            .iter()
            .cloned()
            .enumerate()
            .map(|(p, e)| (Position(p as u64), e))
            .collect();
        apply_batch(&db, *shard, &entries).unwrap();
    }
    let strip = |d: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<_> {
        d.into_iter().filter(|(k, _)| k[0] != b'a').collect()
    };
    assert!(
        strip(db.dump().unwrap()) == strip(sim.db.dump().unwrap()),
        "{what}: replay differs"
    );
}

#[tokio::test]
async fn a_coordinator_crash_after_any_step_ends_in_all_or_nothing() {
    let ref_sim = Sim::new();
    let b = base(&ref_sim).await;
    let n = scenarios(&b).len();
    for si in 0..n {
        // The reference: no crash. Count the proposals of the last op.
        let sim = Sim::new();
        let bb = base(&sim).await;
        let (name, ops) = scenarios(&bb).swap_remove(si);
        let last = ops.len() - 1;
        for (k, op) in ops.iter().enumerate() {
            let op = fill_link(op.clone(), &sim.db, bb.a);
            if k == last {
                break;
            }
            sim.run(op, 100 + k as u64).await.unwrap().unwrap();
        }
        let before = tree(&sim.db);
        let op = fill_link(ops[last].clone(), &sim.db, bb.a);
        let start = sim.proposals.load(Ordering::SeqCst);
        let want = sim.run(op.clone(), 200).await.unwrap();
        assert!(want.is_ok(), "{name}: {want:?}");
        let after = tree(&sim.db);
        assert_ne!(before, after, "{name}: the operation changed nothing");
        assert_clean(&sim.db, name);
        assert_replays(&sim, name);
        let steps = sim.proposals.load(Ordering::SeqCst) - start;
        assert!(steps >= 4, "{name}: only {steps} steps: not cross-shard?");

        for crash_after in 0..steps {
            let sim = Sim::new();
            let bb = base(&sim).await;
            for (k, op) in ops.iter().enumerate().take(last) {
                let op = fill_link(op.clone(), &sim.db, bb.a);
                sim.run(op, 100 + k as u64).await.unwrap().unwrap();
            }
            let op = fill_link(ops[last].clone(), &sim.db, bb.a);
            sim.budget.store(crash_after, Ordering::SeqCst);
            let crashed = sim.run(op.clone(), 200).await;
            let what = format!("{name}, crash after {crash_after} proposals");
            assert_eq!(crashed, Err(Errno::EIO), "{what}: did not crash");
            // Another node recovers what the dead coordinator left open.
            sim.restart_coordinator();
            sim.clock.fetch_add(60_000_000_000, Ordering::SeqCst);
            coord::recover(&sim, Duration::from_secs(5)).await.unwrap();
            assert_clean(&sim.db, &what);
            let mid = tree(&sim.db);
            assert!(mid == before || mid == after, "{what}: a partial result");
            // The client retries the same operation id elsewhere.
            let retried = sim.run(op, 200).await.unwrap();
            assert!(retried.is_ok(), "{what}: retry gave {retried:?}");
            assert_eq!(tree(&sim.db), after, "{what}: final tree");
            assert_clean(&sim.db, &what);
            assert_replays(&sim, &what);
        }
    }
}

#[tokio::test]
async fn concurrent_crossing_renames_never_make_a_cycle() {
    for round in 0..20u64 {
        let mut sim = Sim::new();
        sim.yields = true;
        let b = base(&sim).await;
        // a/s moves into b while b moves into a/s: at most one may win.
        let sname = b.sname.clone();
        let s = sim.db.lookup(b.a, sname.as_bytes()).unwrap().ino;
        let bname = sim.db.inode(b.b).unwrap();
        let bname = sim
            .db
            .readdir(ROOT_INO, 0, 100)
            .unwrap()
            .into_iter()
            .find(|e| e.ino == bname.ino)
            .unwrap()
            .name;
        let one = Op::Rename {
            parent: b.a,
            name: sname.into(),
            newparent: b.b,
            newname: format!("x{round}").into(),
            flags: 0,
            held_open: vec![],
        };
        let two = Op::Rename {
            parent: ROOT_INO,
            name: bname,
            newparent: s,
            newname: "y".into(),
            flags: 0,
            held_open: vec![],
        };
        let (r1, r2) = if round % 2 == 0 {
            tokio::join!(sim.run(one, 300), sim.run(two, 301))
        } else {
            let (r2, r1) = tokio::join!(sim.run(two, 301), sim.run(one, 300));
            (r1, r2)
        };
        let ok = [&r1, &r2].iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert!(
            ok <= 1,
            "round {round}: both renames succeeded: {r1:?} {r2:?}"
        );
        assert!(ok == 1, "round {round}: neither succeeded: {r1:?} {r2:?}");
        assert_clean(&sim.db, &format!("round {round}"));
        assert_replays(&sim, &format!("round {round}"));
    }
}

/// Directories within `DEFAULT_SPREAD_DEPTH` levels of the root spread over
/// the shards; deeper ones stay on their parent's shard, so their mkdir
/// and rmdir are one log commit each.
#[tokio::test]
async fn deep_directories_stay_on_their_parents_shard() {
    assert_eq!(tx::DEFAULT_SPREAD_DEPTH, 2);
    let sim = Sim::new();
    let top = ino_of(
        sim.run(dir(ROOT_INO, &name_on(ROOT_INO, ShardId(1), "t")), 1)
            .await,
    );
    assert_eq!(shard_of(top), ShardId(1));
    let mid = ino_of(sim.run(dir(top, &name_on(top, ShardId(2), "m")), 2).await);
    assert_eq!(shard_of(mid), ShardId(2), "depth 2 is still spread");
    let mut op_id = 10;
    for i in 0..30 {
        let before = sim.proposals.load(Ordering::SeqCst);
        let deep = ino_of(sim.run(dir(mid, &format!("d{i}")), op_id).await);
        assert_eq!(
            shard_of(deep),
            ShardId(2),
            "depth 3 inherits its parent's shard"
        );
        let deeper = ino_of(sim.run(dir(deep, "x"), op_id + 1).await);
        assert_eq!(shard_of(deeper), ShardId(2));
        let r = sim
            .run(
                Op::Rmdir {
                    parent: deep,
                    name: "x".into(),
                },
                op_id + 2,
            )
            .await;
        assert!(matches!(r, Ok(Ok(_))), "{r:?}");
        assert_eq!(
            sim.proposals.load(Ordering::SeqCst) - before,
            3,
            "mkdir, mkdir, rmdir: one commit each"
        );
        op_id += 3;
    }
    assert_clean(&sim.db, "deep mkdir");
    assert_replays(&sim, "deep mkdir");
}

/// Inode numbers whose last byte is 0xff make prefix scans end at a
/// shorter key (`prefix_end`); a cross-shard rmdir of such a directory
/// (it scans the directory's xattrs, extents and locks) must still prepare.
#[tokio::test]
async fn rmdir_of_an_inode_number_ending_in_ff() {
    let sim = Sim::new();
    let parent = ino_of(
        sim.run(dir(ROOT_INO, &name_on(ROOT_INO, ShardId(2), "p")), 1)
            .await,
    );
    let ino = make_ino(ShardId(1), (1 << 47) | 0x0012_34ff);
    let lop = LoggedOp {
        client: CLIENT,
        op_id: 2,
        creds: Creds {
            uid: 0,
            gid: 0,
            groups: vec![],
        },
        now: sim.now(),
        op: dir(parent, "x"),
    };
    let planned = tx::plan(&sim.db, &lop, Some(ino)).unwrap();
    assert!(planned.outcome.is_ok());
    let end = coord::run_tx(
        &sim,
        TxId::new(9, 9),
        ShardId(2),
        planned.parts,
        &lop,
        planned.outcome,
        None,
    )
    .await
    .unwrap();
    assert!(matches!(end, coord::TxEnd::Committed));
    assert_eq!(sim.db.lookup(parent, b"x").unwrap().ino, ino);
    let r = sim
        .run(
            Op::Rmdir {
                parent,
                name: "x".into(),
            },
            3,
        )
        .await;
    assert!(matches!(r, Ok(Ok(_))), "{r:?}");
    assert_clean(&sim.db, "rmdir");
    assert_replays(&sim, "rmdir");
}

fn step(sim: &Sim, op: Op) -> LoggedOp {
    let (coordinator, op_id) = sim.next_id();
    LoggedOp {
        client: coordinator,
        op_id,
        creds: Creds {
            uid: 0,
            gid: 0,
            groups: vec![],
        },
        now: sim.now(),
        op,
    }
}

/// A coordinator that stalls after prepare while recovery aborts its
/// transaction must not be able to commit it afterwards: neither with a
/// late decision (interleaving A) nor after a late prepare of the home
/// shard (interleaving B). Found in review.
#[tokio::test]
async fn a_slow_coordinator_cannot_commit_after_recovery_aborted() {
    for late_home_prepare in [false, true] {
        let sim = Sim::new();
        let name = name_on(ROOT_INO, ShardId(1), "late");
        let lop = LoggedOp {
            client: CLIENT,
            op_id: 7,
            creds: Creds {
                uid: 0,
                gid: 0,
                groups: vec![],
            },
            now: sim.now(),
            op: dir(ROOT_INO, &name),
        };
        let tx = TxId::new(0x51, 1);
        let planned = tx::plan(&sim.db, &lop, Some(tx::tx_ino(ShardId(1), tx))).unwrap();
        let participants: Vec<ShardId> = planned.parts.keys().copied().collect();
        assert_eq!(participants, vec![ShardId(0), ShardId(1)]);
        let prepare = |shard: ShardId| Op::TxPrepare {
            tx,
            shard,
            home: ShardId(0),
            participants: participants.clone(),
            part: planned.parts[&shard].clone(),
        };
        // Prepared on the remote shard, and (A) on the home shard too.
        assert!(sim
            .propose(ShardId(1), step(&sim, prepare(ShardId(1))))
            .await
            .unwrap()
            .is_ok());
        if !late_home_prepare {
            assert!(sim
                .propose(ShardId(0), step(&sim, prepare(ShardId(0))))
                .await
                .unwrap()
                .is_ok());
        }
        // The coordinator stalls; recovery aborts.
        sim.clock.fetch_add(60_000_000_000, Ordering::SeqCst);
        coord::recover(&sim, Duration::from_secs(5)).await.unwrap();
        if late_home_prepare {
            // (B) The home shard's prepare lands late: refused.
            let r = sim
                .propose(ShardId(0), step(&sim, prepare(ShardId(0))))
                .await
                .unwrap();
            assert_eq!(r, Err(Errno::ESTALE), "late home prepare");
        }
        // The late decision cannot commit.
        let decide = Op::TxDecide {
            tx,
            shard: ShardId(0),
            commit: true,
            client: CLIENT,
            op_id: 7,
            outcome: planned.outcome.clone(),
            participants: participants.clone(),
        };
        match sim.propose(ShardId(0), step(&sim, decide)).await.unwrap() {
            Ok(Applied::Decision { commit, .. }) => assert!(!commit, "late commit won"),
            other => panic!("{other:?}"),
        }
        coord::finish_all(
            &sim,
            tx,
            ShardId(0),
            &participants,
            false,
            coord::Finisher::Recovery,
        )
        .await
        .unwrap();
        assert!(
            sim.db.lookup(ROOT_INO, name.as_bytes()).is_err(),
            "half-made mkdir"
        );
        assert_clean(&sim.db, "after the late coordinator");
        // The client's retry then makes the directory, once.
        let r = sim.run(dir(ROOT_INO, &name), 7).await;
        assert!(matches!(r, Ok(Ok(Applied::Attr(_)))), "{r:?}");
        assert!(sim.db.lookup(ROOT_INO, name.as_bytes()).is_ok());
        assert_clean(&sim.db, "after the retry");
        assert_replays(&sim, "late coordinator");
    }
}
