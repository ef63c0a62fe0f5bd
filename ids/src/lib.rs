//! The identifier and position newtypes every ClaudeFS crate shares, so a
//! shard number cannot be passed where a log position is meant (or an inode
//! number where a shard is).
//!
//! Both serialize as their bare integer (`serde(transparent)`): wire
//! formats and on-disk records are the same as when they were plain
//! integers.

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

use serde::{Deserialize, Serialize};

/// Which shard: one replicated log and the slice of the namespace it holds.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ShardId(pub u32);

impl ShardId {
    pub const fn new(n: u32) -> ShardId {
        ShardId(n)
    }

    pub const fn get(self) -> u32 {
        self.0
    }

    /// Big-endian bytes, as in keys that sort by shard.
    pub const fn to_be_bytes(self) -> [u8; 4] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A position in a shard's log: counts decided entries across all epochs.
/// Position `p` is the `p`-th entry (0-based); "applied up to `p`" means
/// every position below `p`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    pub const ZERO: Position = Position(0);
    pub const MAX: Position = Position(u64::MAX);

    pub const fn new(n: u64) -> Position {
        Position(n)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The position after this one.
    pub const fn next(self) -> Position {
        Position(self.0 + 1)
    }

    /// `n` entries earlier, or 0.
    pub const fn saturating_sub(self, n: u64) -> Position {
        Position(self.0.saturating_sub(n))
    }

    /// Entries from `earlier` up to this one, or 0 if `earlier` is later.
    pub const fn since(self, earlier: Position) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Add<u64> for Position {
    type Output = Position;
    fn add(self, n: u64) -> Position {
        Position(self.0 + n)
    }
}

impl AddAssign<u64> for Position {
    fn add_assign(&mut self, n: u64) {
        self.0 += n;
    }
}

/// Entries between two positions (`self` must not be below `earlier`).
impl Sub for Position {
    type Output = u64;
    fn sub(self, earlier: Position) -> u64 {
        self.0 - earlier.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_as_bare_integers() {
        let enc = |v: &dyn Erased| v.bytes();
        assert_eq!(enc(&Position(7)), enc(&7u64));
        assert_eq!(enc(&ShardId(9)), enc(&9u32));
    }

    #[test]
    fn arithmetic() {
        assert_eq!(Position(3) + 2, Position(5));
        assert_eq!(Position(5) - Position(3), 2);
        assert_eq!(Position(2).since(Position(5)), 0);
        assert_eq!(Position(0).saturating_sub(1), Position::ZERO);
        assert_eq!(ShardId(4).to_string(), "4");
    }

    trait Erased {
        fn bytes(&self) -> Vec<u8>;
    }
    impl<T: Serialize> Erased for T {
        fn bytes(&self) -> Vec<u8> {
            bincode::serialize(self).expect("serialize")
        }
    }
}
