//! FUSE mounts made by `cfs mount` for the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cfs_node::{cluster, mounts};

use super::Cluster;

pub fn cfs() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cfs"))
}

/// Runs `cfs ARGS`: whether it succeeded, and its stdout then stderr.
pub fn cfs_run(args: &[&str]) -> (bool, String) {
    let out = Command::new(cfs()).args(args).output().expect("run cfs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A `cfs mount` process serving `path`; unmounted on drop.
pub struct Mount {
    pub path: PathBuf,
    pub child: std::process::Child,
}

impl Mount {
    pub fn new(c: &Cluster, name: &str, extra: &[&str]) -> Mount {
        Self::with_env(c, name, extra, &[])
    }

    /// [`Mount::new`] with extra environment variables (`CFS_LOG`).
    pub fn with_env(c: &Cluster, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Mount {
        let path = c.dir.join(name);
        std::fs::create_dir_all(&path).expect("mountpoint");
        let log = std::fs::File::create(c.dir.join(format!("{name}.log"))).expect("log");
        let child = Command::new(cfs())
            .envs(env.iter().copied())
            .arg("mount")
            .arg(&path)
            .arg("--dir")
            .arg(&c.dir)
            .args(extra)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("cfs mount");
        let until = Instant::now() + Duration::from_secs(30);
        while !mounts::is_mounted(&path) {
            assert!(Instant::now() < until, "mount did not appear");
            std::thread::sleep(Duration::from_millis(50));
        }
        Mount { path, child }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        cfs_client::unmount(&self.path);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A counter of a mount's `/metrics` (summed over its label sets).
pub fn mount_counter(url_file: &Path, name: &str) -> u64 {
    let url = std::fs::read_to_string(url_file).expect("metrics url");
    let addr = url
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .parse()
        .expect("metrics address");
    let (_, body) = cluster::http_get(addr, "/metrics").expect("mount metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Drops the kernel's dentry, inode and page caches (as `bench/fs.sh`
/// does between steps): what follows is answered by the mount.
pub fn drop_kernel_caches() {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (root)");
}
