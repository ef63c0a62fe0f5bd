//! Differential test (in the spirit of JuiceFS' Hypothesis-driven one):
//! the same random sequence of namespace and data operations is applied
//! to two directories (the mount and a local reference); every result and
//! error must match, and so must the final trees.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::bail;

use super::Rng;

const NAMES: &[&str] = &["a", "b", "c", "d"];

fn rel_path(rng: &mut Rng) -> PathBuf {
    let depth = 1 + rng.below(3);
    let mut p = PathBuf::new();
    for _ in 0..depth {
        p.push(NAMES[rng.below(NAMES.len() as u64) as usize]);
    }
    p
}

fn errno_of(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            format!("err:{}", std::io::Error::from_raw_os_error(n).kind()) + &format!("({n})")
        }
        None => format!("err:{e}"),
    }
}

fn res<T: std::fmt::Debug>(r: std::io::Result<T>) -> String {
    match r {
        Ok(v) => format!("ok:{v:?}"),
        Err(e) => errno_of(&e),
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in generated paths")
}

fn renameat2(a: &Path, b: &Path, flags: u32) -> std::io::Result<()> {
    let (ca, cb) = (cstr(a), cstr(b));
    // SAFETY: renameat2(2) with valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn stat_summary(p: &Path) -> std::io::Result<String> {
    let m = std::fs::symlink_metadata(p)?;
    let size = if m.is_dir() { 0 } else { m.len() };
    Ok(format!(
        "mode={:o} size={size} nlink={}",
        m.mode(),
        if m.is_dir() { 0 } else { m.nlink() }
    ))
}

/// One random operation applied under `root`; returns its outcome.
fn step(root: &Path, op: u64, rng: &mut Rng) -> (String, String) {
    let p = root.join(rel_path(rng));
    let q = root.join(rel_path(rng));
    let data: Vec<u8> = (0..rng.below(20_000))
        .map(|i| (i as u8) ^ (op as u8))
        .collect();
    let r = match rng.below(17) {
        0 => ("mkdir", res(std::fs::create_dir(&p))),
        1 => ("rmdir", res(std::fs::remove_dir(&p))),
        2 => (
            "create_excl",
            res(std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
                .map(|_| ())),
        ),
        3 => ("write_trunc", res(std::fs::write(&p, &data))),
        4 => (
            "append",
            res(std::fs::OpenOptions::new()
                .append(true)
                .open(&p)
                .and_then(|mut f| {
                    use std::io::Write;
                    f.write_all(&data)
                })),
        ),
        5 => ("unlink", res(std::fs::remove_file(&p))),
        6 => ("rename", res(std::fs::rename(&p, &q))),
        7 => (
            "rename_noreplace",
            res(renameat2(&p, &q, libc::RENAME_NOREPLACE)),
        ),
        8 => (
            "rename_exchange",
            res(renameat2(&p, &q, libc::RENAME_EXCHANGE)),
        ),
        9 => ("link", res(std::fs::hard_link(&p, &q))),
        10 => (
            "symlink",
            res(std::os::unix::fs::symlink(NAMES[rng.below(4) as usize], &p)),
        ),
        11 => (
            "readlink",
            res(std::fs::read_link(&p).map(|t| t.as_os_str().as_bytes().to_vec())),
        ),
        12 => (
            "truncate",
            res(std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_len(rng.below(30_000)))),
        ),
        13 => (
            "chmod",
            res(std::fs::set_permissions(
                &p,
                std::fs::Permissions::from_mode(0o600 + rng.below(0o177) as u32),
            )),
        ),
        14 => ("stat", res(stat_summary(&p))),
        15 => (
            "readdir",
            res(std::fs::read_dir(&p).and_then(|rd| {
                let mut v: Vec<Vec<u8>> = Vec::new();
                for e in rd {
                    v.push(e?.file_name().as_bytes().to_vec());
                }
                v.sort();
                Ok(v)
            })),
        ),
        _ => (
            "read",
            res(std::fs::read(&p).map(|d| (d.len(), blake3::hash(&d).to_hex().to_string()))),
        ),
    };
    (
        format!("{} {}", r.0, p.strip_prefix(root).unwrap_or(&p).display()),
        r.1,
    )
}

/// Every entry under `root`: relative path → type, mode, size, content.
pub fn tree(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            let m = std::fs::symlink_metadata(&p)?;
            let rel = p.strip_prefix(root)?.to_path_buf();
            let desc = if m.is_dir() {
                stack.push(p.clone());
                format!("dir {:o}", m.mode())
            } else if m.file_type().is_symlink() {
                format!("symlink -> {}", std::fs::read_link(&p)?.display())
            } else {
                let d = std::fs::read(&p)?;
                format!(
                    "file {:o} nlink={} {} {}",
                    m.mode(),
                    m.nlink(),
                    d.len(),
                    blake3::hash(&d).to_hex()
                )
            };
            out.insert(rel, desc);
        }
    }
    Ok(out)
}

/// Applies `ops` random operations from `seed` to `a` and `b` (both
/// emptied first); fails on the first differing outcome.
pub fn run(a: &Path, b: &Path, seed: u64, ops: u64) -> anyhow::Result<u64> {
    for root in [a, b] {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root)?;
    }
    let (mut ra, mut rb) = (Rng::new(seed), Rng::new(seed));
    for i in 0..ops {
        let (what_a, out_a) = step(a, i, &mut ra);
        let (_, out_b) = step(b, i, &mut rb);
        if out_a != out_b {
            bail!(
                "op {i} (seed {seed}) `{what_a}`: {} gave {out_a}, {} gave {out_b}",
                a.display(),
                b.display()
            );
        }
    }
    let (ta, tb) = (tree(a)?, tree(b)?);
    if ta != tb {
        for k in ta.keys().chain(tb.keys()) {
            if ta.get(k) != tb.get(k) {
                bail!(
                    "final trees differ at {}: {:?} vs {:?} (seed {seed})",
                    k.display(),
                    ta.get(k),
                    tb.get(k)
                );
            }
        }
    }
    Ok(ops)
}
