//! The mount's attribute cache, usable under leases (`cfs_proto::lease`).
//!
//! Attributes are cached from replies as the connection reader receives
//! them, in arrival order with the invalidations the node pushes. Each
//! reply carries a *stamp*: the last invalidation the node had sent this
//! session before it read its answer. An answer is cached only if no
//! invalidation of that inode newer than its stamp has arrived (else it
//! may predate the change). A cached entry is used only while the lease on
//! its inode's shard is valid, every invalidation queued before the grant
//! has been applied (to the kernel too), and it was fetched after the
//! lease period began.
//!
//! A new connection is a new session: everything is dropped (`session`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cfs_proto::types::{shard_of, Ino, Inode};

/// Inodes cached at most; past this the cache starts over.
pub const ATTRS_MAX: usize = 1 << 20;
/// Inodes whose last invalidation is remembered; past this the record
/// starts over from a floor (older stamps are refused).
pub const TOMBSTONES_MAX: usize = 1 << 16;

struct Cached {
    inode: Inode,
    fetched: Instant,
}

/// The names of an inode's extended attributes.
struct Names {
    names: Vec<Vec<u8>>,
    fetched: Instant,
}

#[derive(Clone, Copy)]
struct Lease {
    until: Instant,
    /// When the current unbroken run of renewals began.
    start: Instant,
    /// Invalidations up to this one must be applied before use.
    need: u64,
}

#[derive(Default)]
struct State {
    gen: u64,
    attrs: HashMap<Ino, Cached>,
    xattr_names: HashMap<Ino, Names>,
    /// Last invalidation received per inode.
    tombs: HashMap<Ino, u64>,
    /// Stamps below this are refused (a "drop everything", or tombstones
    /// forgotten).
    floor: u64,
    /// Last invalidation applied (kernel notified).
    applied: u64,
    leases: HashMap<u32, Lease>,
}

#[derive(Default)]
pub struct MetaCache {
    s: Mutex<State>,
}

impl MetaCache {
    /// A new session: nothing from the last one may be used. Returns its
    /// generation.
    pub fn session(&self) -> u64 {
        let mut s = self.s.lock().expect("cache lock");
        let gen = s.gen + 1;
        *s = State {
            gen,
            ..State::default()
        };
        gen
    }

    pub fn generation(&self) -> u64 {
        self.s.lock().expect("cache lock").gen
    }

    /// An invalidation arrived (reader order): `ino` 0 is everything.
    pub fn invalidated(&self, gen: u64, seq: u64, ino: Ino) {
        let mut s = self.s.lock().expect("cache lock");
        if s.gen != gen {
            return;
        }
        if ino == 0 {
            s.attrs.clear();
            s.xattr_names.clear();
            s.tombs.clear();
            s.floor = s.floor.max(seq);
            return;
        }
        s.attrs.remove(&ino);
        s.xattr_names.remove(&ino);
        if s.tombs.len() >= TOMBSTONES_MAX {
            s.tombs.clear();
            s.floor = s.floor.max(seq);
        }
        s.tombs.insert(ino, seq);
    }

    /// A reply read with `stamp` carried these attributes (reader order).
    pub fn fetched(&self, gen: u64, stamp: u64, inode: &Inode) {
        let mut s = self.s.lock().expect("cache lock");
        if s.gen != gen || stamp < s.floor {
            return;
        }
        if s.tombs.get(&inode.ino).is_some_and(|t| *t > stamp) {
            return;
        }
        if s.attrs.len() >= ATTRS_MAX {
            s.attrs.clear();
        }
        s.attrs.insert(
            inode.ino,
            Cached {
                inode: inode.clone(),
                fetched: Instant::now(),
            },
        );
    }

    /// A reply read with `stamp` listed the extended attributes of `ino`.
    pub fn fetched_xattr_names(&self, gen: u64, stamp: u64, ino: Ino, names: &[Vec<u8>]) {
        let mut s = self.s.lock().expect("cache lock");
        if s.gen != gen || stamp < s.floor || s.tombs.get(&ino).is_some_and(|t| *t > stamp) {
            return;
        }
        if s.xattr_names.len() >= ATTRS_MAX {
            s.xattr_names.clear();
        }
        s.xattr_names.insert(
            ino,
            Names {
                names: names.to_vec(),
                fetched: Instant::now(),
            },
        );
    }

    /// The names of `ino`'s extended attributes, if a lease makes them
    /// current.
    pub fn xattr_names(&self, ino: Ino) -> Option<Vec<Vec<u8>>> {
        let s = self.s.lock().expect("cache lock");
        let l = s.leases.get(&shard_of(ino))?;
        if l.until <= Instant::now() || s.applied < l.need {
            return None;
        }
        let n = s.xattr_names.get(&ino)?;
        (n.fetched >= l.start).then(|| n.names.clone())
    }

    /// Invalidation `seq` is applied (kernel caches included).
    pub fn applied(&self, gen: u64, seq: u64) {
        let mut s = self.s.lock().expect("cache lock");
        if s.gen == gen {
            s.applied = s.applied.max(seq);
        }
    }

    /// A lease reply for a request sent at `sent`: `shards` are leased for
    /// `valid` from then; the others are not.
    pub fn leased(&self, gen: u64, sent: Instant, shards: &[u32], valid: Duration, need: u64) {
        let mut s = self.s.lock().expect("cache lock");
        if s.gen != gen {
            return;
        }
        let until = sent + valid;
        s.leases.retain(|sh, _| shards.contains(sh));
        for sh in shards {
            let old = s.leases.get(sh).copied();
            let lease = match old {
                // An unbroken run: the cache fetched since its start stays.
                Some(l) if l.until > sent => Lease {
                    until: until.max(l.until),
                    start: l.start,
                    need: need.max(l.need),
                },
                _ => Lease {
                    until,
                    start: sent,
                    need,
                },
            };
            s.leases.insert(*sh, lease);
        }
    }

    /// How long the lease covering `ino` still lasts, if it can be used.
    pub fn lease_left(&self, ino: Ino) -> Option<Duration> {
        let s = self.s.lock().expect("cache lock");
        let l = s.leases.get(&shard_of(ino))?;
        let now = Instant::now();
        (l.until > now && s.applied >= l.need).then(|| l.until - now)
    }

    /// Cached attributes of `ino`, if a lease makes them current.
    pub fn get(&self, ino: Ino) -> Option<Inode> {
        let s = self.s.lock().expect("cache lock");
        let l = s.leases.get(&shard_of(ino))?;
        let now = Instant::now();
        if l.until <= now || s.applied < l.need {
            return None;
        }
        let c = s.attrs.get(&ino)?;
        (c.fetched >= l.start).then(|| c.inode.clone())
    }

    /// Drops what this mount knows of `ino` (its own change, before the
    /// node's invalidation arrives).
    pub fn forget(&self, ino: Ino) {
        let mut s = self.s.lock().expect("cache lock");
        s.attrs.remove(&ino);
        s.xattr_names.remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cfs_proto::types::make_ino;

    fn inode(ino: Ino, size: u64) -> Inode {
        Inode {
            ino,
            mode: libc::S_IFREG | 0o644,
            uid: 0,
            gid: 0,
            size,
            nlink: 1,
            atime: 0,
            mtime: 0,
            ctime: 0,
            crtime: 0,
            rdev: 0,
            generation: 1,
            allocated: 0,
            parent: 1,
            next_cookie: 0,
            entries: 0,
        }
    }

    #[test]
    fn nothing_is_served_without_a_lease() {
        let c = MetaCache::default();
        let g = c.session();
        let ino = make_ino(0, 5);
        c.fetched(g, 0, &inode(ino, 1));
        assert!(c.get(ino).is_none());
        std::thread::sleep(Duration::from_millis(2));
        let sent = Instant::now();
        c.leased(g, sent, &[0], Duration::from_secs(3), 0);
        // Fetched before the lease began: not trusted.
        assert!(c.get(ino).is_none());
        c.fetched(g, 0, &inode(ino, 2));
        assert_eq!(c.get(ino).map(|i| i.size), Some(2));
        // Another shard is not leased.
        let other = make_ino(1, 5);
        c.fetched(g, 0, &inode(other, 1));
        assert!(c.get(other).is_none());
    }

    #[test]
    fn an_answer_older_than_an_invalidation_is_not_cached() {
        let c = MetaCache::default();
        let g = c.session();
        let ino = make_ino(0, 5);
        c.leased(g, Instant::now(), &[0], Duration::from_secs(3), 0);
        c.invalidated(g, 7, ino);
        c.applied(g, 7);
        c.fetched(g, 6, &inode(ino, 1));
        assert!(c.get(ino).is_none(), "read before change 7");
        c.fetched(g, 7, &inode(ino, 2));
        assert_eq!(c.get(ino).map(|i| i.size), Some(2));
        c.invalidated(g, 8, ino);
        assert!(c.get(ino).is_none());
    }

    #[test]
    fn a_lease_waits_for_the_invalidations_queued_before_it() {
        let c = MetaCache::default();
        let g = c.session();
        let ino = make_ino(0, 5);
        c.leased(g, Instant::now(), &[0], Duration::from_secs(3), 4);
        c.fetched(g, 9, &inode(ino, 1));
        assert!(c.get(ino).is_none());
        c.applied(g, 4);
        assert!(c.get(ino).is_some());
    }

    #[test]
    fn a_new_session_or_an_expired_lease_serves_nothing() {
        let c = MetaCache::default();
        let g = c.session();
        let ino = make_ino(0, 5);
        c.leased(g, Instant::now(), &[0], Duration::from_millis(20), 0);
        c.fetched(g, 0, &inode(ino, 1));
        assert!(c.get(ino).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(c.get(ino).is_none());
        let g2 = c.session();
        c.leased(g, Instant::now(), &[0], Duration::from_secs(3), 0);
        assert!(c.lease_left(ino).is_none(), "a grant of the old session");
        c.leased(g2, Instant::now(), &[0], Duration::from_secs(3), 0);
        assert!(c.get(ino).is_none(), "dropped with the old session");
        // Drop everything: older stamps refused.
        c.invalidated(g2, 3, 0);
        c.fetched(g2, 2, &inode(ino, 1));
        assert!(c.get(ino).is_none());
    }
}
