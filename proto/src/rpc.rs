//! Typed requests: each request type names the one reply type it gets, so
//! callers never match on the reply enum (a node answering another kind
//! is a protocol violation, handled once, in the client's `rpc`).

use crate::ops::{Op, Reply, Request};
use crate::types::*;

/// A request with a typed reply.
pub trait Call: Into<Request> {
    type Reply;
    /// The reply, if the node answered the kind this request gets.
    fn reply(r: Reply) -> Option<Self::Reply>;
}

macro_rules! call {
    ($(#[$doc:meta])* $name:ident { $($field:ident : $ty:ty),* } => $variant:ident $(($($bind:ident),*))? -> $out:ty = $pat:pat => $val:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $name { $(pub $field: $ty),* }

        impl From<$name> for Request {
            fn from(c: $name) -> Request {
                let $name { $($field),* } = c;
                Request::$variant { $($field),* }
            }
        }

        impl Call for $name {
            type Reply = $out;
            fn reply(r: Reply) -> Option<$out> {
                match r {
                    $pat => Some($val),
                    _ => None,
                }
            }
        }
    };
}

call!(/// Attributes of an inode.
    GetAttr { ino: Ino } => GetAttr -> Inode = Reply::Attr(i) => i);
call!(/// The inode a name in a directory refers to.
    Lookup { parent: Ino, name: Vec<u8> } => Lookup -> Inode = Reply::Attr(i) => i);
call!(/// Up to `max` entries after cookie `after`.
    ReadDir { ino: Ino, after: u64, max: u32 } => ReadDir -> Vec<DirEntry> = Reply::Entries(e) => e);
call!(/// Entries with their attributes.
    ReadDirPlus { ino: Ino, after: u64, max: u32 } => ReadDirPlus -> ListingPart = Reply::EntriesPlus(p) => p);
call!(/// A symlink's target.
    ReadLink { ino: Ino } => ReadLink -> Vec<u8> = Reply::Data(d) => d);
call!(/// One extended attribute's value.
    GetXattr { ino: Ino, name: Vec<u8> } => GetXattr -> Vec<u8> = Reply::Data(d) => d);
call!(/// The names of an inode's extended attributes.
    ListXattr { ino: Ino } => ListXattr -> Vec<Vec<u8>> = Reply::Names(n) => n);
call!(/// The extent map of `[offset, offset + len)`.
    Extents { ino: Ino, offset: u64, len: u64 } => Extents -> Vec<ExtentRef> = Reply::Extents(e) => e);
call!(/// Stored stripes holding these chunks (inline dedupe).
    FindChunks { ids: Vec<ChunkId> } => FindChunks -> Vec<Option<Extent>> = Reply::Chunks(c) => c);
call!(/// A tenant's data keys in the clear (D51).
    TenantKeys { tenant: String } => TenantKeys -> crate::tenant::TenantKeys = Reply::TenantKeys(k) => k);
call!(/// Makes a tenant's first key, or (`rotate`) its next generation.
    MakeTenantKey { tenant: String, rotate: bool } => MakeTenantKey -> crate::tenant::KeyReport = Reply::Keys(k) => k);
call!(/// A lock that would conflict with `lock`, if any.
    GetLock { ino: Ino, lock: LockRange } => GetLock -> Option<LockRange> = Reply::Lock(l) => l);

/// Every tenant's keys (no key bytes) and re-encryption progress (D51).
#[derive(Clone, Copy, Debug)]
pub struct ListTenantKeys;

impl From<ListTenantKeys> for Request {
    fn from(_: ListTenantKeys) -> Request {
        Request::ListTenantKeys
    }
}

impl Call for ListTenantKeys {
    type Reply = crate::tenant::KeyReport;
    fn reply(r: Reply) -> Option<crate::tenant::KeyReport> {
        match r {
            Reply::Keys(k) => Some(k),
            _ => None,
        }
    }
}

/// Capacity and use.
#[derive(Clone, Copy, Debug)]
pub struct StatFs;

impl From<StatFs> for Request {
    fn from(_: StatFs) -> Request {
        Request::StatFs
    }
}

impl Call for StatFs {
    type Reply = FsStats;
    fn reply(r: Reply) -> Option<FsStats> {
        match r {
            Reply::Stats(s) => Some(s),
            _ => None,
        }
    }
}

/// Leases granted (`crate::lease`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    pub shards: Vec<ShardId>,
    pub millis: u32,
    pub inval_seq: u64,
    /// Shards the answering node leads.
    pub leading: u32,
}

/// Asks for (or renews) leases.
#[derive(Clone, Copy, Debug)]
pub struct Lease;

impl From<Lease> for Request {
    fn from(_: Lease) -> Request {
        Request::Lease
    }
}

impl Call for Lease {
    type Reply = LeaseGrant;
    fn reply(r: Reply) -> Option<LeaseGrant> {
        match r {
            Reply::Lease {
                shards,
                millis,
                inval_seq,
                leading,
            } => Some(LeaseGrant {
                shards,
                millis,
                inval_seq,
                leading,
            }),
            _ => None,
        }
    }
}

/// What a mutation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutated {
    Done,
    /// The inode created, changed or (unlink, rename) left behind.
    Attr(Inode),
    /// A lock request conflicted with this lock.
    Conflict(LockRange),
}

/// A namespace change (`op_id` 0: the client numbers it).
#[derive(Clone, Debug)]
pub struct Mutate {
    pub op_id: u64,
    pub creds: Creds,
    pub op: Op,
    /// See `Request::Mutate`.
    pub early: bool,
}

impl From<Mutate> for Request {
    fn from(m: Mutate) -> Request {
        Request::Mutate {
            op_id: m.op_id,
            creds: m.creds,
            op: m.op,
            early: m.early,
        }
    }
}

impl Call for Mutate {
    type Reply = Mutated;
    fn reply(r: Reply) -> Option<Mutated> {
        match r {
            Reply::None => Some(Mutated::Done),
            Reply::Attr(i) => Some(Mutated::Attr(i)),
            Reply::Lock(Some(l)) => Some(Mutated::Conflict(l)),
            Reply::Lock(None) => Some(Mutated::Done),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_takes_only_its_reply() {
        let r: Request = GetAttr { ino: 5 }.into();
        assert!(matches!(r, Request::GetAttr { ino: 5 }));
        assert_eq!(
            ReadLink::reply(Reply::Data(b"t".to_vec())),
            Some(b"t".to_vec())
        );
        assert_eq!(ReadLink::reply(Reply::None), None);
        assert_eq!(Mutate::reply(Reply::None), Some(Mutated::Done));
        assert_eq!(GetLock::reply(Reply::Lock(None)), Some(None));
        assert!(StatFs::reply(Reply::Entries(vec![])).is_none());
    }
}

/// How one metadata request is named in the logs of the mount that sent
/// it and of the node that served it: the mount's client id and the
/// request's id on its session (`0123456789abcdef:42`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestTag {
    pub client: u64,
    pub id: u64,
}

impl RequestTag {
    pub fn new(client: u64, id: u64) -> Self {
        RequestTag { client, id }
    }
}

impl std::fmt::Display for RequestTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}:{}", self.client, self.id)
    }
}
