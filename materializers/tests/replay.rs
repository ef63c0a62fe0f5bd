//! The materializer is a deterministic function of the log: applying the
//! same entries in different batchings, with a crash (reopen) in between,
//! or from scratch gives byte-identical databases.

use cfs_log::{Entry, RequestId};
use cfs_materializers::materializer::{apply_batch, entry, init_shard};
use cfs_materializers::ops::{LoggedOp, Op};
use cfs_materializers::read::NsRead;
use cfs_materializers::types::*;
use cfs_materializers::NamespaceDb;

fn rng(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

/// A random but plausible stream of operations on a small tree.
fn ops(n: usize, mut seed: u64) -> Vec<Entry> {
    let names: Vec<Vec<u8>> = ["a", "b", "c", "dd", "e"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    let mut out = Vec::new();
    for i in 0..n {
        // A new leadership term (its barrier) in the middle of the run.
        if i == n * 3 / 4 {
            out.push(Entry::barrier());
        }
        let r = rng(&mut seed);
        let ino = make_ino(ShardId(0), 1 + rng(&mut seed) % 12);
        let parent = if r.is_multiple_of(3) {
            ROOT_INO
        } else {
            make_ino(ShardId(0), 2 + rng(&mut seed) % 10)
        };
        let name = names[(rng(&mut seed) % names.len() as u64) as usize].clone();
        let op = match r % 9 {
            0 => Op::Create {
                parent,
                name,
                mode: libc::S_IFDIR | 0o755,
                umask: 0,
                rdev: 0,
                target: None,
                excl: true,
                ino: None,
            },
            1 | 2 => Op::Create {
                parent,
                name,
                mode: libc::S_IFREG | 0o644,
                umask: 0,
                rdev: 0,
                target: None,
                excl: r.is_multiple_of(2),
                // Now and then a replay's number, mostly refused.
                ino: r
                    .is_multiple_of(7)
                    .then(|| make_ino(ShardId(0), rng(&mut seed) % (1 << 18))),
            },
            3 => Op::Unlink {
                parent,
                name,
                // Sometimes the file is held open (it becomes an orphan).
                held_open: if r.is_multiple_of(3) {
                    vec![ino]
                } else {
                    vec![]
                },
            },
            4 => Op::Rmdir { parent, name },
            5 => Op::Rename {
                parent,
                name,
                newparent: if r.is_multiple_of(2) {
                    ROOT_INO
                } else {
                    parent
                },
                newname: names[(r % 5) as usize].clone(),
                flags: 0,
                held_open: if r.is_multiple_of(3) {
                    vec![ino]
                } else {
                    vec![]
                },
            },
            6 => Op::Link { ino, parent, name },
            7 => Op::SetAttr {
                ino,
                set: SetAttr {
                    mode: Some(0o600),
                    size: Some(r % 5000),
                    ..Default::default()
                },
            },
            _ => Op::SetXattr {
                ino,
                name: b"user.k".to_vec(),
                value: vec![r as u8; 10],
                flags: 0,
            },
        };
        let lop = LoggedOp {
            client: 7,
            op_id: i as u64 + 1,
            creds: Creds {
                uid: (r % 2) as u32 * 1000,
                gid: 0,
                groups: vec![],
            },
            now: 1_700_000_000_000_000_000 + i as i64,
            op,
        };
        out.push(entry(
            RequestId {
                client: 1,
                seq: i as u64 + 1,
            },
            &lop,
        ));
    }
    out
}

fn apply_all(db: &NamespaceDb, entries: &[Entry], batch: usize, from: usize) {
    let mut pos = from;
    while pos < entries.len() {
        let end = (pos + batch).min(entries.len());
        let b: Vec<(Position, Entry)> = (pos..end)
            .map(|p| (Position(p as u64), entries[p].clone()))
            .collect();
        apply_batch(db, ShardId(0), &b).expect("apply");
        pos = end;
    }
}

#[test]
fn batching_crash_and_replay_agree() {
    let entries = ops(3000, 42);
    let dir = tempfile::tempdir().unwrap();
    // One entry per batch.
    let a = NamespaceDb::open(&dir.path().join("a")).unwrap();
    init_shard(&a, ShardId(0)).unwrap();
    apply_all(&a, &entries, 1, 0);
    // Big batches, with a "crash" (close and reopen) half way: resumes
    // from the persisted applied position.
    let bpath = dir.path().join("b");
    {
        let b = NamespaceDb::open(&bpath).unwrap();
        init_shard(&b, ShardId(0)).unwrap();
        apply_all(&b, &entries[..1700], 97, 0);
    }
    let b = NamespaceDb::open(&bpath).unwrap();
    init_shard(&b, ShardId(0)).unwrap();
    let resume = b.applied(ShardId(0)).unwrap().get() as usize;
    assert_eq!(resume, 1700);
    apply_all(&b, &entries, 512, resume);
    let (da, db) = (a.dump().unwrap(), b.dump().unwrap());
    assert!(
        da.len() > 50,
        "the stream should build a non-trivial tree ({} keys)",
        da.len()
    );
    assert_eq!(da, db);
    // Re-applying a retried op (same client and op id) changes nothing.
    let again: Vec<(Position, Entry)> = vec![(Position(3000), entries[10].clone())];
    apply_batch(&b, ShardId(0), &again).unwrap();
    let mut after = b.dump().unwrap();
    after.retain(|(k, _)| k[0] != b'a');
    let mut before = db.clone();
    before.retain(|(k, _)| k[0] != b'a');
    assert_eq!(before, after);
}

/// Applies `op` by client 1 as the entry at position `pos` (the next one).
fn apply_one(
    db: &NamespaceDb,
    pos: u64,
    creds: Creds,
    op: Op,
) -> cfs_materializers::ops::ApplyResult {
    apply_as(db, pos, 1, pos as i64, creds, op)
}

/// A regular file `name` in the root, created exclusively.
fn create(name: &str) -> Op {
    Op::Create {
        parent: ROOT_INO,
        name: name.as_bytes().to_vec(),
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        rdev: 0,
        target: None,
        excl: true,
        ino: None,
    }
}

/// The inode an operation answered with.
fn ino_of(r: cfs_materializers::ops::ApplyResult) -> Ino {
    match r {
        Ok(cfs_materializers::ops::Applied::Attr(i)) => i.ino,
        other => panic!("expected an inode, got {other:?}"),
    }
}

/// Applies `op` by `client`, stamped `now`, as the entry at `pos`.
fn apply_as(
    db: &NamespaceDb,
    pos: u64,
    client: u64,
    now: i64,
    creds: Creds,
    op: Op,
) -> cfs_materializers::ops::ApplyResult {
    let lop = LoggedOp {
        client,
        op_id: 0,
        creds,
        now,
        op,
    };
    let e = entry(RequestId { client, seq: pos }, &lop);
    let (r, _) = apply_batch(db, ShardId(0), &[(Position(pos), e)]).unwrap();
    r[0].1.clone()
}

#[test]
fn posix_errors_are_decided_at_apply() {
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let mut n = 0u64;
    let mut run = |uid: u32, op: Op| {
        n += 1;
        let creds = Creds {
            uid,
            gid: uid,
            groups: vec![],
        };
        apply_one(&db, n, creds, op)
    };
    let mk = |name: &str, mode: u32| Op::Create {
        parent: ROOT_INO,
        name: name.as_bytes().to_vec(),
        mode,
        umask: 0,
        rdev: 0,
        target: None,
        excl: true,
        ino: None,
    };
    assert!(run(0, mk("d", libc::S_IFDIR | 0o1777)).is_ok());
    assert_eq!(run(0, mk("d", libc::S_IFREG | 0o644)), Err(Errno::EEXIST));
    assert_eq!(
        run(0, mk(&"x".repeat(256), libc::S_IFREG)),
        Err(Errno::ENAMETOOLONG)
    );
    assert_eq!(run(0, mk("a/b", libc::S_IFREG)), Err(Errno::EINVAL));
    assert_eq!(
        run(1000, mk("f", libc::S_IFREG | 0o644)),
        Err(Errno::EACCES),
        "root dir is 0755"
    );
    assert_eq!(
        run(
            0,
            Op::Unlink {
                parent: ROOT_INO,
                name: b"nope".to_vec(),
                held_open: vec![],
            }
        ),
        Err(Errno::ENOENT)
    );
    assert_eq!(
        run(
            0,
            Op::Unlink {
                parent: ROOT_INO,
                name: b"d".to_vec(),
                held_open: vec![],
            }
        ),
        Err(Errno::EISDIR)
    );
    // Sticky directory: user 1001 cannot remove user 1000's file.
    let d = make_ino(ShardId(0), 2);
    assert!(run(
        1000,
        Op::Create {
            parent: d,
            name: b"f".to_vec(),
            mode: libc::S_IFREG | 0o644,
            umask: 0,
            rdev: 0,
            target: None,
            excl: true,
            ino: None,
        }
    )
    .is_ok());
    assert_eq!(
        run(
            1001,
            Op::Unlink {
                parent: d,
                name: b"f".to_vec(),
                held_open: vec![],
            }
        ),
        Err(Errno::EPERM)
    );
    assert_eq!(
        run(
            0,
            Op::Rmdir {
                parent: ROOT_INO,
                name: b"d".to_vec(),
            }
        ),
        Err(Errno::ENOTEMPTY)
    );
    // Moving a directory under itself.
    assert!(run(0, mk("p", libc::S_IFDIR | 0o755)).is_ok());
    let p = make_ino(ShardId(0), 4);
    assert!(run(
        0,
        Op::Create {
            parent: p,
            name: b"q".to_vec(),
            mode: libc::S_IFDIR | 0o755,
            umask: 0,
            rdev: 0,
            target: None,
            excl: true,
            ino: None,
        }
    )
    .is_ok());
    let q = make_ino(ShardId(0), 5);
    assert_eq!(
        run(
            0,
            Op::Rename {
                parent: ROOT_INO,
                name: b"p".to_vec(),
                newparent: q,
                newname: b"p".to_vec(),
                flags: 0,
                held_open: vec![],
            }
        ),
        Err(Errno::EINVAL)
    );
    // chmod by a non-owner.
    assert_eq!(
        run(
            1001,
            Op::SetAttr {
                ino: p,
                set: SetAttr {
                    mode: Some(0o777),
                    ..Default::default()
                }
            }
        ),
        Err(Errno::EPERM)
    );
}

#[test]
fn unlink_deletes_a_file_in_the_same_entry_unless_held_open() {
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let mut n = 0u64;
    let mut run = |op: Op| {
        n += 1;
        apply_one(&db, n, Creds::root(), op)
    };
    let unlink = |name: &str, held_open: Vec<Ino>| Op::Unlink {
        parent: ROOT_INO,
        name: name.as_bytes().to_vec(),
        held_open,
    };
    use cfs_materializers::keys;
    use cfs_materializers::ops::Applied;
    // Not held open: gone with its unlink, no orphan left to reclaim.
    let f = ino_of(run(create("f")));
    let other = ino_of(run(create("other")));
    assert_eq!(ino_of(run(unlink("f", vec![other]))), f);
    assert_eq!(db.get_raw(&keys::inode(f)).unwrap(), None);
    assert_eq!(db.get_raw(&keys::orphan(f)).unwrap(), None);
    // Held open by the unlinking mount: an orphan until Reclaim.
    let g = ino_of(run(create("g")));
    assert_eq!(ino_of(run(unlink("g", vec![other, g]))), g);
    assert!(db.get_raw(&keys::inode(g)).unwrap().is_some());
    assert!(db.get_raw(&keys::orphan(g)).unwrap().is_some());
    assert_eq!(run(Op::Reclaim { ino: g }), Ok(Applied::None));
    assert_eq!(db.get_raw(&keys::inode(g)).unwrap(), None);
    assert_eq!(db.get_raw(&keys::orphan(g)).unwrap(), None);
    // A rename over a file not held open deletes the replaced file.
    let h = ino_of(run(create("h")));
    run(Op::Rename {
        parent: ROOT_INO,
        name: b"other".to_vec(),
        newparent: ROOT_INO,
        newname: b"h".to_vec(),
        flags: 0,
        held_open: vec![],
    })
    .unwrap();
    assert_eq!(db.get_raw(&keys::inode(h)).unwrap(), None);
    assert!(db.get_raw(&keys::inode(other)).unwrap().is_some());
}

/// Outcomes older than the retry window are forgotten as a client goes
/// on, and forgetting them does not step over what was forgotten before:
/// the last operations of a long-lived client cost what the first did.
#[test]
fn old_outcomes_are_forgotten_without_rescanning() {
    use cfs_materializers::apply::OUTCOMES_KEPT;
    use cfs_materializers::keys;
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let total = OUTCOMES_KEPT + 6_000;
    let mut timings = Vec::new();
    let mut batch = Vec::new();
    let started = std::time::Instant::now();
    for op_id in 1..=total {
        let lop = LoggedOp {
            client: 7,
            op_id,
            creds: Creds::root(),
            now: op_id as i64,
            op: Op::SetAttr {
                ino: ROOT_INO,
                set: SetAttr {
                    mode: Some(0o755),
                    ..Default::default()
                },
            },
        };
        batch.push((
            Position(op_id - 1),
            entry(
                RequestId {
                    client: 7,
                    seq: op_id,
                },
                &lop,
            ),
        ));
        if batch.len() == 1000 {
            let t = std::time::Instant::now();
            apply_batch(&db, ShardId(0), &batch).unwrap();
            timings.push(t.elapsed());
            batch.clear();
        }
    }
    apply_batch(&db, ShardId(0), &batch).unwrap();
    eprintln!(
        "{total} operations in {:?}; batches of 1000: first {:?}, last {:?}",
        started.elapsed(),
        timings.first().unwrap(),
        timings.last().unwrap()
    );
    let low = total - OUTCOMES_KEPT;
    let kept = db
        .scan(
            &keys::outcome(ShardId(0), 7, 0),
            &keys::outcome(ShardId(0), 7, u64::MAX),
            usize::MAX,
        )
        .unwrap();
    assert_eq!(kept.len() as u64, OUTCOMES_KEPT + 1, "the retry window");
    assert_eq!(kept.first().unwrap().0, keys::outcome(ShardId(0), 7, low));
    assert_eq!(
        db.get::<u64>(&keys::outcomes_low(ShardId(0), 7)).unwrap(),
        Some(low)
    );
}

/// What a file's bytes are, byte by byte, in the model of
/// `pieces_follow_writes_truncates_and_punches`: 0 a hole, `1 + b` an
/// inline byte `b`, `1000 + 100_000 * stripe + i` byte `i` of a stripe.
fn byte_of(e: &ExtentRef, k: u64) -> u64 {
    match &e.backing {
        Backing::Inline(b) => 1 + b[(e.skip + k) as usize] as u64,
        Backing::Stripe(x) => 1000 + 100_000 * x.stripe as u64 + e.skip + k,
    }
}

/// The piece map (stripes and inline bytes) against a byte model under
/// random writes of both kinds, truncates and hole punches; inline pieces
/// past `INLINE_BYTES_MAX` are refused and change nothing.
#[test]
fn pieces_follow_writes_truncates_and_punches() {
    use cfs_materializers::ops::Applied;
    use cfs_segments::client::Extent;
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let mut pos = 0u64;
    let mut run = |op: Op| {
        pos += 1;
        apply_one(&db, pos, Creds::root(), op)
    };
    let ino = match run(Op::Create {
        parent: ROOT_INO,
        name: b"f".to_vec(),
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        rdev: 0,
        target: None,
        excl: true,
        ino: None,
    }) {
        Ok(Applied::Attr(i)) => i.ino,
        other => panic!("create: {other:?}"),
    };
    const SPAN: u64 = 2 * INLINE_BYTES_MAX;
    let mut model: Vec<u64> = Vec::new();
    let mut seed = 7u64;
    for step in 0..400u32 {
        let r = rng(&mut seed);
        let off = rng(&mut seed) % SPAN;
        let len = 1 + rng(&mut seed) % 9000;
        match r % 5 {
            0 | 1 => {
                let bytes: Vec<u8> = (0..len).map(|i| (i as u32 ^ step) as u8).collect();
                let piece = ExtentRef {
                    offset: off,
                    len,
                    skip: 0,
                    backing: Backing::Inline(bytes.clone()),
                };
                let res = run(Op::Write {
                    ino,
                    extents: vec![piece],
                    then: None,
                });
                if off + len > INLINE_BYTES_MAX {
                    assert_eq!(res, Err(Errno::EINVAL), "inline past the limit");
                    continue;
                }
                assert!(res.is_ok(), "{res:?}");
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                for (k, b) in bytes.iter().enumerate() {
                    model[off as usize + k] = 1 + *b as u64;
                }
            }
            2 => {
                let skip = rng(&mut seed) % 4096;
                let x = Extent {
                    segment: cfs_segments::format::SegmentId(1),
                    layout: cfs_segments::layout::Layout::for_cluster(3),
                    nodes: vec![1, 2, 3],
                    stripe: step,
                    data_len: (skip + len) as u32,
                    // Every other stripe compressed (one frame, or
                    // frames): the inode's stored bytes are then shares
                    // of the stored lengths.
                    packing: match step % 4 {
                        0 => cfs_proto::types::Packing::Zstd {
                            stored_len: ((skip + len) / 3 + 1) as u32,
                        },
                        2 => cfs_proto::types::Packing::Frames {
                            ends: vec![((skip + len) / 5 + 1) as u32],
                        },
                        _ => cfs_proto::types::Packing::Plain,
                    },
                    fragment_len: 4096,
                    checksums: vec![],
                    missing: vec![],
                    // Every third stripe is a deduplicated chunk (one id
                    // for several stripes: they are indexed per extent).
                    chunk: (step % 3 == 0)
                        .then_some(cfs_proto::types::ChunkId([(step % 7) as u8; 32])),
                    // Every fifth sealed (D51): replicas keep the seal as is.
                    seal: (step % 5 == 0).then_some(cfs_proto::types::Seal {
                        key: cfs_proto::tenant::KeyId(u64::from(step % 3)),
                        nonce: [step as u8; 24],
                    }),
                };
                let piece = ExtentRef {
                    offset: off,
                    len,
                    skip,
                    backing: Backing::Stripe(x),
                };
                let res = run(Op::Write {
                    ino,
                    extents: vec![piece],
                    then: None,
                });
                assert!(res.is_ok(), "{res:?}");
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                for k in 0..len {
                    model[(off + k) as usize] = 1000 + 100_000 * step as u64 + skip + k;
                }
            }
            3 => {
                let size = off;
                let set = SetAttr {
                    size: Some(size),
                    ..SetAttr::default()
                };
                assert!(run(Op::SetAttr { ino, set }).is_ok());
                model.resize(size as usize, 0);
            }
            _ => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let res = run(Op::Fallocate {
                    ino,
                    offset: off,
                    len,
                    mode,
                });
                assert!(res.is_ok(), "{res:?}");
                for k in off..(off + len).min(model.len() as u64) {
                    model[k as usize] = 0;
                }
            }
        }
        let i = db.inode(ino).unwrap();
        assert_eq!(i.size, model.len() as u64, "size after step {step}");
        let mut got = vec![0u64; model.len()];
        let (mut mapped, mut stored) = (0, 0);
        for e in db.extents(ino, 0, SPAN * 2).unwrap() {
            stored += e.stored_bytes();
            if let Backing::Inline(b) = &e.backing {
                assert!(e.offset + e.len <= INLINE_BYTES_MAX);
                assert!(e.skip + e.len <= b.len() as u64);
            }
            for k in 0..e.len {
                got[(e.offset + k) as usize] = byte_of(&e, k);
            }
            mapped += e.len;
        }
        assert_eq!(got, model, "bytes after step {step}");
        assert_eq!(i.allocated, mapped, "allocated after step {step}");
        assert_eq!(i.stored, stored, "stored after step {step}");
    }
}

/// A database is stamped with the layout it was written in; one from
/// another layout (or from before the stamp) is refused with a clear
/// error instead of being misread.
#[test]
fn a_database_of_another_format_is_refused() {
    use cfs_materializers::keys;
    use cfs_materializers::store::{DbError, Txn, FORMAT};
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    assert_eq!(
        db.get_raw(keys::FORMAT).unwrap(),
        Some(FORMAT.to_be_bytes().to_vec())
    );
    drop(db);
    // Reopening the same format works.
    let db = NamespaceDb::open(dir.path()).unwrap();
    // Before the stamp: format 1.
    let mut t = Txn::new(&db);
    t.delete(keys::FORMAT.to_vec());
    t.keep();
    db.commit(t, ShardId(0), db.applied(ShardId(0)).unwrap())
        .unwrap();
    drop(db);
    match NamespaceDb::open(dir.path()) {
        Err(DbError::Format {
            found: 1, expected, ..
        }) => assert_eq!(expected, FORMAT),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a format-1 database was opened"),
    }
}

/// A mount's locks and the orphans it holds open are released by an
/// `ExpireHold` only once its hold lapsed; a renewal keeps them; a
/// renewal after the break says ESTALE; another mount's locks stay.
#[test]
fn holds_of_a_vanished_mount_are_broken_once_lapsed() {
    use cfs_materializers::keys;
    use cfs_materializers::ops::Applied;
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let hold = cfs_proto::hold::HOLD.as_nanos() as i64;
    let (a, b) = (0xa, 0xb);
    let mut pos = 0;
    let mut run = |client: u64, now: i64, op: Op| {
        pos += 1;
        apply_as(&db, pos, client, now, Creds::root(), op)
    };
    let lock = |ino: Ino, client: u64, start: u64| Op::Lock {
        ino,
        lock: LockRange {
            start,
            end: start + 10,
            typ: libc::F_WRLCK,
            client,
            owner: 7,
            pid: 1,
            flock: false,
        },
    };
    let f = ino_of(run(a, 1, create("f")));
    let g = ino_of(run(a, 1, create("g")));
    assert_eq!(run(a, 10, lock(f, a, 0)), Ok(Applied::None));
    assert_eq!(run(b, 30, lock(f, b, 100)), Ok(Applied::None));
    // `a` unlinks `g` while holding it open: an orphan held for `a`.
    run(
        a,
        10,
        Op::Unlink {
            parent: ROOT_INO,
            name: b"g".to_vec(),
            held_open: vec![g],
        },
    )
    .unwrap();
    assert!(db.get_raw(&keys::orphan(g)).unwrap().is_some());
    let expire = |client| Op::ExpireHold {
        shard: ShardId(0),
        client,
    };
    let locks_of = |client: u64| {
        let p = keys::lock_prefix(f);
        db.scan(&p, &keys::prefix_end(&p), usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k[10..18] == client.to_be_bytes())
            .count()
    };
    // Not lapsed yet: nothing happens.
    assert_eq!(run(b, 10 + hold - 1, expire(a)), Ok(Applied::None));
    assert_eq!(locks_of(a), 1);
    // Renewed: lasts another hold from the renewal.
    assert_eq!(
        run(a, 20, Op::RenewHold { shard: ShardId(0) }),
        Ok(Applied::None)
    );
    assert_eq!(
        cfs_materializers::apply::lapsed_holds(&db, ShardId(0), 20 + hold - 1, 10).unwrap(),
        Vec::<u64>::new()
    );
    assert_eq!(
        cfs_materializers::apply::lapsed_holds(&db, ShardId(0), 20 + hold + 1, 10).unwrap(),
        vec![a]
    );
    run(b, 20 + hold - 1, expire(a)).unwrap();
    assert_eq!(locks_of(a), 1);
    assert!(db.get_raw(&keys::inode(g)).unwrap().is_some());
    // Lapsed: `a`'s lock and orphan go, `b`'s lock stays.
    assert_eq!(
        run(b, 20 + hold + 1, expire(a)),
        Ok(Applied::Changed {
            inodes: vec![f, g],
            entries: vec![]
        })
    );
    assert_eq!(locks_of(a), 0);
    assert_eq!(locks_of(b), 1);
    assert_eq!(db.get_raw(&keys::inode(g)).unwrap(), None);
    assert_eq!(db.get_raw(&keys::orphan(g)).unwrap(), None);
    assert_eq!(db.get_raw(&keys::hold(ShardId(0), a)).unwrap(), None);
    let p = keys::held_orphan_prefix(ShardId(0), a);
    assert!(db.scan(&p, &keys::prefix_end(&p), 10).unwrap().is_empty());
    // `a` comes back: its hold is gone.
    assert_eq!(
        run(a, 20 + hold + 2, Op::RenewHold { shard: ShardId(0) }),
        Err(Errno::ESTALE)
    );
    let report = cfs_materializers::check::check(&db).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// A client idle since before `idle_before` has its outcome tables
/// forgotten by `ForgetIdleClients`; a retry of one of its old operations
/// then gets ESTALE (it may have applied: it must not apply twice), while
/// its new operations and other clients are unaffected.
#[test]
fn idle_clients_outcome_tables_are_forgotten() {
    use cfs_materializers::apply::idle_clients;
    use cfs_materializers::keys;
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    let s = ShardId(0);
    init_shard(&db, s).unwrap();
    let mut pos = 0u64;
    let mut run = |client: u64, op_id: u64, now: i64, op: Op| {
        let lop = LoggedOp {
            client,
            op_id,
            creds: Creds::root(),
            now,
            op,
        };
        let e = entry(RequestId { client, seq: op_id }, &lop);
        let (mut out, _) = apply_batch(&db, s, &[(Position(pos), e)]).unwrap();
        pos += 1;
        out.pop().map(|(_, r)| r)
    };
    let mkdir = |name: &str| Op::Create {
        parent: ROOT_INO,
        name: name.as_bytes().to_vec(),
        mode: libc::S_IFDIR | 0o755,
        umask: 0,
        rdev: 0,
        target: None,
        excl: true,
        ino: None,
    };
    // Client 7 works at times 10..13, client 8 at time 1000.
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        assert!(run(7, i as u64 + 1, 10 + i as i64, mkdir(n))
            .unwrap()
            .is_ok());
    }
    assert!(run(8, 1, 1000, mkdir("d")).unwrap().is_ok());
    // A retry of op 2 returns its recorded outcome, not EEXIST.
    assert!(run(7, 2, 20, mkdir("b")).unwrap().is_ok());
    assert_eq!(idle_clients(&db, s, 500, 10).unwrap(), vec![7]);

    let forget = Op::ForgetIdleClients {
        shard: s,
        idle_before: 500,
    };
    assert!(run(99, 1, 1001, forget).unwrap().is_ok());
    let outcomes = |c: u64| {
        db.scan(
            &keys::outcome(s, c, 0),
            &keys::outcome(s, c, u64::MAX),
            usize::MAX,
        )
        .unwrap()
        .len()
    };
    assert_eq!(outcomes(7), 0, "client 7 forgotten");
    assert_eq!(outcomes(8), 1, "client 8 kept");
    assert!(idle_clients(&db, s, 500, 10).unwrap().is_empty());
    // An old operation of client 7 retried: ESTALE, nothing applied.
    assert_eq!(run(7, 3, 1002, mkdir("c2")).unwrap(), Err(Errno::ESTALE));
    assert!(db.lookup(ROOT_INO, b"c2").is_err(), "nothing applied");
    // A new operation of client 7 applies.
    assert!(run(7, 4, 1003, mkdir("e")).unwrap().is_ok());
    assert_eq!(outcomes(7), 1);
}

/// POSIX ACLs decided on the node: only the owner sets one; a valid
/// access ACL sets the mode's bits and grants a named user write (checked
/// here on a truncate, not only by a kernel); a chmod moves the mask; a
/// default ACL only on a directory, inherited in place of the umask; bad
/// lists are refused and change nothing.
#[test]
fn posix_acls_are_checked_and_inherited_at_apply() {
    use cfs_materializers::acl;
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let mut pos = 0;
    let mut run = |c: &Creds, op: Op| {
        pos += 1;
        apply_one(&db, pos, c.clone(), op)
    };
    let root = Creds::root();
    let user = |uid: u32| Creds {
        uid,
        gid: uid,
        groups: vec![],
    };
    let e = |tag, perm, id| AclEntry { tag, perm, id };
    let entries = |named: u32, mask: u16| {
        vec![
            e(acl::USER_OBJ, 6, 0),
            e(acl::USER, 6, named),
            e(acl::GROUP_OBJ, 0, 0),
            e(acl::MASK, mask, 0),
            e(acl::OTHER, 0, 0),
        ]
    };
    let set = |ino, name: &[u8], list: &[AclEntry]| Op::SetXattr {
        ino,
        name: name.to_vec(),
        value: acl::format(list),
        flags: 0,
    };
    let truncate = |ino| Op::SetAttr {
        ino,
        set: SetAttr {
            size: Some(0),
            ..Default::default()
        },
    };
    let mut mk = create("f");
    if let Op::Create { mode, .. } = &mut mk {
        *mode = libc::S_IFREG | 0o600;
    }
    let f = ino_of(run(&root, mk));
    assert_eq!(run(&user(1000), truncate(f)), Err(Errno::EACCES));
    assert_eq!(
        run(&user(1000), set(f, acl::ACCESS_XATTR, &entries(1000, 6))),
        Err(Errno::EPERM),
        "only the owner"
    );
    let mut bad = entries(1000, 6);
    bad.retain(|x| x.tag != acl::MASK);
    assert_eq!(
        run(&root, set(f, acl::ACCESS_XATTR, &bad)),
        Err(Errno::EINVAL)
    );
    assert_eq!(db.inode(f).unwrap().mode & 0o777, 0o600, "nothing changed");
    let i = match run(&root, set(f, acl::ACCESS_XATTR, &entries(1000, 6))) {
        Ok(cfs_materializers::ops::Applied::Attr(i)) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!(i.mode & 0o777, 0o660, "the mask is the group bits");
    assert!(run(&user(1000), truncate(f)).is_ok(), "the named user");
    assert_eq!(run(&user(1001), truncate(f)), Err(Errno::EACCES));
    // Locks too: some access to the file is needed to lock it.
    let lock = |client: u64| Op::Lock {
        ino: f,
        lock: LockRange {
            start: 0,
            end: 10,
            typ: libc::F_WRLCK,
            client,
            owner: 1,
            pid: 1,
            flock: false,
        },
    };
    assert_eq!(
        run(&user(1001), lock(11)),
        Err(Errno::EACCES),
        "no access, no lock"
    );
    assert!(run(&user(1000), lock(10)).is_ok());
    assert_eq!(
        db.getxattr(f, acl::ACCESS_XATTR).unwrap(),
        acl::format(&parse_back(&entries(1000, 6)))
    );
    let chmod = Op::SetAttr {
        ino: f,
        set: SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
    };
    assert!(run(&root, chmod).is_ok());
    assert_eq!(run(&user(1000), truncate(f)), Err(Errno::EACCES), "masked");
    assert_eq!(
        run(&root, set(f, acl::DEFAULT_XATTR, &entries(5, 7))),
        Err(Errno::EACCES),
        "a default ACL on a file"
    );
    // A directory with a default ACL: its children inherit, umask aside.
    let mut mkd = create("d");
    if let Op::Create { mode, .. } = &mut mkd {
        *mode = libc::S_IFDIR | 0o755;
    }
    let d = ino_of(run(&root, mkd));
    assert!(run(&root, set(d, acl::DEFAULT_XATTR, &entries(1000, 7))).is_ok());
    let child = |name: &str, mode: u32| Op::Create {
        parent: d,
        name: name.as_bytes().to_vec(),
        mode,
        umask: 0o077,
        rdev: 0,
        target: None,
        excl: true,
        ino: None,
    };
    let c1 = ino_of(run(&root, child("c1", libc::S_IFREG | 0o666)));
    let ci = db.inode(c1).unwrap();
    assert_eq!(ci.mode & 0o777, 0o660, "the default ACL, not the umask");
    assert!(acl::of(&ci, acl::Kind::Access)
        .iter()
        .any(|x| x.tag == acl::USER && x.id == 1000));
    let sub = ino_of(run(&root, child("sub", libc::S_IFDIR | 0o777)));
    assert_eq!(
        acl::of(&db.inode(sub).unwrap(), acl::Kind::Default),
        entries_sorted(&entries(1000, 7))
    );
    let mut plain = create("plain");
    if let Op::Create { umask, .. } = &mut plain {
        *umask = 0o077;
    }
    let p = ino_of(run(&root, plain));
    assert_eq!(
        db.inode(p).unwrap().mode & 0o777,
        0o600,
        "no default ACL: the umask"
    );
    let report = cfs_materializers::check::check(&db).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// `entries` as the node keeps them: sorted, the base entries' ids unset.
fn entries_sorted(v: &[AclEntry]) -> Vec<AclEntry> {
    parse_back(v)
}

fn parse_back(v: &[AclEntry]) -> Vec<AclEntry> {
    cfs_materializers::acl::parse(&cfs_materializers::acl::format(v)).unwrap()
}

/// A mount token is recorded used once (EEXIST the second time, under
/// another operation id); records of expired tokens are dropped by a
/// later use, and `cfs fsck` finds nothing wrong with them.
#[test]
fn a_mount_token_is_consumed_once_and_forgotten_after_it_expires() {
    use cfs_materializers::keys;
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    let s = ShardId(0);
    init_shard(&db, s).unwrap();
    let mut pos = 0u64;
    let mut run = |op_id: u64, now: i64, id: u128, expires: i64| {
        let lop = LoggedOp {
            client: 99,
            op_id,
            creds: Creds::root(),
            now,
            op: Op::ConsumeToken {
                shard: s,
                id,
                expires,
            },
        };
        let e = entry(
            RequestId {
                client: 99,
                seq: op_id,
            },
            &lop,
        );
        let (mut out, _) = apply_batch(&db, s, &[(Position(pos), e)]).unwrap();
        pos += 1;
        out.pop().map(|(_, r)| r).unwrap()
    };
    let used = || {
        let p = keys::token_used_prefix(s);
        db.scan(&p, &keys::prefix_end(&p), usize::MAX)
            .unwrap()
            .len()
    };
    assert!(run(1, 10, 0xabc, 100).is_ok());
    assert_eq!(run(2, 20, 0xabc, 100), Err(Errno::EEXIST));
    assert!(run(3, 30, 0xdef, 500).is_ok());
    assert_eq!(used(), 2);
    // At time 200 the first has expired: its record goes.
    assert!(run(4, 200, 0x123, 900).is_ok());
    assert_eq!(used(), 2);
    assert_eq!(run(5, 210, 0xdef, 500), Err(Errno::EEXIST));
    let report = cfs_materializers::check::check(&db).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// A new leadership term (the log's barrier entry, D41) moves the inode
/// counter past every number the last leader may have promised; a replayed
/// create gets the number it was answered with only if it is one of those,
/// and nothing else is given such a number.
#[test]
fn a_new_term_keeps_promised_inode_numbers_for_their_replays() {
    use cfs_materializers::apply::TERM_INO_SKIP;
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let root = Creds {
        uid: 0,
        gid: 0,
        groups: vec![],
    };
    let first = ino_of(apply_one(&db, 0, root.clone(), create("a")));
    // What the old leader answered for the next create, never decided.
    let promised = first + 1;
    let (r, _) = apply_batch(&db, ShardId(0), &[(Position(1), Entry::barrier())]).unwrap();
    assert_eq!(r.len(), 1, "a barrier completes (unclaimed) like any entry");
    // The next create of this term comes from past the skipped range.
    let fresh = ino_of(apply_one(&db, 2, root.clone(), create("b")));
    assert!(
        fresh >= first + TERM_INO_SKIP,
        "{fresh:#x} after {first:#x}"
    );
    assert_eq!(fresh % TERM_INO_SKIP, 0, "terms begin on a block");
    let replay = |name: &str, ino: Ino| {
        let mut op = create(name);
        if let Op::Create { ino: slot, .. } = &mut op {
            *slot = Some(ino);
        }
        op
    };
    // A number nobody was promised: refused, nothing changes.
    for wrong in [first, fresh + 5, make_ino(ShardId(1), promised & 0xffff)] {
        assert_eq!(
            apply_one(&db, 3, root.clone(), replay("c", wrong)),
            Err(Errno::EINVAL),
            "{wrong:#x}"
        );
    }
    assert!(db.lookup(ROOT_INO, b"c").is_err());
    // The promised one: given, once.
    assert_eq!(
        ino_of(apply_one(&db, 4, root.clone(), replay("c", promised))),
        promised
    );
    assert_eq!(
        apply_one(&db, 5, root.clone(), replay("d", promised)),
        Err(Errno::EEXIST)
    );
    // Skipped numbers are not counted as files; the replayed one is.
    assert_eq!(db.files(&[ShardId(0)]).unwrap(), 3);
}
