//! Leases on a client's cached metadata.
//!
//! A mount may answer `getattr` and `open` from its own cache, without a
//! round trip, while it holds a lease on the inode's shard. Leases are
//! granted by the node leading the shard after a linearizable read barrier
//! (so the grant is no older than the request), last [`LEASE`] from when
//! the client *sent* the request (measured on the client's monotonic
//! clock), and are renewed every [`RENEW_EVERY`].
//!
//! Recall: a change to the namespace is acknowledged to the client that
//! made it only after every other session holding a lease on that shard
//! has applied the invalidation it caused (or its lease has run out on the
//! server's clock, [`server_hold`]). A node that becomes leader of a shard
//! acknowledges nothing on it until [`server_hold`] has passed, so leases
//! granted by the previous leader have run out.
//!
//! Safety rests on one stated bound: the rates of two nodes' monotonic
//! clocks differ by less than [`CLOCK_RATE_MARGIN`] (NTP-disciplined
//! clocks drift well under 0.05 %). No clock offsets are compared.

use std::time::Duration;

/// How long a lease lasts, from when its request was sent. Short, because
/// it is also how long changes on a shard pause after its leader changes
/// (and how long a vanished mount's lease can hold changes back).
pub const LEASE: Duration = Duration::from_millis(1500);
/// How often a mount renews its leases.
pub const RENEW_EVERY: Duration = Duration::from_millis(400);
/// Bound on the relative rate difference of two nodes' monotonic clocks.
pub const CLOCK_RATE_MARGIN: f64 = 0.01;
/// Slack added on the server side for scheduling delays.
pub const SLACK: Duration = Duration::from_millis(100);

/// How long a server treats a lease as held after it received the
/// renewal: longer than the client can use it, whatever the clock rates.
pub fn server_hold() -> Duration {
    LEASE.mul_f64(1.0 + CLOCK_RATE_MARGIN) + SLACK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_holds_a_lease_longer_than_the_client_uses_it() {
        // In the server's clock units, a client whose clock runs slower
        // by the margin uses its lease for at most LEASE * (1 + margin).
        assert!(server_hold() > LEASE.mul_f64(1.0 + CLOCK_RATE_MARGIN));
        assert!(RENEW_EVERY * 2 < LEASE);
    }
}
