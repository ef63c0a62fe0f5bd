//! The file-register workload: files on the mounts as linearizable
//! registers. A read reads the file; a write writes a temporary file and
//! renames it over the register (atomic replace); a compare-and-set takes
//! an open-file-description lock (through the log, so it holds across
//! mounts and between the clients, which are threads of one process), reads,
//! compares and replaces. Writes take the same lock, so a compare-and-set
//! is atomic with respect to them. Clients use different mounts (strict
//! cache mode); checked per key for linearizability.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::{Checked, Ctx, Process};
use crate::history::{pair, Event, Kind};
use crate::linearizable::{check_register, Op as LinOp, Outcome, RegOp};

const KEYS: u64 = 3;
const VALUES: i64 = 5;
const SEARCH_BUDGET: usize = 5_000_000;

fn reg(mount: &Path, k: &str) -> PathBuf {
    mount.join("reg").join(k)
}

pub fn setup(mount: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(mount.join("reg"))?;
    for k in 0..KEYS {
        std::fs::write(reg(mount, &format!("k{k}")), b"")?;
        std::fs::write(reg(mount, &format!("k{k}.lock")), b"")?;
    }
    Ok(())
}

fn read(mount: &Path, k: &str) -> std::io::Result<Option<i64>> {
    let mut s = String::new();
    std::fs::File::open(reg(mount, k))?.read_to_string(&mut s)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.trim()
        .parse()
        .map(Some)
        .map_err(|e| std::io::Error::other(format!("register {k} holds {s:?}: {e}")))
}

/// Holds an exclusive lock (OFD) on the key's lock file until dropped.
struct Locked {
    file: std::fs::File,
}

impl Drop for Locked {
    fn drop(&mut self) {
        // Unlock explicitly: closing does not reach a FUSE file system for
        // OFD locks (the kernel only tells it about POSIX locks, at flush,
        // and flock locks, at release).
        // SAFETY: a zeroed flock is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_UNLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        // An unlock that fails (no node reachable) would leave the lock
        // held for good (no client leases yet): keep trying for a while.
        let until = std::time::Instant::now() + UNLOCK_PATIENCE;
        loop {
            // SAFETY: fcntl on an fd we own, with a valid flock pointer.
            let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
            if r == 0 || std::time::Instant::now() >= until {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}

/// How long a client keeps retrying a failed unlock.
const UNLOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

fn lock(mount: &Path, k: &str) -> std::io::Result<Locked> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(reg(mount, &format!("{k}.lock")))?;
    // SAFETY: a zeroed flock is a valid value; we set the fields we use.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    // Open-file-description locks: the clients are threads of one process,
    // and classic POSIX record locks of one process never conflict with
    // each other (the first long runs caught exactly that: writes slipping
    // between a compare-and-set's read and its rename on the same mount).
    // l_pid must be 0 for them (it is: zeroed).
    // SAFETY: fcntl on an fd we own, with a valid flock pointer.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLKW, &fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Locked { file: f })
}

/// Replaces the register by rename (atomic), under the caller's lock.
fn replace(mount: &Path, k: &str, tmp: &str, v: i64) -> std::io::Result<()> {
    let t = reg(mount, tmp);
    let mut f = std::fs::File::create(&t)?;
    f.write_all(v.to_string().as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&t, reg(mount, k))
}

/// Where an operation failed: before it could change anything, or after.
enum Step {
    Before(std::io::Error),
    After(std::io::Error),
}

pub async fn client(ctx: Arc<Ctx>, slot: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(ctx.seed.wrapping_add(slot * 7));
    let mut p = Process::new(slot, ctx.concurrency);
    let h = &ctx.history;
    let mut n = 0u64;
    while h.now() < ctx.until {
        let m = ctx.mounts[(p.id as usize) % ctx.mounts.len()].clone();
        let k = format!("k{}", rng.gen_range(0..KEYS));
        n += 1;
        let tmp = format!(".tmp-{}-{n}", p.id);
        let roll = rng.gen_range(0..4);
        if roll < 2 {
            h.invoke(p.id, "read", Some(&k), Value::Null);
            let k2 = k.clone();
            let r = tokio::task::spawn_blocking(move || read(&m, &k2))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match r {
                Ok(v) => h.complete(p.id, Kind::Ok, "read", Some(&k), json!(v)),
                Err(e) => h.complete(p.id, Kind::Fail, "read", Some(&k), json!(e.to_string())),
            }
            continue;
        }
        let (f, arg) = if roll == 2 {
            ("write", json!(rng.gen_range(0..VALUES)))
        } else {
            (
                "cas",
                json!([rng.gen_range(0..VALUES), rng.gen_range(0..VALUES)]),
            )
        };
        h.invoke(p.id, f, Some(&k), arg.clone());
        let (k2, a2) = (k.clone(), arg.clone());
        let r = tokio::task::spawn_blocking(move || {
            let _l = lock(&m, &k2).map_err(Step::Before)?;
            let new = if f == "write" {
                a2.as_i64().unwrap_or(0)
            } else {
                let cur = read(&m, &k2).map_err(Step::Before)?;
                if cur != a2[0].as_i64() {
                    return Ok(false);
                }
                a2[1].as_i64().unwrap_or(0)
            };
            replace(&m, &k2, &tmp, new).map_err(Step::After)?;
            Ok(true)
        })
        .await
        .unwrap_or_else(|e| Err(Step::After(std::io::Error::other(e.to_string()))));
        match r {
            Ok(true) => h.complete(p.id, Kind::Ok, f, Some(&k), arg),
            Ok(false) => h.complete(p.id, Kind::Fail, f, Some(&k), arg),
            Err(Step::Before(e)) => h.complete(p.id, Kind::Fail, f, Some(&k), json!(e.to_string())),
            Err(Step::After(e)) => {
                h.complete(p.id, Kind::Info, f, Some(&k), json!(e.to_string()));
                p.crashed();
            }
        }
    }
}

pub async fn final_reads(ctx: &Ctx) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    for m in &ctx.mounts {
        let mut regs = serde_json::Map::new();
        for k in 0..KEYS {
            let k = format!("k{k}");
            let (m2, k2) = (m.clone(), k.clone());
            let v = tokio::task::spawn_blocking(move || read(&m2, &k2)).await?;
            regs.insert(k, json!(v.ok()));
        }
        out.push(json!({"mount": m.display().to_string(), "registers": regs}));
    }
    Ok(Value::Array(out))
}

pub fn check(events: &[Event], fin: &Value) -> Checked {
    let ops = pair(events);
    let mut by_key: HashMap<String, Vec<LinOp>> = HashMap::new();
    for o in &ops {
        let Some(k) = &o.key else { continue };
        let complete = match o.kind() {
            Kind::Ok => o.complete.as_ref().map(|c| c.time),
            Kind::Info => None,
            _ => continue,
        };
        let op = match (o.f.as_str(), complete) {
            ("read", Some(_)) => RegOp::Read(o.value().as_i64()),
            ("read", None) => continue,
            ("write", _) => match o.invoke.value.as_i64() {
                Some(v) => RegOp::Write(v),
                None => continue,
            },
            ("cas", _) => match (o.invoke.value[0].as_i64(), o.invoke.value[1].as_i64()) {
                (Some(a), Some(b)) => RegOp::Cas(a, b),
                _ => continue,
            },
            _ => continue,
        };
        by_key.entry(k.clone()).or_default().push(LinOp {
            index: o.invoke.index,
            process: o.process,
            invoke: o.invoke.time,
            complete,
            op,
        });
    }
    let mut anomalies = Vec::new();
    let mut unknown = false;
    let mut keys: Vec<_> = by_key.keys().cloned().collect();
    keys.sort();
    for k in &keys {
        match check_register(&by_key[k], None, SEARCH_BUDGET) {
            Outcome::Linearizable => {}
            Outcome::Unknown => unknown = true,
            Outcome::NotLinearizable {
                stuck,
                prefix,
                detail,
            } => anomalies.push(json!({"kind": "not-linearizable", "key": k, "op": stuck,
                "linearized_before": prefix, "detail": detail})),
        }
    }
    // Every mount reads the same final registers.
    let finals: Vec<&Value> = fin
        .as_array()
        .map(|a| a.iter().map(|m| &m["registers"]).collect())
        .unwrap_or_default();
    if finals.windows(2).any(|w| w[0] != w[1]) {
        anomalies.push(json!({"kind": "mounts-disagree", "finals": finals}));
    }
    let count = |f: &str, kd: Kind| ops.iter().filter(|o| o.f == f && o.kind() == kd).count();
    Checked {
        valid: anomalies.is_empty() && !unknown,
        anomalies,
        summary: json!({
            "reads_ok": count("read", Kind::Ok),
            "writes_ok": count("write", Kind::Ok),
            "cas_ok": count("cas", Kind::Ok),
            "cas_failed": count("cas", Kind::Fail),
            "info": ops.iter().filter(|o| o.kind() == Kind::Info).count(),
        }),
        unknown,
    }
}
