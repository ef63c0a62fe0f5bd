//! Space reclamation on a real 3-node cluster with a FUSE mount
//! (docs/decisions.md D48): what nothing references any more is freed
//! from the segment servers' disks; what a file (or a copy by reference)
//! still names stays readable, byte for byte; the counts equal a recount
//! from the extents (`cfs fsck`) after kill -9 of the freeing node in the
//! middle of it; statfs reports the segment store.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cfs_node::cluster;
use common::fuse::Mount;
use common::noise as content;
use common::Cluster;

/// Bytes of fragment files on the three segment servers.
fn stored(c: &Cluster) -> u64 {
    c.fragment_bytes()
}

/// Half log-like text (compressed by the mount, D49), half
/// incompressible bytes.
fn mixed(seed: u64, len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = (0..)
        .flat_map(|i: u64| format!("{seed} {i:08} segment={} ok\n", i % 31).into_bytes())
        .take(len / 2)
        .collect();
    out.extend(content(seed, len - len / 2));
    out
}

fn write_tree(dir: &Path, files: u64, len: usize, seed: u64) {
    write_tree_of(dir, files, len, seed, content)
}

fn write_tree_of(dir: &Path, files: u64, len: usize, seed: u64, make: fn(u64, usize) -> Vec<u8>) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..files {
        std::fs::write(dir.join(format!("f{i}")), make(seed + i, len)).unwrap();
    }
}

fn check_tree_of(dir: &Path, files: u64, len: usize, seed: u64, make: fn(u64, usize) -> Vec<u8>) {
    for i in 0..files {
        let p = dir.join(format!("f{i}"));
        let got = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            got == make(seed + i, len),
            "{} does not read back byte-exact",
            p.display()
        );
    }
}

fn freed_total(c: &Cluster) -> u64 {
    (1..=3)
        .map(|id| c.metric(id, "claudefs_gc_segments_freed_total"))
        .sum()
}

const MIB: usize = 1 << 20;

#[test]
fn what_nothing_references_is_freed_and_the_rest_reads_back() {
    let c = Cluster::start_with("gc", |cfg| {
        cfg.gc_interval_ms = 300;
        cfg.gc_grace_ms = 1000;
    });
    let m = Mount::new(&c, "mnt", &[]);
    let empty = stored(&c);
    // Written first, so that their segments hold nothing else once the
    // mount's writers went idle and sealed them.
    write_tree(&m.path.join("drop"), 24, 3 * MIB, 100);
    let before_keep = stored(&c);
    std::thread::sleep(Duration::from_secs(12));
    write_tree(&m.path.join("keep"), 6, 2 * MIB, 200);
    // A copy by reference (copy_file_range) shares the original's stripes.
    let out = Command::new("cp")
        .arg(m.path.join("keep/f0"))
        .arg(m.path.join("keep-copy"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let full = stored(&c);
    eprintln!(
        "stored: empty {empty}, after drop/ {before_keep}, after keep/ {full} (MiB: {})",
        full >> 20
    );
    assert!(full - empty >= (24 * 3 * MIB) as u64, "the data is on disk");

    std::fs::remove_dir_all(m.path.join("drop")).unwrap();
    std::fs::remove_file(m.path.join("keep/f0")).unwrap();
    let live = (6 * 2 * MIB) as u64;
    // 2+1 erasure coding stores 1.5 bytes per byte; within 10 % of that
    // plus what the servers keep per fragment (headers, proofs).
    let goal = empty + live * 3 / 2 * 11 / 10 + (8 * MIB) as u64;
    let after = c.wait_stored(90, |s| s <= goal);
    eprintln!(
        "stored after rm: {after} bytes ({} MiB), goal {} MiB, live {} MiB",
        after >> 20,
        goal >> 20,
        live >> 20
    );
    assert!(after <= goal, "{after} bytes still stored, goal {goal}");
    assert!(freed_total(&c) > 0);
    // The copy kept f0's stripes; the other files are intact.
    assert!(std::fs::read(m.path.join("keep-copy")).unwrap() == content(200, 2 * MIB));
    common::fuse::drop_kernel_caches();
    for i in 1..6 {
        let p = m.path.join(format!("keep/f{i}"));
        assert!(std::fs::read(&p).unwrap() == content(200 + i, 2 * MIB));
    }
    // statfs reports the segment store: every server's device times the
    // layout's data share (2 of 3).
    let st = nix_statvfs(&m.path);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seg = c.segment_client();
    let total: u64 = rt.block_on(async {
        let mut t = 0;
        for n in 1..=3 {
            t += seg.stat(n).await.unwrap().total_bytes;
        }
        t
    });
    let want = total * 2 / 3;
    assert!(
        st.abs_diff(want) <= want / 100,
        "statfs total {st}, the store's {want}"
    );
    c.fsck_clean();
}

/// Total bytes statfs reports for `p`.
fn nix_statvfs(p: &Path) -> u64 {
    let path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path and a zeroed out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
    st.f_blocks * st.f_frsize
}

#[test]
fn killing_the_freeing_node_frees_nothing_referenced_and_leaks_nothing() {
    let c = Cluster::start_with("gc-kill", |cfg| {
        cfg.gc_interval_ms = 200;
        cfg.gc_grace_ms = 500;
    });
    let m = Mount::new(&c, "mnt", &[]);
    let empty = stored(&c);
    // Half of every file compresses: compressed and plain stripes are
    // counted, compacted and freed alike.
    write_tree_of(&m.path.join("keep"), 8, MIB, 500, mixed);
    // Idle: the writers seal the segments holding keep/ alone.
    std::thread::sleep(Duration::from_secs(11));
    for round in 0..3u64 {
        let dir = m.path.join(format!("churn{round}"));
        write_tree_of(&dir, 16, 2 * MIB, 1000 * (round + 1), mixed);
        // Idle: the writers seal their segments.
        std::thread::sleep(Duration::from_secs(11));
        std::fs::remove_dir_all(&dir).unwrap();
        // Kill the node leading the first shard (it frees) while the
        // others fence, at a different moment each round.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let freer = rt.block_on(c.leader(cfs_log::ShardId(0)));
        std::thread::sleep(Duration::from_millis(150 * round));
        cluster::stop_node(&c.dir, freer, libc::SIGKILL, Duration::from_secs(5)).unwrap();
        cluster::start_node(&c.dir, freer, &common::bin()).unwrap();
        cluster::wait_healthy(&c.cfgs, Duration::from_secs(30)).unwrap();
        check_tree_of(&m.path.join("keep"), 8, MIB, 500, mixed);
    }
    let live = (8 * MIB) as u64;
    let goal = empty + live * 3 / 2 * 11 / 10 + (8 * MIB) as u64;
    let after = c.wait_stored(90, |s| s <= goal);
    eprintln!(
        "stored after the churn: {} MiB, goal {} MiB",
        after >> 20,
        goal >> 20
    );
    assert!(
        after <= goal,
        "{after} bytes still stored (leaked), goal {goal}"
    );
    common::fuse::drop_kernel_caches();
    check_tree_of(&m.path.join("keep"), 8, MIB, 500, mixed);
    c.fsck_clean();
}

#[test]
fn mostly_dead_segments_are_compacted_and_freed() {
    use std::io::{Seek, SeekFrom, Write};
    let c = Cluster::start_with("gc-compact", |cfg| {
        cfg.gc_interval_ms = 300;
        cfg.gc_grace_ms = 1000;
    });
    let m = Mount::new(&c, "mnt", &[]);
    let empty = stored(&c);
    let f = m.path.join("f");
    let mut want = content(7, 16 * MIB);
    std::fs::write(&f, &want).unwrap();
    // Idle: the segments holding f are sealed.
    std::thread::sleep(Duration::from_secs(12));
    // Most of f rewritten in place: the segment holding its end (a
    // mount's writer takes 8 MiB of one flush) keeps a quarter of live
    // data, below the compaction threshold; the one holding its start
    // is all dead.
    let fresh = content(8, 14 * MIB);
    let mut h = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    h.seek(SeekFrom::Start(0)).unwrap();
    h.write_all(&fresh).unwrap();
    h.sync_all().unwrap();
    drop(h);
    want[..14 * MIB].copy_from_slice(&fresh);
    let live = (16 * MIB) as u64;
    let compacted = || -> u64 {
        (1..=3)
            .map(|id| c.metric(id, "claudefs_gc_segments_compacted_total"))
            .sum()
    };
    let until = Instant::now() + Duration::from_secs(60);
    while compacted() == 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(250));
    }
    let compacted = compacted();
    // What is left: the live data, erasure coded, within 10 %, and the
    // servers' per-fragment overhead.
    let goal = empty + live * 3 / 2 * 11 / 10 + (2 * MIB) as u64;
    let after = c.wait_stored(90, |s| s <= goal);
    eprintln!(
        "stored after the rewrite: {} MiB, goal {} MiB, compacted {compacted}",
        after >> 20,
        goal >> 20
    );
    assert!(compacted > 0, "no segment was compacted");
    assert!(after <= goal, "{after} bytes still stored, goal {goal}");
    common::fuse::drop_kernel_caches();
    assert!(std::fs::read(&f).unwrap() == want, "f does not read back");
    // A second mount (no cache) reads the relocated extents too.
    let m2 = Mount::new(&c, "mnt2", &[]);
    assert!(std::fs::read(m2.path.join("f")).unwrap() == want);
    c.fsck_clean();
}
