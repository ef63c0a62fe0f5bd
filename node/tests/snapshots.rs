//! Copy-on-write snapshots on a real 3-node cluster with a FUSE mount
//! (docs/decisions.md D52): `cfs admin snapshot create DIR --name N` makes
//! a read-only copy of DIR's subtree at DIR/.snapshots/N in one log entry;
//! it is browsed with ordinary tools, refuses every change (EROFS), pins
//! the data it names against the collector after the live files are
//! removed, restores to a tree equal to it, and frees its data when
//! deleted; a snapshot taken while a writer runs is the tree at one point
//! of the log; the namespace check passes throughout.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::fuse::{self, cfs_run as cfs, Mount};
use common::{noise, Cluster};

const MIB: usize = 1 << 20;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// What a tree is, path by path: kind, mode, owner, mtime, size and
/// content digest (or symlink target), extended attributes, and which
/// paths are one inode.
#[derive(Debug, PartialEq, Eq)]
struct Tree {
    entries: BTreeMap<PathBuf, String>,
    links: BTreeSet<Vec<PathBuf>>,
}

fn tree(root: &Path) -> Tree {
    let mut entries = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let what = if md.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if md.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else {
                let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                inodes.entry(md.ino()).or_default().push(rel.clone());
                format!("{} bytes {}", b.len(), blake3::hash(&b).to_hex())
            };
            let mut xattrs = Vec::new();
            if !md.file_type().is_symlink() {
                for n in xattr::list(&p).unwrap() {
                    let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                    xattrs.push(format!(
                        "{}={}",
                        n.to_string_lossy(),
                        String::from_utf8_lossy(&v)
                    ));
                }
                xattrs.sort();
            }
            let mtime = if md.is_dir() { 0 } else { md.mtime() };
            entries.insert(
                rel,
                format!(
                    "{what} mode {:o} {}:{} mtime {mtime} {xattrs:?}",
                    md.mode(),
                    md.uid(),
                    md.gid()
                ),
            );
        }
    }
    let links = inodes
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Tree { entries, links }
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn snapshots_are_read_only_pin_their_data_restore_equal_and_free_when_deleted() {
    let c = Cluster::start_with("snap", |cfg| {
        cfg.gc_interval_ms = 300;
        cfg.gc_grace_ms = 1000;
    });
    let m = Mount::new(&c, "mnt", &[]);
    let empty = c.fragment_bytes();
    // A project two levels down (its subtree is one shard's, D19).
    let a = m.path.join("proj/a");
    let src = a.join("src");
    std::fs::create_dir_all(src.join("deep/er")).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("f{i}")), noise(500 + i, 2 * MIB)).unwrap();
    }
    std::fs::write(src.join("deep/er/small"), b"a small inline file\n").unwrap();
    std::fs::hard_link(src.join("f1"), src.join("deep/f1-link")).unwrap();
    std::os::unix::fs::symlink("../f0", src.join("deep/to-f0")).unwrap();
    xattr::set(src.join("f2"), "user.origin", b"instrument 7").unwrap();
    std::fs::set_permissions(src.join("deep"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(src.join("f3"), Some(1000), Some(1000)).unwrap();
    let before = tree(&a);

    // Refusals change nothing: a bad name, the root (spread over shards).
    for i in 0..12 {
        std::fs::create_dir(m.path.join(format!("top{i}"))).unwrap();
    }
    let (ok, out) = cfs(&["admin", "snapshot", "create", &s(&m.path), "--name", "all"]);
    assert!(!ok && out.contains("spans metadata shards"), "{out}");
    let (ok, out) = cfs(&["admin", "snapshot", "create", &s(&a), "--name", "a/b"]);
    assert!(!ok && out.contains("not a snapshot name"), "{out}");

    let (ok, out) = cfs(&["admin", "snapshot", "create", &s(&a), "--name", "s1"]);
    assert!(ok, "{out}");
    let snap = a.join(".snapshots/s1");
    assert_eq!(tree(&snap), before, "the snapshot is the tree as it was");
    // Hidden from listings, reached by name.
    let names: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["src".to_string()]);
    let (ok, out) = cfs(&["admin", "snapshot", "create", &s(&a), "--name", "s1"]);
    assert!(
        !ok && out.contains("already has a snapshot named s1"),
        "{out}"
    );
    let (ok, out) = cfs(&["admin", "snapshot", "list", &s(&a), "--json"]);
    assert!(ok, "{out}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["name"], "s1", "{out}");

    // Read-only, every way in.
    let f0 = snap.join("src/f0");
    let erofs = Some(libc::EROFS);
    assert_eq!(
        errno_of(std::fs::OpenOptions::new().write(true).open(&f0)),
        erofs
    );
    assert_eq!(errno_of(std::fs::write(snap.join("src/new"), b"x")), erofs);
    assert_eq!(
        errno_of(std::fs::create_dir(snap.join("src/newdir"))),
        erofs
    );
    assert_eq!(errno_of(std::fs::remove_file(&f0)), erofs);
    assert_eq!(errno_of(std::fs::rename(&f0, snap.join("src/g0"))), erofs);
    assert_eq!(errno_of(std::fs::rename(&f0, src.join("stolen"))), erofs);
    assert_eq!(
        errno_of(std::fs::set_permissions(
            &f0,
            std::fs::Permissions::from_mode(0o777)
        )),
        erofs
    );
    assert_eq!(errno_of(xattr::set(&f0, "user.x", b"y")), erofs);
    assert_eq!(errno_of(std::fs::hard_link(&f0, src.join("l"))), erofs);
    assert_eq!(
        errno_of(std::fs::remove_dir_all(a.join(".snapshots"))),
        erofs
    );
    // The container's name is reserved.
    assert_eq!(
        errno_of(std::fs::rename(a.join(".snapshots"), a.join("x"))),
        Some(libc::EPERM)
    );
    assert_eq!(
        errno_of(std::fs::create_dir(m.path.join("proj/.snapshots"))),
        Some(libc::EPERM)
    );
    // A directory with snapshots is not empty.
    std::fs::create_dir(m.path.join("proj/b")).unwrap();
    assert!(std::fs::remove_dir(&a).is_err());

    // The live tree moves on; the snapshot does not.
    std::fs::write(src.join("f0"), noise(600, MIB)).unwrap();
    std::fs::remove_file(src.join("f4")).unwrap();
    assert_eq!(tree(&snap), before);

    // It pins its data: scratch data and the live files go; the
    // collector frees or compacts the segments (the snapshot's extents
    // are relocated like any others); the snapshot reads back byte-exact
    // and its 12 MiB stay stored.
    for i in 0..8u64 {
        std::fs::write(a.join(format!("scratch{i}")), noise(700 + i, 2 * MIB)).unwrap();
    }
    let full = c.fragment_bytes();
    for i in 0..8u64 {
        std::fs::remove_file(a.join(format!("scratch{i}"))).unwrap();
    }
    std::fs::remove_dir_all(&src).unwrap();
    let kept = (6 * 2 * MIB) as u64;
    // 2+1 erasure coding stores 1.5 bytes per byte; 10 % and 8 MiB of
    // slack for fragment headers and open segments.
    let goal = empty + kept * 3 / 2 * 11 / 10 + (8 * MIB) as u64;
    let pinned = c.wait_stored(120, |s| s <= goal);
    eprintln!(
        "stored: empty {} MiB, with scratch {} MiB, after rm and GC {} MiB (goal {} MiB)",
        empty >> 20,
        full >> 20,
        pinned >> 20,
        goal >> 20
    );
    assert!(
        pinned <= goal,
        "the scratch data was not freed: {pinned} > {goal}"
    );
    assert!(
        pinned - empty >= kept * 3 / 2,
        "the snapshot's 12 MiB stay stored: {pinned} - {empty}"
    );
    fuse::drop_kernel_caches();
    assert_eq!(tree(&snap), before, "after rm of the live tree and GC");
    for i in 0..6u64 {
        let p = snap.join(format!("src/f{i}"));
        assert!(
            std::fs::read(&p).unwrap() == noise(500 + i, 2 * MIB),
            "{}",
            p.display()
        );
    }

    // Restore: a new tree equal to the snapshot.
    let restored = m.path.join("proj/restored");
    let (ok, out) = cfs(&["admin", "snapshot", "restore", &s(&a), "s1", &s(&restored)]);
    assert!(ok, "{out}");
    assert_eq!(tree(&restored), before, "{out}");
    let (ok, out) = cfs(&["admin", "snapshot", "restore", &s(&a), "s1", &s(&restored)]);
    assert!(!ok && out.contains("exists"), "{out}");
    std::fs::write(restored.join("src/f5"), b"restored trees are writable").unwrap();

    // Deleted, with the restored copy gone too: the data is freed.
    std::fs::remove_dir_all(&restored).unwrap();
    let (ok, out) = cfs(&["admin", "snapshot", "delete", &s(&a), "s1"]);
    assert!(ok, "{out}");
    assert_eq!(errno_of(std::fs::metadata(&snap)), Some(libc::ENOENT));
    let (ok, out) = cfs(&["admin", "snapshot", "delete", &s(&a), "s1"]);
    assert!(!ok && out.contains("no snapshot named s1"), "{out}");
    std::fs::remove_dir(&a).expect("empty once its snapshots are deleted");
    let goal = empty + (8 * MIB) as u64;
    let after = c.wait_stored(90, |s| s <= goal);
    assert!(
        after <= goal,
        "{after} bytes stored after delete, {empty} when empty"
    );
    c.fsck_clean();
}

/// The writer's step `i`: file `f-i` (written whole under a temporary
/// name, then renamed), then `f-(i-10)` removed.
fn body(i: u64) -> Vec<u8> {
    let mut b = format!("file {i}\n").into_bytes();
    b.extend(noise(9000 + i, 3000 + (i as usize % 7) * 20_000));
    b
}

/// The `f-N` numbers present in `dir`; panics if any reads back wrong.
fn numbers_in(dir: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("f-") {
            let n: u64 = n.parse().unwrap();
            let got = std::fs::read(e.path()).unwrap();
            assert!(
                got == body(n),
                "{}: not what was written",
                e.path().display()
            );
            out.push(n);
        }
    }
    out.sort();
    out
}

#[test]
fn a_snapshot_taken_under_writes_is_the_tree_at_one_point_of_the_log() {
    let c = Cluster::start("snapload");
    let m = Mount::new(&c, "mnt", &[]);
    let w = m.path.join("lab/run");
    std::fs::create_dir_all(&w).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (w, stop) = (w.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let tmp = w.join(format!(".tmp-{i}"));
                std::fs::write(&tmp, body(i)).unwrap();
                std::fs::rename(&tmp, w.join(format!("f-{i}"))).unwrap();
                if i >= 10 {
                    std::fs::remove_file(w.join(format!("f-{}", i - 10))).unwrap();
                }
                i += 1;
            }
            i
        })
    };
    let mut taken = Vec::new();
    for k in 0..5 {
        std::thread::sleep(Duration::from_millis(1500));
        let name = format!("t{k}");
        let (ok, out) = cfs(&["admin", "snapshot", "create", &s(&w), "--name", &name]);
        assert!(ok, "{out}");
        taken.push(name);
    }
    stop.store(true, Ordering::Relaxed);
    let steps = writer.join().unwrap();
    assert!(steps > 30, "the writer ran ({steps} steps)");
    let mut last = 0;
    for name in &taken {
        let snap = w.join(".snapshots").join(name);
        let n = numbers_in(&snap);
        // A prefix of the writer's steps: 10 or 11 consecutive files
        // (between a rename and its removal), each whole.
        assert!(!n.is_empty(), "{name}: empty");
        let (lo, hi) = (n[0], n[n.len() - 1]);
        assert_eq!(n, (lo..=hi).collect::<Vec<_>>(), "{name}: a gap");
        assert!(
            n.len() == 10 || n.len() == 11 || (lo == 0 && hi < 11),
            "{name}: {} files {lo}..={hi}",
            n.len()
        );
        assert!(hi >= last, "{name}: snapshots follow the log");
        last = hi;
        // At most the one temporary file being written, no other.
        let tmps: Vec<String> = std::fs::read_dir(&snap)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(tmps.len() <= 1, "{name}: {tmps:?}");
        if let Some(t) = tmps.first() {
            assert_eq!(t, &format!(".tmp-{}", hi + 1), "{name}");
        }
    }
    // One restored is the snapshot.
    let to = m.path.join("lab/back");
    let (ok, out) = cfs(&["admin", "snapshot", "restore", &s(&w), "t2", &s(&to)]);
    assert!(ok, "{out}");
    assert_eq!(tree(&to), tree(&w.join(".snapshots/t2")));
    c.fsck_clean();
}
