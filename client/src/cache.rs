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
//! Directory entries (a name's inode) are cached from lookup, create and
//! link replies by the same stamp rule, applied per name: an answer older
//! than an invalidation of that name is not kept, except that a create or
//! link reply is not refused for the invalidation of its own change (this
//! session's changes of one name are serialized by the kernel's directory
//! lock, so an `own` invalidation of the name after the reply's stamp is
//! that change's). A lookup they answer sends nothing. A name's absence
//! is only known from a complete listing (a lookup's ENOENT may come from
//! a cross-shard change half applied on that node).
//!
//! Directory listings are cached the same way, by the mount itself: a
//! listing is kept if no invalidation of its directory (or of an entry in
//! it) arrived after the request was sent ([`MetaCache::mark`]), and served
//! while the lease on the directory's shard is valid and every listed
//! child's attributes are cached and current too.
//!
//! A new connection is a new session: everything is dropped (`session`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cfs_proto::types::{shard_of, DirEntry, Ino, Inode, ShardId};

use crate::stats::{Cache, MountStats};

/// Inodes cached at most; past this the cache starts over.
pub const ATTRS_MAX: usize = 1 << 20;
/// Directory entries cached at most; past this the cache starts over.
pub const DENTRIES_MAX: usize = 1 << 20;
/// How long own invalidations in the directories of a change whose outcome
/// is unknown still go to the kernel: longer than a metadata service keeps
/// a failed cross-shard operation's steps its client's own
/// (`TX_REQUESTER_GRACE`, 2 s).
pub const UNKNOWN_OUTCOME_WATCH: Duration = Duration::from_secs(5);
/// Directories watched so at most (the oldest go first).
pub const UNKNOWN_OUTCOMES_MAX: usize = 1024;
/// Entries of cached listings at most (over all directories); past this
/// the listing cache starts over.
pub const LISTED_ENTRIES_MAX: usize = 1 << 20;
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

/// A directory's complete listing (without "." and "..").
struct Listing {
    entries: Vec<DirEntry>,
    fetched: Instant,
    /// Names this session's own changes touched since: not known from
    /// `entries` any more (the kernel serializes one mount's changes in a
    /// directory; another mount's change drops the listing). While any,
    /// the listing still tells which other names are absent, but is no
    /// longer served as a listing.
    touched: std::collections::HashSet<Vec<u8>>,
}

impl Listing {
    fn new(entries: Vec<DirEntry>) -> Listing {
        Listing {
            entries,
            fetched: Instant::now(),
            touched: Default::default(),
        }
    }

    /// What it counts against [`LISTED_ENTRIES_MAX`].
    fn weight(&self) -> usize {
        self.entries.len() + self.touched.len() + 1
    }
}

/// A name in a directory and its inode.
struct Dentry {
    ino: Ino,
    fetched: Instant,
}

/// The last invalidations of one name: any, and another session's.
#[derive(Clone, Copy, Default)]
struct NameTomb {
    any: u64,
    foreign: u64,
}

/// What the cache knows of a name, if leases make it current.
#[derive(Debug, PartialEq, Eq)]
pub enum Named {
    /// The name exists; its inode's attributes.
    Found(Inode),
    /// The name does not exist.
    Absent,
}

/// Where the invalidation stream stood when a request was sent.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    gen: u64,
    received: u64,
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
    /// Last invalidation per inode from another session's change (cleared
    /// with `tombs`).
    foreign_tombs: HashMap<Ino, u64>,
    /// Stamps below this are refused (a "drop everything", or tombstones
    /// forgotten).
    floor: u64,
    /// Last invalidation applied (kernel notified).
    applied: u64,
    /// Last invalidation received.
    received: u64,
    listings: HashMap<Ino, Listing>,
    listed_entries: usize,
    dentries: HashMap<(Ino, Vec<u8>), Dentry>,
    /// Last invalidations per name (bounded like `tombs`).
    name_tombs: HashMap<(Ino, Vec<u8>), NameTomb>,
    leases: HashMap<ShardId, Lease>,
    /// Directories of changes whose outcome their caller did not learn,
    /// until when (see [`MetaCache::watch_unknown_outcome`]).
    unknown_outcomes: std::collections::VecDeque<(Instant, Ino)>,
}

#[derive(Default)]
pub struct MetaCache {
    s: Mutex<State>,
    /// Where entries dropped for room are counted.
    stats: Arc<MountStats>,
}

impl MetaCache {
    pub fn new(stats: Arc<MountStats>) -> Self {
        MetaCache {
            s: Mutex::default(),
            stats,
        }
    }

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

    /// See [`MetaCache::invalidated`].
    pub fn invalidated_entry(
        &self,
        gen: u64,
        seq: u64,
        ino: Ino,
        entry: Option<(Ino, &[u8])>,
        own: bool,
    ) {
        let parent = entry.map(|(p, _)| p);
        let mut s = self.s.lock().expect("cache lock");
        if s.gen != gen {
            return;
        }
        s.received = s.received.max(seq);
        if ino == 0 {
            s.attrs.clear();
            s.xattr_names.clear();
            s.tombs.clear();
            s.foreign_tombs.clear();
            s.listings.clear();
            s.listed_entries = 0;
            s.dentries.clear();
            s.name_tombs.clear();
            s.floor = s.floor.max(seq);
            return;
        }
        s.attrs.remove(&ino);
        s.xattr_names.remove(&ino);
        // This session's own change keeps the directory's listing, minus
        // the name it touched (see `Listing::touched`).
        s.tomb(ino, seq, own);
        if let Some(dir) = parent {
            s.tomb(dir, seq, own);
        }
        if let (true, Some((dir, name))) = (own, entry) {
            s.touched(dir, name);
        }
        if let Some((dir, name)) = entry {
            let key = (dir, name.to_vec());
            s.dentries.remove(&key);
            if s.name_tombs.len() >= TOMBSTONES_MAX {
                s.name_tombs.clear();
                s.floor = s.floor.max(seq);
            }
            let t = s.name_tombs.entry(key).or_default();
            t.any = seq;
            if !own {
                t.foreign = seq;
            }
        }
    }

    /// A reply read with `stamp` said `name` in `parent` is `ino`; `own`:
    /// the reply of this session's create or link of that name. Kept unless
    /// the name changed after the node read the answer.
    pub fn fetched_dentry(
        &self,
        gen: u64,
        stamp: u64,
        parent: Ino,
        name: &[u8],
        ino: Ino,
        own: bool,
    ) {
        let mut s = self.s.lock().expect("cache lock");
        let key = (parent, name.to_vec());
        let last = s
            .name_tombs
            .get(&key)
            .map_or(0, |t| if own { t.foreign } else { t.any });
        if s.gen != gen || stamp < s.floor || last > stamp {
            return;
        }
        if s.dentries.len() >= DENTRIES_MAX {
            self.stats.evicted(Cache::Names, s.dentries.len() as u64);
            s.dentries.clear();
        }
        s.dentries.insert(
            key,
            Dentry {
                ino,
                fetched: Instant::now(),
            },
        );
    }

    /// What `name` in `parent` is, from a cached entry or a cached listing
    /// of `parent`, if leases make it (and the inode's attributes) current.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Named> {
        let s = self.s.lock().expect("cache lock");
        let now = Instant::now();
        let l = s.current_lease(parent, now)?;
        let ino = match s.dentries.get(&(parent, name.to_vec())) {
            Some(d) if d.fetched >= l.start => Some(d.ino),
            _ => {
                let listing = s.listings.get(&parent)?;
                // Listings leave `.snapshots` out (D52): ask the node.
                if listing.fetched < l.start
                    || listing.touched.contains(name)
                    || name == cfs_proto::types::SNAPSHOTS_DIR
                {
                    return None;
                }
                listing
                    .entries
                    .iter()
                    .find(|e| e.name == name)
                    .map(|e| e.ino)
            }
        };
        match ino {
            None => Some(Named::Absent),
            Some(i) => s.current_attrs(i, now).map(Named::Found),
        }
    }

    /// Where the invalidation stream stands: taken before sending a
    /// request whose answer may be cached by [`MetaCache::store_listing`].
    pub fn mark(&self) -> Mark {
        let s = self.s.lock().expect("cache lock");
        Mark {
            gen: s.gen,
            received: s.received,
        }
    }

    /// A complete listing of `dir`, asked for after `mark`: kept unless an
    /// invalidation of `dir` or of an entry in it arrived since.
    pub fn store_listing(&self, mark: Mark, dir: Ino, entries: Vec<DirEntry>) {
        let mut s = self.s.lock().expect("cache lock");
        if s.gen != mark.gen
            || s.floor > mark.received
            || s.tombs.get(&dir).is_some_and(|t| *t > mark.received)
        {
            return;
        }
        if s.listed_entries + entries.len() > LISTED_ENTRIES_MAX {
            self.stats.evicted(Cache::Listings, s.listings.len() as u64);
            s.listings.clear();
            s.listed_entries = 0;
        }
        let l = Listing::new(entries);
        // An empty directory costs its listing too.
        s.listed_entries += l.weight();
        if let Some(o) = s.listings.insert(dir, l) {
            s.listed_entries -= o.weight();
        }
    }

    /// This session's mkdir made `dir` (its reply, read with `stamp`): an
    /// empty directory, whose listing is known until another mount
    /// changes it; so are the names absent from it (a `tar -x` or `cp -r`
    /// then creates its files without asking the node about each name).
    /// Own invalidations of `dir` after `stamp` are its creation's (the
    /// kernel cannot change in it before it knows it); another session's
    /// refuse it.
    pub fn created_dir(&self, gen: u64, stamp: u64, dir: Ino) {
        let mut s = self.s.lock().expect("cache lock");
        if s.gen != gen || stamp < s.floor || s.foreign_tombs.get(&dir).is_some_and(|t| *t > stamp)
        {
            return;
        }
        if s.listed_entries + 1 > LISTED_ENTRIES_MAX {
            self.stats.evicted(Cache::Listings, s.listings.len() as u64);
            s.listings.clear();
            s.listed_entries = 0;
        }
        let l = Listing::new(Vec::new());
        s.listed_entries += l.weight();
        if let Some(o) = s.listings.insert(dir, l) {
            s.listed_entries -= o.weight();
        }
    }

    /// `dir`'s listing with every entry's attributes, if leases make all
    /// of it current.
    pub fn listing(&self, dir: Ino) -> Option<Vec<(DirEntry, Inode)>> {
        let s = self.s.lock().expect("cache lock");
        let now = Instant::now();
        let l = s.current_lease(dir, now)?;
        let listing = s.listings.get(&dir)?;
        if listing.fetched < l.start || !listing.touched.is_empty() {
            return None;
        }
        listing
            .entries
            .iter()
            .map(|e| Some((e.clone(), s.current_attrs(e.ino, now)?)))
            .collect()
    }

    /// An invalidation arrived (reader order): `ino` changed, and so did
    /// an entry of directory `parent` if given; `ino` 0 is everything.
    pub fn invalidated(&self, gen: u64, seq: u64, ino: Ino) {
        self.invalidated_entry(gen, seq, ino, None, false)
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
            self.stats.evicted(Cache::Attrs, s.attrs.len() as u64);
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
            self.stats
                .evicted(Cache::XattrNames, s.xattr_names.len() as u64);
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
    pub fn leased(&self, gen: u64, sent: Instant, shards: &[ShardId], valid: Duration, need: u64) {
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
        s.current_attrs(ino, Instant::now())
    }

    /// A change of this mount touching the directories `dirs` failed with
    /// its outcome unknown (EIO, ENOTCONN): part of it may have applied,
    /// and its own invalidations, which its answer was to carry to the
    /// kernel, must reach the kernel instead ([`MetaCache::watched`]) for
    /// [`UNKNOWN_OUTCOME_WATCH`].
    pub fn watch_unknown_outcome(&self, dirs: &[Ino]) {
        let mut s = self.s.lock().expect("cache lock");
        let until = Instant::now() + UNKNOWN_OUTCOME_WATCH;
        for d in dirs {
            if s.unknown_outcomes.len() >= UNKNOWN_OUTCOMES_MAX {
                s.unknown_outcomes.pop_front();
            }
            s.unknown_outcomes.push_back((until, *d));
        }
    }

    /// Whether an own invalidation of `ino` (or of an entry of directory
    /// `ino`) concerns a change whose outcome its caller did not learn.
    pub fn watched(&self, ino: Ino, entry: &Option<(Ino, Vec<u8>)>) -> bool {
        let mut s = self.s.lock().expect("cache lock");
        let now = Instant::now();
        while s.unknown_outcomes.front().is_some_and(|(t, _)| *t <= now) {
            s.unknown_outcomes.pop_front();
        }
        let dir = entry.as_ref().map_or(ino, |(p, _)| *p);
        s.unknown_outcomes
            .iter()
            .any(|(_, d)| *d == dir || *d == ino)
    }

    /// Drops what this mount knows of `ino` (its own change, before the
    /// node's invalidation arrives).
    pub fn forget(&self, ino: Ino) {
        let mut s = self.s.lock().expect("cache lock");
        s.attrs.remove(&ino);
        s.xattr_names.remove(&ino);
        s.drop_listing(ino);
    }
}

impl State {
    /// Records invalidation `seq` of `ino` (its listing, if a directory,
    /// goes with it unless the change is this session's own).
    fn tomb(&mut self, ino: Ino, seq: u64, own: bool) {
        if !own {
            self.drop_listing(ino);
        }
        if self.tombs.len() >= TOMBSTONES_MAX {
            self.tombs.clear();
            self.foreign_tombs.clear();
            self.floor = self.floor.max(seq);
        }
        self.tombs.insert(ino, seq);
        if !own {
            self.foreign_tombs.insert(ino, seq);
        }
    }

    fn drop_listing(&mut self, dir: Ino) {
        if let Some(l) = self.listings.remove(&dir) {
            self.listed_entries -= l.weight();
        }
    }

    /// This session changed `name` in `dir`: its listing no longer tells
    /// about that name (dropped whole when the bound is reached).
    fn touched(&mut self, dir: Ino, name: &[u8]) {
        if self.listed_entries + 1 > LISTED_ENTRIES_MAX {
            self.drop_listing(dir);
            return;
        }
        if let Some(l) = self.listings.get_mut(&dir) {
            if l.touched.insert(name.to_vec()) {
                self.listed_entries += 1;
            }
        }
    }

    /// The lease covering `ino`, if it can be used now.
    fn current_lease(&self, ino: Ino, now: Instant) -> Option<Lease> {
        let l = self.leases.get(&shard_of(ino))?;
        (l.until > now && self.applied >= l.need).then_some(*l)
    }

    fn current_attrs(&self, ino: Ino, now: Instant) -> Option<Inode> {
        let l = self.current_lease(ino, now)?;
        let c = self.attrs.get(&ino)?;
        (c.fetched >= l.start).then(|| c.inode.clone())
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
            stored: 0,
            parent: 1,
            next_cookie: 0,
            entries: 0,
            acl: None,
            compression: None,
            dedupe: None,
            tenant: None,
            snapshot: false,
        }
    }

    #[test]
    fn own_invalidations_in_directories_of_an_unknown_outcome_are_watched() {
        let c = MetaCache::default();
        c.session();
        let (dir, other) = (make_ino(ShardId(0), 7), make_ino(ShardId(1), 9));
        assert!(!c.watched(dir, &None));
        c.watch_unknown_outcome(&[dir]);
        assert!(c.watched(dir, &None));
        assert!(c.watched(other, &Some((dir, b"a".to_vec()))));
        assert!(!c.watched(other, &None));
        assert!(!c.watched(dir + 1, &Some((other, b"a".to_vec()))));
        // Bounded: the oldest go first.
        for i in 0..UNKNOWN_OUTCOMES_MAX as u64 {
            c.watch_unknown_outcome(&[make_ino(ShardId(2), 100 + i)]);
        }
        assert!(!c.watched(dir, &None));
        assert!(c.watched(make_ino(ShardId(2), 100), &None));
    }

    #[test]
    fn nothing_is_served_without_a_lease() {
        let c = MetaCache::default();
        let g = c.session();
        let ino = make_ino(ShardId(0), 5);
        c.fetched(g, 0, &inode(ino, 1));
        assert!(c.get(ino).is_none());
        std::thread::sleep(Duration::from_millis(2));
        let sent = Instant::now();
        c.leased(g, sent, &[ShardId(0)], Duration::from_secs(3), 0);
        // Fetched before the lease began: not trusted.
        assert!(c.get(ino).is_none());
        c.fetched(g, 0, &inode(ino, 2));
        assert_eq!(c.get(ino).map(|i| i.size), Some(2));
        // Another shard is not leased.
        let other = make_ino(ShardId(1), 5);
        c.fetched(g, 0, &inode(other, 1));
        assert!(c.get(other).is_none());
    }

    #[test]
    fn an_answer_older_than_an_invalidation_is_not_cached() {
        let c = MetaCache::default();
        let g = c.session();
        let ino = make_ino(ShardId(0), 5);
        c.leased(g, Instant::now(), &[ShardId(0)], Duration::from_secs(3), 0);
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
        let ino = make_ino(ShardId(0), 5);
        c.leased(g, Instant::now(), &[ShardId(0)], Duration::from_secs(3), 4);
        c.fetched(g, 9, &inode(ino, 1));
        assert!(c.get(ino).is_none());
        c.applied(g, 4);
        assert!(c.get(ino).is_some());
    }

    #[test]
    fn a_new_session_or_an_expired_lease_serves_nothing() {
        let c = MetaCache::default();
        let g = c.session();
        let ino = make_ino(ShardId(0), 5);
        c.leased(
            g,
            Instant::now(),
            &[ShardId(0)],
            Duration::from_millis(20),
            0,
        );
        c.fetched(g, 0, &inode(ino, 1));
        assert!(c.get(ino).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(c.get(ino).is_none());
        let g2 = c.session();
        c.leased(g, Instant::now(), &[ShardId(0)], Duration::from_secs(3), 0);
        assert!(c.lease_left(ino).is_none(), "a grant of the old session");
        c.leased(g2, Instant::now(), &[ShardId(0)], Duration::from_secs(3), 0);
        assert!(c.get(ino).is_none(), "dropped with the old session");
        // Drop everything: older stamps refused.
        c.invalidated(g2, 3, 0);
        c.fetched(g2, 2, &inode(ino, 1));
        assert!(c.get(ino).is_none());
    }

    fn entry(name: &str, ino: Ino, cookie: u64) -> DirEntry {
        DirEntry {
            name: name.as_bytes().to_vec(),
            ino,
            kind: libc::S_IFREG,
            cookie,
        }
    }

    #[test]
    fn a_listing_is_served_under_a_lease_while_nothing_in_it_changed() {
        let c = MetaCache::default();
        let g = c.session();
        let dir = make_ino(ShardId(0), 2);
        let (a, b) = (make_ino(ShardId(0), 3), make_ino(ShardId(0), 4));
        c.leased(g, Instant::now(), &[ShardId(0)], Duration::from_secs(3), 0);
        let listed = vec![entry("a", a, 3), entry("b", b, 4)];
        let m = c.mark();
        c.store_listing(m, dir, listed.clone());
        assert!(c.listing(dir).is_none(), "children's attributes not cached");
        c.fetched(g, 0, &inode(a, 1));
        c.fetched(g, 0, &inode(b, 2));
        let got = c.listing(dir).expect("served");
        assert_eq!(
            got.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>(),
            listed
        );
        assert_eq!(got[1].1.size, 2);
        // A child changed: its attributes go, so the listing is not served.
        c.invalidated(g, 1, b);
        assert!(c.listing(dir).is_none());
        c.fetched(g, 1, &inode(b, 3));
        assert_eq!(c.listing(dir).map(|v| v[1].1.size), Some(3));
        // An entry of the directory changed: the listing is gone.
        c.invalidated_entry(g, 2, dir, Some((dir, &b"a"[..])), false);
        assert!(c.listing(dir).is_none());
    }

    #[test]
    fn a_listing_asked_for_before_a_change_of_its_directory_is_not_kept() {
        let c = MetaCache::default();
        let g = c.session();
        let dir = make_ino(ShardId(0), 2);
        let a = make_ino(ShardId(0), 3);
        c.leased(g, Instant::now(), &[ShardId(0)], Duration::from_secs(3), 0);
        c.fetched(g, 0, &inode(a, 1));
        let m = c.mark();
        // The directory changes while the request is out.
        c.invalidated(g, 5, dir);
        c.applied(g, 5);
        c.store_listing(m, dir, vec![entry("a", a, 3)]);
        assert!(c.listing(dir).is_none());
        // Asked for after the change: kept.
        let m = c.mark();
        c.store_listing(m, dir, vec![entry("a", a, 3)]);
        assert!(c.listing(dir).is_some());
        // Another session, or no lease: nothing.
        let m = c.mark();
        let g2 = c.session();
        c.leased(g2, Instant::now(), &[ShardId(0)], Duration::from_secs(3), 0);
        c.fetched(g2, 0, &inode(a, 1));
        c.store_listing(m, dir, vec![entry("a", a, 3)]);
        assert!(c.listing(dir).is_none(), "stored in an older session");
    }

    #[test]
    fn lookups_are_answered_from_entries_and_listings_under_a_lease() {
        let c = MetaCache::default();
        let g = c.session();
        let dir = make_ino(ShardId(0), 2);
        let a = make_ino(ShardId(0), 3);
        c.leased(g, Instant::now(), &[ShardId(0)], Duration::from_secs(3), 0);
        assert_eq!(c.lookup(dir, b"a"), None);
        // Our own create: the node took the reply's stamp (3) before
        // applying it, and its invalidations (4) come before the reply.
        c.invalidated_entry(g, 4, dir, Some((dir, &b"a"[..])), true);
        c.applied(g, 4);
        c.fetched(g, 3, &inode(a, 0));
        c.fetched_dentry(g, 3, dir, b"a", a, true);
        assert_eq!(c.lookup(dir, b"a"), Some(Named::Found(inode(a, 0))));
        // A lookup answer read before another session changed the name is
        // refused; one read after is kept.
        let b = make_ino(ShardId(0), 5);
        c.invalidated_entry(g, 6, dir, Some((dir, &b"b"[..])), false);
        c.applied(g, 6);
        c.fetched(g, 6, &inode(b, 1));
        c.fetched_dentry(g, 5, dir, b"b", b, false);
        assert_eq!(c.lookup(dir, b"b"), None, "stale entry refused");
        c.fetched_dentry(g, 6, dir, b"b", b, false);
        assert_eq!(c.lookup(dir, b"b"), Some(Named::Found(inode(b, 1))));
        // Our own create's reply is refused if another session changed the
        // name after the node read it.
        c.invalidated_entry(g, 7, dir, Some((dir, &b"c"[..])), false);
        c.fetched_dentry(g, 6, dir, b"c", b, true);
        assert_eq!(c.lookup(dir, b"c"), None);
        // The entry itself changes: gone.
        c.invalidated_entry(g, 8, dir, Some((dir, &b"a"[..])), false);
        c.applied(g, 8);
        assert_eq!(c.lookup(dir, b"a"), None);
        // A complete listing answers for names it has and has not.
        let m = c.mark();
        c.store_listing(m, dir, vec![entry("a", a, 3)]);
        c.fetched(g, 8, &inode(a, 7));
        assert_eq!(c.lookup(dir, b"a"), Some(Named::Found(inode(a, 7))));
        assert_eq!(c.lookup(dir, b"nope"), Some(Named::Absent));
    }

    #[test]
    fn a_directory_this_session_made_answers_for_absent_names_through_its_own_changes() {
        let c = MetaCache::default();
        let g = c.session();
        let dir = make_ino(ShardId(0), 2);
        let (a, b) = (make_ino(ShardId(0), 3), make_ino(ShardId(0), 4));
        c.leased(g, Instant::now(), &[ShardId(0)], Duration::from_secs(3), 0);
        // Refused when the directory changed after the reply was read.
        c.invalidated(g, 2, dir);
        c.applied(g, 2);
        c.created_dir(g, 1, dir);
        assert_eq!(c.lookup(dir, b"x"), None);
        c.created_dir(g, 2, dir);
        assert_eq!(c.lookup(dir, b"x"), Some(Named::Absent));
        assert_eq!(c.listing(dir), Some(Vec::new()), "empty");
        // Our own create of "a": that name is no longer known from the
        // listing, other names still are; the listing is not served.
        c.invalidated_entry(g, 3, dir, None, true);
        c.invalidated_entry(g, 4, dir, Some((dir, &b"a"[..])), true);
        c.applied(g, 4);
        assert_eq!(c.lookup(dir, b"a"), None);
        assert_eq!(c.lookup(dir, b"y"), Some(Named::Absent));
        assert!(c.listing(dir).is_none());
        c.fetched(g, 4, &inode(a, 0));
        c.fetched_dentry(g, 4, dir, b"a", a, true);
        assert_eq!(c.lookup(dir, b"a"), Some(Named::Found(inode(a, 0))));
        // Another session's change in it: nothing is known any more.
        c.invalidated_entry(g, 5, dir, Some((dir, &b"b"[..])), false);
        c.applied(g, 5);
        c.fetched(g, 5, &inode(b, 0));
        assert_eq!(c.lookup(dir, b"y"), None);
        assert_eq!(c.lookup(dir, b"b"), None);
        // The mkdir's own invalidations, numbered after its reply's stamp
        // (an early answer's), do not refuse it.
        let dir2 = make_ino(ShardId(0), 9);
        c.invalidated_entry(g, 10, dir2, None, true);
        c.applied(g, 10);
        c.created_dir(g, 9, dir2);
        assert_eq!(c.lookup(dir2, b"x"), Some(Named::Absent));
    }
}
