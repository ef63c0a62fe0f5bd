//! End-to-end tests of the file system: a real 3-node cluster, real FUSE
//! mounts made by `cfs mount`, and third-party/own checkers on top.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cfs_log::ShardId;
use cfs_node::{cluster, mounts};
use common::fuse::{cfs, drop_kernel_caches, mount_counter, Mount};
use common::Cluster;

fn run_cfs(args: &[&str]) -> String {
    let out = Command::new(cfs()).args(args).output().expect("run cfs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cfs {args:?} failed:\n{text}");
    text
}

fn pjdfstest_bin() -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    [
        PathBuf::from(&home).join(".cargo/bin/pjdfstest"),
        PathBuf::from("/usr/local/bin/pjdfstest"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// Waits until every node's materializer applied the same positions.
fn wait_applied_equal(c: &Cluster) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let views: Vec<String> = c
            .cfgs
            .iter()
            .map(|cfg| {
                let (_, body) = cluster::http_get(cfg.http, "/health").expect("health");
                let v: serde_json::Value = serde_json::from_str(&body).expect("json");
                v["namespace_applied"].to_string()
            })
            .collect();
        if views.iter().all(|v| v == &views[0]) && views[0] != "null" {
            return;
        }
        assert!(
            Instant::now() < until,
            "applied positions never converged: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn dump(c: &Cluster, node: u64) -> String {
    run_cfs(&[
        "ns-dump",
        "--dir",
        c.dir.to_str().expect("utf8"),
        "--node",
        &node.to_string(),
    ])
}

#[test]
fn posix_suite_integrity_and_replay() {
    // Keep the whole log so node 3 can rebuild its namespace by replay.
    let c = Cluster::start_with("fs-posix", |cfg| cfg.log_retain_entries = u64::MAX / 2);
    let m = Mount::new(&c, "mnt", &[]);

    // pjdfstest, the POSIX suite: 0 failures; the only skips are the ones
    // ext4 skips here too (no read-only fs given) and LINK_MAX, which
    // glibc cannot learn from a FUSE mount (docs/posix.md).
    let pjd = pjdfstest_bin().expect("pjdfstest is installed by scripts/setup.sh");
    let work = m.path.join("pjd");
    let sec = c.dir.join("pjd-secondary");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&sec).unwrap();
    let cfg = c.dir.join("pjdfstest.toml");
    std::fs::write(
        &cfg,
        "[features]\nposix_fallocate = {}\nrename_ctime = {}\nutime_now = {}\nutimensat = {}\n\n[settings]\nnaptime = 0.01\n\n[dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"]]\n",
    )
    .unwrap();
    let out = Command::new(&pjd)
        .arg("-c")
        .arg(&cfg)
        .arg("-p")
        .arg(&work)
        .arg("-s")
        .arg(&sec)
        .current_dir(&c.dir)
        .output()
        .expect("pjdfstest");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let summary = text
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or("no summary")
        .to_string();
    eprintln!("pjdfstest: {summary}");
    assert!(
        summary.contains(" 0 failed,"),
        "pjdfstest failures:\n{text}"
    );
    assert!(summary.contains(" 0 expected failures"), "{summary}");
    for l in text.lines().filter(|l| l.trim_end().ends_with("skipped")) {
        let name = l.split_whitespace().next().unwrap_or("");
        assert!(
            name.contains("erofs") || name == "link::link_count_max",
            "unexpected skip: {l}"
        );
    }

    // fsx-style integrity, two seeds.
    let f = m.path.join("fsx.bin");
    for seed in ["11", "12"] {
        run_cfs(&[
            "fsx",
            f.to_str().unwrap(),
            "--seed",
            seed,
            "--ops",
            "1500",
            "--max-size",
            "2000000",
            "--max-op",
            "200000",
        ]);
    }
    // Around the inline limit (INLINE_BYTES_MAX, 64 KiB): inline pieces
    // and stripes mixed in one file, split by overwrites and truncates.
    run_cfs(&[
        "fsx",
        m.path.join("fsx-small.bin").to_str().unwrap(),
        "--seed",
        "21",
        "--ops",
        "2000",
        "--max-size",
        "150000",
        "--max-op",
        "30000",
    ]);
    // Differential against a local directory.
    let local = c.dir.join("diff-local");
    run_cfs(&[
        "difftest",
        m.path.join("diff").to_str().unwrap(),
        local.to_str().unwrap(),
        "--ops",
        "800",
        "--runs",
        "3",
    ]);

    // Every replica materialized the same namespace.
    let d1 = same_namespace(&c, 1, 2);
    assert!(
        d1.lines().count() > 100,
        "namespace too small to be meaningful"
    );
    let _ = c.fsck_clean();
    same_namespace(&c, 1, 3);

    // Rebuilt from scratch by replaying the log, it is the same again.
    cluster::stop_node(&c.dir, 3, libc::SIGTERM, Duration::from_secs(10)).unwrap();
    std::fs::remove_dir_all(cluster::node_dir(&c.dir, 3).join("data/namespace")).unwrap();
    cluster::start_node(&c.dir, 3, &common::bin()).unwrap();
    cluster::wait_healthy(&c.cfgs, Duration::from_secs(30)).unwrap();
    same_namespace(&c, 1, 3);
    drop(m);
}

/// The namespace dumps of nodes `x` and `y` once they applied the same
/// entries, equal (asserted); returns it. The mount's hold renewals
/// (every `cfs_proto::hold::RENEW_EVERY`) may land between the two dumps:
/// then both are taken again.
fn same_namespace(c: &Cluster, x: u64, y: u64) -> String {
    let mut last = None;
    for _ in 0..5 {
        wait_applied_equal(c);
        let (a, b) = (dump(c, x), dump(c, y));
        if a == b {
            return a;
        }
        last = Some((a, b));
    }
    let (a, b) = last.expect("compared");
    assert_eq!(a, b, "node {y}'s namespace differs from node {x}'s");
    a
}

/// A name that places a new directory in the root on `shard`.
fn dir_name_on(shard: u32, stem: &str) -> String {
    (0..)
        .map(|i| format!("{stem}{i}"))
        .find(|n| {
            cfs_materializers::tx::place_dir(
                cfs_materializers::types::ROOT_INO,
                n.as_bytes(),
                &[ShardId(0), ShardId(1)],
            ) == ShardId(shard)
        })
        .unwrap()
}

/// Restarts every node with fault-injection point `failpoint` set.
fn restart_all_with_failpoint(c: &Cluster, failpoint: &str) {
    for n in 1..=3 {
        cluster::stop_node(&c.dir, n, libc::SIGTERM, Duration::from_secs(10)).unwrap();
        cluster::start_node_env(&c.dir, n, &common::bin(), &[("CFS_FAILPOINT", failpoint)])
            .unwrap();
        cluster::wait_healthy(&c.cfgs, Duration::from_secs(30)).unwrap();
    }
}

/// A mount that talks to node `first` and stays there while it answers
/// (the others only as failover).
fn mount_on_first(c: &Cluster, first: u64, name: &str) -> Mount {
    let meta = |n: u64| c.cfg(n).meta_listen.expect("meta").to_string();
    let mut order = vec![meta(first)];
    order.extend((1..=3).filter(|n| *n != first).map(meta));
    let servers = order.join(",");
    Mount::new(
        c,
        name,
        &["--servers", &servers, "--follow-leader", "false"],
    )
}

/// Changes answered early (D30) by a leader that dies before their entries
/// reach any replica (a fault-injection point: the entry is never queued,
/// the node aborts 300 ms later) are replayed by the mount on its next
/// session, once, and `fsync` returns only when they are decided there.
#[test]
fn changes_answered_early_are_replayed_once_after_the_leader_dies() {
    let c = Cluster::start("fs-replay");
    restart_all_with_failpoint(&c, "early-answer-lost");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // The root is on shard 0: the mount talks to its leader first, once
    // it has led for a lease's hold (no early answers before: D30).
    let leader = common::stable_leader(
        cfs_proto::lease::server_hold() + Duration::from_millis(500),
        || rt.block_on(c.leader(ShardId(0))),
    );
    let m = mount_on_first(&c, leader, "m");
    // The create and the extent commit of `f` are answered by the leader,
    // which never logs them.
    std::fs::write(m.path.join("f"), b"replayed").expect("write");
    std::fs::File::open(m.path.join("f"))
        .and_then(|f| f.sync_all())
        .expect("fsync: the changes replayed on the next leader");
    assert_eq!(std::fs::read(m.path.join("f")).unwrap(), b"replayed");
    let names: Vec<String> = std::fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["f".to_string()]);
    assert!(
        c.log_of(leader)
            .contains("failpoint early-answer-lost reached"),
        "the leader did not answer early and die"
    );
    let mlog = std::fs::read_to_string(c.dir.join("m.log")).expect("mount log");
    assert!(mlog.contains("replaying changes"), "{mlog}");
    assert!(!mlog.contains("did not apply as first answered"), "{mlog}");
}

/// A cross-shard mkdir answered once its finishes were ordered (D37), by
/// a leader that dies before they reach any replica (a fault-injection
/// point: the finishes are never queued, the node aborts 300 ms later):
/// the decision is in the log, recovery finishes the transaction, and
/// the mount's replay of the mkdir gets its recorded outcome; the
/// directory is there once, usable, and every replica passes fsck.
#[test]
fn early_finishes_lost_with_their_leader_are_completed_by_recovery() {
    let c = Cluster::start("fs-finish-lost");
    restart_all_with_failpoint(&c, "tx-finish-lost");
    // Past the new leader's fence (no early answers before it: D30).
    let leader = common::stable_leader(
        cfs_proto::lease::server_hold() + Duration::from_millis(500),
        || c.wait_leaders_together(),
    );
    let m = mount_on_first(&c, leader, "m");
    let remote = dir_name_on(1, "lost");
    std::fs::create_dir(m.path.join(&remote)).expect("mkdir across shards");
    std::fs::File::open(&m.path)
        .and_then(|f| f.sync_all())
        .expect("fsync: the mkdir decided on the next leader");
    std::fs::write(m.path.join(&remote).join("f"), b"inside").unwrap();
    assert_eq!(
        std::fs::read(m.path.join(&remote).join("f")).unwrap(),
        b"inside"
    );
    let names: Vec<String> = std::fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![remote.clone()]);
    assert!(
        c.log_of(leader)
            .contains("failpoint tx-finish-lost reached"),
        "the leader did not answer early and die"
    );
    let mlog = std::fs::read_to_string(c.dir.join("m.log")).expect("mount log");
    assert!(mlog.contains("replaying changes"), "{mlog}");
    assert!(!mlog.contains("did not apply as first answered"), "{mlog}");
    drop(m);
    // The dead leader back (without the fault), so fsck sees every replica.
    cluster::start_node_env(&c.dir, leader, &common::bin(), &[]).unwrap();
    cluster::wait_healthy(&c.cfgs, Duration::from_secs(30)).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        // Recovery may still be finishing on a replica: asked again.
        let clean = (1..=3u64).all(|n| {
            Command::new(cfs())
                .args(["fsck", "--dir", c.dir.to_str().unwrap()])
                .args(["--node", &n.to_string()])
                .output()
                .is_ok_and(|o| {
                    o.status.success()
                        && String::from_utf8_lossy(&o.stdout)
                            .contains(" 0 open transaction records, 0 problems")
                })
        });
        if clean {
            break;
        }
        assert!(Instant::now() < until, "fsck never came out clean");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The node a mount talks to is killed (abort at a fault-injection point)
/// between the phases of a cross-shard operation; the mount fails over,
/// retries the same operation, recovery completes the abandoned
/// transaction, and the operation happens exactly once.
#[test]
fn coordinator_crash_between_phases() {
    let c = Cluster::start("fs-2pc");
    let remote = dir_name_on(1, "r");
    for (round, fp) in [
        "tx-after-prepare",
        "tx-after-decide",
        "tx-after-finish-others",
    ]
    .into_iter()
    .enumerate()
    {
        cluster::stop_node(&c.dir, 1, libc::SIGTERM, Duration::from_secs(10)).unwrap();
        cluster::start_node_env(&c.dir, 1, &common::bin(), &[("CFS_FAILPOINT", fp)]).unwrap();
        cluster::wait_healthy(&c.cfgs, Duration::from_secs(30)).unwrap();
        // Node 1 coordinates: the mount stays on the first server.
        let m = Mount::new(&c, &format!("mnt{round}"), &["--follow-leader", "false"]);
        let t = Instant::now();
        match round {
            // A directory placed on shard 1 under the root (shard 0).
            0 => std::fs::create_dir(m.path.join(&remote)).expect("mkdir across shards"),
            // A file moved from the root into that directory.
            1 => {
                std::fs::write(m.path.join("f"), b"payload").unwrap();
                std::fs::rename(m.path.join("f"), m.path.join(&remote).join("f"))
                    .expect("rename across shards")
            }
            // The file moved back, and the directory removed.
            _ => {
                std::fs::rename(m.path.join(&remote).join("f"), m.path.join("g"))
                    .expect("rename back across shards");
                std::fs::remove_dir(m.path.join(&remote)).expect("rmdir across shards")
            }
        }
        eprintln!("{fp}: the operation returned after {:?}", t.elapsed());
        assert!(
            c.log_of(1).contains(&format!("failpoint {fp} reached")),
            "{fp}: node 1 did not stop at the failpoint"
        );
        // The mount goes on working, and sees the outcome once.
        let names: Vec<String> = std::fs::read_dir(&m.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        match round {
            0 => assert!(names.contains(&remote), "{names:?}"),
            1 => {
                assert!(!names.contains(&"f".to_string()), "{names:?}");
                assert_eq!(
                    std::fs::read(m.path.join(&remote).join("f")).unwrap(),
                    b"payload"
                );
            }
            _ => {
                assert!(!names.contains(&remote), "{names:?}");
                assert_eq!(std::fs::read(m.path.join("g")).unwrap(), b"payload");
            }
        }
        drop(m);
        cluster::start_node(&c.dir, 1, &common::bin()).unwrap();
        cluster::wait_healthy(&c.cfgs, Duration::from_secs(30)).unwrap();
    }
    wait_applied_equal(&c);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let d1 = dump(&c, 1);
        if d1 == dump(&c, 2) && d1 == dump(&c, 3) && !d1.lines().any(|l| l.starts_with("70")) {
            break;
        }
        assert!(
            Instant::now() < until,
            "replicas differ or an intent stayed open"
        );
        std::thread::sleep(Duration::from_millis(200));
        wait_applied_equal(&c);
    }
    let _ = c.fsck_clean();
}

/// Writes `n` files with fsync under `dir`, recording the ones whose fsync
/// succeeded.
fn write_files(dir: &Path, from: usize, n: usize, acked: &std::sync::Mutex<Vec<usize>>) {
    use std::io::Write;
    for i in from..from + n {
        let p = dir.join(format!("f{i}"));
        let r = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&p)?;
            f.write_all(&content(i))?;
            f.sync_all()
        })();
        if r.is_ok() {
            acked.lock().unwrap().push(i);
        }
    }
}

fn content(i: usize) -> Vec<u8> {
    (0..(4096 + i * 37 % 70_000))
        .map(|j| (i * 7 + j) as u8)
        .collect()
}

#[test]
fn kill_a_node_during_writes() {
    let c = Cluster::start("fs-kill");
    // The mount talks to node 1 first: kill exactly that one.
    let m = Mount::new(&c, "mnt", &[]);
    let dir = m.path.join("load");
    std::fs::create_dir_all(&dir).unwrap();
    let acked = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| write_files(&dir, 0, 400, &acked));
        std::thread::sleep(Duration::from_millis(1500));
        cluster::stop_node(&c.dir, 1, libc::SIGKILL, Duration::from_secs(1)).unwrap();
        let killed = Instant::now();
        // The mount keeps working: a new file can be created and read.
        let p = m.path.join("after-kill");
        std::fs::write(&p, b"still here").expect("write after kill");
        assert_eq!(std::fs::read(&p).unwrap(), b"still here");
        eprintln!("first write after kill -9 took {:?}", killed.elapsed());
        // A dead connection is noticed at once, not after the call timeout.
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the mount stalled {:?}",
            killed.elapsed()
        );
    });
    let acked = acked.into_inner().unwrap();
    assert!(
        acked.len() >= 350,
        "only {} of 400 writes succeeded",
        acked.len()
    );
    for i in &acked {
        assert_eq!(
            std::fs::read(dir.join(format!("f{i}"))).unwrap(),
            content(*i),
            "fsync'd file f{i} lost or wrong"
        );
    }
    // The killed node restarts and catches up.
    cluster::start_node(&c.dir, 1, &common::bin()).unwrap();
    cluster::wait_healthy(&c.cfgs, Duration::from_secs(30)).unwrap();
    wait_applied_equal(&c);
    drop(m);
}

#[test]
fn two_mounts_see_each_other() {
    let c = Cluster::start("fs-two");
    let a = Mount::new(&c, "a", &[]);
    // b talks to node 2 first, so a's changes reach it through the log.
    let servers = [2usize, 3, 1]
        .iter()
        .map(|i| c.cfgs[i - 1].meta_listen.expect("meta").to_string())
        .collect::<Vec<_>>()
        .join(",");
    let b = Mount::new(&c, "b", &["--servers", &servers]);
    // Close-to-open: written and closed on a, read whole on b.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let same = |got: Vec<u8>, what: &str| {
        assert!(
            got == data,
            "{what}: read {} bytes on b, {} written on a",
            got.len(),
            data.len()
        )
    };
    std::fs::write(a.path.join("shared"), &data).unwrap();
    same(std::fs::read(b.path.join("shared")).unwrap(), "new file");
    // Even when b's kernel holds the attributes of an older version: b
    // (on a follower, without leases) saw the file empty, and its open
    // after a's close must not read up to that old size.
    std::fs::write(a.path.join("grown"), b"").unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    while std::fs::metadata(b.path.join("grown")).is_err() {
        assert!(Instant::now() < until, "create not visible on b");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Small, so b opens it well within the attribute TTL of its stat.
    std::fs::write(a.path.join("grown"), b"grown since").unwrap();
    assert_eq!(
        std::fs::read(b.path.join("grown")).unwrap(),
        b"grown since",
        "b read up to the size its kernel had cached"
    );
    // Overwritten on b, seen on a at the next open.
    std::fs::write(b.path.join("shared"), b"short now").unwrap();
    assert_eq!(std::fs::read(a.path.join("shared")).unwrap(), b"short now");
    // A rename on one is visible on the other.
    std::fs::create_dir(a.path.join("dir")).unwrap();
    std::fs::rename(a.path.join("shared"), a.path.join("dir/moved")).unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    while b.path.join("shared").exists() {
        assert!(
            Instant::now() < until,
            "rename not visible on the other mount"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read(b.path.join("dir/moved")).unwrap(),
        b"short now"
    );
    // A rename over a file is atomic for readers on the other mount: the
    // name they know always opens, old or new content, never ENOENT (the
    // kernel's name for the replaced inode is looked up again: ESTALE).
    for round in 0..20 {
        let new = format!("round {round}");
        std::fs::write(a.path.join("dir/next"), &new).unwrap();
        // b knows the name (its kernel maps it to the current inode).
        let listed: Vec<_> = std::fs::read_dir(b.path.join("dir")).unwrap().collect();
        assert!(!listed.is_empty());
        let _ = std::fs::metadata(b.path.join("dir/moved")).unwrap();
        std::fs::rename(a.path.join("dir/next"), a.path.join("dir/moved")).unwrap();
        assert_eq!(
            std::fs::read_to_string(b.path.join("dir/moved")).unwrap(),
            new,
            "round {round}"
        );
    }
    std::fs::write(a.path.join("dir/moved"), b"short now").unwrap();
    // Before any lock: a mount holding one renews its hold with an entry
    // every few seconds, which this check's entry count would see.
    tar_like_attributes_ride_with_the_data(&c, &a, &b);
    // POSIX locks hold across mounts.
    use std::os::unix::io::AsRawFd;
    let fa = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.path.join("dir/moved"))
        .unwrap();
    let fb = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.path.join("dir/moved"))
        .unwrap();
    let lock = |fd: i32, typ: i32| {
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = typ as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        // SAFETY: fcntl(2) with a valid descriptor and flock struct.
        unsafe { libc::fcntl(fd, libc::F_SETLK, &fl) }
    };
    assert_eq!(lock(fa.as_raw_fd(), libc::F_WRLCK), 0, "first lock");
    assert_eq!(
        lock(fb.as_raw_fd(), libc::F_WRLCK),
        -1,
        "conflicting lock on the other mount must fail"
    );
    drop(fa);
    assert_eq!(
        lock(fb.as_raw_fd(), libc::F_WRLCK),
        0,
        "lock after the holder closed"
    );
    drop(fb);
}

/// Every namespace entry applied so far, over all shards (node 1).
fn entries_applied(c: &Cluster) -> u64 {
    let (_, body) = cluster::http_get(c.cfg(1).http, "/metrics").expect("metrics");
    body.lines()
        .filter(|l| {
            l.starts_with("claudefs_materializer_applied_position{materializer=\"namespace\",")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// What `tar -x` does per file: create, write, futimens, fchown, fchmod,
/// close. The three attribute changes wait for the buffered bytes and
/// ride in their commit (two log entries for the file, not five), and the
/// time set by futimens survives the flush of the bytes written before it.
/// Creates `path` as `tar -x` does (create, write, futimens, fchown,
/// fchmod, close), checks its attributes, and returns how many log entries
/// the cluster applied meanwhile.
fn tar_like_file(c: &Cluster, path: &std::path::Path) -> u64 {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::io::AsRawFd;
    wait_applied_equal(c);
    let before = entries_applied(c);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut &f, b"archived bytes").unwrap();
    let when = libc::timespec {
        tv_sec: 978_307_200, // 2001-01-01
        tv_nsec: 0,
    };
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        when,
    ];
    // SAFETY: futimens(2) and fchown(2) on an open descriptor.
    assert_eq!(unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) }, 0);
    assert_eq!(unsafe { libc::fchown(f.as_raw_fd(), 1000, 1000) }, 0);
    f.set_permissions(std::fs::Permissions::from_mode(0o640))
        .unwrap();
    // Seen at once through the writing mount, before the close.
    let m = f.metadata().unwrap();
    assert_eq!(
        (m.mtime(), m.uid(), m.mode() & 0o7777),
        (978_307_200, 1000, 0o640)
    );
    drop(f);
    let m = std::fs::metadata(path).unwrap();
    assert_eq!(
        (m.mtime(), m.uid(), m.gid(), m.mode() & 0o7777, m.len()),
        (978_307_200, 1000, 1000, 0o640, 14),
        "attributes after close"
    );
    wait_applied_equal(c);
    entries_applied(c) - before
}

fn tar_like_attributes_ride_with_the_data(c: &Cluster, a: &Mount, b: &Mount) {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    let path = a.path.join("from-tar");
    // The count is of every entry the cluster applied meanwhile: the other
    // mount's kernel may release a file it read in the rounds before (a
    // reclaim, a hold renewal) inside the window. Another file is measured
    // then, up to three; the attributes not riding with the data would
    // cost three more entries every time.
    let mut counts = Vec::new();
    for attempt in 0..3 {
        let path = match attempt {
            0 => path.clone(),
            n => a.path.join(format!("from-tar-{n}")),
        };
        counts.push(tar_like_file(c, &path));
        if counts.last().is_some_and(|n| *n <= 2) {
            break;
        }
    }
    assert!(
        counts.last().is_some_and(|n| *n <= 2),
        "create + write with attributes: entries per attempt {counts:?}"
    );
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 978_307_200,
            tv_nsec: 0,
        },
    ];
    // The other mount sees the file whole, with its attributes.
    let m = std::fs::metadata(b.path.join("from-tar")).unwrap();
    assert_eq!(
        (m.mtime(), m.uid(), m.mode() & 0o7777),
        (978_307_200, 1000, 0o640)
    );
    assert_eq!(
        std::fs::read(b.path.join("from-tar")).unwrap(),
        b"archived bytes"
    );
    // A write after a deferred change commits the change first: the
    // write's own time wins, as on a local disk.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::io::Write::write_all(&mut &f, b"A").unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) }, 0);
    std::io::Write::write_all(&mut &f, b"B").unwrap();
    drop(f);
    let m = std::fs::metadata(&path).unwrap();
    assert!(m.mtime() > 978_307_200, "a write after futimens sets mtime");
    assert_eq!(&std::fs::read(&path).unwrap()[..2], b"AB");
}

#[test]
fn bad_input_and_unreachable_servers() {
    let c = Cluster::start("fs-bad");
    let m = Mount::new(&c, "mnt", &["--timeout", "3"]);
    let long = "x".repeat(256);
    let e = std::fs::write(m.path.join(&long), b"").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    let deep = (0..1100).map(|_| "abc").collect::<Vec<_>>().join("/");
    let e = std::fs::create_dir_all(m.path.join(deep)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    // The first write after start may take longer than the 3 s timeout on
    // a loaded machine (a CI run of every test at once): it is retried
    // until the cluster answers; the timeout itself is tested below.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match std::fs::write(m.path.join("ok"), b"fine") {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EIO) && Instant::now() < until => {
                eprintln!("write before the kill: {e}; again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("write before the kill: {e}"),
        }
    }
    // All servers gone: calls fail within the timeout instead of hanging.
    for cfg in &c.cfgs {
        cluster::stop_node(&c.dir, cfg.node_id, libc::SIGKILL, Duration::from_secs(1)).unwrap();
    }
    let t = Instant::now();
    let e = std::fs::write(m.path.join("new-file"), b"x").unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENOTCONN)),
        "unexpected error {e}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
}

/// Full segment devices reach the application as ENOSPC (not EIO), and
/// what was written before stays readable.
/// A node whose log disk runs low refuses new changes with ENOSPC before
/// the disk is full: the application sees ENOSPC, no shard fails, and
/// `/health` says why.
#[test]
fn a_log_disk_low_on_space_refuses_changes_with_enospc() {
    struct Unmount(Vec<PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            for m in &self.0 {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
    let mounted = std::cell::RefCell::new(Unmount(Vec::new()));
    let c = Cluster::start_with("fs-logfull", |cfg| {
        cfg.wal_segment_mib = 1;
        let wal = cfg.data_dir.join("log/wal");
        std::fs::create_dir_all(&wal).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
            .arg(&wal)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a tmpfs needs root");
        mounted.borrow_mut().0.push(wal);
    });
    let _unmount = mounted.into_inner();
    let m = Mount::new(&c, "mnt", &["--timeout", "10"]);
    let body = vec![3u8; 1024];
    let mut made = 0;
    let err = loop {
        assert!(made < 20_000, "never refused");
        match std::fs::write(m.path.join(format!("f{made}")), &body) {
            Ok(()) => made += 1,
            Err(e) => break e,
        }
    };
    eprintln!("refused after {made} files: {err}");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "got {err}");
    // What was made stays.
    assert_eq!(std::fs::read(m.path.join("f0")).unwrap(), body);
    for cfg in &c.cfgs {
        let (code, health) = cluster::http_get(cfg.http, "/health").expect("health");
        assert!(!health.contains("failed"), "node {}: {health}", cfg.node_id);
        if health.contains("log disk low") {
            assert_eq!(code, 503, "{health}");
        }
    }
    let (_, leader_health) = c
        .cfgs
        .iter()
        .map(|cfg| cluster::http_get(cfg.http, "/health").expect("health"))
        .find(|(_, h)| h.contains("log disk low"))
        .expect("a node says its log disk is low");
    assert!(
        leader_health.contains("refused with ENOSPC"),
        "{leader_health}"
    );
}

/// A mount that first reaches a node not leading the shards moves to the
/// one that does (`--follow-leader`), and works there.
#[test]
fn a_mount_moves_to_the_node_leading_the_shards() {
    let c = Cluster::start("fs-leader");
    // Leader affinity gathers the shards on one node: wait for that, and
    // for it to stay a while, so the leader the mount should find does
    // not change under the test.
    let leader = common::stable_leader(Duration::from_secs(2), || c.wait_leaders_together());
    let other = (1..=3).find(|n| *n != leader).expect("a follower");
    let meta = |n: u64| c.cfg(n).meta_listen.expect("meta").to_string();
    let servers = format!("{},{}", meta(other), meta(leader));
    let m = Mount::new(&c, "m", &["--servers", &servers, "--follow-leader", "true"]);
    std::fs::write(m.path.join("f"), b"hello").expect("write");
    assert_eq!(std::fs::read(m.path.join("f")).expect("read"), b"hello");
    // The move happens either at once (the first node's welcome names
    // the leader) or in the background (lease renewals find the node
    // leads no shard, while leadership was still settling): either way
    // the mount's last session must be with the leader.
    // A busy machine can still move leadership later: the mount must
    // follow it, so its session is compared with the leader of the moment.
    let on_leader = |log: &str, leader: u64| {
        log.lines()
            .rfind(|l| l.contains("connected to metadata service"))
            .is_some_and(|l| l.contains(&format!("node_id={leader}")))
    };
    let until = Instant::now() + Duration::from_secs(30);
    let (log, now_leading) = loop {
        let now_leading = c.wait_leaders_together();
        let log = std::fs::read_to_string(c.dir.join("m.log")).expect("mount log");
        if on_leader(&log, now_leading) || Instant::now() > until {
            break (log, now_leading);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(on_leader(&log, now_leading), "{log}");
    assert!(
        log.contains("moved to the node leading the shards")
            || log.contains("looking for the leader"),
        "{log}"
    );
    assert_eq!(std::fs::read(m.path.join("f")).expect("read"), b"hello");
}

/// The mount answers the kernel's capability probe for files it created,
/// but a file given capabilities still loses them when written (the
/// probe then asks the server), as on a local file system.
#[test]
fn file_capabilities_are_dropped_on_write() {
    use std::ffi::CString;
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    let c = Cluster::start("fs-caps");
    let m = Mount::new(&c, "m", &[]);
    let p = m.path.join("tool");
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(b"first").unwrap();
    f.write_all(b" second").unwrap();
    drop(f);
    let path = CString::new(p.as_os_str().as_bytes()).unwrap();
    let name = CString::new("security.capability").unwrap();
    // struct vfs_cap_data, revision 2: CAP_NET_BIND_SERVICE permitted.
    let mut cap = Vec::new();
    for w in [0x0200_0000u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    let get = || {
        let mut buf = [0u8; 64];
        // SAFETY: valid C strings and a buffer of the length given.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error().raw_os_error())
        } else {
            Ok(buf[..n as usize].to_vec())
        }
    };
    assert_eq!(get(), Err(Some(libc::ENODATA)));
    // SAFETY: valid C strings and a value of the length given.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            cap.as_ptr().cast(),
            cap.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    assert_eq!(get(), Ok(cap));
    let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b" third").unwrap();
    drop(f);
    assert_eq!(
        get(),
        Err(Some(libc::ENODATA)),
        "a write drops capabilities"
    );
    assert_eq!(std::fs::read(&p).unwrap(), b"first second third");

    // A write by another user drops set-user-ID (and a setgid
    // executable's set-group-ID) on the server, which takes the writer's
    // identity from the open file handle (D42); a user who may not write
    // is refused there too.
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let sbin = m.path.join("suid");
    std::fs::write(&sbin, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&sbin, std::fs::Permissions::from_mode(0o6777)).unwrap();
    let append_as = |uid: u32, path: &Path| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("echo x >> '{}'", path.display()))
            .uid(uid)
            .gid(uid)
            .output()
            .map(|o| {
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            })
            .unwrap()
    };
    let (ok, err) = append_as(1000, &sbin);
    assert!(ok, "uid 1000 appends to a 0o6777 file: {err}");
    let mode = std::fs::metadata(&sbin).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o777, "set-user-ID and set-group-ID dropped");
    let private = m.path.join("private");
    std::fs::write(&private, b"root's").unwrap();
    assert!(
        !append_as(1000, &private).0,
        "uid 1000 may not write a 0644 file"
    );
    let truncated = std::process::Command::new("truncate")
        .args(["-s", "0"])
        .arg(&private)
        .uid(1000)
        .gid(1000)
        .status()
        .unwrap();
    assert!(
        !truncated.success(),
        "uid 1000 may not truncate a 0644 file"
    );
    assert_eq!(std::fs::read(&private).unwrap(), b"root's");

    // Mounts are nosuid,nodev unless asked (--suid, --dev): whoever can
    // write to the cluster cannot plant a setuid program or a device node
    // on this machine.
    let trusting = Mount::new(&c, "trusting", &["--suid", "--dev"]);
    let flags = |path: &Path| {
        let path = path.canonicalize().unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
            .unwrap_or_else(|| panic!("{} not in mountinfo", path.display()))
            .to_string();
        let opts = line.split(' ').nth(5).unwrap_or("").to_string();
        (
            opts.split(',').any(|o| o == "nosuid"),
            opts.split(',').any(|o| o == "nodev"),
        )
    };
    assert_eq!(flags(&m.path), (true, true), "default mount");
    assert_eq!(flags(&trusting.path), (false, false), "--suid --dev");
}

/// Under a lease, an open of an unchanged file and a stat send nothing
/// to a node; a change on another mount (on the same node, and through
/// another node) is seen by the very next open, with no waiting.
#[test]
fn opens_under_a_lease_send_nothing_and_see_other_mounts_changes() {
    let c = Cluster::start("fs-lease");
    let url_a = c.dir.join("a.metrics-url");
    let a = Mount::new(
        &c,
        "a",
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-url-file",
            url_a.to_str().expect("utf-8"),
        ],
    );
    let f = a.path.join("f");
    std::fs::write(&f, b"one").unwrap();
    let calls = || mount_counter(&url_a, "claudefs_fuse_meta_calls_total");
    // Leases come with the first renewals (a second apart).
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let before = calls();
        for _ in 0..3 {
            let h = std::fs::File::open(&f).unwrap();
            h.metadata().unwrap();
        }
        if calls() == before {
            break;
        }
        assert!(Instant::now() < until, "opens never stopped asking a node");
        std::thread::sleep(Duration::from_millis(200));
    }
    let opens = || mount_counter(&url_a, "claudefs_fuse_requests_total{op=\"open\"}");
    let (calls0, opens0) = (calls(), opens());
    for _ in 0..200 {
        let h = std::fs::File::open(&f).unwrap();
        assert_eq!(h.metadata().unwrap().len(), 3);
    }
    assert!(opens() >= opens0 + 200, "the kernel sent the opens");
    assert_eq!(calls(), calls0, "opens under a lease made round trips");

    // Small files in a directory this mount made: the create and the
    // extent commit at close, nothing else: no lookup of the new name
    // (the directory is known empty, D36), no getattr of the directory
    // after each create nor a stat of the new file (the early answer
    // carried them and its apply does not take them back, D35).
    let own = a.path.join("own/sub");
    std::fs::create_dir_all(&own).unwrap();
    let calls0 = calls();
    for i in 0..20 {
        std::fs::write(own.join(format!("s{i}")), b"small").unwrap();
        assert_eq!(
            std::fs::metadata(own.join(format!("s{i}"))).unwrap().len(),
            5
        );
    }
    let made = calls() - calls0;
    assert!(
        made <= 40,
        "20 small files cost {made} round trips (2 each expected)"
    );

    // Another mount on the same node (it follows the leader too).
    let b = Mount::new(&c, "b", &[]);
    std::fs::write(b.path.join("f"), b"two!").unwrap();
    assert_eq!(
        std::fs::read(&f).unwrap(),
        b"two!",
        "close-to-open, same node"
    );
    // And one on another node: its change waits for a's acknowledgement
    // through the leader's clean position.
    let other = node_not_serving(&c, "a");
    let d = Mount::new(&c, "d", &["--servers", &other, "--follow-leader", "false"]);
    std::fs::write(d.path.join("f"), b"three").unwrap();
    assert_eq!(
        std::fs::read(&f).unwrap(),
        b"three",
        "close-to-open, other node"
    );
    std::fs::create_dir(d.path.join("newdir")).unwrap();
    assert!(
        a.path.join("newdir").is_dir(),
        "a create elsewhere is seen at once"
    );
    // Also in a directory a made and knows the names of: its listing is
    // dropped by d's change, not used to call the new name absent.
    std::fs::write(d.path.join("own/sub/from-d"), b"d").unwrap();
    assert_eq!(
        std::fs::read(own.join("from-d")).unwrap(),
        b"d",
        "a create elsewhere in a directory this mount made"
    );
    drop((b, d));
}

/// The metadata address of a node the mount named `mount` is not
/// connected to (from the mount's log).
fn node_not_serving(c: &Cluster, mount: &str) -> String {
    let log = std::fs::read_to_string(c.dir.join(format!("{mount}.log"))).unwrap_or_default();
    let on = log
        .lines()
        .filter(|l| l.contains("connected to metadata service"))
        .filter_map(|l| l.split("addr=").nth(1)?.split_whitespace().next())
        .next_back()
        .expect("the mount's node in its log")
        .to_string();
    (1..=3)
        .map(|i| c.cfgs[i - 1].meta_listen.expect("meta").to_string())
        .find(|addr| *addr != on)
        .expect("a node the mount is not on")
}

/// Lists `dir` with every entry's attributes, and reads every file.
fn walk(dir: &Path) -> Vec<(String, u64, Vec<u8>)> {
    let mut out: Vec<(String, u64, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let data = std::fs::read(e.path()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), m.len(), data)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn listings_lookups_and_small_files_under_a_lease_send_nothing_and_see_other_mounts_changes() {
    let c = Cluster::start("fs-listings");
    let url_a = c.dir.join("a.metrics-url");
    let a = Mount::new(
        &c,
        "a",
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-url-file",
            url_a.to_str().expect("utf-8"),
        ],
    );
    let calls = || mount_counter(&url_a, "claudefs_fuse_meta_calls_total");
    let d = a.path.join("d");
    std::fs::create_dir(&d).unwrap();
    for i in 0..10 {
        std::fs::write(d.join(format!("f{i}")), vec![i as u8; 4096]).unwrap();
    }
    let expected = walk(&d);
    assert_eq!(expected.len(), 10);
    // Leases come with the first renewals; then a cold walk (the kernel's
    // caches dropped) of what this mount wrote and listed sends nothing.
    // Under the whole suite's load a lease run can break (a late renewal),
    // which makes the next walk fetch again: 20 s was not always enough.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        drop_kernel_caches();
        let before = calls();
        assert_eq!(walk(&d), expected);
        assert!(!d.join("missing").exists());
        if calls() == before {
            break;
        }
        assert!(
            Instant::now() < until,
            "a cold walk never stopped asking a node"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let names = mount_counter(&url_a, "claudefs_fuse_cache_hits_total{cache=\"names\"}");
    let listings = mount_counter(&url_a, "claudefs_fuse_cache_hits_total{cache=\"listings\"}");
    assert!(
        names > 0 && listings > 0,
        "names {names}, listings {listings}"
    );

    // Another mount on another node changes the directory: a sees every
    // change at once, listing and looking up.
    let other = node_not_serving(&c, "a");
    let b = Mount::new(&c, "b", &["--servers", &other, "--follow-leader", "false"]);
    let bd = b.path.join("d");
    std::fs::remove_file(bd.join("f0")).unwrap();
    std::fs::rename(bd.join("f1"), bd.join("g1")).unwrap();
    std::fs::write(bd.join("f2"), b"changed").unwrap();
    std::fs::write(bd.join("new"), b"new").unwrap();
    std::fs::write(bd.join("missing"), b"here now").unwrap();
    assert!(!d.join("f0").exists(), "unlinked elsewhere");
    assert!(!d.join("f1").exists(), "renamed away elsewhere");
    assert_eq!(std::fs::read(d.join("g1")).unwrap(), vec![1u8; 4096]);
    assert_eq!(std::fs::read(d.join("f2")).unwrap(), b"changed");
    assert_eq!(std::fs::read(d.join("missing")).unwrap(), b"here now");
    let mut want: Vec<String> = (2..10).map(|i| format!("f{i}")).collect();
    want.extend(["g1", "missing", "new"].map(String::from));
    want.sort();
    let got: Vec<String> = walk(&d).into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(got, want, "a's listing after b's changes");
    drop_kernel_caches();
    let got: Vec<(String, u64, Vec<u8>)> = walk(&d);
    assert_eq!(
        got.iter().map(|(n, _, _)| n.clone()).collect::<Vec<_>>(),
        want,
        "cold"
    );
    assert!(got.contains(&("f2".to_string(), 7, b"changed".to_vec())));
    drop((a, b));
}

/// A mount killed (SIGKILL) with changes pending loses only what it had
/// not synced: the files fsync'd before the kill are all there, seen from
/// another mount; the namespace is consistent on every replica; and the
/// dead mount's lock and the unlinked file it held open are released once
/// its hold lapses (`cfs_proto::hold`), within the stated bound.
#[test]
fn a_killed_mount_loses_only_unsynced_changes_and_its_holds_lapse() {
    use std::os::fd::AsRawFd;
    let c = Cluster::start("fs-mount-kill");
    let mut a = Mount::new(&c, "a", &[]);
    let b = Mount::new(&c, "b", &[]);
    let lock = |fd: i32| {
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        // SAFETY: fcntl(2) with a valid descriptor and flock struct.
        unsafe { libc::fcntl(fd, libc::F_SETLK, &fl) }
    };
    let d = a.path.join("d");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(a.path.join("lockme"), b"").unwrap();
    let la = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.path.join("lockme"))
        .unwrap();
    assert_eq!(lock(la.as_raw_fd()), 0, "lock through the mount to kill");
    // An unlinked file the mount keeps open: an orphan held for it.
    let held = std::fs::File::create(a.path.join("held")).unwrap();
    std::fs::remove_file(a.path.join("held")).unwrap();
    for i in 0..40 {
        std::fs::write(d.join(format!("s{i}")), content(i)).unwrap();
    }
    std::fs::File::open(&d).and_then(|f| f.sync_all()).unwrap();
    // Changes in flight (answered early, not synced) when the mount dies.
    let d2 = d.clone();
    let writer = std::thread::spawn(move || {
        (0..100_000)
            .take_while(|i| std::fs::write(d2.join(format!("u{i}")), content(*i)).is_ok())
            .count()
    });
    std::thread::sleep(Duration::from_millis(500));
    a.child.kill().expect("kill the mount");
    let killed = Instant::now();
    a.child.wait().expect("mount exit");
    let unsynced = writer.join().expect("writer");
    assert!(unsynced > 0, "nothing was in flight");
    drop((la, held));
    // Everything synced is there, seen from the other mount.
    let bd = b.path.join("d");
    for i in 0..40 {
        assert_eq!(std::fs::read(bd.join(format!("s{i}"))).unwrap(), content(i));
    }
    // A file that made it is whole (never a torn or foreign content).
    for e in std::fs::read_dir(&bd).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(i) = name.strip_prefix('u') {
            let got = std::fs::read(bd.join(&name)).unwrap();
            let i: usize = i.parse().unwrap();
            assert!(got.is_empty() || got == content(i), "{name}: torn content");
        }
    }
    // The dead mount's lock holds until its hold lapses, then goes.
    let lb = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.path.join("lockme"))
        .unwrap();
    assert_eq!(lock(lb.as_raw_fd()), -1, "the dead mount's lock still held");
    let bound = cfs_proto::hold::HOLD + cfs_proto::hold::CHECK_EVERY + Duration::from_secs(10);
    while lock(lb.as_raw_fd()) != 0 {
        assert!(
            killed.elapsed() < bound,
            "the dead mount's lock was not released within {bound:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let released = killed.elapsed();
    eprintln!("the dead mount's lock was released {released:?} after the kill");
    assert!(
        released >= cfs_proto::hold::HOLD - Duration::from_secs(6),
        "released after {released:?}: before the hold could lapse"
    );
    drop(lb);
    drop(b);
    wait_applied_equal(&c);
    for out in c.fsck_clean() {
        assert!(out.contains(" 0 orphans,"), "{out}");
    }
}

/// Cross-shard operations (directories near the root are spread over the
/// shards) right after many early-answered creates in the same directory:
/// the transaction's changes are the asking mount's own, so the node never
/// waits for that mount to acknowledge them (the mount's kernel holds the
/// directory's lock for the very call: waiting stalled such calls until
/// the mount's lease was refused and ran out, ~2 s; D29).
#[test]
fn cross_shard_operations_never_wait_for_the_asking_mount() {
    let c = Cluster::start("fs-xshard-own");
    // One node leads both shards (D34), and the mount moves to it: every
    // change in `w` can be answered early, whichever shard holds it.
    c.wait_leaders_together();
    let m = Mount::new(&c, "m", &[]);
    let d = m.path.join("w");
    std::fs::create_dir(&d).unwrap();
    for i in 0..200 {
        std::fs::write(d.join(format!("f{i}")), b"x").unwrap();
    }
    for i in 0..120 {
        std::fs::create_dir(d.join(format!("d{i}"))).unwrap();
    }
    for i in 0..120 {
        std::fs::remove_dir(d.join(format!("d{i}"))).unwrap();
    }
    let refusals: u64 = (1..=3)
        .map(|n| c.metric(n, "claudefs_meta_lease_refusals_total"))
        .sum();
    let sequenced: u64 = (1..=3)
        .map(|n| c.metric(n, "claudefs_meta_sequenced_total"))
        .sum();
    assert!(
        sequenced >= 200,
        "the creates were not sequenced: {sequenced}"
    );
    assert_eq!(refusals, 0, "a session's acknowledgements lagged");
}

/// Cross-shard changes wait for two commit rounds (the prepares, then the
/// decision) and are answered once their finish steps are ordered (D37):
/// the asking mount then works inside a directory whose finish is not yet
/// decided (the sequencer's overlay holds it), and another mount that
/// looks right after the answer sees the change (a read on another node
/// waits for what was answered early). The tree is right on every
/// replica, and `cfs fsck` finds nothing.
#[test]
fn cross_shard_changes_are_answered_once_their_finishes_are_ordered() {
    let c = Cluster::start("fs-xshard-early");
    c.wait_leaders_together();
    let a = Mount::new(&c, "a", &[]);
    // In the root, on the other shard than the root's: cross-shard.
    let names: Vec<String> = (0..)
        .map(|i| format!("d{i}"))
        .filter(|n| {
            cfs_materializers::tx::place_dir(
                cfs_materializers::types::ROOT_INO,
                n.as_bytes(),
                &[ShardId(0), ShardId(1)],
            ) == ShardId(1)
        })
        .take(41)
        .collect();
    let early_sum = || -> u64 {
        (1..=3)
            .map(|n| c.metric(n, "claudefs_meta_tx_finishes_early_total"))
            .sum()
    };
    // Set-up, not the test: a new leader answers nothing early for a
    // lease's hold, nor while it has not heard from a majority lately (a
    // loaded machine): probe until it does, up to 20 s.
    let until = Instant::now() + Duration::from_secs(20);
    let probes = (0..).map(|i| format!("probe{i}")).filter(|n| {
        cfs_materializers::tx::place_dir(
            cfs_materializers::types::ROOT_INO,
            n.as_bytes(),
            &[ShardId(0), ShardId(1)],
        ) == ShardId(1)
    });
    for probe in probes {
        let p = a.path.join(probe);
        std::fs::create_dir(&p).unwrap();
        std::fs::remove_dir(&p).unwrap();
        if early_sum() > 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "no cross-shard change was answered early"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let warm = early_sum();
    let mut made = Vec::new();
    for (i, name) in names.iter().enumerate().take(40) {
        let d = a.path.join(name);
        std::fs::create_dir(&d).unwrap();
        // Straight into it, while its finish may still be undecided.
        std::fs::write(d.join("f"), format!("in {i}")).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        made.push(i);
    }
    for i in (0..40).step_by(4) {
        let d = a.path.join(&names[i]);
        std::fs::remove_file(d.join("f")).unwrap();
        std::fs::remove_dir(d.join("sub")).unwrap();
        std::fs::remove_dir(&d).unwrap();
        made.retain(|m| *m != i);
    }
    let early = early_sum() - warm;
    let mispredicted: u64 = (1..=3)
        .map(|n| c.metric(n, "claudefs_meta_mispredicted_total"))
        .sum();
    assert!(
        early >= 40,
        "cross-shard changes were not answered once ordered: {early} finishes early"
    );
    assert_eq!(mispredicted, 0);

    // A mount on another node, holding no lease yet: its first look comes
    // right after an answer given before the finish was decided.
    let other = node_not_serving(&c, "a");
    let b = Mount::new(&c, "b", &["--servers", &other, "--follow-leader", "false"]);
    let before = early_sum();
    let late = a.path.join(&names[40]);
    std::fs::create_dir(&late).unwrap();
    std::fs::write(late.join("x"), b"x").unwrap();
    let after = early_sum();
    assert!(after > before, "the last mkdir was not answered early");
    assert_eq!(
        std::fs::read(b.path.join(&names[40]).join("x")).unwrap(),
        b"x"
    );
    let mut want: Vec<String> = made.iter().map(|i| names[*i].clone()).collect();
    want.push(names[40].clone());
    want.sort();
    let mut got: Vec<String> = std::fs::read_dir(&b.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    assert_eq!(got, want, "the other mount's listing");
    for i in &made {
        let d = b.path.join(&names[*i]);
        assert_eq!(
            std::fs::read(d.join("f")).unwrap(),
            format!("in {i}").as_bytes()
        );
        assert!(d.join("sub").is_dir());
    }
    drop((a, b));
    let _ = c.fsck_clean();
}

/// Checks that mount `m` is held to a policy of root squashed and uid
/// 1000 mapped to 4242, seen through `admin` (trusted with root), which
/// made `open/` 0777: root plants nothing in `/` and what it makes in
/// `open/` is 65534's; what uid 1000 makes there is 4242's.
fn held_to_squash_and_uid_map(admin: &Mount, m: &Mount) {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    assert!(std::fs::write(m.path.join("planted"), b"r").is_err());
    assert!(!admin.path.join("planted").exists());
    std::fs::write(m.path.join("open/by-root"), b"r").unwrap();
    let owner = |name: &str| {
        std::fs::metadata(admin.path.join("open").join(name))
            .unwrap()
            .uid()
    };
    assert_eq!(owner("by-root"), 65534, "root squashed");
    let made = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo u > '{}'",
            m.path.join("open/by-1000").display()
        ))
        .uid(1000)
        .gid(1000)
        .status()
        .unwrap();
    assert!(made.success());
    assert_eq!(owner("by-1000"), 4242, "uid 1000 mapped");
}

/// `cfs ca`, as an administrator uses it: a second `init` over an existing
/// CA is refused, `issue` needs one role and well-formed id maps, the key
/// is private, and a mount started with the issued certificate
/// (`--tls-dir`, `--tls-stem`) gets the policy it carries: root squashed
/// to 65534 by default, uid 1000 mapped to 4242.
#[test]
fn ca_commands_issue_a_certificate_a_mount_is_held_to() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::start("fs-ca-cli");
    let ca_dir = cluster::tls_dir(&c.dir);
    let ca_dir = ca_dir.to_str().unwrap();
    let out = c.dir.join("issued");
    let out_s = out.to_str().unwrap();
    let fails = |args: &[&str]| {
        let o = Command::new(cfs()).args(args).output().expect("run cfs");
        assert!(!o.status.success(), "cfs {args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = fails(&["ca", "init", "--dir", ca_dir, "--cluster-id", "other"]);
    assert!(e.contains("already holds a CA"), "{e}");
    let e = fails(&["ca", "issue", "--ca-dir", ca_dir, "--out", out_s]);
    assert!(e.contains("give one of"), "{e}");
    let issue_client = |map: &str| {
        let mut a = vec!["ca", "issue", "--ca-dir", ca_dir, "--out", out_s];
        a.extend(["--client", "gpu", "--map-uid"]);
        a.push(map);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let bad = issue_client("1000-4242");
    let e = fails(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("expected FROM:TO"), "{e}");
    let good = issue_client("1000:4242");
    run_cfs(&good.iter().map(String::as_str).collect::<Vec<_>>());
    let key = std::fs::metadata(out.join("client-gpu.key")).unwrap();
    assert_eq!(
        key.permissions().mode() & 0o777,
        0o600,
        "the key is private"
    );

    // A directory anyone may write, made through the cluster's own mount
    // (its certificate trusts root).
    let admin = Mount::new(&c, "admin", &[]);
    std::fs::create_dir(admin.path.join("open")).unwrap();
    std::fs::set_permissions(
        admin.path.join("open"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let m = Mount::new(&c, "m", &["--tls-dir", out_s, "--tls-stem", "client-gpu"]);
    held_to_squash_and_uid_map(&admin, &m);
    assert_eq!(
        std::fs::read(admin.path.join("open/by-1000")).unwrap(),
        b"u\n"
    );
}

/// `cfs admin token create` and `cfs mount --token`: the token is traded
/// once for a certificate carrying the policy it was minted with (root
/// squashed, uid 1000 mapped to 4242), whose key stays private on the
/// mount; the same token again, an altered one and an expired one are
/// refused and change nothing; the refusal names no secret; a peer
/// without a certificate gets nothing but the trade.
#[test]
fn a_mount_token_is_traded_once_for_its_certificate() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::start("fs-token");
    let dir = c.dir.to_str().unwrap();
    let token_for = |ttl: &str| {
        run_cfs(&[
            "admin",
            "token",
            "create",
            "--dir",
            dir,
            "--client",
            "lab",
            "--map-uid",
            "1000:4242",
            "--ttl",
            ttl,
        ])
        .lines()
        .find(|l| l.starts_with("cfs1."))
        .expect("a token printed")
        .to_string()
    };
    let token = token_for("10m");
    let tls_for = |name: &str| {
        let t = c.dir.join(name);
        std::fs::create_dir_all(&t).unwrap();
        std::fs::copy(cluster::tls_dir(&c.dir).join("ca.crt"), t.join("ca.crt")).unwrap();
        t
    };
    let admin = Mount::new(&c, "admin", &[]);
    std::fs::create_dir(admin.path.join("open")).unwrap();
    std::fs::set_permissions(
        admin.path.join("open"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let mount_fails = |tls: &Path, token: &str| {
        let mp = c.dir.join("refused");
        std::fs::create_dir_all(&mp).unwrap();
        let o = Command::new(cfs())
            .arg("mount")
            .arg(&mp)
            .args([
                "--dir",
                dir,
                "--tls-dir",
                tls.to_str().unwrap(),
                "--token",
                token,
            ])
            .output()
            .expect("run cfs mount");
        assert!(!o.status.success(), "a mount with a bad token started");
        assert!(!mounts::is_mounted(&mp));
        assert!(!tls.join("mount.crt").exists(), "no certificate kept");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };

    let t1 = tls_for("tls-1");
    let m = Mount::new(
        &c,
        "m",
        &["--tls-dir", t1.to_str().unwrap(), "--token", &token],
    );
    let key = std::fs::metadata(t1.join("mount.key")).unwrap();
    assert_eq!(
        key.permissions().mode() & 0o777,
        0o600,
        "the key is private"
    );
    held_to_squash_and_uid_map(&admin, &m);
    drop(m);
    // The kept certificate mounts again without a token.
    let again = Mount::new(&c, "again", &["--tls-dir", t1.to_str().unwrap()]);
    assert!(again.path.join("open/by-1000").exists());
    drop(again);

    // Used once: refused (whichever node is asked), into a fresh dir.
    let e = mount_fails(&tls_for("tls-2"), &token);
    assert!(e.contains("refused the token"), "{e}");
    assert!(!e.contains(&token), "the refusal repeats the token");
    // Altered (the policy rewritten to trust root), and expired.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1].insert_str(0, "dHJ1c3Qtcm9vdAoK");
    let e = mount_fails(&tls_for("tls-3"), &parts.join("."));
    assert!(e.contains("refused the token"), "{e}");
    let short = token_for("1s");
    std::thread::sleep(Duration::from_millis(2100));
    let e = mount_fails(&tls_for("tls-4"), &short);
    assert!(e.contains("refused the token"), "{e}");
    let logs: String = (1..=3)
        .map(|n| std::fs::read_to_string(cluster::node_dir(&c.dir, n).join("node.log")).unwrap())
        .collect();
    assert!(logs.contains("mount token used already; refused"), "{logs}");
    assert!(
        logs.contains("the token's signature does not match"),
        "{logs}"
    );
    assert!(logs.contains("the token expired"), "{logs}");
    assert_eq!(logs.matches("client certificate issued").count(), 1);
    assert!(!logs.contains(&token[20..60]), "a node logged the token");

    // Without a certificate, a Hello (a session) is closed unanswered.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = cluster::tls_dir(&c.dir).join("ca.crt");
    let meta = cluster::meta_servers(&cluster::load_configs(&c.dir).unwrap())[0];
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sec = cfs_net::Security::anonymous(&ca).unwrap();
        let mut conn = sec.connect(meta, Duration::from_secs(5)).await.unwrap();
        let hello = cfs_proto::ops::RequestFrame {
            id: 1,
            fresh: false,
            req: cfs_proto::ops::Request::Hello {
                cluster_id: c.cfgs[0].cluster_id.clone(),
                client_id: 7,
            },
        };
        let mut out = Vec::new();
        cfs_frame::encode_with(&mut out, |o| bincode::serialize_into(o, &hello)).unwrap();
        conn.writer.write_all(&out).await.unwrap();
        conn.writer.flush().await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.reader.read(&mut buf))
            .await
            .expect("closed, not left hanging")
            .unwrap_or(0);
        assert_eq!(n, 0, "a session without a certificate was answered");
    });
}

/// POSIX ACLs through a real mount with the real `setfacl`/`getfacl`: an
/// access ACL grants a named user (the kernel and the node both check
/// it), the mode's group bits are its mask and a chmod changes the mask;
/// a directory's default ACL is inherited by new files and directories in
/// place of the umask; without one the node applies the umask; another
/// mount sees the same ACLs.
#[test]
fn posix_acls_are_stored_inherited_and_enforced() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if Command::new("setfacl").arg("--version").output().is_err() {
        panic!("setfacl is missing (scripts/setup.sh installs the acl package)");
    }
    let c = Cluster::start("fs-acl");
    let m = Mount::new(&c, "m", &[]);
    let other = Mount::new(&c, "other", &[]);
    let sh_as = |uid: u32, script: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&m.path)
            .uid(uid)
            .gid(uid)
            .status()
            .unwrap()
            .success()
    };
    let run = |args: &[&str]| {
        let o = Command::new(args[0])
            .args(&args[1..])
            .current_dir(&m.path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;

    std::fs::write(m.path.join("shared"), b"x\n").unwrap();
    std::fs::set_permissions(
        m.path.join("shared"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    assert!(!sh_as(1000, "echo a >> shared"), "root's 0600 file");
    run(&["setfacl", "-m", "u:1000:rw", "shared"]);
    let acl = run(&["getfacl", "-cpn", "shared"]);
    assert!(acl.contains("user:1000:rw-"), "{acl}");
    assert_eq!(mode(&m.path.join("shared")), 0o660, "group bits = the mask");
    assert!(sh_as(1000, "echo a >> shared"), "the named user writes");
    assert!(!sh_as(1001, "echo b >> shared"), "another user does not");
    // Seen alike through another mount.
    let acl2 = Command::new("getfacl")
        .args(["-cpn", "shared"])
        .current_dir(&other.path)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&acl2.stdout), acl);
    // chmod g-rw: the mask is now ---, the named entry is no longer
    // effective (the kernel's cached ACL is dropped, the node's follows).
    std::fs::set_permissions(
        m.path.join("shared"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let acl = run(&["getfacl", "-cpn", "shared"]);
    assert!(acl.contains("mask::---"), "{acl}");
    assert!(!sh_as(1000, "echo c >> shared"), "masked out");
    run(&["setfacl", "-b", "shared"]);
    assert!(!run(&["getfacl", "-cpn", "shared"]).contains("user:1000"));
    assert_eq!(std::fs::read(m.path.join("shared")).unwrap(), b"x\na\n");

    // Default ACL: inherited in place of the umask.
    std::fs::create_dir(m.path.join("team")).unwrap();
    run(&["setfacl", "-d", "-m", "g:50:rwx", "team"]);
    assert!(sh_as(
        0,
        "umask 077; echo n > team/new; mkdir team/sub; umask 022; echo p > plain"
    ));
    assert_eq!(mode(&m.path.join("team/new")), 0o664, "umask ignored");
    let acl = run(&["getfacl", "-cpn", "team/new"]);
    assert!(acl.contains("group:50:rwx\t#effective:rw-"), "{acl}");
    assert_eq!(mode(&m.path.join("team/sub")), 0o775);
    let dflt = run(&["getfacl", "-cpnd", "team/sub"]);
    assert!(
        dflt.contains("group:50:rwx"),
        "the subdirectory inherits the default: {dflt}"
    );
    assert_eq!(
        mode(&m.path.join("plain")),
        0o644,
        "no default ACL: the umask"
    );
}

/// The namespace database's disk fills on the node leading every shard:
/// that node's materializer stops, it says so (`/health` 503 naming the
/// shard and the cause) and stops its replicas, the other two elect a
/// leader, the mount moves to it, and every file whose fsync returned 0
/// reads back; new files are written through the new leader.
#[test]
fn a_full_namespace_disk_fails_the_node_and_mounts_move() {
    use std::io::Write;
    // The highest id wins leader-affinity ties; the others wait long
    // before their first election: node 3 leads.
    const SMALL: u64 = 3;
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let mounted = std::cell::RefCell::new(None);
    let c = Cluster::start_with("fs-nsfull", |cfg| {
        if cfg.node_id == SMALL {
            let ns = cfg.data_dir.join("namespace");
            std::fs::create_dir_all(&ns).unwrap();
            let ok = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
                .arg(&ns)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "mounting a tmpfs needs root");
            *mounted.borrow_mut() = Some(Unmount(ns));
        } else {
            cfg.election_ticks *= 10;
        }
    });
    let _unmount = mounted.take();
    assert_eq!(c.wait_leaders_together(), SMALL);
    let m = Mount::new(&c, "m", &[]);
    let health = |n: u64| cluster::http_get(c.cfg(n).http, "/health").unwrap();
    let body = |i: usize| -> Vec<u8> { (0..60 << 10).map(|k| ((k + i * 7) % 251) as u8).collect() };
    let until = Instant::now() + Duration::from_secs(90);
    let (mut synced, mut errors) = (Vec::new(), 0);
    for i in 0.. {
        let (code, text) = health(SMALL);
        if code == 503 && text.contains("namespace materializer") {
            eprintln!("after {} files node {SMALL} says: {text}", synced.len());
            assert!(text.contains("No space left"), "{text}");
            assert!(text.contains("failed"), "its shards are failed too: {text}");
            break;
        }
        assert!(
            Instant::now() < until,
            "node {SMALL}'s namespace disk never filled"
        );
        // Files of inline bytes (below 64 KiB): they fill the database.
        let r = std::fs::File::create(m.path.join(format!("f{i}"))).and_then(|mut f| {
            f.write_all(&body(i))?;
            f.sync_all()
        });
        match r {
            Ok(()) => synced.push(i),
            Err(_) => errors += 1,
        }
    }
    // The others lead without it, and the mount follows.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let r = std::fs::write(m.path.join("after"), b"moved")
            .and_then(|_| std::fs::File::open(m.path.join("after"))?.sync_all());
        if r.is_ok() && std::fs::read(m.path.join("after")).is_ok_and(|b| b == b"moved") {
            break;
        }
        assert!(Instant::now() < until, "the mount never moved: {r:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    for n in 1..=2 {
        let (code, text) = health(n);
        assert!(code == 200 || !text.contains("failed"), "node {n}: {text}");
    }
    drop_kernel_caches();
    for i in &synced {
        assert_eq!(
            std::fs::read(m.path.join(format!("f{i}"))).unwrap(),
            body(*i),
            "f{i}, synced before the failure"
        );
    }
    eprintln!(
        "{} files synced, {errors} refused around the failure",
        synced.len()
    );
}
