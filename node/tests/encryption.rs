//! Encryption at rest per tenant on a real 3-node cluster with FUSE
//! mounts (docs/decisions.md D51): a subtree given a tenant
//! (`cfs admin policy set DIR --encrypt TENANT`) has every byte of its
//! files sealed with the tenant's key in the segment store, none in the
//! clear there, in the log or in the namespace (small files included);
//! they read back exactly from any mount whose certificate names the
//! tenant and from no other; a tenant's chunks are deduplicated only
//! against its own; `cfs admin keys rotate` makes new stripes use the new
//! key and the collector re-encrypts the old ones, also when the node
//! doing it is killed mid-way; the counts stay equal to a recount.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cfs_node::cluster;
use common::fuse::{self, cfs_run as cfs, Mount};
use common::Cluster;
use common::{reads_back, wait_until};

const MIB: usize = 1 << 20;
/// Bytes that must never appear in the clear where a tenant's data lives.
const MARKER: &[u8] = b"TENANT-SECRET-7f3a9c-";

/// `len` bytes of text carrying [`MARKER`] every few hundred bytes,
/// varied by `seed` (so no two files share chunks unless meant to).
fn secret_text(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(MARKER);
        out.extend_from_slice(format!("{x:016x} line of a genome annotation\n").as_bytes());
    }
    out.truncate(len);
    out
}

/// Whether any file under `dir` holds [`MARKER`].
fn marker_under(dir: &Path) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                if b.windows(MARKER.len()).any(|w| w == MARKER) {
                    hits.push(p);
                }
            }
        }
    }
    hits
}

fn metrics_mount(c: &Cluster, name: &str, extra: &[&str]) -> (Mount, PathBuf) {
    let url = c.dir.join(format!("{name}.url"));
    let url_s = url.to_string_lossy().into_owned();
    let mut args = vec![
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-url-file",
        url_s.as_str(),
    ];
    args.extend_from_slice(extra);
    (Mount::new(c, name, &args), url)
}

fn found_bytes(url: &Path) -> u64 {
    fuse::mount_counter(url, "claudefs_fuse_dedupe_bytes_total{result=\"found\"}")
}

fn dir_s(c: &Cluster) -> String {
    c.dir.to_string_lossy().into_owned()
}

/// `cfs admin keys list --json`.
fn key_report(c: &Cluster) -> serde_json::Value {
    let (ok, out) = cfs(&["admin", "keys", "list", "--dir", &dir_s(c), "--json"]);
    assert!(ok, "keys list: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("keys list JSON: {e}: {out}"))
}

#[test]
fn a_tenants_files_are_sealed_readable_by_its_mounts_only_and_deduplicated_apart() {
    let c = Cluster::start("tenants");
    let d = dir_s(&c);
    let (m, url) = metrics_mount(&c, "mnt", &[]);
    // Keys: made once; a second create is refused; bad names are refused.
    let (ok, out) = cfs(&["admin", "keys", "create", "genomics", "--dir", &d]);
    assert!(ok, "{out}");
    assert!(out.contains("genomics  1"), "{out}");
    let (ok, out) = cfs(&["admin", "keys", "create", "genomics", "--dir", &d]);
    assert!(!ok && out.contains("has a key already"), "{out}");
    let (ok, out) = cfs(&["admin", "keys", "create", "bad.name", "--dir", &d]);
    assert!(!ok && out.contains("not a tenant name"), "{out}");
    // The key is in the log only sealed: no key bytes in the report.
    let r = key_report(&c);
    assert_eq!(r["keys"][0]["tenant"], "genomics");
    assert!(r["keys"][0].get("key").is_none(), "{r}");

    let g = m.path.join("g");
    let plain = m.path.join("plain");
    std::fs::create_dir(&g).unwrap();
    std::fs::create_dir(&plain).unwrap();
    let mp = |p: &Path| p.to_string_lossy().into_owned();
    // Uncompressed on both sides, so that a byte in the clear would be
    // found as it is.
    let (ok, out) = cfs(&[
        "admin",
        "policy",
        "set",
        &mp(&g),
        "--compress",
        "off",
        "--encrypt",
        "genomics",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("encrypt genomics"), "{out}");
    let (ok, out) = cfs(&["admin", "policy", "set", &mp(&plain), "--compress", "off"]);
    assert!(ok, "{out}");
    // A tenant without a key is refused, and changes nothing.
    let other = m.path.join("other");
    std::fs::create_dir(&other).unwrap();
    let (ok, out) = cfs(&["admin", "policy", "set", &mp(&other), "--encrypt", "nokey"]);
    assert!(!ok && out.contains("has no key"), "{out}");
    let (_, out) = cfs(&["admin", "policy", "get", &mp(&other)]);
    assert!(out.contains("encrypt off"), "{out}");

    // A large file, a file of incompressible bytes, a small one (which
    // would otherwise ride inline in the log), and a subdirectory's file.
    let big = secret_text(1, 3 * MIB + 12345);
    let small = secret_text(2, 300);
    let random = common::noise(3, MIB);
    std::fs::write(g.join("big"), &big).unwrap();
    std::fs::write(g.join("small"), &small).unwrap();
    std::fs::write(g.join("random"), &random).unwrap();
    std::fs::create_dir(g.join("sub")).unwrap();
    std::fs::write(g.join("sub/nested"), &small).unwrap();
    // The same secret outside the tenant: stored in the clear, which
    // shows the search below would see it.
    std::fs::write(plain.join("big"), secret_text(9, MIB)).unwrap();
    let f = std::fs::File::open(g.join("big")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let seg_hits: Vec<PathBuf> = (1..=3)
        .flat_map(|id| marker_under(&c.segments_dir(id)))
        .collect();
    assert!(
        !seg_hits.is_empty(),
        "the unencrypted copy must be found in the clear"
    );
    // Every fragment holding the tenant's files: nothing in the clear.
    // The plain file is written with another seed: its fragments hold the
    // marker, so look for the tenant's own lines instead.
    let tenant_line = &big[MARKER.len()..MARKER.len() + 16];
    for id in 1..=3 {
        for p in std::fs::read_dir(c.segments_dir(id)).unwrap().flatten() {
            let b = std::fs::read(p.path()).unwrap();
            assert!(
                !b.windows(16).any(|w| w == tenant_line),
                "a tenant's bytes in the clear in {}",
                p.path().display()
            );
        }
    }
    // Nor in the log or the namespace database (the small file's bytes,
    // which a file of no tenant would keep inline there).
    let small_line = &small[MARKER.len()..MARKER.len() + 16];
    for id in 1..=3 {
        let data = cluster::node_dir(&c.dir, id).join("data");
        for sub in ["log", "namespace"] {
            let mut stack = vec![data.join(sub)];
            while let Some(dd) = stack.pop() {
                for e in std::fs::read_dir(&dd).into_iter().flatten().flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if let Ok(b) = std::fs::read(&p) {
                        assert!(
                            !b.windows(16).any(|w| w == small_line),
                            "a tenant's small file in the clear in {}",
                            p.display()
                        );
                    }
                }
            }
        }
    }
    // Read back from this mount and from another with the tenant.
    let m2 = Mount::new(&c, "mnt2", &[]);
    for mp in [&m.path, &m2.path] {
        reads_back(&mp.join("g/big"), &big);
        reads_back(&mp.join("g/small"), &small);
        reads_back(&mp.join("g/random"), &random);
        reads_back(&mp.join("g/sub/nested"), &small);
    }
    // Files made in the subtree inherit the tenant.
    let (_, out) = cfs(&["admin", "policy", "get", &mp(&g.join("sub"))]);
    assert!(out.contains("encrypt genomics"), "{out}");

    // A mount whose certificate names another tenant: the names are
    // there, the bytes are not (EACCES at open), files of no tenant are.
    let security = c.issue(
        cfs_net::Principal::Client {
            name: "lab-b".into(),
            policy: cfs_net::ClientPolicy {
                trust_root: true,
                tenants: vec!["lab-b".into()],
                ..Default::default()
            },
        },
        "mount-b",
    );
    drop(security);
    let tls = cluster::tls_dir(&c.dir);
    let tls_s = tls.to_string_lossy().into_owned();
    let mb = Mount::new(&c, "mntb", &["--tls-dir", &tls_s, "--tls-stem", "mount-b"]);
    assert!(mb.path.join("g/big").exists());
    let e = std::fs::read(mb.path.join("g/big")).expect_err("another tenant's file read");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let e = std::fs::write(mb.path.join("g/new"), b"x").expect_err("wrote into another tenant");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    assert_eq!(
        std::fs::read(mb.path.join("plain/big")).unwrap(),
        secret_text(9, MIB)
    );
    drop(mb);

    // Dedupe stays inside the tenant: a second copy in the tenant is
    // found, the same bytes outside it are written again.
    let dup = secret_text(4, 2 * MIB);
    std::fs::write(g.join("dup1"), &dup).unwrap();
    let before = found_bytes(&url);
    std::fs::write(g.join("dup2"), &dup).unwrap();
    let within = found_bytes(&url) - before;
    assert!(
        within >= MIB as u64,
        "a tenant's second copy found only {within} bytes"
    );
    let before = found_bytes(&url);
    std::fs::write(plain.join("dup"), &dup).unwrap();
    let across = found_bytes(&url) - before;
    assert_eq!(across, 0, "the tenant's chunks were found from outside it");
    // A copy by reference across the tenant boundary copies the bytes
    // (cp falls back when the by-reference copy is refused).
    let st = Command::new("cp")
        .arg(g.join("dup1"))
        .arg(plain.join("copied"))
        .status()
        .unwrap();
    assert!(st.success());
    reads_back(&plain.join("copied"), &dup);
    reads_back(&m2.path.join("g/dup2"), &dup);
    c.fsck_clean();
}

/// Starts every node of `c` that is not running (without failpoints).
fn restart_dead(c: &Cluster) -> usize {
    let mut n = 0;
    for cfg in &c.cfgs {
        if cluster::http_get(cfg.http, "/health").is_err() {
            let _ = cluster::stop_node(&c.dir, cfg.node_id, libc::SIGKILL, Duration::from_secs(1));
            cluster::start_node(&c.dir, cfg.node_id, &common::bin()).unwrap();
            n += 1;
        }
    }
    if n > 0 {
        cluster::wait_healthy(&c.cfgs, Duration::from_secs(30)).unwrap();
    }
    n
}

fn rotation_case(name: &str, failpoint: Option<&str>) {
    let env: Vec<(&str, &str)> = failpoint
        .map(|f| ("CFS_FAILPOINT", f))
        .into_iter()
        .collect();
    let c = Cluster::start_env(
        name,
        |cfg| {
            cfg.gc_interval_ms = 300;
            cfg.gc_grace_ms = 1000;
        },
        &env,
    );
    let d = dir_s(&c);
    let m = Mount::new(&c, "mnt", &[]);
    let (ok, out) = cfs(&["admin", "keys", "create", "lab", "--dir", &d]);
    assert!(ok, "{out}");
    let (ok, out) = cfs(&["admin", "keys", "rotate", "nobody", "--dir", &d]);
    assert!(!ok && out.contains("has no key yet"), "{out}");
    let g = m.path.join("lab");
    std::fs::create_dir(&g).unwrap();
    let (ok, out) = cfs(&[
        "admin",
        "policy",
        "set",
        &g.to_string_lossy(),
        "--encrypt",
        "lab",
    ]);
    assert!(ok, "{out}");
    let files: Vec<(PathBuf, Vec<u8>)> = (0..24u64)
        .map(|i| {
            let data = if i % 3 == 0 {
                common::noise(100 + i, 2 * MIB + i as usize * 999)
            } else {
                secret_text(100 + i, 2 * MIB + i as usize * 777)
            };
            (g.join(format!("f{i}")), data)
        })
        .collect();
    for (p, data) in &files {
        std::fs::write(p, data).unwrap();
    }
    let empty_ish = c.fragment_bytes();
    let (ok, out) = cfs(&["admin", "keys", "rotate", "lab", "--dir", &d]);
    assert!(ok, "{out}");
    assert!(out.contains("lab  2"), "{out}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mover = rt.block_on(c.leader(cfs_log::ShardId(0)));
    let mut aborted = 0;
    if failpoint.is_some() {
        // Each node that runs the pass aborts at the failpoint; it comes
        // back without it, and the next pass (maybe on another node)
        // finishes what it left.
        let until = Instant::now() + Duration::from_secs(60);
        while aborted == 0 && Instant::now() < until {
            aborted += restart_dead(&c);
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(aborted > 0, "no node reached the failpoint");
    } else {
        // Killed once it has moved some: mid-pass or just after one.
        assert!(
            wait_until(60, || c
                .metric(mover, "claudefs_gc_reencrypted_bytes_total")
                > 0),
            "nothing re-encrypted"
        );
        cluster::stop_node(&c.dir, mover, libc::SIGKILL, Duration::from_secs(5)).unwrap();
    }
    // Written under the new key while a node is (or was) down.
    std::thread::sleep(Duration::from_secs(6));
    let late = secret_text(999, 3 * MIB);
    std::fs::write(g.join("late"), &late).unwrap();
    // Done: nothing left under the first key, as logged (a pass counts
    // `left` by scanning every extent; `moved` counts what passes that
    // lived to log it moved, so a crash may leave it short).
    let done = wait_until(120, || {
        restart_dead(&c);
        let r = key_report(&c);
        r["reencryption"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["tenant"] == "lab"))
            .is_some_and(|p| p["left_bytes"] == 0)
    });
    assert!(done, "re-encryption did not finish: {}", key_report(&c));
    let r = key_report(&c);
    let newest = r["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["tenant"] == "lab")
        .map(|k| k["id"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(r["reencryption"][0]["to"].as_u64(), Some(newest), "{r}");
    // `cfs admin status` shows it.
    let (ok, out) = cfs(&["admin", "status", "--dir", &d]);
    assert!(ok, "{out}");
    assert!(out.contains("re-encryption lab: to key"), "{out}");
    assert!(out.contains("(done)"), "{out}");
    // Every file reads back exactly: from the mount that wrote them
    // (whose keys predate the rotation: it fetches the new one), and from
    // a new mount (nothing cached).
    fuse::drop_kernel_caches();
    for (p, data) in files.iter().take(4) {
        reads_back(p, data);
    }
    let m2 = Mount::new(&c, "mnt2", &[]);
    for (p, data) in &files {
        reads_back(&m2.path.join(p.strip_prefix(&m.path).unwrap()), data);
    }
    reads_back(&m2.path.join("lab/late"), &late);
    // The old stripes and any copy a crash left unreferenced are freed:
    // what stays is about what was stored before the rotation.
    let live = files.iter().map(|(_, d)| d.len() as u64).sum::<u64>() + late.len() as u64;
    let goal = empty_ish + live * 3 / 2 * 11 / 10 + (16 * MIB) as u64;
    let freed = wait_until(90, || c.fragment_bytes() <= goal);
    assert!(freed, "{} bytes stored, goal {goal}", c.fragment_bytes());
    // The counts equal a recount; nothing referenced was freed.
    c.fsck_clean();
}

#[test]
fn rotation_reencrypts_old_stripes_in_the_background_across_a_kill() {
    rotation_case("rotation-kill", None);
}

#[test]
fn rotation_survives_a_crash_after_copying_before_relocating() {
    rotation_case("rotation-copied", Some("reencrypt-copied"));
}

#[test]
fn rotation_survives_a_crash_between_shards_relocations() {
    rotation_case("rotation-relocated", Some("reencrypt-relocated-one"));
}
