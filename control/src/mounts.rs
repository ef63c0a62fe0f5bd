//! The mount that `cfs up --mount` starts next to a local cluster:
//!
//! ```text
//! DIR/mount/path        the mount point
//! DIR/mount/pid         the `cfs mount` process
//! DIR/mount/mount.log   its log
//! DIR/mount/metrics-url where its counters are served (`GET /metrics`)
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

fn mount_dir(dir: &Path) -> PathBuf {
    dir.join("mount")
}

/// Whether `path` is a mount point of a ClaudeFS FUSE mount.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(p) = path.canonicalize() else {
        return false;
    };
    let Ok(m) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    m.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, Some(mp), Some(ty)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        ty.starts_with("fuse") && Path::new(&mp.replace("\\040", " ")) == p
    })
}

/// Starts `cfs mount MNT --dir DIR` in the background unless MNT is
/// mounted; waits until the mount appears.
pub fn start_mount(dir: &Path, mnt: &Path, extra: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(mnt).with_context(|| format!("creating {}", mnt.display()))?;
    let mnt = mnt.canonicalize()?;
    if is_mounted(&mnt) {
        return Ok(());
    }
    let md = mount_dir(dir);
    std::fs::create_dir_all(&md)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(md.join("mount.log"))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    let url_file = md.join("metrics-url");
    let _ = std::fs::remove_file(&url_file);
    cmd.arg("mount")
        .arg(&mnt)
        .arg("--dir")
        .arg(dir)
        .arg("--metrics-listen")
        .arg("127.0.0.1:0")
        .arg("--metrics-url-file")
        .arg(&url_file)
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().context("starting cfs mount")?;
    std::fs::write(md.join("pid"), format!("{}\n", child.id()))?;
    std::fs::write(md.join("path"), mnt.as_os_str().as_encoded_bytes())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(&mnt) {
        if let Ok(Some(st)) = child.try_wait() {
            bail!(
                "cfs mount exited with {st}; see {}",
                md.join("mount.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not appear within 30 s; see {}",
                mnt.display(),
                md.join("mount.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Unmounts the mount `start_mount` made and stops its process.
/// Returns the mount point if there was one.
pub fn stop_mount(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let md = mount_dir(dir);
    let Ok(p) = std::fs::read(md.join("path")) else {
        return Ok(None);
    };
    let mnt = PathBuf::from(String::from_utf8_lossy(&p).into_owned());
    if is_mounted(&mnt) {
        cfs_client::unmount(&mnt);
    }
    if let Some(pid) = std::fs::read_to_string(md.join("pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: kill(2) with a pid we started; signal 0 only probes.
        while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
            unsafe { libc::kill(pid, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(50));
        }
        if unsafe { libc::kill(pid, 0) } == 0 {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = std::fs::remove_file(md.join("pid"));
    let _ = std::fs::remove_file(md.join("path"));
    Ok(Some(mnt))
}
