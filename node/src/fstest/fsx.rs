//! fsx-style data integrity exerciser (after Apple's/Linux' fsx): random
//! writes, reads, truncates, fallocates, hole punches, mmap reads,
//! copy_file_range and fsync/reopen against one file, with an in-memory
//! model of its contents; every byte read is checked. `--seed` replays a
//! run; a failure prints the operation log.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::Rng;

pub struct FsxConfig {
    pub seed: u64,
    pub ops: u64,
    pub duration: Option<Duration>,
    /// Largest file size the run grows the file to.
    pub max_size: u64,
    /// Largest single write/read.
    pub max_op: u64,
}

#[derive(Debug, Clone)]
enum FsxOp {
    Write { off: u64, len: u64 },
    Read { off: u64, len: u64 },
    Truncate { size: u64 },
    Fallocate { off: u64, len: u64, keep: bool },
    Punch { off: u64, len: u64 },
    MmapRead { off: u64, len: u64 },
    CopyRange { from: u64, to: u64, len: u64 },
    Fsync,
    Reopen,
}

pub struct FsxReport {
    pub ops: u64,
    pub bytes_checked: u64,
    pub elapsed: Duration,
}

fn open(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn check(model: &[u8], got: &[u8], off: u64, what: &str) -> anyhow::Result<()> {
    let want = &model[off as usize..off as usize + got.len()];
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        bail!(
            "{what}: byte at file offset {} is {:#04x}, expected {:#04x} ({} bytes compared from {off})",
            off + i as u64,
            got[i],
            want[i],
            got.len()
        );
    }
    Ok(())
}

/// Runs fsx on `path` (created or truncated to empty).
pub fn run(path: &Path, cfg: &FsxConfig) -> anyhow::Result<FsxReport> {
    let mut rng = Rng::new(cfg.seed);
    let _ = std::fs::remove_file(path);
    let mut f = open(path)?;
    let mut model: Vec<u8> = Vec::new();
    let mut history: Vec<FsxOp> = Vec::new();
    let start = Instant::now();
    let mut checked = 0u64;
    let mut n = 0u64;
    let mut stamp = 1u8;
    while n < cfg.ops || cfg.duration.is_some_and(|d| start.elapsed() < d) {
        if cfg.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        n += 1;
        let size = model.len() as u64;
        let pick = rng.below(100);
        let op = match pick {
            0..=29 => {
                let off = rng.below(cfg.max_size);
                let len = 1 + rng.below(cfg.max_op.min(cfg.max_size - off));
                FsxOp::Write { off, len }
            }
            30..=54 => {
                let off = rng.below(size + 1);
                FsxOp::Read {
                    off,
                    len: 1 + rng.below(cfg.max_op),
                }
            }
            55..=61 => FsxOp::Truncate {
                size: rng.below(cfg.max_size),
            },
            62..=66 => {
                let off = rng.below(cfg.max_size);
                FsxOp::Fallocate {
                    off,
                    len: 1 + rng.below(cfg.max_op.min(cfg.max_size - off)),
                    keep: rng.below(2) == 0,
                }
            }
            67..=72 => {
                let off = rng.below(size + 1);
                FsxOp::Punch {
                    off,
                    len: 1 + rng.below(cfg.max_op),
                }
            }
            73..=82 => {
                let off = rng.below(size + 1);
                FsxOp::MmapRead {
                    off,
                    len: 1 + rng.below(cfg.max_op),
                }
            }
            83..=89 => {
                let len = 1 + rng.below(cfg.max_op / 2);
                let from = rng.below(size + 1);
                let to = rng.below(cfg.max_size.saturating_sub(len).max(1));
                FsxOp::CopyRange { from, to, len }
            }
            90..=95 => FsxOp::Fsync,
            _ => FsxOp::Reopen,
        };
        history.push(op.clone());
        if history.len() > 64 {
            history.remove(0);
        }
        let r = apply(&mut f, path, &mut model, &op, &mut stamp, &mut checked);
        if let Err(e) = r {
            let recent: Vec<String> = history.iter().map(|o| format!("{o:?}")).collect();
            bail!(
                "fsx failed at op {n} (seed {}): {e:#}\nlast operations, oldest first:\n  {}",
                cfg.seed,
                recent.join("\n  ")
            );
        }
    }
    // Final full comparison after reopening.
    drop(f);
    let f = open(path)?;
    let len = f.metadata()?.len();
    if len != model.len() as u64 {
        bail!(
            "final size {len}, expected {} (seed {})",
            model.len(),
            cfg.seed
        );
    }
    let mut buf = vec![0u8; model.len()];
    f.read_exact_at(&mut buf, 0)?;
    check(&model, &buf, 0, "final read")?;
    checked += buf.len() as u64;
    Ok(FsxReport {
        ops: n,
        bytes_checked: checked,
        elapsed: start.elapsed(),
    })
}

fn apply(
    f: &mut File,
    path: &Path,
    model: &mut Vec<u8>,
    op: &FsxOp,
    stamp: &mut u8,
    checked: &mut u64,
) -> anyhow::Result<()> {
    let size = model.len() as u64;
    match *op {
        FsxOp::Write { off, len } => {
            *stamp = stamp.wrapping_add(1).max(1);
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(*stamp))
                .collect();
            f.write_all_at(&data, off).context("pwrite")?;
            let end = (off + len) as usize;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&data);
        }
        FsxOp::Read { off, len } => {
            let n = len.min(size.saturating_sub(off));
            let mut buf = vec![0u8; n as usize];
            f.read_exact_at(&mut buf, off).context("pread")?;
            check(model, &buf, off, "read")?;
            *checked += n;
            // Reading at or past the end returns nothing.
            let mut one = [0u8; 1];
            if f.read_at(&mut one, size).context("pread at EOF")? != 0 {
                bail!("read at EOF {size} returned data");
            }
        }
        FsxOp::Truncate { size: s } => {
            f.set_len(s).context("ftruncate")?;
            model.resize(s as usize, 0);
        }
        FsxOp::Fallocate { off, len, keep } => {
            let mode = if keep { libc::FALLOC_FL_KEEP_SIZE } else { 0 };
            // SAFETY: fallocate(2) on an open descriptor.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
            if r != 0 {
                bail!("fallocate: {}", std::io::Error::last_os_error());
            }
            if !keep && off + len > size {
                model.resize((off + len) as usize, 0);
            }
        }
        FsxOp::Punch { off, len } => {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate(2) on an open descriptor.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
            if r != 0 {
                bail!("punch hole: {}", std::io::Error::last_os_error());
            }
            let end = (off + len).min(size);
            if off < end {
                model[off as usize..end as usize].fill(0);
            }
        }
        FsxOp::MmapRead { off, len } => {
            let n = len.min(size.saturating_sub(off));
            if n == 0 {
                return Ok(());
            }
            let page = 4096u64;
            let base = off / page * page;
            let maplen = (off + n - base) as usize;
            // SAFETY: a private read-only mapping of an open file, within
            // its size; unmapped before return.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    maplen,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    base as i64,
                );
                if p == libc::MAP_FAILED {
                    bail!("mmap: {}", std::io::Error::last_os_error());
                }
                let s = std::slice::from_raw_parts(
                    (p as *const u8).add((off - base) as usize),
                    n as usize,
                );
                let r = check(model, s, off, "mmap read");
                libc::munmap(p, maplen);
                r?;
            }
            *checked += n;
        }
        FsxOp::CopyRange { from, to, len } => {
            let n = len.min(size.saturating_sub(from));
            if n == 0 || (from < to + n && to < from + n) {
                return Ok(());
            }
            let (mut fi, mut fo) = (from as i64, to as i64);
            let mut done = 0u64;
            while done < n {
                // SAFETY: copy_file_range(2) between ranges of one open file
                // that do not overlap.
                let r = unsafe {
                    libc::copy_file_range(
                        f.as_raw_fd(),
                        &mut fi,
                        f.as_raw_fd(),
                        &mut fo,
                        (n - done) as usize,
                        0,
                    )
                };
                if r < 0 {
                    bail!("copy_file_range: {}", std::io::Error::last_os_error());
                }
                if r == 0 {
                    break;
                }
                done += r as u64;
            }
            if done != n {
                bail!("copy_file_range copied {done} of {n}");
            }
            let src = model[from as usize..(from + n) as usize].to_vec();
            let end = (to + n) as usize;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[to as usize..end].copy_from_slice(&src);
        }
        FsxOp::Fsync => f.sync_all().context("fsync")?,
        FsxOp::Reopen => {
            *f = open(path)?;
            let len = f.metadata()?.len();
            if len != size {
                bail!("size after reopen {len}, expected {size}");
            }
        }
    }
    Ok(())
}
