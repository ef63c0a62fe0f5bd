//! Namespace types shared by the materializer, the metadata service and the
//! FUSE client: inodes, credentials, errors and extent references.

use serde::{Deserialize, Serialize};

pub use cfs_stripe::{ChunkId, Compression, Extent, Packing, Seal, SegmentId};

/// An inode number. The high 16 bits name the shard that owns the inode
/// (its attributes, and for a directory its entries); the low 48 bits are
/// a counter of that shard. The root is inode 1 on shard 0.
pub type Ino = u64;

pub use cfs_ids::{Position, ShardId};

pub const ROOT_INO: Ino = 1;
const SHARD_SHIFT: u32 = 48;
/// The bits of an inode number that count within its shard.
pub const INO_COUNTER_MASK: u64 = (1 << SHARD_SHIFT) - 1;

/// Shard that owns `ino`.
pub fn shard_of(ino: Ino) -> ShardId {
    ShardId((ino >> SHARD_SHIFT) as u32)
}

/// The `n`th inode of `shard`.
pub fn make_ino(shard: ShardId, n: u64) -> Ino {
    (u64::from(shard.get()) << SHARD_SHIFT) | (n & INO_COUNTER_MASK)
}

/// Longest name component (bytes), as Linux.
pub const NAME_MAX: usize = 255;
/// Longest symlink target (bytes), as Linux' PATH_MAX.
pub const PATH_MAX: usize = 4096;
/// Largest extended attribute value.
pub const XATTR_SIZE_MAX: usize = 65536;
/// Largest file (bytes): 2^63 - 1 like ext4's limit is not needed; 8 EiB - 1.
pub const FILE_SIZE_MAX: u64 = i64::MAX as u64;

/// A POSIX error number, carried as the positive errno value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const EXDEV: Errno = Errno(libc::EXDEV);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const EMLINK: Errno = Errno(libc::EMLINK);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const ELOOP: Errno = Errno(libc::ELOOP);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    pub const ENOTCONN: Errno = Errno(libc::ENOTCONN);
    pub const ESTALE: Errno = Errno(libc::ESTALE);
    /// A write named a segment that is being freed (its fence,
    /// `Op::FenceSegment`): the writer writes its bytes again elsewhere.
    /// Never returned to applications.
    pub const FREED_DATA: Errno = Errno(libc::EREMCHG);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    /// A change to a snapshot (D52).
    pub const EROFS: Errno = Errno(libc::EROFS);
    /// A tenant has no key, or this mount was not given it (D51).
    pub const ENOKEY: Errno = Errno(libc::ENOKEY);
    /// The node's master key does not open a tenant's key (D51).
    pub const EKEYREJECTED: Errno = Errno(libc::EKEYREJECTED);
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EDEADLK: Errno = Errno(libc::EDEADLK);
    pub const ENODEV: Errno = Errno(libc::ENODEV);
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

pub type FsResult<T> = Result<T, Errno>;

/// Who asks: the caller's effective ids and supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Creds {
    pub fn root() -> Self {
        Creds {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// A timestamp: nanoseconds since the epoch (may be negative).
pub type Nanos = i64;

/// Attributes of one inode, as stored and as returned to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub ino: Ino,
    /// Type and permission bits, as `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub atime: Nanos,
    pub mtime: Nanos,
    pub ctime: Nanos,
    pub crtime: Nanos,
    pub rdev: u32,
    pub generation: u64,
    /// Bytes of file data actually mapped to extents (for `st_blocks`).
    pub allocated: u64,
    /// Bytes those extents keep stored: inline bytes, and each stripe
    /// extent's share of its stripe's stored (compressed) bytes, before
    /// erasure coding ([`ExtentRef::stored_bytes`]).
    pub stored: u64,
    /// For directories: the parent (for `..` and rename loops); next
    /// readdir cookie; number of entries.
    pub parent: Ino,
    pub next_cookie: u64,
    pub entries: u64,
    /// POSIX ACLs beyond the mode bits (`materializers::acl`); `None` for
    /// almost every inode.
    pub acl: Option<Box<Acls>>,
    /// How this file's stripes are stored, when a policy says so (set on a
    /// directory through [`COMPRESS_XATTR`], inherited by what is created
    /// in it); `None`: as the writing mount's `--compress` says.
    pub compression: Option<Compression>,
    /// Whether this file's stripes are deduplicated, when a policy says
    /// so (set on a directory through [`DEDUPE_XATTR`], inherited like
    /// `compression`); `None`: as the writing mount's `--dedupe` says.
    pub dedupe: Option<bool>,
    /// The tenant whose key seals this file's stripes (D51), from a
    /// subtree's [`crate::tenant::TENANT_XATTR`], inherited like
    /// `compression`; `None`: stored unsealed.
    pub tenant: Option<String>,
    /// Part of a snapshot (D52): read-only, made and removed only with its
    /// snapshot.
    pub snapshot: bool,
}

/// The extended attribute that holds a subtree's compression policy
/// (`zstd:N` or `off`; root only, as every `trusted.` attribute): set on a
/// directory, it is copied to everything created in it from then on
/// (`cfs admin policy set PATH --compress zstd:N`).
pub const COMPRESS_XATTR: &[u8] = b"trusted.claudefs.compress";

/// The extended attribute that holds a subtree's dedupe policy (`on` or
/// `off`), kept and inherited as [`COMPRESS_XATTR`] is
/// (`cfs admin policy set PATH --dedupe on|off`).
pub const DEDUPE_XATTR: &[u8] = b"trusted.claudefs.dedupe";

/// The reserved name, in a directory that has snapshots, of the
/// read-only directory that holds them (`DIR/.snapshots/NAME`, D52);
/// readdir does not list it.
pub const SNAPSHOTS_DIR: &[u8] = b".snapshots";

/// Setting this extended attribute on a directory (root only) to `NAME`
/// snapshots the directory's subtree as `DIR/.snapshots/NAME`
/// (`cfs admin snapshot create`).
pub const SNAPSHOT_CREATE_XATTR: &[u8] = b"trusted.claudefs.snapshot.create";

/// Setting this extended attribute on a directory (root only) to `NAME`
/// deletes `DIR/.snapshots/NAME` (`cfs admin snapshot delete`).
pub const SNAPSHOT_DELETE_XATTR: &[u8] = b"trusted.claudefs.snapshot.delete";

/// The most inodes one snapshot copies: one log entry applies it, in one
/// RocksDB batch.
pub const SNAPSHOT_INODES_MAX: usize = 100_000;

/// An `on`/`off` policy value (surrounding white space ignored).
pub fn parse_on_off(v: &[u8]) -> Option<bool> {
    match std::str::from_utf8(v).ok()?.trim() {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// How an `on`/`off` policy value is stored.
pub fn on_off(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
}

/// One POSIX ACL entry, as the kernel's `system.posix_acl_*` xattrs carry
/// it: a tag (`ACL_USER_OBJ` …), permission bits (`rwx`), and a uid or
/// gid for `ACL_USER`/`ACL_GROUP` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AclEntry {
    pub tag: u16,
    pub perm: u16,
    pub id: u32,
}

/// An inode's POSIX ACLs: the access ACL (empty: the mode bits say it
/// all) and, for a directory, the default ACL its new children inherit
/// (empty: none). Entries sorted by tag, then id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acls {
    pub access: Vec<AclEntry>,
    pub default: Vec<AclEntry>,
}

impl Inode {
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.kind() == libc::S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.kind() == libc::S_IFLNK
    }
}

/// A directory entry with its inode's attributes and the names of its
/// extended attributes (what `ls -l` asks of every entry), as readdirplus
/// returns them.
pub type EntryPlus = (DirEntry, Inode, Vec<Vec<u8>>);

/// One readdirplus answer: entries, and how the scan that found them ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListingPart {
    pub entries: Vec<EntryPlus>,
    /// No entry follows these.
    pub end: bool,
    /// Entries were left out: their inodes are not there yet on this node
    /// (a cross-shard change in progress). The part is not the whole
    /// directory's state, and a listing built from it must not be kept.
    pub skipped: bool,
}

/// One directory entry as readdir returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    /// `S_IF*` type bits.
    pub kind: u32,
    /// Resume readdir after this entry with this cookie.
    pub cookie: u64,
}

/// File bytes below this offset may be kept inline, in the namespace
/// itself ([`Backing::Inline`]): a small file's bytes then ride in its
/// `Write` log entry (no stripe write, no segment read), as Lustre's
/// Data-on-MDT and ext4's inline data do. Bounds a file's inline bytes.
pub const INLINE_BYTES_MAX: u64 = 64 << 10;

/// A piece of a file: `len` bytes at file offset `offset` are bytes
/// `[skip, skip + len)` of `backing`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentRef {
    pub offset: u64,
    pub len: u64,
    pub skip: u64,
    pub backing: Backing,
}

/// Where an [`ExtentRef`]'s bytes live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backing {
    /// A stripe of the segment store.
    Stripe(Extent),
    /// The bytes themselves (only below [`INLINE_BYTES_MAX`]).
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl Backing {
    /// Bytes available to reference.
    pub fn len(&self) -> u64 {
        match self {
            Backing::Stripe(e) => e.data_len as u64,
            Backing::Inline(b) => b.len() as u64,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ExtentRef {
    /// The bytes this piece keeps stored (see [`Inode::stored`]).
    pub fn stored_bytes(&self) -> u64 {
        match &self.backing {
            Backing::Stripe(e) => e.stored_share(self.len),
            Backing::Inline(_) => self.len,
        }
    }

    /// The part of this piece at file offsets `[from, to)` (clamped to the
    /// piece). An inline piece keeps only those bytes.
    pub fn part(&self, from: u64, to: u64) -> ExtentRef {
        let s = from.max(self.offset);
        let t = to.min(self.offset + self.len).max(s);
        let skip = self.skip + (s - self.offset);
        match &self.backing {
            Backing::Stripe(e) => ExtentRef {
                offset: s,
                len: t - s,
                skip,
                backing: Backing::Stripe(e.clone()),
            },
            Backing::Inline(b) => ExtentRef {
                offset: s,
                len: t - s,
                skip: 0,
                backing: Backing::Inline(
                    b.get(skip as usize..(skip + t - s) as usize)
                        .unwrap_or_default()
                        .to_vec(),
                ),
            },
        }
    }

    /// Whether this piece is valid to map: non-empty, within its backing,
    /// not past the largest file, and inline only below
    /// [`INLINE_BYTES_MAX`].
    pub fn valid(&self, len_max: u64) -> bool {
        let Some(end) = self.offset.checked_add(self.len) else {
            return false;
        };
        self.len > 0
            && self.len <= len_max
            && self.skip.saturating_add(self.len) <= self.backing.len()
            && end <= FILE_SIZE_MAX
            && (matches!(self.backing, Backing::Stripe(_)) || end <= INLINE_BYTES_MAX)
    }
}

/// Which attributes a setattr changes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    /// Explicit ctime (only by the owner through utimensat-like calls).
    pub ctime: Option<Nanos>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    /// The time the entry was proposed (UTIME_NOW).
    Now,
    At(Nanos),
}

/// A byte-range lock, POSIX (`fcntl`) or BSD (`flock`, whole file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRange {
    /// Inclusive start, exclusive end (`u64::MAX` = to end of file).
    pub start: u64,
    pub end: u64,
    /// `F_RDLCK`, `F_WRLCK` or `F_UNLCK`.
    pub typ: i32,
    /// Owner: client id and the kernel's lock owner.
    pub client: u64,
    pub owner: u64,
    pub pid: u32,
    pub flock: bool,
}

/// File system usage for statfs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStats {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub files: u64,
}

/// How many levels below the root new directories are spread over the
/// shards (`cfs_materializers::tx::place_dir`); deeper ones stay on their
/// parent's shard (`cfs_materializers::tx::dir_shard`).
pub const DEFAULT_SPREAD_DEPTH: u32 = 2;
