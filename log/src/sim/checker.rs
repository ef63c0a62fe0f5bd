//! The global view every replica is checked against, and the reference
//! materializer digest.

use super::*;

pub(super) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub(super) const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A 64-bit finalizer (splitmix64), so digests of similar logs differ widely.
pub(super) fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The state of a materializer: a digest chained over every delivered entry
/// (order sensitive) and the position of the next entry it expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Materialized {
    pub digest: u64,
    pub next: Position,
}

impl Materialized {
    /// Before any entry.
    pub const EMPTY: Materialized = Materialized {
        digest: FNV_OFFSET,
        next: Position::ZERO,
    };

    /// Applies the entry at position `self.next`.
    pub fn apply(&mut self, entry: &Entry) {
        let mut h = self.digest;
        for b in entry.encode() {
            h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        self.digest = mix64(h ^ self.next.get());
        self.next += 1;
    }
}

/// The global view every replica is checked against: the decided log as
/// first delivered by any replica, and the reference materializer digest of
/// every prefix of it (the "full replay").
#[derive(Debug)]
pub struct Checker {
    pub(super) log: Vec<Entry>,
    /// `digests[p]` is the digest after applying `log[..p]`.
    pub(super) digests: Vec<u64>,
    /// Where each request was decided.
    pub(super) positions: BTreeMap<RequestId, Position>,
    /// `Duplicate(Some(p))` answers not yet verifiable (`p` not delivered).
    pub(super) claims: BTreeMap<Position, RequestId>,
}

impl Default for Checker {
    fn default() -> Self {
        Checker::new()
    }
}

impl Checker {
    pub fn new() -> Self {
        Checker {
            log: Vec::new(),
            digests: vec![Materialized::EMPTY.digest],
            positions: BTreeMap::new(),
            claims: BTreeMap::new(),
        }
    }

    /// Number of decided positions (all acknowledged).
    pub fn len(&self) -> Position {
        Position(self.log.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }

    pub fn entry(&self, pos: Position) -> Option<&Entry> {
        self.log.get(pos.get() as usize)
    }

    /// Where `req` was decided, if it was.
    pub fn position_of(&self, req: RequestId) -> Option<Position> {
        self.positions.get(&req).copied()
    }

    /// Node `node` delivered `entry` at `pos`.
    ///
    /// # Errors
    /// Agreement: another entry was delivered at `pos` before. Gap: `pos` is
    /// past the end of the global log (replicas deliver contiguously from a
    /// position someone already delivered, so the global log has no holes).
    /// Dedupe: the request was decided at another position, or contradicts
    /// a `Duplicate(Some(pos))` answer.
    pub fn decided(&mut self, node: NodeId, pos: Position, entry: &Entry) -> Result<(), String> {
        let len = self.len();
        if pos < len {
            let first = &self.log[pos.get() as usize];
            if first != entry {
                return Err(format!(
                    "agreement violated: node {node} delivered {entry:?} at position {pos}, \
                     but {first:?} was delivered there before"
                ));
            }
            return Ok(());
        }
        if pos > len {
            return Err(format!(
                "gap: node {node} delivered position {pos} but no replica has delivered {len}"
            ));
        }
        if !entry.request.is_none() {
            if let Some(p) = self.positions.insert(entry.request, pos) {
                return Err(format!(
                    "dedupe violated: request {:?} decided at positions {p} and {pos}",
                    entry.request
                ));
            }
        }
        if let Some(req) = self.claims.remove(&pos) {
            check_claim(node, pos, req, entry)?;
        }
        let mut m = Materialized {
            digest: self.digests[pos.get() as usize],
            next: pos,
        };
        m.apply(entry);
        self.log.push(entry.clone());
        self.digests.push(m.digest);
        Ok(())
    }

    /// Node `node` answered `Duplicate(Some(pos))` for `req`.
    pub fn claim(&mut self, node: NodeId, pos: Position, req: RequestId) -> Result<(), String> {
        match self.log.get(pos.get() as usize) {
            Some(e) => check_claim(node, pos, req, e),
            None => match self.claims.insert(pos, req) {
                Some(other) if other != req => Err(format!(
                    "dedupe violated: position {pos} claimed by requests {other:?} and {req:?}"
                )),
                _ => Ok(()),
            },
        }
    }

    /// A materializer state of node `node` (`what`: live or snapshot).
    ///
    /// # Errors
    /// If it differs from full replay of the global log up to `m.next`.
    pub fn materialized(&self, node: NodeId, what: &str, m: Materialized) -> Result<(), String> {
        match self.digests.get(m.next.get() as usize) {
            Some(d) if *d == m.digest => Ok(()),
            Some(d) => Err(format!(
                "replay mismatch: node {node} {what} materializer at {} has digest {:#018x}, \
                 full replay of the global log gives {d:#018x}",
                m.next, m.digest
            )),
            None => Err(format!(
                "node {node} {what} materializer is at {} past the global log end {}",
                m.next,
                self.len()
            )),
        }
    }
}

pub(super) fn check_claim(
    node: NodeId,
    pos: Position,
    req: RequestId,
    e: &Entry,
) -> Result<(), String> {
    if e.request == req {
        Ok(())
    } else {
        Err(format!(
            "dedupe violated: node {node} said {req:?} is decided at {pos}, which holds {:?}",
            e.request
        ))
    }
}
