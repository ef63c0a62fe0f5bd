//! The namespace as the lakehouse keeps it in memory: each inode's
//! attributes and every directory entry, enough to give every name its
//! full path at a flush. It changes only by [`Delta`]s: the current value
//! of one inode or one directory entry, read from the namespace.

use std::collections::HashMap;

use cfs_proto::types::{Ino, Inode, Nanos, ROOT_INO};

/// What the index keeps of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Bytes of file data mapped to extents (before erasure coding).
    pub allocated: u64,
    /// Bytes those extents keep stored (after compression, before
    /// erasure coding).
    pub stored: u64,
    pub nlink: u32,
    pub atime: Nanos,
    pub mtime: Nanos,
    pub ctime: Nanos,
}

impl From<&Inode> for Meta {
    fn from(i: &Inode) -> Meta {
        Meta {
            mode: i.mode,
            uid: i.uid,
            gid: i.gid,
            size: i.size,
            allocated: i.allocated,
            stored: i.stored,
            nlink: i.nlink,
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
        }
    }
}

/// The current value of one piece of the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    /// Inode `ino` now has these attributes (`None`: it is gone).
    Inode(Ino, Option<Meta>),
    /// The entry `name` in directory `parent` now names `child` (`None`:
    /// there is no such entry).
    Link {
        parent: Ino,
        name: Box<[u8]>,
        child: Option<Ino>,
    },
}

/// One name of one inode, with its full path: a row of the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named<'a> {
    pub ino: Ino,
    pub parent: Ino,
    pub path: String,
    /// Byte offset in `path` where the name starts.
    pub name_at: usize,
    pub meta: &'a Meta,
}

/// (directory, name): one name of an inode.
pub type Name = (Ino, Box<[u8]>);

/// The namespace, in memory.
#[derive(Default)]
pub struct Namespace {
    inodes: HashMap<Ino, Meta>,
    /// (directory, name) → the inode the name points to.
    links: HashMap<Name, Ino>,
    /// inode → its names, for the parent chain of directories and for the
    /// inodes whose last name went away.
    names: HashMap<Ino, Vec<Name>>,
}

/// Paths deeper than this are cut (a loop in a namespace read while it
/// moved would otherwise never end; the next flush has it right).
pub const DEPTH_MAX: usize = 4096;

impl Namespace {
    pub fn inodes(&self) -> usize {
        self.inodes.len()
    }

    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// Applies one delta; returns the inode that lost a name by it (its
    /// attributes may have changed too: the caller reads it again).
    pub fn apply(&mut self, d: Delta) -> Option<Ino> {
        match d {
            Delta::Inode(ino, Some(m)) => {
                self.inodes.insert(ino, m);
                None
            }
            Delta::Inode(ino, None) => {
                self.inodes.remove(&ino);
                None
            }
            Delta::Link {
                parent,
                name,
                child,
            } => {
                let key = (parent, name);
                let old = match child {
                    Some(c) => self.links.insert(key.clone(), c),
                    None => self.links.remove(&key),
                };
                if old == child {
                    return None;
                }
                if let Some(o) = old {
                    if let Some(ns) = self.names.get_mut(&o) {
                        ns.retain(|(p, n)| !(*p == key.0 && *n == key.1));
                        if ns.is_empty() {
                            self.names.remove(&o);
                        }
                    }
                }
                if let Some(c) = child {
                    self.names.entry(c).or_default().push(key);
                }
                old
            }
        }
    }

    /// Whether `ino` has no name left (then it is not in the index).
    pub fn is_unnamed(&self, ino: Ino) -> bool {
        !self.names.contains_key(&ino)
    }

    /// Every name of every inode with its full path, sorted by path.
    /// Names under a directory not (yet) connected to the root — a
    /// cross-shard change seen half — are left out until they are.
    pub fn rows(&self) -> Vec<Named<'_>> {
        let mut dir_paths: HashMap<Ino, Option<String>> = HashMap::new();
        dir_paths.insert(ROOT_INO, Some(String::new()));
        let mut out = Vec::with_capacity(self.links.len() + 1);
        if let Some(root) = self.inodes.get(&ROOT_INO) {
            out.push(Named {
                ino: ROOT_INO,
                parent: ROOT_INO,
                path: "/".to_string(),
                name_at: 1,
                meta: root,
            });
        }
        for ((parent, name), child) in &self.links {
            let Some(meta) = self.inodes.get(child) else {
                continue;
            };
            let Some(dir) = self.dir_path(*parent, &mut dir_paths) else {
                continue;
            };
            let name = String::from_utf8_lossy(name);
            let mut path = String::with_capacity(dir.len() + 1 + name.len());
            path.push_str(&dir);
            path.push('/');
            let name_at = path.len();
            path.push_str(&name);
            out.push(Named {
                ino: *child,
                parent: *parent,
                path,
                name_at,
                meta,
            });
        }
        out.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// The path of directory `dir` ("" for the root), memoized; `None`
    /// when it does not reach the root.
    fn dir_path(&self, dir: Ino, memo: &mut HashMap<Ino, Option<String>>) -> Option<String> {
        if let Some(p) = memo.get(&dir) {
            return p.clone();
        }
        // Walk up to the first directory with a known path, then build
        // the paths back down.
        let mut chain: Vec<(Ino, &[u8])> = Vec::new();
        let mut at = dir;
        let base = loop {
            if let Some(p) = memo.get(&at) {
                break p.clone();
            }
            if chain.len() >= DEPTH_MAX {
                break None;
            }
            match self.names.get(&at).and_then(|ns| ns.first()) {
                Some((p, n)) => {
                    chain.push((at, n));
                    at = *p;
                }
                None => break None,
            }
        };
        let mut path = base;
        for (ino, name) in chain.into_iter().rev() {
            path = path.map(|p| format!("{p}/{}", String::from_utf8_lossy(name)));
            memo.insert(ino, path.clone());
        }
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 1000,
            gid: 1000,
            size: 10,
            allocated: 10,
            stored: 10,
            nlink: 1,
            atime: 0,
            mtime: 0,
            ctime: 0,
        }
    }

    fn link(ns: &mut Namespace, parent: Ino, name: &str, child: Option<Ino>) -> Option<Ino> {
        ns.apply(Delta::Link {
            parent,
            name: name.as_bytes().into(),
            child,
        })
    }

    fn paths(ns: &Namespace) -> Vec<String> {
        ns.rows().into_iter().map(|r| r.path).collect()
    }

    #[test]
    fn paths_follow_renames_of_directories_and_deletes() {
        let mut ns = Namespace::default();
        let dir = libc::S_IFDIR | 0o755;
        let file = libc::S_IFREG | 0o644;
        ns.apply(Delta::Inode(ROOT_INO, Some(meta(dir))));
        ns.apply(Delta::Inode(2, Some(meta(dir))));
        ns.apply(Delta::Inode(3, Some(meta(file))));
        ns.apply(Delta::Inode(4, Some(meta(file))));
        link(&mut ns, ROOT_INO, "a", Some(2));
        link(&mut ns, 2, "x.h5", Some(3));
        link(&mut ns, 2, "y", Some(4));
        assert_eq!(paths(&ns), ["/", "/a", "/a/x.h5", "/a/y"]);
        // Rename /a to /b: every path beneath changes.
        link(&mut ns, ROOT_INO, "a", None);
        link(&mut ns, ROOT_INO, "b", Some(2));
        assert_eq!(paths(&ns), ["/", "/b", "/b/x.h5", "/b/y"]);
        // A hard link is a second row of the same inode.
        link(&mut ns, ROOT_INO, "hard", Some(3));
        assert_eq!(paths(&ns), ["/", "/b", "/b/x.h5", "/b/y", "/hard"]);
        // Unlinking the last name reports the inode, which leaves the rows.
        assert_eq!(link(&mut ns, 2, "y", None), Some(4));
        assert!(ns.is_unnamed(4));
        assert_eq!(paths(&ns), ["/", "/b", "/b/x.h5", "/hard"]);
        // A name whose inode is not known yet (another shard) waits.
        link(&mut ns, 2, "later", Some(9));
        assert_eq!(paths(&ns), ["/", "/b", "/b/x.h5", "/hard"]);
        ns.apply(Delta::Inode(9, Some(meta(file))));
        assert_eq!(paths(&ns), ["/", "/b", "/b/later", "/b/x.h5", "/hard"]);
    }

    #[test]
    fn a_directory_cut_off_from_the_root_is_left_out() {
        let mut ns = Namespace::default();
        let dir = libc::S_IFDIR | 0o755;
        ns.apply(Delta::Inode(ROOT_INO, Some(meta(dir))));
        ns.apply(Delta::Inode(5, Some(meta(dir))));
        ns.apply(Delta::Inode(6, Some(meta(dir))));
        // 5 and 6 name each other (a half-seen state): no rows, no hang.
        link(&mut ns, 5, "six", Some(6));
        link(&mut ns, 6, "five", Some(5));
        assert_eq!(paths(&ns), ["/"]);
    }
}
