//! A mount's hold on what it owns on a shard: its byte-range and flock
//! locks, and the files it still has open after their last name was
//! removed (orphans).
//!
//! Taking a lock or keeping an unlinked file open records a hold for the
//! mount on that shard, in the log, lasting [`HOLD`] from the entry's time.
//! The mount renews every hold it has every [`RENEW_EVERY`]
//! ([`crate::ops::Op::RenewHold`]). A node leading the shard looks for
//! lapsed holds every [`CHECK_EVERY`] and proposes
//! [`crate::ops::Op::ExpireHold`], which, applied, releases the mount's
//! locks and deletes its orphans if the hold has still not been renewed by
//! that entry's time. A mount that died (or was cut off for longer than
//! [`HOLD`]) thus loses its locks within `HOLD + CHECK_EVERY` plus one
//! commit; a mount that comes back after that learns it from ESTALE on its
//! next renewal.
//!
//! Times are the wall clocks of the nodes that received the entries: the
//! nodes' clocks must agree to well within `HOLD - RENEW_EVERY` (NTP keeps
//! them within milliseconds).

use std::time::Duration;

/// How long a hold lasts after its last renewal.
pub const HOLD: Duration = Duration::from_secs(20);
/// How often a mount renews its holds.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often a shard's leader looks for lapsed holds.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

const _: () = assert!(RENEW_EVERY.as_secs() * 3 < HOLD.as_secs());
