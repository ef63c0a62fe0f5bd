//! Segment counts (D48): every shard counts what its extents reference of
//! each segment, in the same batch as the extents change; a fence is
//! refused while a count is not zero and, once set, refuses writes naming
//! the segment. Counts equal a recount from the extents after any mix of
//! writes, overwrites, truncates, punches, links and unlinks, and replaying
//! the same entries in other batchings gives the same database.

use cfs_log::{Entry, RequestId};
use cfs_materializers::check::check;
use cfs_materializers::materializer::{apply_batch, entry, init_shard};
use cfs_materializers::ops::{Applied, ApplyResult, LoggedOp, Op};
use cfs_materializers::read::NsRead;
use cfs_materializers::segment_use::{kept, SegmentUse};
use cfs_materializers::types::*;
use cfs_materializers::NamespaceDb;
use cfs_segments::client::Extent;

fn rng(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

fn lop(op: Op) -> LoggedOp {
    LoggedOp {
        client: 1,
        op_id: 0,
        creds: Creds::root(),
        now: 1,
        op,
    }
}

/// Applies `ops` one entry each from position `*pos`; the results.
fn apply(db: &NamespaceDb, pos: &mut u64, log: &mut Vec<Entry>, op: Op) -> ApplyResult {
    *pos += 1;
    let e = entry(
        RequestId {
            client: 1,
            seq: *pos,
        },
        &lop(op),
    );
    log.push(e.clone());
    let (r, _) = apply_batch(db, ShardId(0), &[(Position(*pos), e)]).expect("apply");
    r[0].1.clone()
}

fn stripe(segment: u128, stripe: u32, data_len: u32) -> Extent {
    Extent {
        segment: SegmentId(segment),
        layout: cfs_segments::layout::Layout::for_cluster(3),
        nodes: vec![1, 2, 3],
        stripe,
        data_len,
        // Odd segments hold compressed stripes: their counts are shares
        // of the stored bytes.
        packing: if segment % 2 == 1 {
            Packing::Zstd {
                stored_len: data_len / 3 + 1,
            }
        } else {
            Packing::Plain
        },
        fragment_len: 4096,
        checksums: vec![],
        missing: vec![],
        // Stripes 0 and 1 of every segment hold chunks: the same id for
        // the same (segment mod 4, stripe), so some chunks are named from
        // several segments and files.
        chunk: (stripe < 2).then(|| {
            let mut id = [0u8; 32];
            id[0] = (segment % 4) as u8;
            id[1] = stripe as u8;
            cfs_proto::types::ChunkId(id)
        }),
        seal: None,
    }
}

fn write(ino: Ino, offset: u64, len: u64, segment: u128, n: u32) -> Op {
    Op::Write {
        ino,
        extents: vec![ExtentRef {
            offset,
            len,
            skip: 0,
            backing: Backing::Stripe(stripe(segment, n, len as u32)),
        }],
        then: None,
    }
}

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

fn ino_of(r: ApplyResult) -> Ino {
    match r {
        Ok(Applied::Attr(i)) => i.ino,
        other => panic!("expected an inode, got {other:?}"),
    }
}

fn fence(segment: u128, fence: bool) -> Op {
    Op::FenceSegments {
        shard: ShardId(0),
        segments: vec![SegmentId(segment)],
        fence,
    }
}

fn fenced(db: &NamespaceDb, segment: u128) -> bool {
    cfs_materializers::segment_use::fences(db)
        .unwrap()
        .contains_key(&SegmentId(segment))
}

fn use_of(db: &NamespaceDb, segment: u128) -> Option<SegmentUse> {
    kept(db)
        .unwrap()
        .get(&(ShardId(0), SegmentId(segment)))
        .copied()
}

fn assert_clean(db: &NamespaceDb, when: &str) {
    let r = check(db).unwrap();
    assert!(r.problems.is_empty(), "{when}: {:?}", r.problems);
}

#[test]
fn counts_follow_the_extents_through_every_kind_of_change() {
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(&dir.path().join("a")).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let (mut pos, mut log) = (0u64, Vec::new());
    let files: Vec<Ino> = ["f0", "f1", "f2"]
        .iter()
        .map(|n| ino_of(apply(&db, &mut pos, &mut log, create(n))))
        .collect();
    let mut seed = 11u64;
    for step in 0..600u32 {
        let ino = files[(rng(&mut seed) % 3) as usize];
        let off = rng(&mut seed) % (1 << 20);
        let len = 1 + rng(&mut seed) % 200_000;
        let op = match rng(&mut seed) % 6 {
            0..=2 => write(ino, off, len, 1 + (rng(&mut seed) % 4) as u128, step),
            3 => Op::SetAttr {
                ino,
                set: SetAttr {
                    size: Some(off),
                    ..SetAttr::default()
                },
            },
            4 => Op::Fallocate {
                ino,
                offset: off,
                len,
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            },
            _ => Op::Fallocate {
                ino,
                offset: off,
                len,
                mode: 0,
            },
        };
        let r = apply(&db, &mut pos, &mut log, op);
        assert!(r.is_ok(), "step {step}: {r:?}");
        if step % 50 == 0 {
            assert_clean(&db, &format!("after step {step}"));
        }
    }
    assert_clean(&db, "after the writes");
    let r = check(&db).unwrap();
    assert!(r.segments_used > 0, "the writes should reference segments");
    // A second name keeps the file's references; removing both drops them.
    let r = apply(
        &db,
        &mut pos,
        &mut log,
        Op::Link {
            ino: files[0],
            parent: ROOT_INO,
            name: b"g0".to_vec(),
        },
    );
    assert!(r.is_ok(), "{r:?}");
    for name in ["f0", "g0", "f1", "f2"] {
        let before = kept(&db).unwrap();
        let r = apply(
            &db,
            &mut pos,
            &mut log,
            Op::Unlink {
                parent: ROOT_INO,
                name: name.as_bytes().to_vec(),
                held_open: vec![],
            },
        );
        assert!(r.is_ok(), "unlink {name}: {r:?}");
        assert_clean(&db, &format!("after unlinking {name}"));
        if name == "f0" {
            assert_eq!(before, kept(&db).unwrap(), "a link still names f0");
        }
    }
    assert!(
        kept(&db).unwrap().is_empty(),
        "nothing is referenced any more"
    );

    // The same entries in one batch, and in batches of 7 with a reopen in
    // between, give byte-identical databases.
    for (name, batch) in [("b", log.len()), ("c", 7)] {
        let path = dir.path().join(name);
        let half = log.len() / 2;
        {
            let other = NamespaceDb::open(&path).unwrap();
            init_shard(&other, ShardId(0)).unwrap();
            apply_range(&other, &log, 0, half, batch);
        }
        let other = NamespaceDb::open(&path).unwrap();
        apply_range(&other, &log, half, log.len(), batch);
        assert_eq!(
            db.dump().unwrap(),
            other.dump().unwrap(),
            "batches of {batch}"
        );
    }
}

fn apply_range(db: &NamespaceDb, log: &[Entry], from: usize, to: usize, batch: usize) {
    let mut at = from;
    while at < to {
        let end = (at + batch).min(to);
        let b: Vec<(Position, Entry)> = (at..end)
            .map(|p| (Position(p as u64 + 1), log[p].clone()))
            .collect();
        apply_batch(db, ShardId(0), &b).expect("apply");
        at = end;
    }
}

#[test]
fn a_fence_is_refused_while_referenced_and_then_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let (mut pos, mut log) = (0u64, Vec::new());
    let f = ino_of(apply(&db, &mut pos, &mut log, create("f")));
    assert!(apply(&db, &mut pos, &mut log, write(f, 0, 8192, 7, 0)).is_ok());
    assert_eq!(
        use_of(&db, 7),
        Some(SegmentUse {
            extents: 1,
            // Segment 7 holds compressed stripes: the count is of the
            // stored bytes (a third, rounded up, of 8192).
            bytes: 8192 / 3 + 1
        })
    );
    // Referenced: the fence is not set and nothing changes.
    let before = db.dump().unwrap();
    assert!(apply(&db, &mut pos, &mut log, fence(7, true)).is_ok());
    assert!(!fenced(&db, 7));
    let mut after = db.dump().unwrap();
    after.retain(|(k, _)| k[0] != b'a' && k[0] != b'r');
    let mut want = before;
    want.retain(|(k, _)| k[0] != b'a' && k[0] != b'r');
    assert_eq!(want, after, "a refused fence changes nothing");
    // Overwritten: unreferenced, the fence holds, and a late write naming
    // the segment is refused without changing the file.
    assert!(apply(&db, &mut pos, &mut log, write(f, 0, 8192, 8, 1)).is_ok());
    assert_eq!(use_of(&db, 7), None);
    assert!(apply(&db, &mut pos, &mut log, fence(7, true)).is_ok());
    assert!(fenced(&db, 7));
    let late = apply(&db, &mut pos, &mut log, write(f, 100_000, 4096, 7, 2));
    assert_eq!(late, Err(Errno::FREED_DATA));
    assert_eq!(use_of(&db, 7), None, "the refused write references nothing");
    assert_eq!(db.inode(f).unwrap().size, 8192);
    assert_clean(&db, "with a fence");
    // Other segments are not affected; lifting the fence lets writes in.
    assert!(apply(&db, &mut pos, &mut log, write(f, 8192, 4096, 8, 3)).is_ok());
    assert!(apply(&db, &mut pos, &mut log, fence(7, false)).is_ok());
    assert!(!fenced(&db, 7));
    assert!(apply(&db, &mut pos, &mut log, write(f, 100_000, 4096, 7, 2)).is_ok());
    assert_eq!(use_of(&db, 7).map(|u| u.extents), Some(1));
    assert_clean(&db, "after the fence was lifted");
}

#[test]
fn a_mount_cannot_propose_a_fence_and_an_entry_names_a_bounded_number() {
    assert!(fence(1, true).is_service_only());
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let (mut pos, mut log) = (0u64, Vec::new());
    let too_many = Op::FenceSegments {
        shard: ShardId(0),
        segments: (0..=cfs_proto::ops::FENCE_SEGMENTS_MAX as u128)
            .map(SegmentId)
            .collect(),
        fence: true,
    };
    assert_eq!(apply(&db, &mut pos, &mut log, too_many), Err(Errno::EINVAL));
    assert!(cfs_materializers::segment_use::fences(&db)
        .unwrap()
        .is_empty());
}

fn piece(offset: u64, len: u64, segment: u128, n: u32) -> ExtentRef {
    ExtentRef {
        offset,
        len,
        skip: 0,
        backing: Backing::Stripe(stripe(segment, n, len as u32)),
    }
}

#[test]
fn relocations_move_only_what_the_file_still_maps() {
    use cfs_proto::ops::Relocation;
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(dir.path()).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let (mut pos, mut log) = (0u64, Vec::new());
    let f = ino_of(apply(&db, &mut pos, &mut log, create("f")));
    let g = ino_of(apply(&db, &mut pos, &mut log, create("g")));
    assert!(apply(&db, &mut pos, &mut log, write(f, 0, 8192, 1, 0)).is_ok());
    assert!(apply(&db, &mut pos, &mut log, write(g, 0, 8192, 1, 1)).is_ok());
    let old_f = db.extents(f, 0, 8192).unwrap().remove(0);
    let old_g = db.extents(g, 0, 8192).unwrap().remove(0);
    // g changes after the copy: its relocation is skipped.
    assert!(apply(&db, &mut pos, &mut log, write(g, 0, 8192, 3, 2)).is_ok());
    let moves = vec![
        Relocation {
            ino: f,
            old: old_f.clone(),
            new: vec![piece(0, 4096, 2, 0), piece(4096, 4096, 2, 1)],
        },
        Relocation {
            ino: g,
            old: old_g,
            new: vec![piece(0, 8192, 2, 2)],
        },
    ];
    let size_before = db.inode(f).unwrap();
    let r = apply(
        &db,
        &mut pos,
        &mut log,
        Op::RelocateExtents {
            shard: ShardId(0),
            moves,
        },
    );
    assert_eq!(
        r,
        Ok(Applied::Changed {
            inodes: vec![f],
            entries: vec![]
        })
    );
    let now: Vec<ExtentRef> = db.extents(f, 0, 8192).unwrap();
    assert_eq!(now, vec![piece(0, 4096, 2, 0), piece(4096, 4096, 2, 1)]);
    let after = db.inode(f).unwrap();
    assert_eq!(
        (after.size, after.allocated, after.mtime),
        (size_before.size, size_before.allocated, size_before.mtime),
        "a relocation changes neither size nor times"
    );
    assert_eq!(use_of(&db, 1), None, "nothing names the old segment");
    assert_eq!(use_of(&db, 2).map(|u| u.extents), Some(2));
    assert_eq!(db.extents(g, 0, 8192).unwrap(), vec![piece(0, 8192, 3, 2)]);
    assert_clean(&db, "after the relocation");
    // Pieces that do not tile the old extent are refused whole.
    let bad = Op::RelocateExtents {
        shard: ShardId(0),
        moves: vec![Relocation {
            ino: f,
            old: piece(0, 4096, 2, 0),
            new: vec![piece(0, 4000, 4, 0)],
        }],
    };
    assert_eq!(apply(&db, &mut pos, &mut log, bad), Err(Errno::EINVAL));
    assert_eq!(use_of(&db, 4), None);
    assert!(Op::RelocateExtents {
        shard: ShardId(0),
        moves: vec![]
    }
    .is_service_only());
}

/// The chunk index (D50): each extent key naming a stripe written as a
/// chunk is one reference; a lookup finds a stripe while any file names
/// it; removing the last reference removes the chunk; an index entry
/// that names no such extent is reported by the fsck and never answered.
#[test]
fn the_chunk_index_follows_the_extents_that_name_a_chunk() {
    use cfs_materializers::chunks;
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(&dir.path().join("a")).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let (mut pos, mut log) = (0u64, Vec::new());
    let shards = [ShardId(0)];
    let a = ino_of(apply(&db, &mut pos, &mut log, create("a")));
    let b = ino_of(apply(&db, &mut pos, &mut log, create("b")));
    // Segment 6 stripe 0 holds chunk (6 % 4, 0) = (2, 0); segment 2
    // stripe 0 the same id, written by another file.
    let x = stripe(6, 0, 100_000);
    let id = x.chunk.expect("stripe 0 is a chunk");
    assert_eq!(chunks::find(&db, &shards, &id).unwrap(), None);
    for (ino, segment) in [(a, 6), (b, 2)] {
        let r = apply(&db, &mut pos, &mut log, write(ino, 0, 100_000, segment, 0));
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(chunks::references(&db, &shards, &id).unwrap(), 2);
    let found = chunks::find(&db, &shards, &id).unwrap().expect("stored");
    assert_eq!(found.chunk, Some(id));
    // A third reference (a dedupe hit: the same stripe in another file).
    let c = ino_of(apply(&db, &mut pos, &mut log, create("c")));
    let hit = Op::Write {
        ino: c,
        extents: vec![ExtentRef {
            offset: 0,
            len: 100_000,
            skip: 0,
            backing: Backing::Stripe(found.clone()),
        }],
        then: None,
    };
    assert!(apply(&db, &mut pos, &mut log, hit).is_ok());
    assert_eq!(chunks::references(&db, &shards, &id).unwrap(), 3);
    assert_eq!(chunks::totals(&db, &shards).unwrap(), (1, 3));
    assert_clean(&db, "three references");
    // A part of the chunk overwritten: the piece left still names the
    // stripe (its bytes are still the chunk's), so it still counts.
    assert!(apply(&db, &mut pos, &mut log, write(a, 0, 70_000, 8, 9)).is_ok());
    assert_eq!(chunks::references(&db, &shards, &id).unwrap(), 3);
    for name in ["a", "b", "c"] {
        let r = apply(
            &db,
            &mut pos,
            &mut log,
            Op::Unlink {
                parent: ROOT_INO,
                name: name.as_bytes().to_vec(),
                held_open: vec![],
            },
        );
        assert!(r.is_ok(), "{r:?}");
        assert_clean(&db, &format!("after unlinking {name}"));
    }
    assert_eq!(chunks::references(&db, &shards, &id).unwrap(), 0);
    assert_eq!(chunks::find(&db, &shards, &id).unwrap(), None);
    // A corrupt index entry: names an extent key that does not exist.
    let d = ino_of(apply(&db, &mut pos, &mut log, create("d")));
    assert!(apply(&db, &mut pos, &mut log, write(d, 0, 100_000, 6, 0)).is_ok());
    let bogus = cfs_materializers::keys::chunk_where(
        ShardId(0),
        &id,
        &cfs_materializers::keys::extent(d, 4096),
    );
    let applied = db.applied(ShardId(0)).unwrap();
    let mut t = cfs_materializers::store::Txn::new(&db);
    t.put_raw(bogus, Vec::new());
    t.keep();
    db.commit(t, ShardId(0), applied).unwrap();
    let r = check(&db).unwrap();
    assert!(
        r.problems.iter().any(|p| p.contains("names no extent")),
        "{:?}",
        r.problems
    );
    // The lookup skips it and still answers from the good entry.
    assert_eq!(
        chunks::find(&db, &shards, &id).unwrap().map(|e| e.chunk),
        Some(Some(id))
    );
}

fn in_dir(parent: Ino, name: &str, mode: u32) -> Op {
    Op::Create {
        parent,
        name: name.as_bytes().to_vec(),
        mode,
        umask: 0,
        rdev: 0,
        target: None,
        excl: true,
        ino: None,
    }
}

fn snapshot(dir: Ino, create: bool, name: &str) -> Op {
    Op::SetXattr {
        ino: dir,
        name: if create {
            SNAPSHOT_CREATE_XATTR
        } else {
            SNAPSHOT_DELETE_XATTR
        }
        .to_vec(),
        value: name.as_bytes().to_vec(),
        flags: 0,
    }
}

/// A snapshot (D52) copies a subtree's metadata in one entry, counts its
/// extents like any others (so its segments are pinned after the live
/// files go), refuses every change, and releases its segments when
/// deleted; replay in other batchings gives the same database.
#[test]
fn a_snapshot_pins_its_segments_refuses_changes_and_releases_them_when_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let db = NamespaceDb::open(&dir.path().join("a")).unwrap();
    init_shard(&db, ShardId(0)).unwrap();
    let (mut pos, mut log) = (0u64, Vec::new());
    let d = ino_of(apply(
        &db,
        &mut pos,
        &mut log,
        in_dir(ROOT_INO, "d", libc::S_IFDIR | 0o755),
    ));
    let sub = ino_of(apply(
        &db,
        &mut pos,
        &mut log,
        in_dir(d, "sub", libc::S_IFDIR | 0o700),
    ));
    let f = ino_of(apply(
        &db,
        &mut pos,
        &mut log,
        in_dir(sub, "f", libc::S_IFREG | 0o644),
    ));
    assert!(apply(&db, &mut pos, &mut log, write(f, 0, 8192, 10, 0)).is_ok());
    let link = Op::Link {
        ino: f,
        parent: d,
        name: b"f-link".to_vec(),
    };
    assert!(apply(&db, &mut pos, &mut log, link).is_ok());
    let before = use_of(&db, 10);
    assert_eq!(before.map(|u| u.extents), Some(1));

    // Not root: refused, nothing changes.
    let mut user = lop(snapshot(d, true, "s"));
    user.creds = Creds {
        uid: 1000,
        gid: 1000,
        groups: vec![],
    };
    pos += 1;
    let e = entry(
        RequestId {
            client: 1,
            seq: pos,
        },
        &user,
    );
    log.push(e.clone());
    let (r, _) = apply_batch(&db, ShardId(0), &[(Position(pos), e)]).expect("apply");
    assert_eq!(r[0].1, Err(Errno::EPERM));

    assert!(apply(&db, &mut pos, &mut log, snapshot(d, true, "s")).is_ok());
    assert_eq!(
        apply(&db, &mut pos, &mut log, snapshot(d, true, "s")),
        Err(Errno::EEXIST)
    );
    assert_clean(&db, "after the snapshot");
    // One more extent names the segment: the copy's.
    assert_eq!(use_of(&db, 10).map(|u| u.extents), Some(2));
    let cont = db.lookup(d, SNAPSHOTS_DIR).unwrap().ino;
    let root = db.lookup(cont, b"s").unwrap().ino;
    let ssub = db.lookup(root, b"sub").unwrap().ino;
    let attr = db.lookup(ssub, b"f").unwrap();
    let sf = attr.ino;
    assert!(
        attr.snapshot && attr.nlink == 2 && attr.size == 8192,
        "{attr:?}"
    );
    assert_eq!(
        db.lookup(root, b"f-link").unwrap().ino,
        sf,
        "hard links stay links"
    );
    assert!(sf >= make_ino(ShardId(0), cfs_materializers::apply::SNAPSHOT_INO_BASE));
    // The directory lists without its snapshots.
    let names: Vec<Vec<u8>> = db
        .readdir(d, 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b"sub".to_vec(), b"f-link".to_vec()]);

    // Every change to the snapshot is refused.
    for op in [
        write(sf, 0, 4096, 11, 1),
        in_dir(ssub, "new", libc::S_IFREG | 0o644),
        Op::Unlink {
            parent: ssub,
            name: b"f".to_vec(),
            held_open: vec![],
        },
        Op::SetAttr {
            ino: sf,
            set: SetAttr {
                mode: Some(0o777),
                ..Default::default()
            },
        },
        Op::Rename {
            parent: ssub,
            name: b"f".to_vec(),
            newparent: d,
            newname: b"g".to_vec(),
            flags: 0,
            held_open: vec![],
        },
    ] {
        assert_eq!(
            apply(&db, &mut pos, &mut log, op.clone()),
            Err(Errno::EROFS),
            "{op:?}"
        );
    }
    let reserved = in_dir(sub, ".snapshots", libc::S_IFDIR | 0o755);
    assert_eq!(apply(&db, &mut pos, &mut log, reserved), Err(Errno::EPERM));

    // The live files go: the snapshot's extent keeps the segment, and a
    // fence is refused.
    for (parent, name) in [(sub, "f"), (d, "f-link")] {
        let r = apply(
            &db,
            &mut pos,
            &mut log,
            Op::Unlink {
                parent,
                name: name.as_bytes().to_vec(),
                held_open: vec![],
            },
        );
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(use_of(&db, 10), before);
    assert!(apply(&db, &mut pos, &mut log, fence(10, true)).is_ok());
    assert!(!fenced(&db, 10));
    // A directory holding snapshots is not empty.
    let r = apply(
        &db,
        &mut pos,
        &mut log,
        Op::Rmdir {
            parent: ROOT_INO,
            name: b"d".to_vec(),
        },
    );
    assert_eq!(r, Err(Errno::ENOTEMPTY));

    // Deleted: nothing names the segment, the container is gone.
    assert!(apply(&db, &mut pos, &mut log, snapshot(d, false, "s")).is_ok());
    assert_eq!(use_of(&db, 10), None);
    assert!(db.lookup(d, SNAPSHOTS_DIR).is_err());
    assert_eq!(
        apply(&db, &mut pos, &mut log, snapshot(d, false, "s")),
        Err(Errno::ENOENT)
    );
    assert_clean(&db, "after the snapshot was deleted");

    for (name, batch) in [("b", log.len()), ("c", 3)] {
        let other = NamespaceDb::open(&dir.path().join(name)).unwrap();
        init_shard(&other, ShardId(0)).unwrap();
        apply_range(&other, &log, 0, log.len(), batch);
        assert_eq!(
            db.dump().unwrap(),
            other.dump().unwrap(),
            "batches of {batch}"
        );
    }
}
