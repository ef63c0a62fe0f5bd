//! The caller's credentials: ids from the request, supplementary groups
//! from `/proc/<pid>/status` (FUSE does not pass them), kept per process
//! for a second so that a tool making thousands of calls does not read
//! `/proc` for each (an open, a read and a close: ~1 % of a small-file
//! workload's CPU, `perf`). A process that changes its groups is seen
//! with the new ones within [`GROUPS_TTL`]; its uid and gid always come
//! from the request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cfs_proto::types::Creds;
use fuser::Request;

/// How long a process's supplementary groups are reused.
pub const GROUPS_TTL: Duration = Duration::from_secs(1);
/// Processes whose groups are kept at most (the table starts over past it).
pub const GROUPS_CACHED_MAX: usize = 4096;

/// A caller as the kernel names it: (pid, uid, gid).
type Caller = (u32, u32, u32);

#[derive(Default)]
pub struct Groups {
    /// Each caller's groups and when they were read.
    by_process: Mutex<HashMap<Caller, (Vec<u32>, Instant)>>,
}

impl Groups {
    pub fn creds(&self, req: &Request<'_>) -> Creds {
        let key = (req.pid(), req.uid(), req.gid());
        let now = Instant::now();
        let cached = {
            let m = self.by_process.lock().expect("groups lock");
            m.get(&key)
                .filter(|(_, at)| now.duration_since(*at) < GROUPS_TTL)
                .map(|(g, _)| g.clone())
        };
        let groups = cached.unwrap_or_else(|| {
            let g = read_groups(req.pid());
            let mut m = self.by_process.lock().expect("groups lock");
            if m.len() >= GROUPS_CACHED_MAX {
                m.clear();
            }
            m.insert(key, (g.clone(), now));
            g
        });
        Creds {
            uid: req.uid(),
            gid: req.gid(),
            groups,
        }
    }
}

/// The supplementary groups of process `pid` (none if it is gone).
fn read_groups(pid: u32) -> Vec<u32> {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    s.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_groups_are_read_from_proc() {
        // SAFETY: getgroups(2) with a buffer of the size passed.
        let mut buf = vec![0 as libc::gid_t; 1024];
        let n = unsafe { libc::getgroups(buf.len() as i32, buf.as_mut_ptr()) };
        assert!(n >= 0);
        let mut want: Vec<u32> = buf[..n as usize].to_vec();
        let mut got = read_groups(std::process::id());
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert!(read_groups(u32::MAX).is_empty(), "no such process");
    }
}
