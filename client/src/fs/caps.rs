//! The kernel's "kill privileges" probe: before every write to a file and
//! every chown of one, it asks `getxattr("security.capability")` (a file
//! that is modified or given away loses its capabilities). On a FUSE file
//! system that is a server round trip per `write(2)`. This mount answers
//! the probe itself for the attribute TTL when it knows the answer is
//! "none": the file was created here, or the server said so. Setting or
//! removing any attribute here forgets it; strict mode always asks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cfs_proto::types::Ino;

/// The attribute the kernel probes.
pub(super) const CAPS: &[u8] = b"security.capability";

/// Entries kept before expired ones are dropped.
const PRUNE_AT: usize = 4096;

/// Inodes known to have no `security.capability`, until when.
#[derive(Default)]
pub(super) struct NoCaps {
    until: Mutex<HashMap<Ino, Instant>>,
}

impl NoCaps {
    /// Whether `ino` is known to have none now.
    pub(super) fn known(&self, ino: Ino) -> bool {
        let m = self.until.lock().expect("caps lock");
        m.get(&ino).is_some_and(|t| Instant::now() < *t)
    }

    /// `ino` has none, as of now, for `ttl`.
    pub(super) fn record(&self, ino: Ino, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut m = self.until.lock().expect("caps lock");
        if m.len() >= PRUNE_AT {
            m.retain(|_, t| now < *t);
        }
        m.insert(ino, now + ttl);
    }

    pub(super) fn forget(&self, ino: Ino) {
        self.until.lock().expect("caps lock").remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_until_the_ttl_or_forgotten() {
        let c = NoCaps::default();
        assert!(!c.known(5));
        c.record(5, Duration::from_secs(60));
        assert!(c.known(5));
        c.forget(5);
        assert!(!c.known(5));
        c.record(6, Duration::ZERO);
        assert!(!c.known(6), "strict mode (TTL 0) records nothing");
        c.record(7, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!c.known(7), "expired");
    }
}
