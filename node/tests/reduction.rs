//! Compression of stripes on a real 3-node cluster with FUSE mounts
//! (docs/decisions.md D49): a mount compresses by default, stores
//! compressible files in a fraction of their size and incompressible
//! ones as they are, and every byte reads back exactly, whole or in
//! parts (a small read decompressing only the frames covering it), from
//! the writing mount and from another one, after in-place
//! rewrites, a copy by reference and compaction; `--compress off`
//! stores bytes as they are; a bad `--compress` is refused.
//!
//! Inline dedupe (D50): bytes the cluster already stores are referenced,
//! not written again, from any mount, also when shifted inside a file;
//! they stay readable after the copy first written is removed;
//! `--dedupe off` writes them again.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::fuse::{self, Mount};
use common::{noise, reads_back, wait_until, Cluster};

const MIB: usize = 1 << 20;

/// Bytes of fragment files on the three segment servers.
fn stored(c: &Cluster) -> u64 {
    c.fragment_bytes()
}

/// Source-like text: lines of words from a small vocabulary, varied by
/// `seed` (compresses several times, as source code does, not to nothing).
fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "fn ",
        "let ",
        "mut ",
        "self",
        ".stripe",
        "(segment)",
        " => ",
        "{\n",
        "}\n",
        "return ",
        "match ",
        "Ok(",
        "Err(e)",
        "    ",
        ";\n",
        "extent_",
    ];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % 16) as usize].as_bytes());
        if x.is_multiple_of(11) {
            out.extend_from_slice(format!("{}", x % 1000).as_bytes());
        }
    }
    out.truncate(len);
    out
}

fn url_file(c: &Cluster, name: &str) -> PathBuf {
    c.dir.join(format!("{name}.url"))
}

/// Writes `data` to `path` from a child process (`dd`, 1 MiB writes).
/// The tests of a binary run in threads of one process, and a child any
/// of them starts inherits this process's open files until its exec
/// closes them: that close is a FUSE flush, which commits the buffer at
/// whatever point the write has reached, so chunks are cut there (D50).
/// A file written by its own process is closed only by it.
fn write_alone(c: &Cluster, path: &Path, data: &[u8]) {
    let src = c.dir.join(format!(
        "src-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f")
    ));
    std::fs::write(&src, data).unwrap();
    let ok = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", path.display()))
        .args(["bs=1M", "status=none"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "dd to {}", path.display());
    std::fs::remove_file(&src).unwrap();
}

fn mount(c: &Cluster, name: &str, extra: &[&str]) -> Mount {
    let url = url_file(c, name);
    let url_s = url.to_string_lossy().into_owned();
    let mut args = vec![
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-url-file",
        url_s.as_str(),
    ];
    args.extend_from_slice(extra);
    Mount::new(c, name, &args)
}

#[test]
fn compressible_data_is_stored_compressed_and_reads_back_exactly() {
    let c = Cluster::start_with("reduction", |cfg| {
        cfg.gc_interval_ms = 300;
        cfg.gc_grace_ms = 1000;
    });
    let m = mount(&c, "mnt", &[]);
    let base = stored(&c);

    // 24 MiB of source-like text: stored compressed.
    let t = text(1, 24 * MIB);
    std::fs::write(m.path.join("text"), &t).unwrap();
    let after_text = stored(&c);
    let text_stored = after_text - base;
    eprintln!(
        "text: {} MiB written, {} KiB of fragments (plain 2+1 would be {} KiB)",
        t.len() >> 20,
        text_stored >> 10,
        (t.len() * 3 / 2) >> 10
    );
    assert!(
        text_stored * 2 < t.len() as u64,
        "24 MiB of text stored in {text_stored} bytes of fragments: not compressed"
    );

    // 16 MiB of noise: stored as it is (1.5 bytes per byte with 2+1).
    let n = noise(2, 16 * MIB);
    std::fs::write(m.path.join("noise"), &n).unwrap();
    let noise_stored = stored(&c) - after_text;
    assert!(
        noise_stored >= (n.len() as u64) * 3 / 2,
        "16 MiB of noise stored in {noise_stored} bytes"
    );
    let url = url_file(&c, "mnt");
    let data = fuse::mount_counter(&url, "claudefs_fuse_stripe_data_bytes_total");
    let kept = fuse::mount_counter(&url, "claudefs_fuse_stripe_stored_bytes_total");
    eprintln!("mount counters: {data} bytes into stripes, {kept} stored");
    assert!(data >= (t.len() + n.len()) as u64);
    assert!(kept < data - (t.len() as u64) / 2, "{kept} of {data}");

    // In-place rewrites of parts of the compressed file, then reads from
    // this mount and from a fresh one (no cache shared).
    let mut t2 = t.clone();
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.path.join("text"))
            .unwrap();
        for (i, at) in [5usize, 3 * MIB + 17, 11 * MIB - 100, 24 * MIB - 4000]
            .into_iter()
            .enumerate()
        {
            let piece = text(100 + i as u64, 9000.min(t2.len() - at));
            f.write_all_at(&piece, at as u64).unwrap();
            t2[at..at + piece.len()].copy_from_slice(&piece);
        }
        f.sync_all().unwrap();
    }
    reads_back(&m.path.join("text"), &t2);
    reads_back(&m.path.join("noise"), &n);
    // A copy by reference shares the compressed stripes.
    let out = Command::new("cp")
        .arg(m.path.join("text"))
        .arg(m.path.join("text-copy"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    fuse::drop_kernel_caches();
    let other = mount(&c, "other", &[]);
    // Small reads at random places of the compressed text, from a mount
    // with nothing cached: each fetches and decompresses only the 64 KiB
    // frames covering it (D49), not the whole stripe.
    {
        let f = std::fs::File::open(other.path.join("text")).unwrap();
        let asked = 24;
        for i in (0..asked).rev() {
            let at = i * MIB + 12_345 + i * 7_777;
            let mut b = vec![0u8; 4096];
            f.read_exact_at(&mut b, at as u64).unwrap();
            assert!(b == t2[at..at + 4096], "4 KiB at {at} differ");
        }
        let url = url_file(&c, "other");
        let part = fuse::mount_counter(&url, "claudefs_fuse_stripe_reads_total{how=\"part\"}");
        let whole = fuse::mount_counter(&url, "claudefs_fuse_stripe_reads_total{how=\"whole\"}");
        eprintln!("{asked} random 4 KiB reads: {part} served from frames, {whole} read whole");
        assert!(
            part >= asked as u64 && whole == 0,
            "{part} part, {whole} whole reads"
        );
    }
    reads_back(&other.path.join("text"), &t2);
    reads_back(&other.path.join("text-copy"), &t2);
    reads_back(&other.path.join("noise"), &n);

    // Compaction of compressed segments: most of the text rewritten, so
    // its first segments are mostly dead; the collector copies what
    // lives (decompressed, compressed again) and frees them.
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.path.join("text"))
            .unwrap();
        let piece = text(7, 20 * MIB);
        f.write_all_at(&piece, MIB as u64).unwrap();
        t2[MIB..21 * MIB].copy_from_slice(&piece);
        f.sync_all().unwrap();
    }
    std::fs::remove_file(m.path.join("text-copy")).unwrap();
    let compacted = wait_until(90, || {
        (1..=3)
            .map(|id| c.metric(id, "claudefs_gc_segments_freed_total"))
            .sum::<u64>()
            > 0
    });
    assert!(compacted, "nothing freed after the rewrite");
    fuse::drop_kernel_caches();
    reads_back(&other.path.join("text"), &t2);
    reads_back(&m.path.join("text"), &t2);
    reads_back(&other.path.join("noise"), &n);
    drop(other);

    // `--compress off`: the same text stored as it is.
    // (Counted by the mount: the collector is still freeing what the
    // rewrite left, so the disks' growth says nothing here.)
    // (Dedupe off too: the text's untouched chunks are still stored, and
    // would be referenced rather than written.)
    let plain = mount(&c, "plain", &["--compress", "off", "--dedupe", "off"]);
    std::fs::write(plain.path.join("text-plain"), &t).unwrap();
    let url = url_file(&c, "plain");
    let plain_data = fuse::mount_counter(&url, "claudefs_fuse_stripe_data_bytes_total");
    let plain_stored = fuse::mount_counter(&url, "claudefs_fuse_stripe_stored_bytes_total");
    assert!(plain_data >= t.len() as u64 - (64 << 10), "{plain_data}");
    assert_eq!(
        plain_data, plain_stored,
        "with --compress off, {plain_data} bytes stored in {plain_stored}"
    );
    assert_eq!(
        fuse::mount_counter(
            &url,
            "claudefs_fuse_stripes_written_total{packing=\"zstd\"}"
        ),
        0
    );
    reads_back(&m.path.join("text-plain"), &t);
    drop(plain);
    drop(m);
    c.fsck_clean();
}

#[test]
fn a_bad_compress_option_is_refused_before_mounting() {
    for bad in ["zstd:0", "zstd:20", "lz4", "zstd:x"] {
        let out = Command::new(fuse::cfs())
            .args(["mount", "/nonexistent-mountpoint", "--dir", "/nonexistent"])
            .args(["--compress", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("compression") && err.contains("zstd:N"),
            "{bad}: unclear error: {err}"
        );
    }
}

fn admin_policy(args: &[&str]) -> std::process::Output {
    Command::new(fuse::cfs())
        .args(["admin", "policy"])
        .args(args)
        .output()
        .unwrap()
}

/// Fragment bytes a write of `data` to `path` added on the servers.
fn stored_for(c: &Cluster, path: &Path, data: &[u8]) -> u64 {
    let before = stored(c);
    std::fs::write(path, data).unwrap();
    stored(c) - before
}

/// A subtree's policy (`cfs admin policy set DIR --compress`) decides how
/// what is created in it afterwards is stored, whatever the writing
/// mount's `--compress`; subdirectories made later inherit it; a policy
/// that does not parse is refused and changes nothing; clearing it gives
/// new files the mount's setting again.
#[test]
fn a_subtree_policy_is_inherited_by_what_is_created_in_it() {
    let c = Cluster::start("policy");
    // Dedupe off: the test writes the same text in and out of the
    // subtree to compare how each is stored.
    let m = mount(&c, "mnt", &["--compress", "off", "--dedupe", "off"]);
    let t = text(3, 4 * MIB);
    let plain_min = (t.len() as u64) * 3 / 2;
    let dir = m.path.join("projects");
    std::fs::create_dir(&dir).unwrap();
    let d = dir.to_str().unwrap();

    let out = admin_policy(&["get", d]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("mount default"));
    let out = admin_policy(&["set", d, "--compress", "zstd:3"]);
    assert!(out.status.success(), "{out:?}");
    let out = admin_policy(&["get", d]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("compress zstd:3"));

    // Created in it, and in a subdirectory made after: compressed,
    // though this mount writes plain by default.
    std::fs::create_dir(dir.join("sub")).unwrap();
    let out = admin_policy(&["get", dir.join("sub").to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("compress zstd:3"),
        "{out:?}"
    );
    let inside = stored_for(&c, &dir.join("sub/a.txt"), &t);
    assert!(inside * 2 < t.len() as u64, "stored {inside} under zstd:3");
    // Outside: the mount's setting.
    let outside = stored_for(&c, &m.path.join("b.txt"), &t);
    assert!(outside >= plain_min, "stored {outside} outside the policy");

    // A bad value: refused (EINVAL), the policy unchanged.
    let bad = xattr::set(&dir, "trusted.claudefs.compress", b"zstd:99");
    assert_eq!(
        bad.unwrap_err().raw_os_error(),
        Some(libc::EINVAL),
        "zstd:99 accepted"
    );
    let out = admin_policy(&["set", d, "--compress", "lz4"]);
    assert!(!out.status.success());
    let out = admin_policy(&["get", d]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("compress zstd:3"));
    // A file is not a subtree.
    let out = admin_policy(&[
        "set",
        dir.join("sub/a.txt").to_str().unwrap(),
        "--compress",
        "off",
    ]);
    assert!(!out.status.success());

    // Cleared: new files take the mount's setting again.
    let out = admin_policy(&["clear", d]);
    assert!(out.status.success(), "{out:?}");
    let after = stored_for(&c, &dir.join("c.txt"), &t);
    assert!(
        after >= plain_min,
        "stored {after} after the policy was cleared"
    );

    // Everything reads back, from another mount too.
    let other = mount(&c, "other", &[]);
    for p in ["projects/sub/a.txt", "b.txt", "projects/c.txt"] {
        reads_back(&other.path.join(p), &t);
    }
    drop(other);
    drop(m);
    c.fsck_clean();
}

#[test]
fn identical_bytes_are_stored_once_and_outlive_the_first_copy() {
    let c = Cluster::start_with("dedupe", |cfg| {
        cfg.gc_interval_ms = 300;
        cfg.gc_grace_ms = 1000;
    });
    let m = mount(&c, "mnt", &[]);
    let url = url_file(&c, "mnt");
    let found =
        |url: &Path| fuse::mount_counter(url, "claudefs_fuse_dedupe_bytes_total{result=\"found\"}");
    let n = noise(5, 24 * MIB);
    let base = stored(&c);
    write_alone(&c, &m.path.join("a"), &n);
    let after_a = stored(&c);
    assert!(
        after_a - base >= (n.len() as u64) * 3 / 2,
        "{}",
        after_a - base
    );
    assert_eq!(found(&url), 0, "nothing was stored before a");

    // The same bytes again, written (not copied by reference): only
    // references are committed.
    write_alone(&c, &m.path.join("b"), &n);
    let after_b = stored(&c);
    eprintln!(
        "a: {} KiB of fragments, b: {} KiB more, found {} KiB",
        (after_a - base) >> 10,
        (after_b - after_a) >> 10,
        found(&url) >> 10
    );
    // Cut the same way however the writes were batched into flushes
    // (D50): every chunk is found, nothing is written again.
    assert_eq!(found(&url), n.len() as u64);
    assert!(
        after_b - after_a < MIB as u64 / 4,
        "a second copy of 24 MiB took {} bytes of fragments",
        after_b - after_a
    );

    // From another mount, shifted by a prefix: content-defined chunks
    // find most of the bytes again.
    let other = mount(&c, "other", &[]);
    let mut shifted = noise(6, MIB + 4321);
    shifted.extend_from_slice(&n);
    std::fs::write(other.path.join("c"), &shifted).unwrap();
    let other_found = found(&url_file(&c, "other"));
    eprintln!(
        "c (shifted): found {} KiB of {} KiB",
        other_found >> 10,
        shifted.len() >> 10
    );
    assert!(other_found >= 16 * MIB as u64, "{other_found}");
    let nodes_found: u64 = (1..=3)
        .map(|id| c.metric(id, "claudefs_meta_chunks_found_total"))
        .sum();
    assert!(nodes_found > 0);

    fuse::drop_kernel_caches();
    reads_back(&other.path.join("b"), &n);
    reads_back(&m.path.join("c"), &shifted);

    // The first copy removed: what b and c reference stays; the collector
    // runs meanwhile (nothing of a is unreferenced, so nothing is freed).
    std::fs::remove_file(m.path.join("a")).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    fuse::drop_kernel_caches();
    let fresh = mount(&c, "fresh", &[]);
    reads_back(&fresh.path.join("b"), &n);
    reads_back(&fresh.path.join("c"), &shifted);
    std::fs::remove_file(fresh.path.join("b")).unwrap();
    fuse::drop_kernel_caches();
    reads_back(&fresh.path.join("c"), &shifted);

    // `--dedupe off`: the same bytes are written again.
    let off = mount(&c, "off", &["--dedupe", "off"]);
    std::fs::write(off.path.join("d"), &n).unwrap();
    let off_url = url_file(&c, "off");
    assert_eq!(found(&off_url), 0);
    assert!(
        fuse::mount_counter(&off_url, "claudefs_fuse_stripe_data_bytes_total")
            >= (n.len() - MIB) as u64
    );
    reads_back(&m.path.join("d"), &n);
    drop((off, fresh, other, m));
    c.fsck_clean();
}

#[test]
fn a_bad_dedupe_option_is_refused_before_mounting() {
    let out = Command::new(fuse::cfs())
        .args(["mount", "/nonexistent-mountpoint", "--dir", "/nonexistent"])
        .args(["--dedupe", "maybe"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected `on` or `off`"), "{err}");
}

/// A subtree's dedupe policy (`cfs admin policy set DIR --dedupe off`)
/// wins over the mount's `--dedupe on` for what is created in it; a bad
/// value is refused and changes nothing; `get` shows both parts.
#[test]
fn a_subtree_dedupe_policy_wins_over_the_mount() {
    let c = Cluster::start("dedupe-policy");
    let m = mount(&c, "mnt", &[]);
    let url = url_file(&c, "mnt");
    let found = || fuse::mount_counter(&url, "claudefs_fuse_dedupe_bytes_total{result=\"found\"}");
    let n = noise(9, 8 * MIB);
    write_alone(&c, &m.path.join("first"), &n);
    let dir = m.path.join("scratch");
    std::fs::create_dir(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let out = admin_policy(&["set", d, "--dedupe", "off"]);
    assert!(out.status.success(), "{out:?}");
    let out = admin_policy(&["get", d]);
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        shown.contains("dedupe off") && shown.contains("compress (mount default)"),
        "{shown}"
    );
    // In the subtree: written again, though the mount dedupes.
    let before = found();
    let inside = stored_for(&c, &dir.join("copy"), &n);
    assert_eq!(found(), before, "deduplicated under --dedupe off");
    assert!(inside >= (n.len() as u64) * 3 / 2, "stored {inside}");
    // Outside: the mount's default finds the bytes.
    write_alone(&c, &m.path.join("second"), &n);
    assert!(
        found() >= before + (n.len() - MIB) as u64,
        "found {} bytes of {} (before {before}); mount log: {}",
        found(),
        n.len(),
        std::fs::read_to_string(c.dir.join("mnt.log")).unwrap_or_default()
    );
    // A bad value: EINVAL, the policy unchanged; the CLI refuses it too.
    let bad = xattr::set(&dir, "trusted.claudefs.dedupe", b"sometimes");
    assert_eq!(bad.unwrap_err().raw_os_error(), Some(libc::EINVAL));
    let out = admin_policy(&["set", d, "--dedupe", "maybe"]);
    assert!(!out.status.success());
    let out = admin_policy(&["set", d]);
    assert!(
        !out.status.success(),
        "a policy with nothing to set accepted"
    );
    let out = admin_policy(&["get", d]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dedupe off"));
    reads_back(&dir.join("copy"), &n);
    let out = admin_policy(&["clear", d]);
    assert!(out.status.success(), "{out:?}");
    let out = admin_policy(&["get", d]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dedupe (mount default)"));
    drop(m);
    c.fsck_clean();
}

/// A stripe stored under a chunk id its bytes do not hash to (a faulty
/// or hostile writer: failpoint `chunk-wrong-id`) is never served: every
/// mount's read of it fails with EIO and is counted, the liar's own
/// included; an honest copy of the same bytes is not deduplicated
/// against it and reads back exactly.
#[test]
fn a_stripe_whose_bytes_do_not_match_its_chunk_id_is_refused() {
    let c = Cluster::start("chunklie");
    let liar = {
        let url = url_file(&c, "liar");
        let url_s = url.to_string_lossy().into_owned();
        common::fuse::Mount::with_env(
            &c,
            "liar",
            &[
                "--metrics-listen",
                "127.0.0.1:0",
                "--metrics-url-file",
                &url_s,
            ],
            &[("CFS_FAILPOINT", "chunk-wrong-id")],
        )
    };
    let honest = mount(&c, "honest", &[]);
    let data = text(77, 3 << 20);
    std::fs::write(liar.path.join("lied"), &data).unwrap();
    std::fs::write(honest.path.join("true"), &data).unwrap();
    common::fuse::drop_kernel_caches();
    let eio = |p: &Path| std::fs::read(p).err().and_then(|e| e.raw_os_error());
    assert_eq!(eio(&honest.path.join("lied")), Some(libc::EIO));
    assert_eq!(eio(&liar.path.join("lied")), Some(libc::EIO));
    for m in ["honest", "liar"] {
        let n =
            common::fuse::mount_counter(&url_file(&c, m), "claudefs_fuse_chunk_mismatches_total");
        assert!(n >= 1, "{m}: {n} mismatches counted");
    }
    reads_back(&honest.path.join("true"), &data);
    c.fsck_clean();
}
